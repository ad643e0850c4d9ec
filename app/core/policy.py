"""The event policy: what a client may send upstream and what it sees of the server's session.

Sans-I/O, after websockets' `Protocol`: data in, decisions out, no sockets. One `SessionPolicy` is
built per session at connect time from `Settings`, the client's tier and the chosen model; then

* `client_event(text)` decides a client text frame: it returns the text to forward upstream (the
  same object when nothing changes) or raises a `ClientError` for the `error` event to send back;
* `upstream_event(text)` returns the event type, the parsed event when the relay needs its fields,
  and the text to forward to the client (rewritten only for `session.created` / `session.updated`,
  from which what the server tells the model is removed: see `SessionPolicy`).

What a tier may change is data (`TierSettings.client_may_set`, dotted GA paths), not code.
A client event may carry only the fields its type defines (`CLIENT_EVENT_FIELDS`), so nothing
the policy did not judge reaches the upstream, however lenient the upstream is.
Audio deltas are never decoded here: upstream events are typed from their first bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from app.config import DEFAULT_CLIENT_MAY_CREATE, ITEM_KINDS, SERVER_VALUE, SessionSettings
from app.errors import (
    ClientError,
    FieldLockedError,
    InvalidEventError,
    ItemNotAllowedError,
    UpstreamError,
)

# The top-level fields of each client event a Realtime server accepts (REALTIME.md §2, §3; the
# GA `*EventParam` types of the official openai-python SDK): every event has `type` and an
# optional client-chosen `event_id`. `transcription_session.update` is beta-only; the relay
# speaks GA upstream, so it is unknown here.
_ENVELOPE = ("type", "event_id")
CLIENT_EVENT_FIELDS: Final[dict[str, frozenset[str]]] = {
    event_type: frozenset({*_ENVELOPE, *fields})
    for event_type, fields in {
        "session.update": ("session",),
        "input_audio_buffer.append": ("audio",),
        "input_audio_buffer.commit": (),
        "input_audio_buffer.clear": (),
        "output_audio_buffer.clear": (),
        "conversation.item.create": ("item", "previous_item_id"),
        "conversation.item.retrieve": ("item_id",),
        "conversation.item.truncate": ("item_id", "content_index", "audio_end_ms"),
        "conversation.item.delete": ("item_id",),
        "response.create": ("response",),
        "response.cancel": ("response_id",),
    }.items()
}
CLIENT_EVENT_TYPES: Final = frozenset(CLIENT_EVENT_FIELDS)

# A transcription session (`?intent=transcription`) only hears audio: it has no responses and no
# conversation a client can write to (https://developers.openai.com/api/docs/guides/realtime-transcription).
TRANSCRIPTION_EVENTS: Final = frozenset(
    {
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
    }
)
# The fields of a transcription session (the GA `RealtimeTranscriptionSessionCreateRequest`):
# what a tier may set there is its `client_may_set` cut down to these.
TRANSCRIPTION_PATHS: Final = (
    "audio.input.format",
    "audio.input.transcription",
    "audio.input.noise_reduction",
    "audio.input.turn_detection",
    "include",
)
# Turn-detection fields about responses, which a transcription session never has.
_RESPONSE_TURN_FIELDS: Final = frozenset({"create_response", "interrupt_response"})

# Upstream events whose fields the relay reads; every other event is forwarded unparsed.
PARSED_UPSTREAM_TYPES: Final = frozenset(
    {
        "session.created",
        "session.updated",
        "response.created",
        "response.output_item.done",  # the model's tool calls: what a client may answer
        "response.done",
        "error",
        "conversation.item.input_audio_transcription.completed",
        "rate_limits.updated",  # the account's remaining requests and tokens, for metrics
    }
)
# Parsed as well where the session has server tools: the events of their calls, to hide them.
SERVER_TOOL_EVENT_TYPES: Final = frozenset(
    {
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.created",
        "conversation.item.retrieved",
    }
)
_SESSION_EVENTS = frozenset({"session.created", "session.updated"})

# Per-response fields that never touch what the server locks (REALTIME.md §7.2).
RESPONSE_FIELDS_ALWAYS_ALLOWED: Final = frozenset({"conversation", "metadata", "input"})

# Message roles a client may write (REALTIME.md §6). An allow-list, matched exactly: `System`
# or `"system "` must not pass for a role a lenient upstream might read as `system`. `system`
# itself only where the tier may set instructions: a system message is instructions.
MESSAGE_ROLES: Final = frozenset({"user", "assistant", "system"})

# Session fields that carry what the server tells the model or the transcriber, or who watches
# the session (REALTIME.md §5): a client sees them in `session.created` / `session.updated`
# only if its tier may set them. Fields of `SessionSettings.extra` join them (see SessionPolicy).
PRIVATE_SESSION_PATHS: Final = (
    "instructions",
    "prompt",
    "tracing",
    "audio.input.transcription.prompt",
    "audio.input.transcription.keywords",
)

# Tool fields holding credentials or where they go (an MCP tool's `authorization`, `headers`
# and `server_url`, REALTIME.md §18.1): never shown to a client, whatever its tier.
TOOL_CREDENTIAL_FIELDS: Final = frozenset({"authorization", "headers", "server_url"})
# What a client sees of a tool its tier may not set: what it is called.
_TOOL_NAME_FIELDS = ("type", "name", "server_label")

# Servers write "type" first; reading it from the prefix spares parsing every audio delta.
_TYPE_PREFIX = re.compile(r'\{\s*"type"\s*:\s*"([^"\\]+)"')

INJECTED_EVENT_ID: Final = "relay_session_defaults"

# Item `type`s other than `message`: a message's kind is its role's (`user_message`...).
_ITEM_TYPES: Final = frozenset(kind for kind in ITEM_KINDS if not kind.endswith("_message"))

_NOTHING: Final[list[str]] = []  # no field ignored (shared, never changed)

# How much of a client-chosen name (a type, a field) an error repeats.
_SHOWN = 64


class _DuplicateKeyError(ValueError):
    """A JSON object names a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(repr(key[:_SHOWN]))
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

    def covers(self, path: tuple[str, ...]) -> bool:
        """Whether `path` or one of its ancestors is allowed (a path covers what lies below)."""
        return any(".".join(path[:i]) in self.allowed for i in range(1, len(path) + 1))

    def locked_paths(self, fields: dict[str, Any], base: str = "") -> list[str]:
        """The dotted paths in `fields` a client may not set, in document order.

        It descends only into proper ancestors of allowed paths, so its depth is bounded by the
        longest allowed path, however deep `fields` is.
        """
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


