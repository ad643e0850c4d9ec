"""After the fact: a WebRTC call's session as the upstream reports it, against the server's.

A WebRTC client's data-channel events go to the upstream directly, never through the relay, which
holds only the call's sideband socket (https://developers.openai.com/api/docs/guides/realtime-server-controls).
The relay cannot refuse a client's `session.update`; it sees its result, the `session.updated` the
sideband receives. `SessionWatch` reads each one, finds the fields the client's tier may not set
that no longer hold the server's values (and values outside the tier's `allowed_values`), and
writes the `session.update` that puts the server's values back. The session core decides what
follows (`core.session`: restore, and end a call that keeps doing it).

What is compared is what the relay set: every field of the server's session the tier may not
change, leaf by leaf (objects are compared key by key, so the defaults an upstream adds to an
object do not count as changes); tools by their names. A field the upstream does not report is not
judged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, Final

from app.core.policy import SessionPolicy

# The relay's own restoring `session.update`s carry this event id prefix.
RESTORE_EVENT_ID: Final = "relay_restore"

_ABSENT: Final = object()


def _leaves(
    fields: dict[str, Any], base: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) under `fields` whose value is not an object (empty objects too)."""
    for key, value in fields.items():
        path = (*base, key)
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def _at(fields: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`; `_ABSENT` where a key is missing, and the first non-object met on
    the way (a `null` turn detection stands for all of its fields)."""
    for key in path:
        if not isinstance(fields, dict):
            return fields
        if key not in fields:
            return _ABSENT
        fields = fields[key]
    return fields


def _tool_names(tools: Any) -> Counter[str]:
    if not isinstance(tools, list):
        return Counter({repr(tools): 1})
    return Counter(
        str(tool.get("name") or tool.get("server_label")) if isinstance(tool, dict) else repr(tool)
        for tool in tools
    )


class SessionWatch:
    """Compares reported sessions with the server's; built once per (tier, model) policy."""

    def __init__(self, policy: SessionPolicy) -> None:
        self._policy = policy
        self._server = policy.session
        guard = policy.session_guard
        self._watched = [
            (path, value) for path, value in _leaves(self._server) if not guard.covers(path)
        ]

    def changed(self, session: Any) -> list[str]:
        """The dotted paths of a reported session that the client changed and may not have."""
        if not isinstance(session, dict):
            return []
        changed = []
        for path, value in self._watched:
            reported = _at(session, path)
            if reported is _ABSENT:
                continue
            if path == ("tools",):
                if _tool_names(reported) != _tool_names(value):
                    changed.append("tools")
            elif _differs(reported, value):
                changed.append(".".join(path))
        # Outside allowed_values; `null` is an upstream's "not set" (an idle_timeout_ms of none).
        for dotted in self._policy.outside_values(session):
            if _at(session, tuple(dotted.split("."))) is not None:
                changed.append(dotted)
        return changed

    def restoring(self, paths: list[str], event_id: str) -> str:
        """The `session.update` that puts the server's values back at `paths`."""
        fields: dict[str, Any] = {"type": self._server.get("type", "realtime")}
        for dotted in paths:
            path = tuple(dotted.split("."))
            value = _at(self._server, path)
            if value is _ABSENT:
                continue  # a value outside allowed_values where the server set none
            inner = fields
            for key in path[:-1]:
                inner = inner.setdefault(key, {})
            inner[path[-1]] = value
        event = {"type": "session.update", "event_id": event_id, "session": fields}
        return json.dumps(event, separators=(",", ":"))


def _differs(reported: Any, value: Any) -> bool:
    """500 and 500.0 are the same value; True and 1 are not."""
    if isinstance(reported, bool) or isinstance(value, bool):
        return type(reported) is not type(value) or reported != value
    return bool(reported != value)
