"""The relay as a client of MCP servers (RELAY_MCP_SERVERS): one connection kept per server.

Each server gets a task of its own (`McpServer.start`) that connects over streamable HTTP with
the official SDK, lists the server's tools (those `allowed_tools` names, when set), and holds the
connection open for the calls of every session. The task owns the connection because the SDK's
connection lives in an anyio task group: a failing transport cancels the task that opened it,
which must not be the app's lifespan nor a session's.

A server that cannot be reached is tried again, after 1 s and then twice as long each time up to
a minute; until it first answers, its tools are simply absent (`tools` is empty), and once it
has, its last listing stays while it is away (calls then give "unavailable"). A connection that is
lost (the server restarted, or forgot the session) is reopened at once. A call the server turned
away because it no longer had the session was never run, so it is sent once more on the new
connection; a call cut off mid-way is not, since the tool may have run.

Headers are credentials: they go on the HTTP client only. Log lines name the server's label and
the exception's type, never a header, a URL or a message from the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx2
import mcp_types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from app.config import McpServerSettings

logger = logging.getLogger(__name__)

RETRY_FIRST_SECONDS: Final = 1.0
RETRY_MAX_SECONDS: Final = 60.0
CLOSE_SECONDS: Final = 5.0  # ending a session politely (an HTTP DELETE) before it is cut
MAX_PAGES: Final = 20  # tools/list pages read: a listing that never ends cannot hang start-up
# The SDK's read timeout for the transport's streams, which a server may hold open; each call
# has its own deadline (the server's `timeout_seconds`).
STREAM_READ_SECONDS: Final = 300.0
CLIENT_INFO: Final = mcp_types.Implementation(name="realtime-relay", version="0.1.0")
SESSION_HEADER: Final = "mcp-session-id"  # MCP streamable HTTP, 2025-06-18 "Session Management"


class McpUnavailableError(Exception):
    """The server is not connected, or its connection was lost during the call."""


class _SessionEndedError(McpUnavailableError):
    """The server turned the call away: its session had ended, so the call never ran."""


class _SessionWatch:
    """An httpx2 response hook: notes a 404 to a request that carried a session id.

    The MCP transport spec has a client start a new session when a request with an
    `Mcp-Session-Id` gets 404: the server no longer has the session and did not process the
    request. The SDK reports it as an ordinary error whose message varies with the server, so
    the status is read here, on the HTTP client the relay hands the SDK.
    """

    def __init__(self) -> None:
        self.session_ended = False

    async def __call__(self, response: httpx2.Response) -> None:
        if response.status_code == 404 and SESSION_HEADER in response.request.headers:
            self.session_ended = True


@dataclass(frozen=True, slots=True)
class _Live:
    """An open connection, the event that asks its task to drop it, and its session watch."""

    client: Client
    lost: asyncio.Event
    watch: _SessionWatch


class McpServer:
    """One MCP server: its connection, the tools it listed, and calls to them.

    Args:
        label: the server's label in RELAY_MCP_SERVERS.
        settings: its settings.
        on_listed: called with the server each time its tools are listed anew.
    """

    def __init__(
        self,
        label: str,
        settings: McpServerSettings,
        on_listed: Callable[[McpServer], None] = lambda server: None,
    ) -> None:
        self.label = label
        self.timeout = settings.timeout_seconds
        self._settings = settings
        self._on_listed = on_listed
        self.tools: tuple[mcp_types.Tool, ...] = ()  # the last listing, allowed tools only
        self._live: _Live | None = None
        self._changed = asyncio.Event()  # set, and replaced, whenever `_live` changes
        self._tried = asyncio.Event()  # the first try to connect has ended
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the task that connects and keeps the connection open."""
        if self._task is None:
            self._task = asyncio.create_task(self._keep_connected(), name=f"mcp {self.label}")

    async def first_attempt(self) -> bool:
        """Wait for the first try to connect to end, within the timeout; whether it listed tools.

        A try is bounded by the timeout already; the bound here also covers a server that
        accepts the connection and never answers.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout + 1.0):
                await self._tried.wait()
        return self._live is not None

    async def aclose(self) -> None:
        """Close the connection (politely if it can within `CLOSE_SECONDS`) and stop the task."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        if self._live is not None:
            self._live.lost.set()  # the task leaves its connection's context and returns
        else:
            task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CLOSE_SECONDS)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_SECONDS)

    async def call(self, name: str, arguments: dict[str, Any]) -> mcp_types.CallToolResult:
        """Call the tool `name` (its name on the server) within the server's timeout.

        Raises:
            McpUnavailableError: not connected, or the connection was lost.
            TimeoutError: no answer within the timeout.
            MCPError: the server refused the call (unknown tool, invalid parameters, ...).
        """
        deadline = asyncio.get_running_loop().time() + self.timeout
        live = self._live
        if live is None:
            raise McpUnavailableError
        try:
            return await self._call(live, name, arguments, deadline)
        except _SessionEndedError:
            pass  # the call never ran: send it once more, on a new connection
        try:
            async with asyncio.timeout_at(deadline):
                live = await self._reconnected(live)
        except TimeoutError:
            raise McpUnavailableError from None
        return await self._call(live, name, arguments, deadline)

    async def _call(
        self, live: _Live, name: str, arguments: dict[str, Any], deadline: float
    ) -> mcp_types.CallToolResult:
        """One attempt; `_SessionEndedError` when the server turned it away unrun."""
        try:
            async with asyncio.timeout_at(deadline):
                return await live.client.call_tool(
                    name, arguments, read_timeout_seconds=self.timeout
                )
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise TimeoutError from None
            if exc.code == mcp_types.CONNECTION_CLOSED:
                live.lost.set()  # cut off mid-way: the tool may have run, so no second try
                raise McpUnavailableError from None
            if live.watch.session_ended:
                live.lost.set()
                raise _SessionEndedError from None
            raise

    async def _reconnected(self, stale: _Live) -> _Live:
        """Wait for a connection other than `stale`."""
        while (live := self._live) is None or live is stale:
            await self._changed.wait()
        return live

    def _set_live(self, live: _Live | None) -> None:
        self._live = live
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _keep_connected(self) -> None:
        delay = RETRY_FIRST_SECONDS
        failures = 0
        while not self._stopping:
            reason = "closed"
            try:
                await self._connect_and_hold()
            except Exception as exc:  # whatever ended the try or the connection: log, go on
                reason = _reason(exc)
            finally:
                self._tried.set()
                held = self._live is not None
                self._set_live(None)
            if self._stopping:
                break
            if held:  # a connection that worked: reopen it at once, a call may be waiting
                logger.warning("MCP server %r: connection lost (%s)", self.label, reason)
                failures, delay = 0, RETRY_FIRST_SECONDS
                continue
            failures += 1
            # The first failure of a series is worth a warning, the rest a debug line.
            logger.log(
                logging.WARNING if failures == 1 else logging.DEBUG,
                "MCP server %r unreachable (%s); %d of its tools offered, next try in %.0f s",
                self.label,
                reason,
                len(self.tools),
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _connect_and_hold(self) -> None:
        """Connect, list the tools, and hold the connection until it is lost or closed."""
        headers = {key: value.get_secret_value() for key, value in self._settings.headers.items()}
        timeout = httpx2.Timeout(self.timeout, read=STREAM_READ_SECONDS)
        watch = _SessionWatch()
        hooks: dict[str, list[Callable[..., Any]]] = {"response": [watch]}
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(self.timeout):
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks=hooks)
                )
                client = await stack.enter_async_context(
                    Client(
                        streamable_http_client(self._settings.url, http_client=http),
                        read_timeout_seconds=self.timeout,
                        client_info=CLIENT_INFO,
                        cache=None,
                    )
                )
                tools = await self._list(client)
            self.tools = tools
            lost = asyncio.Event()
            self._set_live(_Live(client, lost, watch))
            self._tried.set()
            logger.info("MCP server %r: %d tools", self.label, len(tools))
            self._on_listed(self)
            await lost.wait()

    async def _list(self, client: Client) -> tuple[mcp_types.Tool, ...]:
        allowed = self._settings.allowed_tools
        tools: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(tool for tool in page.tools if allowed is None or tool.name in allowed)
            cursor = page.next_cursor
            if cursor is None:
                break
        return tuple(tools)


def _reason(exc: BaseException) -> str:
    """A short, secret-free account of a connection failure: exception types and codes only."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"MCP error {exc.code}"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__
