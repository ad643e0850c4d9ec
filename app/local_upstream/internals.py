"""Library internals the local upstream needs, in one place, used only on the versions tested.

Two libraries do not offer what the local upstream's WebRTC calls need through public APIs:

- websockets parses every request as a WebSocket handshake and aborts a `POST` before any hook
  runs, but OpenAI serves calls over HTTP beside the WebSocket (REALTIME.md §15.1), and a relay
  derives one URL from the other. `side_door` subclasses websockets' `ServerConnection` (its
  `data_received`, `eof_received`, `handshake` and `connection_lost_waiter`): a connection
  whose first bytes are not `GET ` goes to an HTTP handler (`http.RequestReader`) instead, and a
  `GET` goes to websockets untouched.
- aioice gathers host candidates on every interface except loopback (`get_host_addresses`),
  and offers no setting for it. This workplace allows loopback traffic only, so
  `use_ice_addresses` replaces that one function: candidates on the addresses given
  (`LocalUpstreamConfig.ice_addresses`, 127.0.0.1 by default). The replacement is global to the
  process, so a test's aiortc caller gathers on the same addresses; the relay does not use aioice.

Both are used only when the installed release is one the suite ran (`TESTED_WEBSOCKETS`,
`TESTED_AIOICE`; `scripts/test-versions.sh` runs the oldest and newest websockets). On any other
the local upstream says so once and does without: no HTTP on its port (so no calls), or aioice's
own choice of interfaces.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aioice.ice
from websockets.asyncio.server import ServerConnection

from app.local_upstream.http import HttpRequest, HttpResponse, RequestReader, error_response

logger = logging.getLogger(__name__)

TESTED_WEBSOCKETS: Final = frozenset({"14.1", "15.0.1", "17.4"})
TESTED_AIOICE: Final = frozenset({"0.13.0"})
AUTO: Final = "auto"  # in ICE addresses: aioice's own choice of interfaces
LINGER_S: Final = 2.0  # after a response, how long to drop what the client still sends

HttpApp = Callable[[HttpRequest], Awaitable[HttpResponse]]


def _tested(distribution: str, versions: frozenset[str]) -> bool:
    version = importlib.metadata.version(distribution)
    if version in versions:
        return True
    logger.warning(
        "local upstream: %s %s is not a release the test suite ran (%s)",
        distribution,
        version,
        ", ".join(sorted(versions)),
    )
    return False


@functools.cache
def side_door_enabled() -> bool:
    """Whether `side_door` may run: websockets is a release the suite ran (warns once if not)."""
    return _tested("websockets", TESTED_WEBSOCKETS)


@functools.cache
def ice_patch_enabled() -> bool:
    """Whether `use_ice_addresses` may run: aioice is a release the suite ran (warns once)."""
    return _tested("aioice", TESTED_AIOICE)


class _SideDoorConnection(ServerConnection):
    """A websockets server connection that hands plain HTTP requests to `_respond`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sniffed = bytearray()
        self._websocket = False
        self._reader: RequestReader | None = None
        self._peer_done: asyncio.Future[None] = self.loop.create_future()  # its end of stream
        # None: a WebSocket handshake, or a connection that ended before a request.
        self._outcome: asyncio.Future[HttpRequest | HttpResponse | None] = self.loop.create_future()

    async def _respond(self, request: HttpRequest) -> HttpResponse:
        raise NotImplementedError

    def _decide(self, outcome: HttpRequest | HttpResponse | None) -> None:
        if not self._outcome.done():
            self._outcome.set_result(outcome)

    def data_received(self, data: bytes) -> None:
        if self._websocket:
            super().data_received(data)
            return
        if self._reader is None:
            self._sniffed += data
            start = bytes(self._sniffed[:4])
            if len(start) < 4 and b"GET ".startswith(start):
                return
            data, self._sniffed = bytes(self._sniffed), bytearray()
            if start == b"GET ":
                self._websocket = True
                self._decide(None)
                super().data_received(data)
                return
            self._reader = RequestReader()
        write, outcome = self._reader.receive(data)
        if write:
            self.transport.write(write)
        if outcome is not None:
            self._decide(outcome)

    # asyncio lets `eof_received` return True to keep writing; websockets' annotation says None.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._websocket:
            super().eof_received()
            return None
        self._decide(None)  # no-op after a complete request; else the client gave up
        if not self._peer_done.done():
            self._peer_done.set_result(None)
        return True  # the response may still have to go out: `handshake` closes

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        # Runs inside the server's `open_timeout` (10 s), which so bounds reading a request and
        # answering it. The protocol stays CONNECTING, so the server then just drops the
        # connection, already closed here, and logs nothing.
        waits: list[asyncio.Future[Any]] = [self._outcome, self.connection_lost_waiter]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self._websocket:
            await super().handshake(*args, **kwargs)
            return
        outcome = self._outcome.result() if self._outcome.done() else None
        response = outcome if isinstance(outcome, HttpResponse) else None
        if isinstance(outcome, HttpRequest):
            try:
                response = await self._respond(outcome)
            except Exception:
                logger.exception("local upstream: %s %s failed", outcome.method, outcome.target)
                response = error_response(500, "The local upstream failed on this request.")
        if response is not None and not self.transport.is_closing():
            self.transport.write(response.encode())
            # A lingering close (RFC 9112 §9.6): send our end of stream, then read and drop
            # what the client still sends (an oversized body) until it closes, for a moment.
            # Closing with its data unread would reset the connection, and the client could
            # lose the response.
            if self.transport.can_write_eof():
                self.transport.write_eof()
            ends: list[asyncio.Future[Any]] = [self._peer_done, self.connection_lost_waiter]
            await asyncio.wait(ends, timeout=LINGER_S, return_when=asyncio.FIRST_COMPLETED)
        self.transport.close()  # flushes what was written first
        await asyncio.shield(self.connection_lost_waiter)


def side_door(app: HttpApp) -> type[ServerConnection]:
    """A `ServerConnection` class for `serve(create_connection=...)` that serves plain HTTP
    requests with `app` and WebSocket handshakes as usual."""

    class SideDoorConnection(_SideDoorConnection):
        async def _respond(self, request: HttpRequest) -> HttpResponse:
            return await app(request)

    return SideDoorConnection


_stock_host_addresses = aioice.ice.get_host_addresses
_addresses: list[str] | None = None


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if _addresses is None:
        return _stock_host_addresses(use_ipv4, use_ipv6)
    found: list[str] = []
    for address in _addresses:  # "auto": aioice's own choice, every interface but loopback
        if address == AUTO:
            found += _stock_host_addresses(use_ipv4, use_ipv6)
        elif use_ipv6 if ":" in address else use_ipv4:
            found.append(address)
    return list(dict.fromkeys(found))


def use_ice_addresses(addresses: list[str] | None) -> None:
    """Gather ICE host candidates on `addresses` from now on, in the whole process (`None`, or
    the entry `"auto"`: aioice's own choice). The last call wins."""
    global _addresses
    if addresses is None:
        _addresses = None  # the replacement, if in place, defers to aioice's own again
        return
    if ice_patch_enabled():
        _addresses = list(addresses)
        aioice.ice.get_host_addresses = _host_addresses
