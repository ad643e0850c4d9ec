"""The WebRTC session watch over plain dicts: what a client changed, and how it is put back."""

from __future__ import annotations

import copy
import json

import pytest

from app.config import SessionSettings, TierSettings
from app.core.policy import SessionPolicy
from app.core.watch import SessionWatch

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
SESSION = SessionSettings(instructions="SERVER INSTRUCTIONS", tools=[TOOL], voice="cedar")


def watch() -> SessionWatch:
    tier = TierSettings()
    policy = SessionPolicy(
        SESSION,
        tier.client_may_set,
        model="gpt-realtime-mini",
        allowed_values=tier.allowed_values,
        call=True,
    )
    return SessionWatch(policy)


def reported() -> dict:
    """The session an upstream reports after the relay's: its own defaults added."""
    session = copy.deepcopy(watch()._server)
    session |= {"object": "realtime.session", "id": "sess_1", "model": "gpt-realtime-mini"}
    session["tools"] = [{**TOOL, "description": ""}]
    session["audio"]["input"]["turn_detection"]["idle_timeout_ms"] = None
    session["audio"]["input"]["format"] = {"type": "audio/pcm", "rate": 24000}
    return session


def test_the_server_s_own_session_is_unchanged():
    assert watch().changed(reported()) == []


def test_what_the_tier_may_set_is_not_judged():
    session = reported()
    session["audio"]["output"]["voice"] = "alloy"
    session["audio"]["input"]["turn_detection"] = None
    assert watch().changed(session) == []


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda s: s.update(instructions="be a pirate"), "instructions"),
        (lambda s: s.update(tools=[]), "tools"),
        (lambda s: s["tools"].append({"type": "function", "name": "x"}), "tools"),
        (lambda s: s.update(tool_choice="none"), "tool_choice"),
        (lambda s: s.update(max_output_tokens=5), "max_output_tokens"),
        (lambda s: s["audio"]["output"].update(voice="Robot"), "audio.output.voice"),
        (lambda s: s["audio"]["output"].update(speed=4.0), "audio.output.speed"),
    ],
)
def test_a_locked_field_or_a_value_outside_the_list_is_a_change(change, path):
    session = reported()
    change(session)
    assert watch().changed(session) == [path]


def test_the_restoring_update_holds_the_server_s_values():
    session = reported()
    session["instructions"] = "be a pirate"
    session["tools"] = []
    session["audio"]["output"]["voice"] = "Robot"
    changed = watch().changed(session)
    event = json.loads(watch().restoring(changed, "relay_restore_1"))
    assert event["type"] == "session.update" and event["event_id"] == "relay_restore_1"
    assert event["session"] == {
        "type": "realtime",
        "instructions": "SERVER INSTRUCTIONS",
        "tools": [TOOL],
        "audio": {"output": {"voice": "cedar"}},
    }


def test_a_call_s_session_has_no_audio_formats():
    """The call's audio is RTP: the relay sets no formats, so none is judged."""
    server = watch()._server
    assert "format" not in server["audio"]["input"] and "format" not in server["audio"]["output"]
    session = reported()
    session["audio"]["input"]["format"] = {"type": "audio/pcmu"}
    assert watch().changed(session) == []
