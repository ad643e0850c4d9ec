"""MCP tools as the model sees them: function tools with names of their own, and their outputs.

The relay keeps MCP off the model's side (REALTIME.md §18.4): each tool an MCP server lists is
declared as a GA `function` tool whose `parameters` are the tool's input schema, and the relay
runs its calls with `tools/call`.

Names. OpenAI accepts function names matching `^[A-Za-z0-9_-]{1,64}$`, unique in a session, while
MCP tool names are free text and two servers may both have a `search`. A tool is therefore
injected as `{label}__{tool}` with any other character replaced by `_`; a name too long, or taken
already, ends in a short hash of the label and the remote name instead, so the same
configuration yields the same names.

Outputs. The content blocks of a result, joined by newlines: text as it is, other blocks
(images, audio, binary resources) named, not passed on. A result with structured content only
gives it as compact JSON; when both are there the text is preferred, since the spec has servers
put the same data in a text block and that text is what the tool's author meant a reader to see
(the SDK's server turns a returned string into `{"result": "..."}` and the string). A result
flagged `isError` becomes an `{"error": ...}` output with the server's text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, Final

import mcp_types
from mcp.shared.exceptions import MCPError

from app.codes import ToolOutcome
from app.tools.calls import TIMED_OUT, UNAVAILABLE, ToolResult, compact_json, failure
from app.tools.mcp_servers import McpServer, McpUnavailableError

MAX_NAME: Final = 64  # OpenAI's limit on a function name
SEPARATOR: Final = "__"
MAX_SERVER_MESSAGE: Final = 500  # characters of an MCP error message passed to the model
_INVALID: Final = re.compile(r"[^A-Za-z0-9_-]")
_HASH_CHARS: Final = 8


def tool_name(label: str, tool: str, taken: Container[str] = ()) -> str:
    """The name the model sees for the tool `tool` of the MCP server `label`.

    Args:
        label: the server's label in RELAY_MCP_SERVERS.
        tool: the tool's name on that server.
        taken: names given already (other tools'); the result is none of them.
    """
    name = _INVALID.sub("_", f"{label}{SEPARATOR}{tool}")
    if len(name) <= MAX_NAME and name not in taken:
        return name
    digest = hashlib.sha256(f"{label}\0{tool}".encode()).hexdigest()
    # Another 8 hex digits from the same digest on the rare collision of the first ones.
    for start in range(len(digest) - _HASH_CHARS + 1):
        suffix = "_" + digest[start : start + _HASH_CHARS]
        candidate = name[: MAX_NAME - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
    raise ValueError("no free name for an MCP tool")  # 57 collisions in a row: not in practice


@dataclass(frozen=True, slots=True)
class McpTool:
    """An MCP server's tool under the name the model sees."""

    name: str
    server: McpServer
    remote: mcp_types.Tool

    def definition(self) -> dict[str, Any]:
        """The GA function tool the model is given."""
        description = self.remote.description or self.remote.title or ""
        return {
            "type": "function",
            "name": self.name,
            "description": description,
            "parameters": self.remote.input_schema,
        }

    async def run(self, arguments: dict[str, Any]) -> ToolResult:
        """Call the tool; never raises but CancelledError."""
        try:
            result = await self.server.call(self.remote.name, arguments)
        except TimeoutError:
            return TIMED_OUT
        except McpUnavailableError:
            return UNAVAILABLE
        except MCPError as exc:
            message = exc.message[:MAX_SERVER_MESSAGE]
            return failure(ToolOutcome.ERROR, f"the tool failed: {message}")
        return output(result)


def output(result: mcp_types.CallToolResult) -> ToolResult:
    """The model's output for a `tools/call` result."""
    text = "\n".join(_block_text(block) for block in result.content)
    if result.is_error:
        return failure(ToolOutcome.ERROR, text or "the tool failed")
    if not result.content and result.structured_content is not None:
        return ToolResult(compact_json(result.structured_content), ToolOutcome.OK)
    return ToolResult(text, ToolOutcome.OK)


def _block_text(block: mcp_types.ContentBlock) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, mcp_types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, mcp_types.TextResourceContents):
            return resource.text
        return f"[binary resource {resource.uri}]"
    if isinstance(block, mcp_types.ResourceLink):
        return f"[resource {block.uri}]"
    return f"[{block.type} content, {block.mime_type}]"  # image, audio: the model cannot see them
