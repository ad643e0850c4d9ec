"""Server tools: the tools the relay injects into the model's session and runs itself.

The relay builds one `Toolbox` per app (`Toolbox(settings, metrics)`), starts it at start-up and
closes it at shutdown. Per session it asks for the tier's `definitions` (to inject) and `names`
(the calls to keep from the client), and hands each call of those tools to `run`, which always
returns an output for the model.

- `calls`: `ToolCall`, `ToolContext`, results and the outputs of failures;
- `http_tools`: tools run by an HTTP request to the application (RELAY_TOOLS `http`);
- `mcp_servers`: a connection kept to each MCP server (RELAY_MCP_SERVERS);
- `mcp_tools`: MCP tools as function tools: their names, definitions and outputs;
- `toolbox`: the `Toolbox`.
"""

from app.tools.calls import ToolCall, ToolContext
from app.tools.toolbox import Toolbox

__all__ = ["ToolCall", "ToolContext", "Toolbox"]