def _unknown_field(
    event: dict[str, Any], event_type: str, fields: frozenset[str]
) -> InvalidEventError:
    """The error naming the first field of `event` its type does not have (truncated)."""
    name = next(key for key in event if key not in fields)[:_SHOWN]
    return InvalidEventError(f"{event_type} has no field {name!r}", param=name)


def _resolved(rule: Any, base: dict[str, Any], path: str) -> Any:
    """`rule` with `SERVER_VALUE` replaced by the server's own value at `path` (if it has one)."""
    if not isinstance(rule, list) or SERVER_VALUE not in rule:
        return rule
    server: Any = base
    for key in path.split("."):
        server = server.get(key) if isinstance(server, dict) else None
    return [value for value in rule if value != SERVER_VALUE] + ([server] if server else [])


def _allowed(value: Any, rule: Any) -> bool:
    """Whether `value` is one of a list's values, or a number within `{"min", "max"}`."""
    if isinstance(rule, list):
        return any(value == allowed and type(value) is type(allowed) for allowed in rule)
    if isinstance(rule, dict):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        low, high = rule.get("min"), rule.get("max")
        return (low is None or value >= low) and (high is None or value <= high)
    return False


def _within(paths: Iterable[str], fields: Sequence[str]) -> list[str]:
    """The parts of dotted `paths` inside `fields`: a path below a field, or a field a path covers.

    `["audio", "audio.output.voice", "instructions"]` within `["audio.input.format"]` is
    `["audio.input.format"]`.
    """
    kept: list[str] = []
    for path in paths:
        for field in fields:
            if path == field or path.startswith(f"{field}."):
                kept.append(path)
            elif field.startswith(f"{path}."):
                kept.append(field)
    return list(dict.fromkeys(kept))


# Objects of a session whose fields a partial update sets one by one; any other value (a turn
# detection object, a format) is replaced whole.
_MERGED_OBJECTS: Final = frozenset({(), ("audio",), ("audio", "input"), ("audio", "output")})


