"""Client connections before any request: a cap on how many are open, and a deadline for the
request head.

Uvicorn bounds neither. A connection that sends nothing, or half a request head, is never timed
out (its keep-alive timer starts only after a response), so a thousand of them hold a thousand
file descriptors; past the open-file limit, accepting fails and real clients are reset. Here:

- a connection that has not completed its request head (a WebSocket upgrade request included)
  within `RELAY_HANDSHAKE_TIMEOUT_SECONDS` of connecting, or of starting its next request on a
  kept-alive connection, is closed;
- past `RELAY_MAX_CONNECTIONS` open connections (plain HTTP and WebSocket alike), a new one gets
  a canned 503 and is closed at once, before any parsing. Unset, the cap is derived from the
  open-file limit, leaving room for each connection's second descriptor (a session's upstream
  socket, a static file) and for Redis and the process's own.

This subclasses uvicorn's HTTP protocols (`HttpToolsProtocol`, `H11Protocol`: their callbacks,
`connections` and `transport`), which are internals: it is used only on the uvicorn minor version
the tests ran (`TESTED_UVICORN`); on any other, `connection_protocol` returns uvicorn's stock
protocol and warns once. `main.server_config` selects it; `uvicorn app.main:app` users select it
with `--http app.transport.connections:HttpProtocol` (read from the `RELAY_` environment,
as the app is).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.config import Settings, load_settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional to uvicorn; "auto" then means h11, as in uvicorn
    HttpToolsProtocol = None  # type: ignore[assignment, misc]

try:
    import resource
except ImportError:  # Windows: no open-file limit to read or raise
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# The uvicorn minor version whose protocol internals this module was tested against.
TESTED_UVICORN: Final = (0, 54)

# Descriptors kept out of the cap's reach: the process's own (listening socket, event loop,
# logs, ...), plus an eighth of the limit for Redis connections and other bursts.
_RESERVED_DESCRIPTORS: Final = 64
_RESERVED_FRACTION: Final = 8
# Each connection may hold a second descriptor: a session's upstream socket, a file being served.
_DESCRIPTORS_PER_CONNECTION: Final = 2
# At most one warning per this many seconds while the cap refuses connections.
_REFUSAL_WARNING_INTERVAL: Final = 60.0

_REFUSAL_BODY: Final = b"too many open connections\n"
_REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n" % len(_REFUSAL_BODY)
) + _REFUSAL_BODY

Implementation = Literal["auto", "httptools", "h11"]


def uvicorn_supported(version: str | None = None) -> bool:
    """Whether the running uvicorn (or `version`) is the minor version the tests ran."""
    parts = (version if version is not None else uvicorn.__version__).split(".")
    try:
        return (int(parts[0]), int(parts[1])) == TESTED_UVICORN
    except (IndexError, ValueError):
        return False


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE in force (None: no limit, or no way to read it)."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as servers commonly do at start-up.

    The soft limit is often 1,024 while the hard one is far higher; each session holds two
    descriptors. Logged when it changes, or when it cannot.
    """
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. macOS refuses RLIM_INFINITY
        logger.warning("open-file limit stays at %d: %s", soft, exc)
        return
    logger.info("open-file limit raised from %d to %d", soft, hard)


