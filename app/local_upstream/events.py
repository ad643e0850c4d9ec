"""Ids and event builders shared by the local upstream's session and response code."""

from __future__ import annotations

import secrets
import string
from typing import Any

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """A random id in the server's style, e.g. `item_Cg2rB1wYe5sNfG2h3IkMp`."""
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(21))


def server_event(event_type: str, **fields: Any) -> dict[str, Any]:
    """A server event with a fresh `event_id`, fields in the order given."""
    return {"type": event_type, "event_id": new_id("event"), **fields}


class ClientEventError(Exception):
    """A client event the upstream refuses with an `error` event (REALTIME.md §10).

    The socket stays open; the session turns this into `error_event(...)`.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def error_event(
    code: str | None,
    message: str,
    *,
    param: str | None = None,
    client_event_id: str | None = None,
    error_type: str = "invalid_request_error",
) -> dict[str, Any]:
    """An `error` server event; `client_event_id` echoes the offending client event."""
    error = {
        "type": error_type,
        "code": code,
        "message": message,
        "param": param,
        "event_id": client_event_id,
    }
    return server_event("error", error=error)
