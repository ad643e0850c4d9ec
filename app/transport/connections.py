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

This module holds the limits and their bookkeeping. Enforcing them subclasses uvicorn's HTTP
protocols, which are internals: that is `fast.connection_protocol`, used only on the library
versions the tests ran; on any other, uvicorn's stock protocol serves, with neither bound.
`main.server_config` selects it; `uvicorn app.main:app` users select it with `--http
app.transport.fast:HttpProtocol` (read from the `RELAY_` environment, as the app is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from app.config import Settings

try:
    import resource
except ImportError:  # Windows: no open-file limit to read or raise
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Descriptors kept out of the cap's reach: the process's own (listening socket, event loop,
# logs, ...), plus an eighth of the limit for Redis connections and other bursts.
_RESERVED_DESCRIPTORS: Final = 64
_RESERVED_FRACTION: Final = 8
# Each connection may hold a second descriptor: a session's upstream socket, a file being served.
_DESCRIPTORS_PER_CONNECTION: Final = 2
# At most one warning per this many seconds while the cap refuses connections.
_REFUSAL_WARNING_INTERVAL: Final = 60.0

_REFUSAL_BODY: Final = b"too many open connections\n"
# What a connection past the cap gets, before it is closed.
REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n" % len(_REFUSAL_BODY)
) + _REFUSAL_BODY


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
