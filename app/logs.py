"""Logging setup, in one place: plain text or one JSON object per line.

Every session logs through a `LoggerAdapter` that adds its id and tier; the JSON formatter puts
them in fields of their own. Log lines carry event types, sizes, codes and durations only.

`guard_wire_logs` keeps credentials and payloads out at any level: websockets logs every
handshake header (`Authorization`, the `openai-insecure-api-key.` subprotocol) and every frame
at DEBUG, through the logger its caller gives it (uvicorn gives `uvicorn.error`), and uvicorn's
TRACE message log prints each WebSocket scope's subprotocols.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Final

import websockets
from uvicorn.logging import TRACE_LOG_LEVEL

_SESSION_FIELDS = ("session", "tier")

_WEBSOCKETS_DIR: Final = os.path.dirname(websockets.__file__) + os.sep
# Loggers that websockets' protocols write to: uvicorn's (its WebSocket protocols pass it) and
# websockets' own defaults. A filter on a logger sees the records logged through it, whoever
# configures handlers later (uvicorn's CLI, dictConfig, an embedding app).
_WIRE_LOGGERS: Final = ("uvicorn.error", "websockets.server", "websockets.client")
# Uvicorn's ASGI message log (TRACE), whose scopes list the client's subprotocols.
_ASGI_LOGGER: Final = "uvicorn.asgi"
_REDACTED: Final = "<...>"


class _WireFilter(logging.Filter):
    """Drops records below INFO logged from inside the websockets package: handshake headers,
    frames. websockets' INFO lines ("connection open"...) and the caller's own lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or not record.pathname.startswith(_WEBSOCKETS_DIR)


class _ScopeFilter(logging.Filter):
    """Redacts the `subprotocols` of the scopes uvicorn's TRACE message log prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, Mapping) and "subprotocols" in arg for arg in record.args
        ):
            record.args = tuple(
                {**arg, "subprotocols": _REDACTED}
                if isinstance(arg, Mapping) and "subprotocols" in arg
                else arg
                for arg in record.args
            )
        return True


_WIRE_FILTER: Final = _WireFilter()
_SCOPE_FILTER: Final = _ScopeFilter()


def guard_wire_logs() -> None:
    """Keep client credentials and payloads out of the logs, whatever the level. Idempotent."""
    for name in _WIRE_LOGGERS:
        logging.getLogger(name).addFilter(_WIRE_FILTER)  # addFilter adds a filter once
    logging.getLogger(_ASGI_LOGGER).addFilter(_SCOPE_FILTER)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and session fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _SESSION_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        session = getattr(record, "session", None)
        if session is not None:
            line = f"{line} [session={session} tier={getattr(record, 'tier', '-')}]"
        return line


def configure_logging(level: str, fmt: str) -> None:
    """Send the relay's and uvicorn's logs to stderr in the chosen format.

    `level` is a logging level name, or uvicorn's TRACE (below DEBUG: connections and ASGI
    messages), which uvicorn's own CLI registers and `python -m app` would not otherwise know.
    """
    guard_wire_logs()
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The tool clients' per-request lines (method and URL of each tool call) are noise at INFO;
    # the relay logs each call's tool, outcome and duration itself (app/tools).
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
