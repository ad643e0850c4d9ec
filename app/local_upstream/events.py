"""Ids, event builders and the client-event dispatcher shared by the local upstream's sessions."""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

_ALPHABET = string.ascii_letters + string.digits

Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any]], Awaitable[None]]


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


async def dispatch(
    message: str | bytes,
    handlers: Mapping[str, Handler],
    *,
    record: list[dict[str, Any]],
    send: Send,
) -> None:
    """Parse one client frame, record it and run its `type`'s handler from `handlers`.

    Frames that are not a JSON object, events without a `type` or of a type not in `handlers`,
    and any `ClientEventError` a handler raises become an `error` event (REALTIME.md §10) that
    echoes the client's `event_id`; the socket stays open.
    """
    if isinstance(message, bytes):
        await send(error_event("invalid_event", "Binary frames are not supported; send JSON text."))
        return
    try:
        event = json.loads(message)
    except ValueError:
        await send(error_event("invalid_event", "The event is not valid JSON."))
        return
    if not isinstance(event, dict):
        await send(error_event("invalid_event", "The event must be a JSON object."))
        return
    record.append(event)
    client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    event_type = event.get("type")
    handler = handlers.get(event_type) if isinstance(event_type, str) else None
    try:
        if event_type is None:
            raise ClientEventError("invalid_event", "The 'type' field is missing.", "type")
        if handler is None:
            supported = ", ".join(f"'{name}'" for name in handlers)
            raise ClientEventError(
                "invalid_event",
                f"Invalid value: {event_type!r}. Supported values are: {supported}.",
                "type",
            )
        await handler(event)
    except ClientEventError as exc:
        await send(error_event(exc.code, exc.message, param=exc.param, client_event_id=client_id))
