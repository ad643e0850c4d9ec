"""The GA session objects: defaults, and validation and merging of `session.update`.

Two kinds (REALTIME.md §5, §14.2): a realtime session (`type: "realtime"`, `?model=`) and a
transcription session (`type: "transcription"`, `?intent=transcription`), which has only
`audio.input` and `include`. An update must name its session's own type.

Merge rule (documented choice): objects merge key by key, recursively, so a client may send only
`{"type": "realtime", "audio": {"output": {"voice": "cedar"}}}`. Lists, scalars and `null` replace.
Audio `format` objects replace as a whole (so switching to `audio/pcmu` drops `rate`), and so does
`turn_detection` when its `type` changes. Every value is checked before anything is applied, so a
refused update changes nothing. Read-only fields echoed back by clients (`id`, `object`,
`expires_at`) are accepted and ignored.
"""

from __future__ import annotations

import copy
from typing import Any

from app.local_upstream import pcm
from app.local_upstream.events import ClientEventError

DEFAULT_INSTRUCTIONS = (
    "You are the realtime-relay local upstream. You echo what the user said and describe it."
)
SESSION_TTL_S = 3600  # GA sessions last up to 60 minutes (REALTIME.md §11)

# Server-default turn detection, as in example b's session.created.
DEFAULT_SERVER_VAD: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 200,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
DEFAULT_SEMANTIC_VAD: dict[str, Any] = {
    "type": "semantic_vad",
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}
# A transcription session's turn detection has nothing about responses (example g).
TRANSCRIPTION_SERVER_VAD: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 200,
}
TRANSCRIPTION_SEMANTIC_VAD: dict[str, Any] = {"type": "semantic_vad", "eagerness": "auto"}

# The GA session.update shape: a nested dict is an object whose keys are checked, None a leaf.
_SCHEMA: dict[str, Any] = dict.fromkeys(
    (
        "type model output_modalities instructions tools tool_choice max_output_tokens tracing "
        "truncation prompt include reasoning parallel_tool_calls id object expires_at"
    ).split()
)
_SCHEMA["audio"] = {
    "input": {
        "format": None,
        "transcription": None,
        "noise_reduction": None,
        "turn_detection": None,
    },
    "output": {"format": None, "voice": None, "speed": None},
}
_TRANSCRIPTION_SCHEMA: dict[str, Any] = dict.fromkeys("type include id object expires_at".split())
_TRANSCRIPTION_SCHEMA["audio"] = {"input": _SCHEMA["audio"]["input"]}
_READ_ONLY = ("id", "object", "expires_at")
_REPLACED = {"format", "tracing", "truncation", "prompt", "noise_reduction", "reasoning"}
_TURN_DETECTION_KEYS = set(DEFAULT_SERVER_VAD) | set(DEFAULT_SEMANTIC_VAD)


