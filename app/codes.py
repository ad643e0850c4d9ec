"""The relay's vocabularies, defined once: session outcomes and refusal reasons.

Each is a `StrEnum`, so a member is its label value: metrics build their label sets from these
enums (`metrics.py`), logs print them, and comparisons with plain strings keep working. Error
codes live beside the exceptions that carry them (`errors.ErrorCode`), close codes in
`errors.CloseCode`, audio formats and codecs in `audio.codecs`.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a session that reached the upstream ended: the `outcome` label of
    `realtime_relay_sessions_total`."""

    COMPLETED = "completed"  # the upstream closed normally
    CLIENT_CLOSED = "client_closed"
    CLIENT_TIMEOUT = "client_timeout"  # keepalive unanswered, or read too slowly
    LIMIT = "limit"  # a cap found over its limit at renewal (Redis lost its data)
    UPSTREAM_ERROR = "upstream_error"
    EXPIRED = "expired"  # max_session_seconds
    IDLE = "idle"  # idle_timeout_seconds
    REFUSED = "refused"
    SHUTDOWN = "shutdown"  # closed by a drain
    FIELD_LOCKED = "field_locked"  # a WebRTC call kept changing fields its tier locks
    ERROR = "error"  # anything else (a relay bug, logged with its traceback)


class Transport(StrEnum):
    """How a client reaches the session: the `transport` label of the session metrics."""

    WEBSOCKET = "websocket"  # /ws: every event through the relay
    WEBRTC = "webrtc"  # /v1/realtime/calls: the relay holds the call's sideband only


class RejectionReason(StrEnum):
    """Why a session was refused before it started: the `reason` label of
    `realtime_relay_session_rejections_total`."""

    UNAUTHORIZED = "unauthorized"
    ORIGIN = "origin"
    MODEL = "model"
    LIMIT = "limit"
    LIMITER = "limiter"
    UPSTREAM = "upstream"
    PROTOCOL = "protocol"
    SHUTDOWN = "shutdown"
    BUDGET = "budget"  # the client's daily spend is used up


class ToolOutcome(StrEnum):
    """How a server tool call ended: the `outcome` label of `realtime_relay_tool_calls_total`.

    Whatever the outcome, the model gets an output it can read (an `{"error": ...}` object when
    the call failed), so a conversation never stalls on a tool.
    """

    OK = "ok"
    TRUNCATED = "truncated"  # succeeded, with an output longer than the relay passes on
    INVALID_ARGUMENTS = "invalid_arguments"  # the model's arguments are not a JSON object
    TIMEOUT = "timeout"
    ERROR = "error"  # the tool answered with an error (a non-2xx status, an MCP error result)
    UNAVAILABLE = "unavailable"  # the tool could not be reached


class BudgetScope(StrEnum):
    """Which budget a session exhausted: the `scope` label of
    `realtime_relay_budget_exhausted_total` (the limits are `TierSettings.max_*`)."""

    SESSION_TOKENS = "session_tokens"  # max_tokens_per_session
    SESSION_COST = "session_cost"  # max_cost_usd_per_session
    CLIENT_DAY = "client_day"  # max_cost_usd_per_client_per_day
