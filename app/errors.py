"""Close codes and the relay's exceptions.

Every refusal the client can see is a `RelayError`: it carries the WebSocket close code, a stable
`code` for the `error` event and a message that is safe to show (no keys, no other tenants' data)::

    RelayError
    ├── ClientError                 the client's doing; the session stays open
    │   ├── InvalidEventError       invalid_json / invalid_event / unknown_event_type
    │   ├── FieldLockedError        field_locked: a change the tier does not allow
    │   └── InvalidAudioError       invalid_audio
    ├── AdmissionError              refused before any upstream connection (close 1008)
    │   ├── UnauthorizedError       unauthorized
    │   ├── OriginNotAllowedError   origin_not_allowed
    │   ├── ModelNotAllowedError    model_not_allowed
    │   ├── UnsupportedClientError  unsupported_protocol
    │   └── SessionLimitError       session_limit_reached
    ├── LimiterUnavailableError     limiter_unavailable (close 1013: retrying may help)
    ├── SessionEndedError           session_expired / session_idle (close 1000)
    ├── ClientTimeoutError          client_timeout: keepalive pings unanswered (close 1011)
    ├── MessageTooBigError          message_too_big (close 1009)
    ├── ShuttingDownError           server_shutting_down (close 1012)
    └── UpstreamError               upstream_* (close 1014, or 1013 when rate limited)
        ├── UpstreamRefusedError    the upstream answered the handshake with an HTTP error
        ├── UpstreamClosedError     the upstream went away mid-session
        └── UpstreamTimeoutError    upstream_timeout: keepalive pings unanswered mid-session

Foreign exceptions (websockets, redis) are translated into these once, where they are raised.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NotRequired, TypedDict


class CloseCode(IntEnum):
    """WebSocket close codes the relay sends (RFC 6455 §7.4, IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008  # auth, origin, model, session limit: retrying cannot fix it
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTART = 1012  # shutting down: SDKs reconnect, landing on another replica
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


class ErrorBody(TypedDict):
    """The `error` object of a Realtime `error` event (REALTIME.md §10)."""

    type: str
    code: str
    message: str
    param: str | None
    event_id: str | None


class ErrorEvent(TypedDict):
    """An `error` event as the relay builds it."""

    type: str
    event_id: str
    error: ErrorBody
    relay: NotRequired[dict[str, Any]]


class RelayError(Exception):
    """Base of every error a client may be told about."""

    code = "relay_error"
    close_code = CloseCode.INTERNAL
    error_type = "server_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.client_event_id: str | None = None  # the client event that caused it, if any


class ClientError(RelayError):
    """Bad client input: the event is refused with an `error` event and the session goes on."""

    code = "invalid_event"
    close_code = CloseCode.POLICY
    error_type = "invalid_request_error"


class InvalidEventError(ClientError):
    """A frame that is not valid JSON, not an event, or of an unknown type."""


class FieldLockedError(ClientError):
    """A change to session fields the client's tier does not allow."""

    code = "field_locked"


class InvalidAudioError(ClientError):
    """Audio the relay cannot decode; nothing buffered before it is lost."""

    code = "invalid_audio"


class AdmissionError(RelayError):
    """The session is refused before any upstream connection is opened."""

    close_code = CloseCode.POLICY
    error_type = "invalid_request_error"


class UnauthorizedError(AdmissionError):
    code = "unauthorized"


class OriginNotAllowedError(AdmissionError):
    code = "origin_not_allowed"


class ModelNotAllowedError(AdmissionError):
    code = "model_not_allowed"


class UnsupportedClientError(AdmissionError):
    code = "unsupported_protocol"


class SessionLimitError(AdmissionError):
    """A concurrency cap is full; the message names the cap, never other tenants' data."""

    code = "session_limit_reached"

    def __init__(self, message: str, *, cap: str) -> None:
        super().__init__(message, param=cap)
        self.cap = cap


class LimiterUnavailableError(RelayError):
    """The limits store cannot be reached and the relay fails closed."""

    code = "limiter_unavailable"
    close_code = CloseCode.TRY_AGAIN_LATER


class SessionEndedError(RelayError):
    """The relay ends a session by policy (too long, or idle too long)."""

    code = "session_expired"
    close_code = CloseCode.NORMAL
    error_type = "invalid_request_error"


class ClientTimeoutError(RelayError):
    """The client stopped answering keepalive pings: it stopped reading, or its network did.

    Closed with 1011, as websockets closes a keepalive timeout, so SDKs reconnect; the client
    rarely reads the `error` event, but the relay's logs and metrics name the cause.
    """

    code = "client_timeout"
    close_code = CloseCode.INTERNAL
    error_type = "invalid_request_error"


class MessageTooBigError(RelayError):
    code = "message_too_big"
    close_code = CloseCode.TOO_BIG
    error_type = "invalid_request_error"


class ShuttingDownError(RelayError):
    code = "server_shutting_down"
    close_code = CloseCode.RESTART


class UpstreamError(RelayError):
    """The upstream could not be reached or failed; the client sees a bad gateway."""

    code = "upstream_unavailable"
    close_code = CloseCode.BAD_GATEWAY


class UpstreamRefusedError(UpstreamError):
    """The upstream answered the WebSocket handshake with an HTTP error status."""

    def __init__(self, status: int) -> None:
        if status in (401, 403):
            code, message = "upstream_unauthorized", "the upstream refused the relay's credentials"
        elif status == 429:
            code, message = "upstream_rate_limited", "the upstream is rate limiting; retry later"
        else:
            code, message = "upstream_refused", f"the upstream refused the connection ({status})"
        super().__init__(message, code=code)
        self.status = status
        if status == 429:
            self.close_code = CloseCode.TRY_AGAIN_LATER


class UpstreamClosedError(UpstreamError):
    """The upstream closed or dropped the connection while the session was live."""

    code = "upstream_closed"


def error_event(
    code: str,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    client_event_id: str | None = None,
    event_id: str,
) -> ErrorEvent:
    """Build a Realtime `error` event (REALTIME.md §10), tagged as coming from the relay."""
    return {
        "type": "error",
        "event_id": event_id,
        "error": {
            "type": error_type,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        },
        "relay": {"source": "relay"},
    }


def event_for(exc: RelayError, *, event_id: str, client_event_id: str | None = None) -> ErrorEvent:
    """The `error` event that tells a client about `exc`."""
    return error_event(
        exc.code,
        exc.message,
        error_type=exc.error_type,
        param=exc.param,
        client_event_id=client_event_id,
        event_id=event_id,
    )


class UpstreamTimeoutError(UpstreamError):
    """The upstream stopped answering keepalive pings mid-session (it stalled)."""

    code = "upstream_timeout"