def derived_max_connections(open_files: int) -> int:
    """The connection cap for a soft open-file limit of `open_files`.

    A connection can hold two descriptors (its own and a session's upstream socket, or a served
    file); `_RESERVED_DESCRIPTORS` plus an eighth of the limit stay for the process itself,
    Redis and bursts. 1,024 descriptors give 416 connections.
    """
    reserved = _RESERVED_DESCRIPTORS + open_files // _RESERVED_FRACTION
    return max(1, (open_files - reserved) // _DESCRIPTORS_PER_CONNECTION)


@dataclass
class ConnectionGate:
    """One server's connection limits, and its bookkeeping of refusals (for the logs)."""

    handshake_timeout: float
    max_connections: int | None
    refused: int = 0
    _warned_at: float | None = field(default=None, repr=False)

    def refuse(self, now: float) -> None:
        """Count a refused connection; warn at most once per `_REFUSAL_WARNING_INTERVAL`."""
        self.refused += 1
        if self._warned_at is None or now - self._warned_at >= _REFUSAL_WARNING_INTERVAL:
            self._warned_at = now
            logger.warning(
                "%d open connections (RELAY_MAX_CONNECTIONS): refusing new ones; %d refused so far",
                self.max_connections,
                self.refused,
            )


def connection_gate(settings: Settings) -> ConnectionGate:
    """The limits from `settings`: the cap given, or derived from the open-file limit."""
    cap = settings.max_connections
    if cap is not None:
        logger.info("at most %d open connections (RELAY_MAX_CONNECTIONS)", cap)
    else:
        open_files = open_file_limit()
        if open_files is None:
            logger.info("no open-file limit: open connections are not capped")
        else:
            cap = derived_max_connections(open_files)
            logger.info(
                "at most %d open connections (derived from the open-file limit, %d)",
                cap,
                open_files,
            )
    return ConnectionGate(settings.handshake_timeout_seconds, cap)


class _Admission(asyncio.Protocol):
    """What the two HTTP protocols share: the cap at `connection_made` and the head deadline.

    The subclass arms the deadline when a request starts (`_await_head`) and disarms it when
    the request head is complete (`_head_received`); uvicorn's keep-alive timer covers the
    idle time between requests.
    """

    gate: ClassVar[ConnectionGate]
    connections: Any  # uvicorn's `server_state.connections`: every open HTTP and WebSocket
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any  # the request being answered, if any
    _refused: bool = False
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cap = self.gate.max_connections
        if cap is not None and len(self.connections) >= cap:
            self._refused = True  # never added to `connections`, never parsed
            self.gate.refuse(self.loop.time())
            # Best effort: if the client's request is already in our socket buffer, the close
            # is a reset and the client may see that instead of the 503. Either way, at once.
            cast(asyncio.Transport, transport).write(_REFUSAL)  # uvloop's are not subclasses
            transport.close()
            return
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # bytes that raced the close
            super().data_received(data)

    def _await_head(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(
                self.gate.handshake_timeout, self._head_timed_out
            )

    def _head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # HTTP pipelining: uvicorn stops reading while it answers an earlier request, so
            # the rest of this head may be waiting in the socket. Look again later.
            self._await_head()
            return
        if not self.transport.is_closing():
            # No response: like nginx's client_header_timeout, the connection is just closed.
            logger.debug("no request head within %.1f s: closing", self.gate.handshake_timeout)
            self.transport.close()


class _H11Admission(_Admission, H11Protocol):
    """h11's protocol with the cap and the head deadline."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._refused or self.transport.get_protocol() is not self:  # upgraded, or refused
            return
        # h11 reports a request only once its head is complete; until then the client is IDLE.
        if self.conn.their_state is h11.IDLE:
            self._await_head()
        else:
            self._head_received()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._head_received()
        super().handle_websocket_upgrade(event)


if HttpToolsProtocol is not None:

    class _HttpToolsAdmission(_Admission, HttpToolsProtocol):
        """httptools' protocol with the cap and the head deadline."""

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_head()  # the first byte of a request (kept-alive ones included)

        def on_headers_complete(self) -> None:
            self._head_received()
            super().on_headers_complete()


def _base(implementation: Implementation) -> type[_Admission]:
    if implementation == "h11" or (implementation == "auto" and HttpToolsProtocol is None):
        return _H11Admission
    if HttpToolsProtocol is None:
        raise ValueError("the httptools HTTP protocol needs httptools installed")
    return _HttpToolsAdmission


@functools.cache
def _warn_unsupported() -> None:
    logger.warning(
        "uvicorn %s is not the version %s this relay was tested on: no connection cap or "
        "handshake timeout (uvicorn's stock HTTP protocol)",
        uvicorn.__version__,
        ".".join(map(str, TESTED_UVICORN)),
    )


def connection_protocol(
    settings: Settings, implementation: Implementation = "auto"
) -> type[asyncio.Protocol] | str:
    """The `http=` for uvicorn's config: its HTTP protocol with the settings' limits.

    `implementation` picks the parser as uvicorn's `http=` does ("auto": httptools if installed,
    else h11). On an untested uvicorn, the stock protocol of that name, with one warning.
    """
    if not uvicorn_supported():
        _warn_unsupported()
        return implementation
    base = _base(implementation)
    gate = connection_gate(settings)
    # A class per server: uvicorn builds protocols from a class, and its limits are the server's.
    return type(base.__name__.lstrip("_"), (base,), {"gate": gate})


@functools.cache
def _from_environment() -> type[asyncio.Protocol]:
    raise_open_file_limit()
    protocol = connection_protocol(load_settings())
    if isinstance(protocol, str):  # untested uvicorn: its own class, as `http="auto"` would
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        return AutoHTTPProtocol
    return protocol


def __getattr__(name: str) -> Any:
    """`HttpProtocol`, for `uvicorn app.main:app --http app.transport.connections:HttpProtocol`:
    built on first access from the `RELAY_` environment (as `app.main.app` is), so importing
    this module reads no environment."""
    if name == "HttpProtocol":
        return _from_environment()
    raise AttributeError(name)
