"""The event policy: what a client may send upstream and what it sees of the server's session.

Sans-I/O, after websockets' `Protocol`: data in, decisions out, no sockets. One `SessionPolicy` is
built per session at connect time from `Settings`, the client's tier and the chosen model; then

* `client_event(text)` decides a client text frame: it returns the text to forward upstream (the
  same object when nothing changes) or raises a `ClientError` for the `error` event to send back;
* `upstream_event(text)` returns the event type, the parsed event when the relay needs its fields,
  and the text to forward to the client (rewritten only for `session.created` / `session.updated`,
  from which the server's instructions and tool definitions are removed).

What a tier may change is data (`TierSettings.client_may_set`, dotted GA paths), not code.
Audio deltas are never decoded here: upstream events are typed from their first bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Final

from app.config import SessionSettings
from app.errors import ClientError, FieldLockedError, InvalidEventError

# Client event types a Realtime server accepts (REALTIME.md §3). `transcription_session.update` is
# beta-only; the relay speaks GA upstream, so it is unknown here.
CLIENT_EVENT_TYPES: Final = frozenset(
    {
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "output_audio_buffer.clear",
        "conversation.item.create",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
        "response.create",
        "response.cancel",
    }
)

# Upstream events whose fields the relay reads; every other event is forwarded unparsed.
PARSED_UPSTREAM_TYPES: Final = frozenset(
    {
        "session.created",
        "session.updated",
        "response.done",
        "error",
        "conversation.item.input_audio_transcription.completed",
    }
)

# Per-response fields that never touch what the server locks (REALTIME.md §7.2).
RESPONSE_FIELDS_ALWAYS_ALLOWED: Final = frozenset({"conversation", "metadata", "input"})

# Servers write "type" first; reading it from the prefix spares parsing every audio delta.
_TYPE_PREFIX = re.compile(r'\{\s*"type"\s*:\s*"([^"\\]+)"')

INJECTED_EVENT_ID: Final = "relay_session_defaults"


class _DuplicateKeyError(ValueError):
    """A JSON object names a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(repr(key[:64]))
            seen.add(key)
    return fields


# The policy judges the parsed event but the upstream gets the original text, so both must read
# the same fields: parsers differ on duplicate keys (Python keeps the last, others the first), and
# `{"type": "input_audio_buffer.clear", ..., "type": "session.update"}` must not pass as either.
_decode_strict = json.JSONDecoder(object_pairs_hook=_unique_keys).decode


def _paths_under(prefixes: Iterable[str]) -> frozenset[str]:
    """Every proper ancestor of dotted paths: "audio", "audio.output" for "audio.output.voice"."""
    ancestors: set[str] = set()
    for path in prefixes:
        parts = path.split(".")
        ancestors.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(ancestors)


