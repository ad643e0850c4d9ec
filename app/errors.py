"""Close codes, error codes and the relay's exceptions.

Every refusal the client can see is a `RelayError`: it carries the WebSocket close code
(`CloseCode`), a stable `code` for the `error` event (an `ErrorCode`, public: clients match on it)
and a message that is safe to show (no keys, no other tenants' data)::

    RelayError
    ├── ClientError                 the client's doing; the session stays open
    │   ├── InvalidEventError       invalid_json / invalid_event / unknown_event_type
    │   ├── FieldLockedError        field_locked: a change the tier does not allow
    │   ├── ItemNotAllowedError     item_not_allowed / invalid_call_id: an item the client may
    │   │                           not create (a forged tool call, or an output for no open call)
    │   └── RateLimitedError        rate_limited: over max_concurrent_responses or per minute
    │   └── InvalidAudioError       invalid_audio
    ├── AdmissionError              refused before any upstream connection (close 1008)
    │   ├── UnauthorizedError       unauthorized
    │   ├── OriginNotAllowedError   origin_not_allowed
    │   ├── ModelNotAllowedError    model_not_allowed
    │   ├── UnsupportedClientError  unsupported_protocol
    │   └── SessionLimitError       session_limit_reached
    ├── LimiterUnavailableError     limiter_unavailable (close 1013: retrying may help)
    ├── BudgetExhaustedError        budget_exhausted (close 1008); budget_warning at 80 %
    ├── LockedFieldsChangedError    field_locked: a WebRTC call kept changing them (hung up)
    ├── SessionEndedError           session_expired / session_idle (close 1000)
    ├── ClientTimeoutError          client_timeout: keepalive pings unanswered (close 1011)
    ├── MessageTooBigError          message_too_big (close 1009)
    ├── ShuttingDownError           server_shutting_down (close 1012)
    └── UpstreamError               upstream_unavailable / upstream_rejected_session (close 1014)
        ├── UpstreamRefusedError    upstream_unauthorized / upstream_refused (close 1014),
        │                           upstream_rate_limited (close 1013): an HTTP error at handshake
        ├── UpstreamClosedError     upstream_closed: the upstream went away mid-session
        └── UpstreamTimeoutError    upstream_timeout: keepalive pings unanswered mid-session

`RelayError` itself is `relay_error` (close 1011). The error codes the upstream sends
(REALTIME.md §10) are forwarded as they are; those the metrics count by name are
`UpstreamErrorCode`. Foreign exceptions (websockets, redis) are translated into these once, where
they are raised.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, Final, NotRequired, TypedDict


class CloseCode(IntEnum):
    """WebSocket close codes the relay sends or sees (RFC 6455 §7.4, IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    # Never sent: what a connection lost without a close frame reports (RFC 6455 §7.1.5). The
    # upstream's closes are counted by code, and this is one of them.
    ABNORMAL = 1006
    POLICY = 1008  # auth, origin, model, session limit: retrying cannot fix it
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTART = 1012  # shutting down: SDKs reconnect, landing on another replica
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


class ErrorCode(StrEnum):
    """The `code` of every `error` event the relay itself sends (the README's table).

    The values are public: clients match on them, and they are the `code` label of
    `realtime_relay_errors_total`.
    """

    RELAY_ERROR = "relay_error"  # a relay bug, logged with its traceback
    # ClientError: the session stays open
    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    FIELD_LOCKED = "field_locked"
    ITEM_NOT_ALLOWED = "item_not_allowed"
    INVALID_CALL_ID = "invalid_call_id"
    RATE_LIMITED = "rate_limited"
    BUDGET_WARNING = "budget_warning"  # a warning: the session goes on
    BUDGET_EXHAUSTED = "budget_exhausted"
    INVALID_AUDIO = "invalid_audio"
    # AdmissionError: refused before any upstream connection
    UNAUTHORIZED = "unauthorized"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    SESSION_LIMIT_REACHED = "session_limit_reached"
    # the session ends
    LIMITER_UNAVAILABLE = "limiter_unavailable"
    SESSION_EXPIRED = "session_expired"
    SESSION_IDLE = "session_idle"
    CLIENT_TIMEOUT = "client_timeout"
    MESSAGE_TOO_BIG = "message_too_big"
    SERVER_SHUTTING_DOWN = "server_shutting_down"
    # UpstreamError
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_UNAUTHORIZED = "upstream_unauthorized"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_REJECTED_SESSION = "upstream_rejected_session"  # it refused the injected settings
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_TIMEOUT = "upstream_timeout"


class UpstreamErrorCode(StrEnum):
    """Codes of the upstream's `error` events that metrics count by name (REALTIME.md §10).

    The relay forwards upstream errors as they are; any other code is counted as `other`. Some
    values are also `ErrorCode`s (`invalid_event`, `session_expired`): the `source` label tells
    them apart.
    """

    SESSION_EXPIRED = "session_expired"
    CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE = "conversation_already_has_active_response"
    RESPONSE_CANCEL_NOT_ACTIVE = "response_cancel_not_active"
    INPUT_AUDIO_BUFFER_COMMIT_EMPTY = "input_audio_buffer_commit_empty"
    UNKNOWN_PARAMETER = "unknown_parameter"
    MISSING_REQUIRED_PARAMETER = "missing_required_parameter"
    INVALID_TYPE = "invalid_type"
    INVALID_VALUE = "invalid_value"
    INVALID_EVENT = "invalid_event"
    SERVER_ERROR = "server_error"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"


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
    """Base of every error a client may be told about.

    Args:
        message: safe to show the client.
        code: overrides the class's `code` for this error (an `ErrorCode`, by convention).
        param: the field or cap the error is about, if any.
    """

    code: str = ErrorCode.RELAY_ERROR
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

    code = ErrorCode.INVALID_EVENT
    close_code = CloseCode.POLICY
    error_type = "invalid_request_error"


class InvalidEventError(ClientError):
    """A frame that is not valid JSON, not an event, or of an unknown type."""


class FieldLockedError(ClientError):
    """A change to session fields the client's tier does not allow."""

    code = ErrorCode.FIELD_LOCKED


class ItemNotAllowedError(ClientError):
    """An item the client may not create: a kind its tier does not allow (a tool call, an MCP
    item, an assistant message), or a tool output for no open call of a client tool
    (`code=INVALID_CALL_ID`)."""

    code = ErrorCode.ITEM_NOT_ALLOWED


class RateLimitedError(ClientError):
    """A `response.create` over the tier's `max_concurrent_responses` or
    `max_responses_per_minute`; the session goes on."""

    code = ErrorCode.RATE_LIMITED


class InvalidAudioError(ClientError):
    """Audio the relay cannot decode; nothing buffered before it is lost."""

    code = ErrorCode.INVALID_AUDIO


class AdmissionError(RelayError):
    """The session is refused before any upstream connection is opened."""

    close_code = CloseCode.POLICY
    error_type = "invalid_request_error"


class UnauthorizedError(AdmissionError):
    code = ErrorCode.UNAUTHORIZED


class OriginNotAllowedError(AdmissionError):
    code = ErrorCode.ORIGIN_NOT_ALLOWED


class ModelNotAllowedError(AdmissionError):
    code = ErrorCode.MODEL_NOT_ALLOWED


# A tier without transcription sessions, or a relay without a transcription model.
TRANSCRIPTION_NOT_ALLOWED: Final = "transcription sessions are not available to this client"


class UnsupportedClientError(AdmissionError):
    code = ErrorCode.UNSUPPORTED_PROTOCOL


class SessionLimitError(AdmissionError):
    """A concurrency cap is full; the message names the cap, never other tenants' data."""

    code = ErrorCode.SESSION_LIMIT_REACHED

    def __init__(self, message: str, *, cap: str) -> None:
        super().__init__(message, param=cap)
        self.cap = cap


class LimiterUnavailableError(RelayError):
    """The limits store cannot be reached and the relay fails closed."""

    code = ErrorCode.LIMITER_UNAVAILABLE
    close_code = CloseCode.TRY_AGAIN_LATER


class BudgetExhaustedError(RelayError):
    """A session or a client reached its budget (tokens, USD per session, USD per client per
    day); as a warning at 80 % its code is `budget_warning`."""

    code = ErrorCode.BUDGET_EXHAUSTED
    close_code = CloseCode.POLICY
    error_type = "invalid_request_error"


class LockedFieldsChangedError(RelayError):
    """A WebRTC client kept changing, over its data channel, fields its tier locks: the relay
    hangs the call up (it put them back before; `core.watch`)."""

    code = ErrorCode.FIELD_LOCKED
    close_code = CloseCode.POLICY
    error_type = "invalid_request_error"


class SessionEndedError(RelayError):
    """The relay ends a session by policy: too long, or idle too long (`code=SESSION_IDLE`)."""

    code = ErrorCode.SESSION_EXPIRED
    close_code = CloseCode.NORMAL
    error_type = "invalid_request_error"


class ClientTimeoutError(RelayError):
    """The client stopped answering keepalive pings: it stopped reading, or its network did.

    Closed with 1011, as websockets closes a keepalive timeout, so SDKs reconnect; the client
    rarely reads the `error` event, but the relay's logs and metrics name the cause.
    """

    code = ErrorCode.CLIENT_TIMEOUT
    close_code = CloseCode.INTERNAL
    error_type = "invalid_request_error"


class MessageTooBigError(RelayError):
    code = ErrorCode.MESSAGE_TOO_BIG
    close_code = CloseCode.TOO_BIG
    error_type = "invalid_request_error"


class ShuttingDownError(RelayError):
    code = ErrorCode.SERVER_SHUTTING_DOWN
    close_code = CloseCode.RESTART


class UpstreamError(RelayError):
    """The upstream could not be reached or failed; the client sees a bad gateway."""

    code = ErrorCode.UPSTREAM_UNAVAILABLE
    close_code = CloseCode.BAD_GATEWAY


class UpstreamRefusedError(UpstreamError):
    """The upstream answered the WebSocket handshake with an HTTP error status."""

    def __init__(self, status: int) -> None:
        if status in (401, 403):
            code = ErrorCode.UPSTREAM_UNAUTHORIZED
            message = "the upstream refused the relay's credentials"
        elif status == 429:
            code = ErrorCode.UPSTREAM_RATE_LIMITED
            message = "the upstream is rate limiting; retry later"
        else:
            code = ErrorCode.UPSTREAM_REFUSED
            message = f"the upstream refused the connection ({status})"
        super().__init__(message, code=code)
        self.status = status
        if status == 429:
            self.close_code = CloseCode.TRY_AGAIN_LATER


class UpstreamClosedError(UpstreamError):
    """The upstream closed or dropped the connection while the session was live."""

    code = ErrorCode.UPSTREAM_CLOSED


class UpstreamTimeoutError(UpstreamError):
    """The upstream stopped answering keepalive pings mid-session (it stalled)."""

    code = ErrorCode.UPSTREAM_TIMEOUT


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
