"""The vocabularies: each is an enum, its values are the public strings, and metrics use them."""

from __future__ import annotations

import json

import pytest

from app import errors
from app.audio.codecs import InputCodec, OutputCodec
from app.codes import Outcome, RejectionReason
from app.errors import CloseCode, ErrorCode, RelayError, UpstreamErrorCode, UpstreamRefusedError
from app.metrics import (
    AUDIO_CODECS,
    AUDIO_DIRECTIONS,
    CLOSE_CODES,
    DIRECTIONS,
    ERROR_CODES,
    OUTCOMES,
    REJECTION_REASONS,
    AudioDirection,
    Direction,
)

# The error codes clients match on (README "Close codes and error codes"): renaming one breaks them.
PUBLIC_ERROR_CODES = {
    "relay_error",
    "invalid_json",
    "invalid_event",
    "unknown_event_type",
    "field_locked",
    "item_not_allowed",
    "invalid_call_id",
    "rate_limited",
    "budget_warning",
    "budget_exhausted",
    "invalid_audio",
    "unauthorized",
    "origin_not_allowed",
    "model_not_allowed",
    "unsupported_protocol",
    "session_limit_reached",
    "limiter_unavailable",
    "session_expired",
    "session_idle",
    "client_timeout",
    "message_too_big",
    "server_shutting_down",
    "upstream_unavailable",
    "upstream_unauthorized",
    "upstream_rate_limited",
    "upstream_refused",
    "upstream_rejected_session",
    "upstream_closed",
    "upstream_timeout",
}


def _subclasses(cls: type[RelayError]) -> list[type[RelayError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def test_error_codes_keep_their_public_strings():
    """ErrorCode holds exactly the documented codes, each its own string."""
    assert {code.value for code in ErrorCode} == PUBLIC_ERROR_CODES
    assert all(str(code) == code.value == code for code in ErrorCode)


def test_every_relay_error_carries_an_error_code():
    """Each RelayError subclass's code, and each code an HTTP refusal maps to, is an ErrorCode."""
    for cls in _subclasses(RelayError):
        assert isinstance(cls.code, ErrorCode), cls
    statuses = {401: "upstream_unauthorized", 403: "upstream_unauthorized"}
    statuses |= {429: "upstream_rate_limited", 500: "upstream_refused"}
    for status, code in statuses.items():
        assert UpstreamRefusedError(status).code is ErrorCode(code)
    assert UpstreamRefusedError(429).close_code is CloseCode.TRY_AGAIN_LATER


def test_a_code_override_is_kept_and_events_carry_plain_strings():
    """`code=` still overrides the class's code; the error event holds the string itself."""
    error = errors.SessionEndedError("idle", code=ErrorCode.SESSION_IDLE)
    assert error.code == "session_idle"
    assert errors.InvalidEventError("x", code="invalid_json").code == "invalid_json"
    event = errors.event_for(error, event_id="event_1")
    assert json.loads(json.dumps(event))["error"]["code"] == "session_idle"


def test_docstring_tree_names_every_error_and_code():
    """errors.py's docstring draws every RelayError subclass and every relay error code."""
    doc = errors.__doc__ or ""
    for cls in _subclasses(RelayError):
        assert cls.__name__ in doc, cls
    for code in ErrorCode:
        assert code.value in doc, code


@pytest.mark.parametrize(
    ("label_set", "values"),
    [
        (OUTCOMES, {outcome.value for outcome in Outcome}),
        (REJECTION_REASONS, {reason.value for reason in RejectionReason}),
        (ERROR_CODES, {c.value for c in ErrorCode} | {c.value for c in UpstreamErrorCode}),
        (CLOSE_CODES, {str(code.value) for code in CloseCode}),
        (set(AUDIO_CODECS), {c.value for c in InputCodec} | {c.value for c in OutputCodec}),
        (set(DIRECTIONS), {direction.value for direction in Direction}),
        (set(AUDIO_DIRECTIONS), {direction.value for direction in AudioDirection}),
    ],
)
def test_metric_label_sets_are_the_enums_values(label_set, values):
    """Each metric label set is derived from its enum, as plain strings."""
    assert set(label_set) == values
    assert all(type(value) is str for value in label_set)


def test_label_sets_keep_the_values_metrics_always_had():
    """Deriving the sets from enums lost no label value (dashboards and alerts use them)."""
    assert {"completed", "client_closed", "client_timeout", "error", "shutdown"} <= OUTCOMES
    assert {"1000", "1001", "1006", "1008", "1009", "1011", "1012", "1013"} <= CLOSE_CODES
    assert {"conversation_already_has_active_response", "rate_limit_exceeded"} <= ERROR_CODES
    assert set(AUDIO_CODECS) == {"pcm16", "g711_ulaw", "g711_alaw", "opus"}
    assert DIRECTIONS == ("client_to_upstream", "upstream_to_client")