def default_session(
    *, session_id: str, model: str, instructions: str, now: float
) -> dict[str, Any]:
    """The full session `session.created` announces (example b)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(now) + SESSION_TTL_S,
        "audio": {
            "input": {
                "format": {"type": pcm.PCM, "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": dict(DEFAULT_SERVER_VAD),
            },
            "output": {
                "format": {"type": pcm.PCM, "rate": 24000},
                "voice": "marin",
                "speed": 1.0,
            },
        },
        "include": None,
    }


def default_transcription_session(*, session_id: str, now: float) -> dict[str, Any]:
    """The transcription session `session.created` announces (example g)."""
    return {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": session_id,
        "expires_at": int(now) + SESSION_TTL_S,
        "audio": {
            "input": {
                "format": {"type": pcm.PCM, "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": dict(TRANSCRIPTION_SERVER_VAD),
            }
        },
        "include": None,
    }


def apply_update(session: dict[str, Any], update: Any) -> dict[str, Any]:
    """Return the effective session after `update`, or raise `ClientEventError`."""
    if not isinstance(update, dict):
        raise ClientEventError("missing_required_parameter", "Missing 'session'.", "session")
    if "type" not in update:
        raise ClientEventError(
            "missing_required_parameter",
            "Missing required parameter: 'session.type'.",
            "session.type",
        )
    kind = session["type"]
    if update["type"] != kind:
        raise ClientEventError(
            "invalid_value",
            f"Invalid value: {update['type']!r}. This is a {kind!r} session; its type cannot "
            "change.",
            "session.type",
        )
    transcription_only = kind == "transcription"
    _check_keys(update, _TRANSCRIPTION_SCHEMA if transcription_only else _SCHEMA, "session")
    changes = {k: v for k, v in update.items() if k not in _READ_ONLY}
    merged = _merge(copy.deepcopy(session), changes)
    if not transcription_only:
        _normalise(merged)
    _normalise_input(merged, transcription_only=transcription_only)
    return merged


def output_format(fmt: Any, param: str) -> dict[str, Any]:
    """Validate and fill a GA audio format object (REALTIME.md §11)."""
    if not isinstance(fmt, dict):
        raise ClientEventError(
            "invalid_type", f"Invalid type for '{param}': expected an object.", param
        )
    kind = fmt.get("type")
    if kind not in pcm.FORMATS:
        raise ClientEventError(
            "invalid_value",
            f"Invalid value: {kind!r}. Supported values are: {', '.join(pcm.FORMATS)}.",
            f"{param}.type",
        )
    if kind == pcm.PCM:
        if fmt.get("rate", 24000) != 24000:
            raise ClientEventError(
                "invalid_value", "Only a rate of 24000 is supported.", f"{param}.rate"
            )
        return {"type": kind, "rate": 24000}
    return {"type": kind}


def output_modalities(value: Any, param: str) -> list[str]:
    """Validate `output_modalities`: exactly `["audio"]` or `["text"]` (REALTIME.md §5)."""
    if value not in (["audio"], ["text"]):
        raise ClientEventError(
            "invalid_value", "output_modalities must be ['audio'] or ['text'].", param
        )
    return list(value)


def _check_keys(update: dict[str, Any], schema: dict[str, Any], path: str) -> None:
    for key, value in update.items():
        param = f"{path}.{key}"
        if key not in schema:
            raise ClientEventError("unknown_parameter", f"Unknown parameter: '{param}'.", param)
        sub = schema[key]
        if isinstance(sub, dict):
            if not isinstance(value, dict):
                raise ClientEventError(
                    "invalid_type", f"Invalid type for '{param}': expected an object.", param
                )
            _check_keys(value, sub, param)
        elif key == "turn_detection" and isinstance(value, dict):
            for inner in value:
                if inner not in _TURN_DETECTION_KEYS:
                    name = f"{param}.{inner}"
                    raise ClientEventError(
                        "unknown_parameter", f"Unknown parameter: '{name}'.", name
                    )


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        old = base.get(key)
        # A turn_detection of another type replaces the old one instead of mixing fields.
        same_vad = key != "turn_detection" or (
            isinstance(old, dict)
            and isinstance(value, dict)
            and value.get("type", old.get("type")) == old.get("type")
        )
        if isinstance(old, dict) and isinstance(value, dict) and key not in _REPLACED and same_vad:
            base[key] = _merge(old, value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _normalise(session: dict[str, Any]) -> None:
    session["output_modalities"] = output_modalities(
        session.get("output_modalities"), "session.output_modalities"
    )
    if not isinstance(session.get("instructions"), str):
        raise ClientEventError(
            "invalid_type", "instructions must be a string.", "session.instructions"
        )
    tokens = session.get("max_output_tokens")
    if tokens != "inf" and not (isinstance(tokens, int) and 1 <= tokens <= 4096):
        raise ClientEventError(
            "invalid_value",
            "max_output_tokens must be 1-4096 or 'inf'.",
            "session.max_output_tokens",
        )
    tools = session.get("tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ClientEventError("invalid_type", "tools must be a list of objects.", "session.tools")
    for index, tool in enumerate(tools):
        if tool.get("type") == "function" and not isinstance(tool.get("name"), str):
            param = f"session.tools[{index}].name"
            raise ClientEventError("missing_required_parameter", f"Missing '{param}'.", param)
    choice = session.get("tool_choice")
    if not (choice in ("auto", "none", "required") or isinstance(choice, dict)):
        raise ClientEventError("invalid_value", "Invalid tool_choice.", "session.tool_choice")
    audio_out = session["audio"]["output"]
    audio_out["format"] = output_format(audio_out.get("format"), "session.audio.output.format")
    speed = audio_out.get("speed", 1.0)
    if not isinstance(speed, int | float) or not 0.25 <= speed <= 1.5:
        raise ClientEventError(
            "invalid_value", "speed must be 0.25-1.5.", "session.audio.output.speed"
        )


def _normalise_input(session: dict[str, Any], *, transcription_only: bool) -> None:
    """Check and fill `audio.input` and `include`, common to both kinds of session."""
    include = session.get("include")
    if include is not None and not (
        isinstance(include, list) and all(isinstance(i, str) for i in include)
    ):
        raise ClientEventError(
            "invalid_type", "include must be a list of strings.", "session.include"
        )
    audio_in = session["audio"]["input"]
    audio_in["format"] = output_format(audio_in.get("format"), "session.audio.input.format")
    transcription = audio_in.get("transcription")
    if transcription is not None:
        if not isinstance(transcription, dict) or not isinstance(transcription.get("model"), str):
            param = "session.audio.input.transcription.model"
            raise ClientEventError("missing_required_parameter", f"Missing '{param}'.", param)
        audio_in["transcription"] = {
            "model": None,
            "language": None,
            "prompt": None,
        } | transcription
    defaults = (
        {"server_vad": TRANSCRIPTION_SERVER_VAD, "semantic_vad": TRANSCRIPTION_SEMANTIC_VAD}
        if transcription_only
        else {"server_vad": DEFAULT_SERVER_VAD, "semantic_vad": DEFAULT_SEMANTIC_VAD}
    )
    audio_in["turn_detection"] = _turn_detection(audio_in.get("turn_detection"), defaults)


def _turn_detection(value: Any, defaults: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientEventError("invalid_type", f"Invalid type for '{param}'.", param)
    kind = value.get("type")
    if kind not in defaults:
        raise ClientEventError(
            "invalid_value",
            f"Invalid value: {kind!r}. Supported values are: 'server_vad', 'semantic_vad'.",
            f"{param}.type",
        )
    merged = defaults[kind] | value
    if kind == "server_vad":
        threshold = merged["threshold"]
        if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ClientEventError(
                "invalid_value", "threshold must be 0.0-1.0.", f"{param}.threshold"
            )
        for key in ("prefix_padding_ms", "silence_duration_ms"):
            if not isinstance(merged[key], int) or merged[key] < 0:
                name = f"{param}.{key}"
                raise ClientEventError(
                    "invalid_value", f"{key} must be a non-negative integer.", name
                )
    return merged
