"""Logging setup, in one place: plain text or one JSON object per line.

Every session logs through a `LoggerAdapter` that adds its id and tier; the JSON formatter puts
them in fields of their own. Log lines carry event types, sizes, codes and durations only.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_SESSION_FIELDS = ("session", "tier")


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
    """Send the relay's and uvicorn's logs to stderr in the chosen format."""
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
