"""The beta <-> GA dialect translator: what lets a beta-era client talk to a GA upstream.

Pure and sans-I/O, like the rest of the session core: strings and dicts in, strings and dicts out.
A client that asks for the beta dialect (`is_beta`: the `OpenAI-Beta: realtime=v1` header or the
`openai-beta.realtime-v1` subprotocol) gets its events translated to GA on the way up
(`client_event_to_ga`, before the policy judges them, so a beta client is policed by the same
rules as a GA one) and a beta-shaped stream on the way down (`upstream_event_to_beta`, the last
step before the client sees a frame).

The two shapes are OpenAI's public ones:
* GA: the Realtime API reference, https://platform.openai.com/docs/api-reference/realtime, and
  the guides under https://developers.openai.com/api/docs/guides/realtime (transcription
  sessions: https://developers.openai.com/api/docs/guides/realtime-transcription);
* beta, and what changed: https://platform.openai.com/docs/guides/realtime#beta-to-ga-migration;
* both as typed by the official openai-python SDK, generated from OpenAI's OpenAPI spec:
  `src/openai/types/realtime/` (GA) and `src/openai/types/beta/realtime/` (beta).
REALTIME.md §5, §6, §7, §12.6 and §14.5 tabulate the differences this module encodes.

Everything here is a table: session fields (`_SESSION_FIELDS`, `_TRANSCRIPTION_FIELDS`,
`_RESPONSE_FIELDS`), audio formats (`_FORMATS`), content part types (`_PART_TO_GA`) and server
event names (`_RENAMED`); `ga_param_to_beta` names an error's GA path as the beta client wrote it.
A beta field with no GA equivalent (`temperature`, `client_secret`) is dropped and named in the
returned list for a debug log; a field the tables do not know passes through untouched, for the
policy and the upstream to judge. The hot path (audio, text and transcript deltas) is renamed by
rewriting the frame's prefix, never parsed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

BETA_SUBPROTOCOL: Final = "openai-beta.realtime-v1"
_BETA_HEADER: Final = b"openai-beta"
_BETA_HEADER_VALUE: Final = b"realtime=v1"

# -- tables ----------------------------------------------------------------------------------

# Beta audio format strings and their GA objects (REALTIME.md §11). GA PCM is 24 kHz only.
_FORMATS: Final[dict[str, dict[str, Any]]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}
_FORMAT_NAMES: Final[dict[str, str]] = {ga["type"]: beta for beta, ga in _FORMATS.items()}


def _format_to_ga(value: Any) -> Any:
    # An unknown string goes up as it came: the upstream answers `invalid_type` for it.
    return dict(_FORMATS[value]) if isinstance(value, str) and value in _FORMATS else value


def _type_of(obj: dict[Any, Any]) -> str:
    kind = obj.get("type")
    return kind if isinstance(kind, str) else ""


def _format_to_beta(value: Any) -> Any:
    if isinstance(value, dict):
        name = _FORMAT_NAMES.get(_type_of(value))
        # Beta PCM is 24 kHz only: PCM at another rate has no beta name.
        if name is not None and (name != "pcm16" or value.get("rate", 24000) == 24000):
            return name
    return value  # no beta spelling (another rate, a future format): shown as GA sends it


# Beta `["text", "audio"]` (audio with its transcript) is GA `["audio"]`; text only is the same.
def _modalities_to_ga(value: Any) -> Any:
    if isinstance(value, list) and "audio" in value:
        return ["audio"]
    return value


def _modalities_to_beta(value: Any) -> Any:
    if isinstance(value, list) and "audio" in value:
        return ["text", "audio"]
    return value


_Convert = Callable[[Any], Any] | None
# (beta field, GA path, beta -> GA, GA -> beta): one row per renamed field of a flat beta object.
_Field = tuple[str, tuple[str, ...], _Convert, _Convert]

# A realtime session (REALTIME.md §5).
_SESSION_FIELDS: Final[tuple[_Field, ...]] = (
    ("modalities", ("output_modalities",), _modalities_to_ga, _modalities_to_beta),
    ("voice", ("audio", "output", "voice"), None, None),
    ("speed", ("audio", "output", "speed"), None, None),
    ("output_audio_format", ("audio", "output", "format"), _format_to_ga, _format_to_beta),
    ("input_audio_format", ("audio", "input", "format"), _format_to_ga, _format_to_beta),
    ("input_audio_transcription", ("audio", "input", "transcription"), None, None),
    ("input_audio_noise_reduction", ("audio", "input", "noise_reduction"), None, None),
    ("turn_detection", ("audio", "input", "turn_detection"), None, None),
    ("max_response_output_tokens", ("max_output_tokens",), None, None),
)
# A transcription session (REALTIME.md §14.5): only the input side.
_TRANSCRIPTION_FIELDS: Final[tuple[_Field, ...]] = tuple(
    row for row in _SESSION_FIELDS if row[1][:2] == ("audio", "input")
)
# `response.create`'s `response` (REALTIME.md §7.2).
_RESPONSE_FIELDS: Final[tuple[_Field, ...]] = (
    ("modalities", ("output_modalities",), _modalities_to_ga, _modalities_to_beta),
    ("voice", ("audio", "output", "voice"), None, None),
    ("output_audio_format", ("audio", "output", "format"), _format_to_ga, _format_to_beta),
    ("max_response_output_tokens", ("max_output_tokens",), None, None),
)
# The response object of `response.created` / `response.done` (REALTIME.md §7.1): beta calls
# its cap `max_output_tokens` too, so only the audio and modality fields move.
_RESPONSE_OBJECT_FIELDS: Final = _RESPONSE_FIELDS[:3]

# Beta fields GA has no place for: dropped, and named for the log.
_SESSION_DROPPED: Final = ("temperature", "client_secret")
_TRANSCRIPTION_DROPPED: Final = ("modalities", "client_secret")
_RESPONSE_DROPPED: Final = ("temperature",)

# Item content part types that differ (REALTIME.md §6): the assistant's. `input_*` are the same.
_PART_TO_GA: Final = {"text": "output_text", "audio": "output_audio"}
_PART_TO_BETA: Final = {ga: beta for beta, ga in _PART_TO_GA.items()}

# GA server event -> beta server event, renamed without parsing (REALTIME.md §4.4, §12.6).
_RENAMED: Final[dict[str, str]] = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}
# GA events beta clients have never seen (REALTIME.md §4, §12.6, §18.2). They are forwarded (a
# client ignores a type it does not know), their items in beta shape; the wiring may drop them.
GA_ONLY_UPSTREAM_TYPES: Final = frozenset(
    {
        "conversation.item.done",
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.dtmf_event_received",
        "conversation.item.input_audio_transcription.segment",
        "mcp_list_tools.in_progress",
        "mcp_list_tools.completed",
        "mcp_list_tools.failed",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.mcp_call.failed",
    }
)

# Servers write "type" first (policy.py reads event types the same way).
_TYPE_PREFIX = re.compile(r'\{\s*"type"\s*:\s*"([^"\\]+)"')

# -- client (beta) -> upstream (GA) ----------------------------------------------------------


def client_event_to_ga(event: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Translate a parsed beta client event to its GA form.

    Args:
        event: a client event in the beta dialect (not modified).

    Returns:
        The GA event (the same object when the two shapes agree, as for
        `input_audio_buffer.append`), and the dotted names of the beta fields dropped for lack
        of a GA equivalent (`session.temperature`), for a debug log.
    """
    translate = _CLIENT_EVENTS.get(_type_of(event))
    if translate is None:
        return event, []
    return translate(event)