class FieldGuard:
    """Finds the fields of a nested dict that lie outside a set of allowed dotted paths."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)
        self._ancestors = _paths_under(self.allowed)

    def locked_paths(self, fields: dict[str, Any], base: str = "") -> list[str]:
        """The dotted paths in `fields` a client may not set, in document order."""
        locked: list[str] = []
        for key, value in fields.items():
            path = f"{base}{key}"
            if path in self.allowed:
                continue
            if path in self._ancestors and isinstance(value, dict):
                locked.extend(self.locked_paths(value, path + "."))
            else:
                locked.append(path)
        return locked


def _event_id(event: dict[str, Any]) -> str | None:
    event_id = event.get("event_id")
    return event_id if isinstance(event_id, str) else None


def _refuse(paths: list[str], what: str) -> FieldLockedError:
    names = ", ".join(paths)
    return FieldLockedError(f"{what} may not change {names}: the relay sets them", param=paths[0])


class SessionPolicy:
    """The decisions for one session: built once at connect, consulted for every event.

    Args:
        session: the server's session defaults (instructions, tools, voice, turn detection...).
        client_may_set: dotted GA session paths this client's tier may change.
        model: the upstream model of this session.
        input_format: the GA `audio.input.format` the upstream gets (set by the audio layer).
        output_format: the GA `audio.output.format` the upstream sends.
    """

    def __init__(
        self,
        session: SessionSettings,
        client_may_set: Iterable[str],
        *,
        model: str,
        input_format: dict[str, Any] | None = None,
        output_format: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.session_guard = FieldGuard({"type", *client_may_set})
        self.response_guard = FieldGuard({*RESPONSE_FIELDS_ALWAYS_ALLOWED, *client_may_set})
        self.may_set_instructions = "instructions" in self.session_guard.allowed
        self.may_set_tools = "tools" in self.session_guard.allowed
        self.injected = self._injected_session(
            session,
            input_format or {"type": "audio/pcm", "rate": 24000},
            output_format or {"type": "audio/pcm", "rate": 24000},
        )
        self._checks: dict[str, Callable[[dict[str, Any]], None]] = {
            "session.update": self._check_session_update,
            "response.create": self._check_response_create,
            "conversation.item.create": self._check_item_create,
        }

    @staticmethod
    def _injected_session(
        session: SessionSettings, input_format: dict[str, Any], output_format: dict[str, Any]
    ) -> str:
        audio_input: dict[str, Any] = {
            "format": input_format,
            "turn_detection": session.turn_detection,
            "transcription": session.transcription,
            "noise_reduction": session.noise_reduction,
        }
        fields: dict[str, Any] = {
            "type": "realtime",
            "instructions": session.instructions,
            "tools": session.tools,
            "tool_choice": session.tool_choice,
            "output_modalities": session.output_modalities,
            "max_output_tokens": session.max_output_tokens,
            "audio": {
                "input": audio_input,
                "output": {"format": output_format, "voice": session.voice},
            },
            **session.extra,
        }
        event = {"type": "session.update", "event_id": INJECTED_EVENT_ID, "session": fields}
        return json.dumps(event, separators=(",", ":"))

    # -- client -> upstream -------------------------------------------------------------------

    def client_event(self, text: str) -> tuple[str, dict[str, Any]]:
        """Decide a client text frame.

        Returns:
            The event type and the parsed event; the frame is forwarded unchanged.

        Raises:
            InvalidEventError: not JSON, not an event, or a type the relay does not know.
            FieldLockedError: a change the client's tier does not allow.
        """
        try:
            event = _decode_strict(text)
        except _DuplicateKeyError as exc:
            raise InvalidEventError(f"duplicate key {exc} in the event", param=str(exc)) from None
        except ValueError:
            raise InvalidEventError("the frame is not valid JSON", code="invalid_json") from None
        if not isinstance(event, dict):
            raise InvalidEventError("an event must be a JSON object with a string 'type'")
        event_type = event.get("type")
        if not isinstance(event_type, str):
            raise InvalidEventError("an event must be a JSON object with a string 'type'")
        if event_type not in CLIENT_EVENT_TYPES:
            error = InvalidEventError(
                f"unknown client event type {event_type[:64]!r}",
                code="unknown_event_type",
                param="type",
            )
            error.client_event_id = _event_id(event)
            raise error
        check = self._checks.get(event_type)
        if check is not None:
            try:
                check(event)
            except ClientError as exc:
                exc.client_event_id = _event_id(event)
                raise
        return event_type, event

    def _check_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise InvalidEventError("session.update needs a 'session' object", param="session")
        if session.get("type", "realtime") != "realtime":
            raise _refuse(["session.type"], "this session")
        locked = self.session_guard.locked_paths(session)
        if locked:
            raise _refuse([f"session.{path}" for path in locked], "a client")

    def _check_response_create(self, event: dict[str, Any]) -> None:
        response = event.get("response")
        if response is None:
            return
        if not isinstance(response, dict):
            raise InvalidEventError("'response' must be an object", param="response")
        locked = self.response_guard.locked_paths(response)
        if locked:
            raise _refuse([f"response.{path}" for path in locked], "a response")
        items = response.get("input")
        if isinstance(items, list) and not self.may_set_instructions:
            for item in items:
                if isinstance(item, dict) and item.get("role") == "system":
                    raise _refuse(["response.input.system"], "a response")

    def _check_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise InvalidEventError("conversation.item.create needs an 'item' object", param="item")
        if item.get("role") == "system" and not self.may_set_instructions:
            raise _refuse(["item.role"], "a client")  # system messages are instructions

    # -- upstream -> client -------------------------------------------------------------------

    def upstream_event(self, text: str) -> tuple[str, dict[str, Any] | None, str]:
        """Type an upstream text frame and rewrite what the client must not see.

        Returns:
            The event type (`""` if it has none), the parsed event if the relay reads its fields
            (`PARSED_UPSTREAM_TYPES`, or any event not typed from its prefix), and the text to
            forward to the client.
        """
        match = _TYPE_PREFIX.match(text)
        if match is not None:
            event_type = match.group(1)
            if event_type not in PARSED_UPSTREAM_TYPES:
                return event_type, None, text
        try:
            event = json.loads(text)
        except ValueError:
            return "", None, text  # not ours to judge: the client sees what the server sent
        if not isinstance(event, dict):
            return "", None, text
        event_type = event.get("type")
        if not isinstance(event_type, str):
            return "", event, text
        if event_type in ("session.created", "session.updated"):
            text = self._redact_session(event)
        return event_type, event, text

    def _redact_session(self, event: dict[str, Any]) -> str:
        """Drop the server's instructions and tool definitions (tools stay named)."""
        session = event.get("session")
        if isinstance(session, dict):
            visible = dict(session)
            if not self.may_set_instructions:
                visible.pop("instructions", None)
            tools = visible.get("tools")
            if not self.may_set_tools and isinstance(tools, list):
                visible["tools"] = [
                    {"type": tool.get("type"), "name": tool.get("name")}
                    for tool in tools
                    if isinstance(tool, dict)
                ]
            event = {**event, "session": visible}
        return json.dumps(event, separators=(",", ":"))
