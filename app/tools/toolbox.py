"""The `Toolbox`: every server tool of an app, the definitions each tier gets, and their calls.

Built once per app from `Settings` and `RelayMetrics`. `start()` at start-up opens what needs
opening: the HTTP client the HTTP tools share, and a connection to each MCP server that
RELAY_TOOLS names. Start-up waits for each server's first try to connect and list its tools,
within the server's timeout: a server that cannot be reached then is logged and left out (its
tools are absent) and is tried again in the background, so its tools appear once it answers
(`mcp_servers.py`). `aclose()` closes everything, each part within a bound.

`run()` never raises (but CancelledError): a bad call, a failing tool, a timeout each give the
model an output it can read, and every call is counted in `realtime_relay_tool_calls_total`
under the name the model used and its `ToolOutcome`, then logged with its duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import httpx2

from app.codes import ToolOutcome
from app.config import Settings, TierSettings
from app.metrics import RelayMetrics
from app.tools.calls import (
    INVALID_ARGUMENTS,
    UNAVAILABLE,
    ToolCall,
    ToolContext,
    ToolResult,
    capped,
    failure,
    parse_arguments,
)
from app.tools.http_tools import HttpTool
from app.tools.mcp_servers import McpServer
from app.tools.mcp_tools import McpTool, tool_name

logger = logging.getLogger(__name__)

CLOSE_SECONDS: Final = 5.0


class Toolbox:
    """The server tools of one app.

    Args:
        settings: the app's settings: RELAY_TOOLS, RELAY_MCP_SERVERS, the tiers' `tools` and
            RELAY_TOOL_MAX_OUTPUT_CHARS.
        metrics: where calls are counted; MCP tools get their series once listed.
    """

    def __init__(self, settings: Settings, metrics: RelayMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._http_tools = {
            tool.name: HttpTool(tool, settings.tool_max_output_chars)
            for tool in settings.tools
            if tool.http is not None and tool.name is not None
        }
        labels = dict.fromkeys(tool.mcp for tool in settings.tools if tool.mcp is not None)
        self._servers = {
            label: McpServer(label, settings.mcp_servers[label], self._listed) for label in labels
        }
        self._mcp_tools: dict[str, McpTool] = {}  # the name the model sees -> the tool
        self._client: httpx2.AsyncClient | None = None

    async def start(self) -> None:
        """Open the HTTP client and connect to the MCP servers; never hangs, never raises.

        Returns once every server has listed its tools or failed its first try (within its
        timeout); the ones that failed are logged and retried in the background.
        """
        if self._client is not None:
            return
        # Redirects are not followed: the tools' headers are for the configured URL only.
        self._client = httpx2.AsyncClient(follow_redirects=False)
        servers = self._servers.values()
        for server in servers:
            server.start()
        connected = sum(await asyncio.gather(*(server.first_attempt() for server in servers)))
        logger.info(
            "server tools: %d HTTP, %d MCP from %d of %d MCP servers",
            len(self._http_tools),
            len(self._mcp_tools),
            connected,
            len(self._servers),
        )

    async def aclose(self) -> None:
        """Close the MCP connections and the HTTP client, each within a bound."""
        await asyncio.gather(*(server.aclose() for server in self._servers.values()))
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_SECONDS):
                    await client.aclose()

    def definitions(self, tier: TierSettings) -> list[dict[str, Any]]:
        """The GA function tools of the server tools `tier` gets, to inject into its sessions."""
        wanted = None if tier.tools is None else frozenset(tier.tools)
        tools: list[dict[str, Any]] = [
            tool.definition()
            for name, tool in self._http_tools.items()
            if wanted is None or name in wanted
        ]
        tools.extend(
            tool.definition()
            for tool in self._mcp_tools.values()
            if wanted is None or tool.server.label in wanted
        )
        return tools

    def names(self, tier: TierSettings) -> frozenset[str]:
        """The names of the server tools `tier` gets: the calls the relay runs, not the client."""
        return frozenset(tool["name"] for tool in self.definitions(tier))

    async def run(self, call: ToolCall, context: ToolContext) -> str:
        """Run `call` for a session of `context.tier` and return the output for the model.

        Never raises but CancelledError. The output is at most RELAY_TOOL_MAX_OUTPUT_CHARS long:
        a longer one is cut and says so (outcome `truncated`).
        """
        started = time.perf_counter()
        result = capped(await self._run(call, context), self._settings.tool_max_output_chars)
        seconds = time.perf_counter() - started
        self._metrics.tool_call(call.name, result.outcome, seconds)
        known = call.name in self._http_tools or call.name in self._mcp_tools
        level = logging.DEBUG if result.outcome is ToolOutcome.OK else logging.INFO
        logger.log(
            level,
            "tool %s: %s in %.3f s",
            call.name if known else "(unknown)",
            result.outcome.value,
            seconds,
        )
        return result.output

    async def _run(self, call: ToolCall, context: ToolContext) -> ToolResult:
        tier = self._settings.tiers.get(context.tier)
        if tier is None or call.name not in self.names(tier):
            return UNAVAILABLE
        arguments = parse_arguments(call.arguments)
        if arguments is None:
            return INVALID_ARGUMENTS
        try:
            http_tool = self._http_tools.get(call.name)
            if http_tool is not None:
                if self._client is None:  # not started, or closed
                    return UNAVAILABLE
                return await http_tool.run(self._client, arguments, call, context)
            return await self._mcp_tools[call.name].run(arguments)
        except Exception as exc:  # a bug of ours or a library's: the model still gets an answer
            # Its type only: a library's message may carry a URL with a token in it.
            logger.error("tool %s: unexpected failure (%s)", call.name, type(exc).__name__)
            return failure(ToolOutcome.ERROR, "the tool failed")

    def _listed(self, server: McpServer) -> None:
        """Name the MCP servers' tools anew after `server` listed its tools."""
        taken = set(self._http_tools)
        tools: dict[str, McpTool] = {}
        for each in self._servers.values():  # in configuration order: the same names each time
            for remote in each.tools:
                name = tool_name(each.label, remote.name, taken)
                taken.add(name)
                tools[name] = McpTool(name, each, remote)
        self._mcp_tools = tools
        self._metrics.known_tools(tools)