def _session_update(event: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    session = event.get("session")
    if not isinstance(session, dict):
        return event, []  # not a session: the policy says so
    ga, dropped = _nest(session, _SESSION_FIELDS, _SESSION_DROPPED, "session")
    if "type" in ga:  # beta has no `type`; the realtime kind is this event's, not the client's
        dropped.append("session.type")
    return {**event, "session": {**ga, "type": "realtime"}}, dropped


def _transcription_session_update(event: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    session = event.get("session")
    if not isinstance(session, dict):
        return {**event, "type": "session.update"}, []
    ga, dropped = _nest(session, _TRANSCRIPTION_FIELDS, _TRANSCRIPTION_DROPPED, "session")
    if "type" in ga:
        dropped.append("session.type")
    return {**event, "type": "session.update", "session": {**ga, "type": "transcription"}}, dropped


def _response_create(event: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    response = event.get("response")
    if not isinstance(response, dict):
        return event, []
    ga, dropped = _nest(response, _RESPONSE_FIELDS, _RESPONSE_DROPPED, "response")
    items = ga.get("input")
    if isinstance(items, list):
        ga["input"] = [_item(item, _PART_TO_GA) for item in items]
    return {**event, "response": ga}, dropped


def _item_create(event: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    item = event.get("item")
    ga = _item(item, _PART_TO_GA)
    return (event if ga is item else {**event, "item": ga}), []


_CLIENT_EVENTS: Final[dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]]] = {
    "session.update": _session_update,
    "transcription_session.update": _transcription_session_update,
    "response.create": _response_create,
    "conversation.item.create": _item_create,
}
# The beta client events whose GA form differs; every other type is the same in both dialects.
TRANSLATED_CLIENT_TYPES: Final = frozenset(_CLIENT_EVENTS)


def _nest(
    flat: dict[str, Any], fields: Sequence[_Field], drop: Sequence[str], where: str
) -> tuple[dict[str, Any], list[str]]:
    """A flat beta object as its nested GA form, and the names of the fields dropped."""
    ga = {key: value for key, value in flat.items() if key not in drop}
    dropped = [f"{where}.{key}" for key in drop if key in flat]
    for beta, path, to_ga, _ in fields:
        if beta not in ga:
            continue
        value = ga.pop(beta)
        node = ga
        for key in path[:-1]:
            child = node.get(key)
            # Copy on the way down: a GA-shaped sub-object the client also sent is not modified.
            node[key] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = to_ga(value) if to_ga is not None else value
    return ga, dropped


def _item(item: Any, parts: dict[str, str]) -> Any:
    """`item` with its content part types renamed by `parts` (the same object if none are)."""
    if not isinstance(item, dict):
        return item
    content = item.get("content")
    if not isinstance(content, list) or not any(
        isinstance(part, dict) and _type_of(part) in parts for part in content
    ):
        return item
    return {**item, "content": [_part(part, parts) for part in content]}


def _part(part: Any, parts: dict[str, str]) -> Any:
    if isinstance(part, dict):
        renamed = parts.get(_type_of(part))
        if renamed is not None:
            return {**part, "type": renamed}
    return part


# -- upstream (GA) -> client (beta) ----------------------------------------------------------


def upstream_event_to_beta(event_type: str, text: str) -> str:
    """Translate a GA upstream event's JSON text to what a beta client expects.

    Args:
        event_type: the event's `type`, as the policy read it from the frame.
        text: the frame's JSON text.

    Returns:
        The beta frame. Renamed events (`_RENAMED`: audio, text and transcript deltas and
        their `.done`) are rewritten in their prefix and otherwise byte-identical; the few
        events that carry a session, an item, a response, a content part or an error's
        `param` (`PARSED_UPSTREAM_TYPES`) are parsed and rebuilt, and returned as they came
        when nothing in them changes; every other event (and any frame that cannot be
        parsed) is returned as it came.
    """
    renamed = _RENAMED.get(event_type)
    if renamed is not None:
        match = _TYPE_PREFIX.match(text)
        if match is not None and match.group(1) == event_type:
            return text[: match.start(1)] + renamed + text[match.end(1) :]
        return _rebuilt(text, lambda event: {**event, "type": renamed})
    restructure = _UPSTREAM_EVENTS.get(event_type)
    if restructure is None:
        return text
    return _rebuilt(text, restructure)


def _rebuilt(text: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        return text  # not the translator's to judge: the policy has seen it already
    if not isinstance(event, dict):
        return text
    beta = change(event)
    if beta is event:
        return text  # nothing to change: keep the server's bytes
    return json.dumps(beta, separators=(",", ":"))


def _session_event(event: dict[str, Any]) -> dict[str, Any]:
    session = event.get("session")
    if not isinstance(session, dict):
        return event
    if session.get("type") == "transcription":
        # A beta transcription socket hears `transcription_session.created` / `.updated`.
        name = "transcription_session." + str(event.get("type")).rpartition(".")[2]
        flat = _flatten(session, _TRANSCRIPTION_FIELDS)
        event = {**event, "type": name}
    else:
        flat = _flatten(session, _SESSION_FIELDS)
    # Beta sessions have no `type` (a beta server refuses `session.type`, REALTIME.md §1.1).
    flat.pop("type", None)
    return {**event, "session": flat}


def _flatten(ga: dict[str, Any], fields: Sequence[_Field]) -> dict[str, Any]:
    """A nested GA session or response as the flat beta object; GA-only fields stay as sent."""
    flat = dict(ga)
    audio = flat.pop("audio", None)
    if not isinstance(audio, dict):
        if audio is not None:  # malformed: not the translator's to judge
            flat["audio"] = audio
        audio = {}
    branches = {key: dict(value) for key, value in audio.items() if isinstance(value, dict)}
    for beta, path, _, to_beta in fields:
        if path[0] == "audio":
            branch = branches.get(path[1], {})
            if path[2] not in branch:
                continue
            value = branch.pop(path[2])
        elif path[0] in flat:
            value = flat.pop(path[0])
        else:
            continue
        flat[beta] = to_beta(value) if to_beta is not None else value
    # What has no beta name (a future `audio.*` field) stays under `audio` rather than be lost.
    rest = {key: value for key, value in audio.items() if not isinstance(value, dict)}
    rest.update((key, value) for key, value in branches.items() if value)
    if rest:
        flat["audio"] = rest
    return flat


def _item_event(event: dict[str, Any]) -> dict[str, Any]:
    item = event.get("item")
    beta = _item(item, _PART_TO_BETA)
    return event if beta is item else {**event, "item": beta}


def _item_added(event: dict[str, Any]) -> dict[str, Any]:
    # GA announces an item with `.added` and finalizes it with `.done`; beta has only `.created`.
    return {**_item_event(event), "type": "conversation.item.created"}


def _response_event(event: dict[str, Any]) -> dict[str, Any]:
    response = event.get("response")
    if not isinstance(response, dict):
        return event
    beta = _flatten(response, _RESPONSE_OBJECT_FIELDS)
    output = beta.get("output")
    if isinstance(output, list):
        beta["output"] = [_item(item, _PART_TO_BETA) for item in output]
    return event if beta == response else {**event, "response": beta}


def _part_event(event: dict[str, Any]) -> dict[str, Any]:
    # The spec spells GA parts `audio` / `text` here, but accept `output_*` (REALTIME.md §4.4).
    part = event.get("part")
    beta = _part(part, _PART_TO_BETA)
    return event if beta is part else {**event, "part": beta}


def _error_event(event: dict[str, Any]) -> dict[str, Any]:
    error = event.get("error")
    if isinstance(error, dict) and isinstance(error.get("param"), str):
        param = ga_param_to_beta(error["param"])
        if param != error["param"]:
            return {**event, "error": {**error, "param": param}}
    return event


_UPSTREAM_EVENTS: Final[dict[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "session.created": _session_event,
    "session.updated": _session_event,
    "conversation.item.added": _item_added,
    "conversation.item.created": _item_event,
    "conversation.item.done": _item_event,
    "conversation.item.retrieved": _item_event,
    "response.output_item.added": _item_event,
    "response.output_item.done": _item_event,
    "response.created": _response_event,
    "response.done": _response_event,
    "response.content_part.added": _part_event,
    "response.content_part.done": _part_event,
    "error": _error_event,
}
# The GA events `upstream_event_to_beta` parses (rare: none is per audio chunk).
PARSED_UPSTREAM_TYPES: Final = frozenset(_UPSTREAM_EVENTS)

# Dotted GA parameter paths (an `error`'s `param`) and the beta paths they were sent as.
_PARAMS: Final = sorted(
    (
        (f"{where}.{'.'.join(path)}", f"{where}.{name}")
        for where, fields in (("session", _SESSION_FIELDS), ("response", _RESPONSE_FIELDS))
        for name, path, _, _ in fields
    ),
    key=lambda pair: -len(pair[0]),
)


def ga_param_to_beta(param: str) -> str:
    """The beta path of a GA parameter path (`session.audio.output.voice` -> `session.voice`).

    For the `param` of an `error` event, the upstream's or the relay's own, when a beta client
    is to read it; a path with no beta spelling comes back as it is.
    """
    for ga, beta in _PARAMS:
        if param == ga or param.startswith(ga + "."):
            return beta + param[len(ga) :]
    return param


# -- dialect ---------------------------------------------------------------------------------


def is_beta(headers: Iterable[tuple[bytes, bytes]], subprotocols: Sequence[str]) -> bool:
    """Whether a client asked for the beta dialect.

    Args:
        headers: the handshake's headers as ASGI gives them (`(name, value)` bytes pairs).
        subprotocols: the subprotocols the client offered (browsers cannot set headers).

    Returns:
        True for an `OpenAI-Beta: realtime=v1` header (alone or in a comma-separated list, as
        HTTP allows) or an `openai-beta.realtime-v1` subprotocol.
    """
    if BETA_SUBPROTOCOL in subprotocols:
        return True
    for name, value in headers:
        if name.lower() == _BETA_HEADER and any(
            token.strip().lower() == _BETA_HEADER_VALUE for token in value.split(b",")
        ):
            return True
    return False