def _merged(
    fields: dict[str, Any], changes: dict[str, Any], path: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`fields` with `changes` applied as a partial `session.update` applies them."""
    merged = dict(fields)
    for key, value in changes.items():
        inner = (*path, key)
        if inner in _MERGED_OBJECTS and isinstance(value, dict):
            current = merged.get(key)
            merged[key] = _merged(current if isinstance(current, dict) else {}, value, inner)
        else:
            merged[key] = value
    return merged


def _without(fields: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """`fields` less the value at `path`, copying only the dicts along it (the rest is shared)."""
    head = path[0]
    if head not in fields:
        return fields
    if len(path) == 1:
        return {key: value for key, value in fields.items() if key != head}
    inner = fields[head]
    if not isinstance(inner, dict):
        return fields
    trimmed = _without(inner, path[1:])
    return fields if trimmed is inner else {**fields, head: trimmed}


class SessionPolicy:
    """The decisions for one session: built once at connect, consulted for every event.

    Client events: an event of a known type may carry only that type's fields
    (`CLIENT_EVENT_FIELDS`), else `invalid_event` names the first other field. A session field
    or a per-response override outside `client_may_set` is `field_locked`. A message's `role`
    (in `conversation.item.create` and in each item of `response.create`'s `response.input`) is
    `user` or `assistant`, or `system` where the tier may set `instructions` (otherwise
    `field_locked`); any other value is `invalid_event`. An item of a kind outside the tier's
    `client_may_create` (`config.ITEM_KINDS`: an assistant message, a function call, an MCP
    item...) is `item_not_allowed`. JSON nested deeper than the decoder's recursion limit is
    `invalid_event`.

    Server sessions (`session.created`, `session.updated`) are shown to the client without
    what the tier may not set of: the instructions, the prompt template (`prompt`), `tracing`,
    the transcription `prompt` and `keywords` (`PRIVATE_SESSION_PATHS`), and every field of
    `session.extra` the relay does not otherwise inject: the relay cannot tell which of those
    the operator meant to keep private, so none is shown unless the tier may set it. Tools stay
    named (type, name or server label) unless the tier may set tools; tool credentials
    (`TOOL_CREDENTIAL_FIELDS`) are never shown.

    Args:
        session: the server's session defaults (instructions, tools, voice, turn detection...).
        client_may_set: dotted GA session paths this client's tier may change.
        model: the upstream model of this session.
        input_format: the GA `audio.input.format` the upstream gets (set by the audio layer).
        output_format: the GA `audio.output.format` the upstream sends.
        client_may_create: the item kinds a client may create.
        ignore_locked: the tier's `locked_fields` is "ignore": locked fields and disallowed values
            are removed from a `session.update` or `response.create` (and reported), not refused.
        allowed_values: dotted path -> the values a client may choose there (a list, where
            `config.SERVER_VALUE` stands for the server's own value) or `{"min", "max"}`;
            applied where the tier may set the path, in `session.update` and `response.create`.
        server_tools: the definitions of the server tools the session gets, injected with the
            client tools of `session.tools`.
        call: a WebRTC call's session (`call_session`): no audio formats, as the call's audio is
            RTP and never the relay's.
        transcription: a transcription-only session (`?intent=transcription`): the server's
            session is `{"type": "transcription", "audio": {"input": ...}}`, `model` is its
            transcription model, a client may send only `TRANSCRIPTION_EVENTS` and set only the
            `TRANSCRIPTION_PATHS` of `client_may_set`, and `session.type` is locked.
    """

    def __init__(
        self,
        session: SessionSettings,
        client_may_set: Iterable[str],
        *,
        model: str,
        input_format: dict[str, Any] | None = None,
        output_format: dict[str, Any] | None = None,
        client_may_create: Iterable[str] = DEFAULT_CLIENT_MAY_CREATE,
        server_tools: Sequence[dict[str, Any]] = (),
        allowed_values: dict[str, Any] | None = None,
        ignore_locked: bool = False,
        call: bool = False,
        transcription: bool = False,
    ) -> None:
        self.model = model
        self.kind = "transcription" if transcription else "realtime"
        self._event_fields = CLIENT_EVENT_FIELDS
        if transcription:
            client_may_set = _within(client_may_set, TRANSCRIPTION_PATHS)
            server_tools = ()
            self._event_fields = {
                name: fields
                for name, fields in CLIENT_EVENT_FIELDS.items()
                if name in TRANSCRIPTION_EVENTS
            }
        self.server_tools = list(server_tools)
        self.server_tool_names = frozenset(str(tool["name"]) for tool in self.server_tools)
        self.parsed_types = PARSED_UPSTREAM_TYPES
        if self.server_tools:
            self.parsed_types = PARSED_UPSTREAM_TYPES | SERVER_TOOL_EVENT_TYPES
        self._may_create = frozenset(client_may_create)
        self.ignore_locked = ignore_locked
        self.session_guard = guard = FieldGuard({"type", *client_may_set})
        self.response_guard = FieldGuard({*RESPONSE_FIELDS_ALWAYS_ALLOWED, *client_may_set})
        self.may_set_instructions = "instructions" in guard.allowed
        self.may_set_tools = "tools" in guard.allowed
        self._roles = MESSAGE_ROLES if self.may_set_instructions else MESSAGE_ROLES - {"system"}
        self._roles_named = " or ".join(repr(role) for role in sorted(self._roles))
        input_format = input_format or {"type": "audio/pcm", "rate": 24000}
        if transcription:
            base = self._transcription_session(session, input_format)
            extra: dict[str, Any] = {}
        else:
            base = self._base_session(
                session, input_format, output_format or {"type": "audio/pcm", "rate": 24000}
            )
            base["tools"] = [*session.tools, *self.server_tools]
            if call:
                del base["audio"]["input"]["format"], base["audio"]["output"]["format"]
            extra = session.extra
        self._values = [
            (tuple(path.split(".")), _resolved(rule, base, path))
            for path, rule in (allowed_values or {}).items()
            if guard.covers(tuple(path.split(".")))
        ]
        # The server's session, as injected (a WebRTC call is created with it).
        self.session = fields = {**base, **extra}
        event = {"type": "session.update", "event_id": INJECTED_EVENT_ID, "session": fields}
        self.injected = json.dumps(event, separators=(",", ":"))
        private = [tuple(path.split(".")) for path in PRIVATE_SESSION_PATHS]
        private += [(key,) for key in extra if key not in base]
        self._hidden = tuple(path for path in dict.fromkeys(private) if not guard.covers(path))
        self._checks: dict[str, Callable[[dict[str, Any]], list[str] | None]] = {
            "session.update": self._check_session_update,
            "response.create": self._check_response_create,
            "conversation.item.create": self._check_item_create,
        }

    @staticmethod
    def _base_session(
        session: SessionSettings, input_format: dict[str, Any], output_format: dict[str, Any]
    ) -> dict[str, Any]:
        """The session fields the relay injects itself; `session.extra` is merged over them."""
        audio_input: dict[str, Any] = {
            "format": input_format,
            "turn_detection": session.turn_detection,
            "transcription": session.transcription,
            "noise_reduction": session.noise_reduction,
        }
        return {
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
        }

    @staticmethod
    def _transcription_session(
        session: SessionSettings, input_format: dict[str, Any]
    ) -> dict[str, Any]:
        """The transcription session the relay injects (`session.extra` is realtime-only)."""
        turn_detection = session.turn_detection
        if turn_detection is not None:
            turn_detection = {
                key: value
                for key, value in turn_detection.items()
                if key not in _RESPONSE_TURN_FIELDS
            }
        audio_input = {
            "format": input_format,
            "transcription": session.transcription,
            "noise_reduction": session.noise_reduction,
            "turn_detection": turn_detection,
        }
        return {"type": "transcription", "audio": {"input": audio_input}}

    def call_session(self, requested: Any) -> tuple[dict[str, Any], list[str]]:
        """A WebRTC call's session: the server's, with what the client's `session` may set.

        `requested` (the call's `session` part, or None) is judged as a `session.update` is; its
        `model` is the caller's to check, not a field. Returns the session and the dotted paths
        removed from `requested` (the tier ignores what it locks).

        Raises:
            InvalidEventError: `requested` is not an object.
            FieldLockedError: a change the client's tier does not allow (`refuse` mode).
        """
        if requested is None:
            return self.session, []
        if not isinstance(requested, dict):
            raise InvalidEventError("the session must be a JSON object", param="session")
        event = {"session": {key: value for key, value in requested.items() if key != "model"}}
        ignored = self._check_session_update(event) or []
        changes = event["session"]
        tools = changes.get("tools")
        if isinstance(tools, list):  # the client's tools beside the server's, never in their place
            for tool in tools:
                name = tool.get("name") if isinstance(tool, dict) else None
                if isinstance(name, str) and name in self.server_tool_names:
                    raise InvalidEventError(
                        f"the tool name {name[:64]!r} is the server's", param="session.tools"
                    )
            changes = {**changes, "tools": [*tools, *self.server_tools]}
        return _merged(self.session, changes), ignored

    # -- client -> upstream -------------------------------------------------------------------

    def client_event(self, text: str) -> tuple[str, dict[str, Any]]:
        """Decide a client text frame (`decide`, for callers that forward it unchanged)."""
        event_type, event, _, _ = self.decide(text)
        return event_type, event

    def decide(self, text: str) -> tuple[str, dict[str, Any], str, list[str]]:
        """Decide a client text frame.

        Returns:
            The event type, the parsed event, the text to forward (the same object unless
            fields were removed) and the dotted paths removed (the tier ignores what it locks).

        Raises:
            InvalidEventError: not JSON (`invalid_json`, also for JSON nested too deep to
                decode), not an event, a field or role its type does not have (`invalid_event`),
                or a type the relay does not know (`unknown_event_type`).
            FieldLockedError: a change the client's tier does not allow.
        """
        try:
            event = _decode_strict(text)
        except _DuplicateKeyError as exc:
            raise InvalidEventError(f"duplicate key {exc} in the event", param=str(exc)) from None
        except ValueError:
            raise InvalidEventError("the frame is not valid JSON", code="invalid_json") from None
        except RecursionError:
            # `[[[[…]]]]` a thousand deep exhausts the decoder's recursion: bad input, not a
            # relay failure. RFC 8259 §9 lets a parser limit the depth of nesting.
            raise InvalidEventError(
                "the frame nests JSON deeper than the relay accepts", code="invalid_event"
            ) from None
        if not isinstance(event, dict):
            raise InvalidEventError("an event must be a JSON object with a string 'type'")
        event_type = event.get("type")
        if not isinstance(event_type, str):
            raise InvalidEventError("an event must be a JSON object with a string 'type'")
        fields = self._event_fields.get(event_type)
        try:
            if fields is None:
                if event_type in CLIENT_EVENT_TYPES:
                    raise InvalidEventError(
                        f"a {self.kind} session has no {event_type} (its client events: "
                        + ", ".join(self._event_fields)
                        + ")",
                        param="type",
                    )
                raise InvalidEventError(
                    f"unknown client event type {event_type[:_SHOWN]!r}",
                    code="unknown_event_type",
                    param="type",
                )
            # The hot path: an append is two or three keys against a frozenset.
            if not event.keys() <= fields:
                raise _unknown_field(event, event_type, fields)
            check = self._checks.get(event_type)
            ignored = check(event) if check is not None else None
        except ClientError as exc:
            exc.client_event_id = _event_id(event)
            raise
        if ignored:
            return event_type, event, json.dumps(event, separators=(",", ":")), ignored
        return event_type, event, text, _NOTHING

    def _check_session_update(self, event: dict[str, Any]) -> list[str] | None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise InvalidEventError("session.update needs a 'session' object", param="session")
        retyped = _NOTHING
        if session.get("type", self.kind) != self.kind:
            # The session's kind is the relay's: ignoring it keeps the event a valid update.
            if not self.ignore_locked:
                raise _refuse(["session.type"], "a client")
            session = event["session"] = {**session, "type": self.kind}
            retyped = ["session.type"]
        locked = self.session_guard.locked_paths(session) + self.outside_values(session)
        ignored = self._locked(event, "session", locked, "a client")
        return [*retyped, *ignored] if ignored else retyped or None

    def _locked(
        self, event: dict[str, Any], key: str, locked: list[str], who: str
    ) -> list[str] | None:
        """Refuse the locked paths of `event[key]`, or (ignoring them) remove them."""
        if not locked:
            return None
        if not self.ignore_locked:
            raise _refuse([f"{key}.{path}" for path in locked], who)
        fields = event[key]
        for path in locked:
            fields = _without(fields, tuple(path.split(".")))
        event[key] = fields
        return [f"{key}.{path}" for path in locked]

    def outside_values(self, fields: dict[str, Any]) -> list[str]:
        """The paths whose value lies outside the tier's `allowed_values`."""
        outside = []
        for path, rule in self._values:
            value: Any = fields
            for key in path:
                if not isinstance(value, dict) or key not in value:
                    break
                value = value[key]
            else:
                if not _allowed(value, rule):
                    outside.append(".".join(path))
        return outside

    def _check_response_create(self, event: dict[str, Any]) -> list[str] | None:
        response = event.get("response")
        if response is None:
            return None
        if not isinstance(response, dict):
            raise InvalidEventError("'response' must be an object", param="response")
        locked = self.response_guard.locked_paths(response) + self.outside_values(response)
        ignored = self._locked(event, "response", locked, "a response")
        response = event["response"]
        items = response.get("input")
        if items is None:
            return ignored
        if not isinstance(items, list):
            raise InvalidEventError(
                "'response.input' must be a list of items", param="response.input"
            )
        for item in items:
            if not isinstance(item, dict):
                raise InvalidEventError(
                    "each item of 'response.input' must be an object", param="response.input"
                )
            self._check_item(item, "response.input", "response.input.system")
        return ignored

    def _check_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise InvalidEventError("conversation.item.create needs an 'item' object", param="item")
        self._check_item(item, "item", "item.role")

    def _check_item(self, item: dict[str, Any], where: str, system: str) -> None:
        """Refuse an item of a kind the tier may not create; `system` names a system message.

        An allow-list: a message (its `type` is `message`, or absent) is the kind of its role;
        any other item is the kind its `type` names exactly, carries no `role`, and must be a
        kind the relay knows (`config.ITEM_KINDS`; `item_reference` only in `response.input`).
        """
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            self._check_role(role, f"{where}.role", system)
            if role != "system" and f"{role}_message" not in self._may_create:
                raise ItemNotAllowedError(
                    f"a client may not create {role} messages", param=f"{where}.role"
                )
            return
        if kind == "item_reference" and where == "response.input" and "role" not in item:
            return
        if not isinstance(kind, str) or kind not in _ITEM_TYPES or "role" in item:
            shown = str(kind)[:_SHOWN]
            raise InvalidEventError(f"{where} has no item type {shown!r}", param=f"{where}.type")
        if kind not in self._may_create:
            raise ItemNotAllowedError(
                f"a client may not create {kind} items", param=f"{where}.type"
            )

    def _check_role(self, role: Any, param: str, locked: str) -> None:
        """Refuse a message role outside the tier's allow-list; `locked` names a system one."""
        if isinstance(role, str) and role in self._roles:  # a str first: a list is unhashable
            return
        if role == "system":  # system messages are instructions
            raise _refuse([locked], "a client")
        raise InvalidEventError(f"{param} must be {self._roles_named}", param=param)

    # -- upstream -> client -------------------------------------------------------------------

    def upstream_event(self, text: str) -> tuple[str, dict[str, Any] | None, str]:
        """Type an upstream text frame and rewrite what the client must not see.

        Returns:
            The event type (`""` if it has none), the parsed event if the relay reads its fields
            (`PARSED_UPSTREAM_TYPES`, or any event not typed from its prefix), and the text to
            forward to the client. A frame the relay cannot parse (not JSON, or nested too deep)
            is not its to judge and goes to the client as it came, typed `""`.

        Raises:
            UpstreamError: a `session.created` / `session.updated` the relay cannot parse or
                re-encode: forwarded as it came, it would show the server's instructions.
        """
        match = _TYPE_PREFIX.match(text)
        if match is not None:
            event_type = match.group(1)
            if event_type not in self.parsed_types:
                return event_type, None, text
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            if match is not None and match.group(1) in _SESSION_EVENTS:
                raise UpstreamError("the upstream sent a session the relay cannot read") from None
            return "", None, text  # not ours to judge: the client sees what the server sent
        if not isinstance(event, dict):
            return "", None, text
        event_type = event.get("type")
        if not isinstance(event_type, str):
            return "", event, text
        if event_type in _SESSION_EVENTS:
            try:
                text = self._redact_session(event)
            except RecursionError:
                raise UpstreamError("the upstream sent a session the relay cannot read") from None
        return event_type, event, text

    def _redact_session(self, event: dict[str, Any]) -> str:
        """The event without the session fields the client may not see (see the class)."""
        session = event.get("session")
        if isinstance(session, dict):
            visible = session
            for path in self._hidden:
                visible = _without(visible, path)
            tools = visible.get("tools")
            if isinstance(tools, list):
                shown = [self._visible_tool(tool) for tool in tools if isinstance(tool, dict)]
                visible = {**visible, "tools": shown}
            event = {**event, "session": visible}
        return json.dumps(event, separators=(",", ":"))

    def _visible_tool(self, tool: dict[str, Any]) -> dict[str, Any]:
        if not self.may_set_tools:
            return {key: tool[key] for key in _TOOL_NAME_FIELDS if key in tool}
        return {key: value for key, value in tool.items() if key not in TOOL_CREDENTIAL_FIELDS}
