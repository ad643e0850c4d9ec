"""The session core driven with strings and numbers: no socket, no event loop, no clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.codes import Outcome
from app.config import SessionSettings, TierSettings
from app.core.policy import INJECTED_EVENT_ID, SessionPolicy
from app.core.session import Deadlines, Ending, Phase, SessionCore

SESSION = SessionSettings(instructions="SERVER INSTRUCTIONS", voice="cedar")
CREATED = {"type": "session.created", "session": {"instructions": "default", "type": "realtime"}}
UPDATED = {"type": "session.updated", "session": {"instructions": "SERVER INSTRUCTIONS"}}


class Port:
    """Records the core's decisions in order, as ("kind", value) pairs."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.timer: float | None = None
        self.ending: Ending | None = None

    def to_upstream(self, text: str) -> None:
        self.log.append(("upstream", json.loads(text)))

    def to_client(self, event_type: str, text: str) -> None:
        self.log.append(("client", json.loads(text)))

    def reply(self, text: str) -> None:
        self.log.append(("reply", json.loads(text)))

    def flush_input(self) -> None:
        self.log.append(("flush", None))

    def opened(self) -> None:
        self.log.append(("opened", None))

    def schedule(self, at: float | None) -> None:
        self.timer = at

    def end(self, ending: Ending) -> None:
        assert self.ending is None, "a session ends once"
        self.ending = ending
        self.log.append(("end", ending))

    def take(self) -> list[tuple[str, Any]]:
        taken, self.log = self.log, []
        return taken


class Meter:
    """Counts what the core reports, with the times it gives."""

    def __init__(self) -> None:
        self.client: list[tuple[str, float]] = []
        self.upstream: list[tuple[str, float]] = []

    def client_event(self, event_type: str, event: dict, size: int, start: float) -> None:
        self.client.append((event_type, start))

    def client_audio(self, size: int, start: float, decoded: float) -> None:
        self.client.append(("binary", start))

    def upstream_event(self, event_type: str, event: Any, text: str, start: float) -> None:
        self.upstream.append((event_type, start))


def make(
    deadlines: Deadlines | None = None, may_set: list[str] | None = None
) -> tuple[SessionCore, Port, Meter]:
    policy = SessionPolicy(
        SESSION, TierSettings().client_may_set if may_set is None else may_set, model="m"
    )
    port, meter = Port(), Meter()
    errors: list[str] = []
    core = SessionCore(
        policy,
        deadlines or Deadlines(start_seconds=5.0),
        meter,
        port,
        session_id="0123456789abcdef",
        count_error=errors.append,
    )
    return core, port, meter


def up(core: SessionCore, event: dict, now: float = 0.0) -> None:
    core.upstream_text(json.dumps(event), now)


def opened(deadlines: Deadlines | None = None, **kwargs: Any) -> tuple[SessionCore, Port, Meter]:
    core, port, meter = make(deadlines, **kwargs)
    core.start(0.0)
    up(core, CREATED)
    up(core, UPDATED)
    port.take()
    return core, port, meter


def test_the_server_session_is_injected_before_the_client_is_read():
    """session.created is shown redacted, the server's session goes up, then the client is read."""
    core, port, meter = make()
    core.start(10.0)
    assert port.timer == 15.0  # the start deadline
    core.client_text(json.dumps({"type": "response.create"}), 10.1)  # too early: not read
    assert port.take() == []
    up(core, CREATED, 10.2)
    (shown, injected) = port.take()
    assert shown == ("client", {"type": "session.created", "session": {"type": "realtime"}})
    assert injected[0] == "upstream" and injected[1]["event_id"] == INJECTED_EVENT_ID
    assert injected[1]["session"]["instructions"] == "SERVER INSTRUCTIONS"
    assert core.phase is Phase.INJECTING
    up(core, UPDATED, 10.3)
    assert [kind for kind, _ in port.take()] == ["client", "opened"]
    assert core.phase is Phase.OPEN and port.timer is None  # no deadline on this tier
    assert meter.upstream == [("session.created", 10.2), ("session.updated", 10.3)]


def test_an_upstream_that_starts_with_anything_else_ends_the_session():
    """A first event other than session.created is an upstream failure (1014)."""
    core, port, _ = make()
    core.start(0.0)
    up(core, {"type": "response.done"})
    ending = port.ending
    assert ending is not None and ending.outcome is Outcome.UPSTREAM_ERROR
    assert ending.close_code == 1014 and ending.error is not None
    assert "response.done first" in ending.error.message


def test_a_refused_injection_is_reported_without_its_message():
    """The upstream's error about the injected session ends it as upstream_rejected_session."""
    core, port, _ = make()
    core.start(0.0)
    up(core, CREATED)
    refusal = {
        "type": "error",
        "error": {"code": "invalid_value", "message": "tool secret", "event_id": INJECTED_EVENT_ID},
    }
    up(core, refusal)
    ending = port.ending
    assert ending is not None and ending.error is not None
    assert ending.error.code == "upstream_rejected_session"
    assert "secret" not in ending.error.message
    assert ("client", refusal) not in port.log


def test_the_start_has_a_deadline():
    """No session.updated within the start deadline ends the session; an early wake-up does not."""
    core, port, _ = make(Deadlines(start_seconds=2.0))
    core.start(100.0)
    up(core, CREATED, 100.5)
    core.timer(101.9)
    assert port.ending is None and port.timer == 102.0
    core.timer(102.0)
    assert port.ending is not None and port.ending.error is not None
    assert port.ending.error.message == "the upstream did not start a session in time"
    assert port.timer is None


def test_a_locked_change_is_refused_and_the_session_goes_on():
    """A client's instructions get a field_locked error naming its event; later events pass."""
    core, port, meter = opened()
    update = {"type": "session.update", "event_id": "c1", "session": {"instructions": "x"}}
    core.client_text(json.dumps(update), 1.0)
    core.client_text(json.dumps(update), 1.1)
    core.client_text(json.dumps({"type": "response.create"}), 1.2)
    first, second, forwarded = port.take()
    assert first[0] == "reply" and first[1]["error"]["code"] == "field_locked"
    assert first[1]["error"]["event_id"] == "c1"
    assert first[1]["event_id"] != second[1]["event_id"]  # each relay event has its own id
    assert first[1]["event_id"].startswith("event_relay_0123456789ab_")
    assert forwarded == ("upstream", {"type": "response.create"})
    assert meter.client == [("response.create", 1.2)]
    assert port.ending is None


def test_a_commit_flushes_the_input_audio_first():
    """The decoder's tail goes up before the commit that ends the turn."""
    core, port, _ = opened()
    core.client_text(json.dumps({"type": "input_audio_buffer.commit"}), 1.0)
    assert port.take() == [("flush", None), ("upstream", {"type": "input_audio_buffer.commit"})]


def test_idle_time_counts_from_the_last_sign_of_conversation():
    """Audio alone does not keep a session alive; client events and detected speech do."""
    core, port, _ = opened(Deadlines(start_seconds=5.0, idle_seconds=10.0))
    assert port.timer == 10.0
    core.client_text(json.dumps({"type": "response.create"}), 4.0)
    up(core, {"type": "input_audio_buffer.speech_started"}, 6.0)
    core.client_text(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), 9.0)
    core.timer(10.0)  # the deadline set at the start: activity since moved it on
    assert port.ending is None and port.timer == 16.0
    core.timer(16.0)
    ending = port.ending
    assert ending == Ending(Outcome.IDLE, 1000, ending.error) and ending.error is not None
    assert ending.error.code == "session_idle"


def test_a_session_has_a_maximum_length():
    """max_session_seconds counts from the upstream's opening, whatever the activity."""
    core, port, _ = opened(Deadlines(start_seconds=5.0, max_session_seconds=60.0))
    assert port.timer == 60.0
    core.client_text(json.dumps({"type": "response.create"}), 59.0)
    core.timer(60.0)
    assert port.ending is not None and port.ending.outcome is Outcome.EXPIRED
    assert port.ending.error is not None and port.ending.error.code == "session_expired"


def test_responses_in_flight_are_tracked():
    """response.created adds a response, response.done removes it."""
    core, _, _ = opened()
    up(core, {"type": "response.created", "response": {"id": "resp_1"}})
    up(core, {"type": "response.created", "response": {"id": "resp_2"}})
    up(core, {"type": "response.done", "response": {"id": "resp_1"}})
    assert core.responses == {"resp_2"}


@pytest.mark.parametrize(
    ("code", "keepalive_failed", "client_slow", "outcome", "error_code"),
    [
        (1000, False, False, Outcome.COMPLETED, None),
        (1001, False, False, Outcome.COMPLETED, None),
        (1006, True, False, Outcome.UPSTREAM_ERROR, "upstream_timeout"),
        (1006, True, True, Outcome.CLIENT_TIMEOUT, "client_timeout"),
        (None, False, False, Outcome.UPSTREAM_ERROR, "upstream_closed"),
        (4000, False, False, Outcome.UPSTREAM_ERROR, "upstream_closed"),
    ],
)
def test_how_an_upstream_close_ends_the_session(
    code, keepalive_failed, client_slow, outcome, error_code
):
    """The upstream's close code and the keepalive state decide the outcome and who is blamed."""
    core, port, _ = opened()
    core.upstream_closed(code, keepalive_failed=keepalive_failed, client_slow=client_slow)
    ending = port.ending
    assert ending is not None and ending.outcome is outcome
    assert (ending.error.code if ending.error else None) == error_code


def test_a_drain_warns_then_ends_with_1012_and_nothing_follows():
    """A warning leaves the session open; the drain ends it; later frames are ignored."""
    core, port, _ = opened()
    from app.errors import ShuttingDownError

    core.warn(ShuttingDownError("closing in 30 s"))
    (warning,) = port.take()
    assert warning[1]["error"]["code"] == "server_shutting_down" and port.ending is None
    core.drain()
    core.client_text(json.dumps({"type": "response.create"}), 1.0)
    up(core, {"type": "response.done"})
    core.client_closed()
    assert port.take() == [("end", port.ending)]
    assert port.ending is not None and port.ending.close_code == 1012
    assert port.ending.outcome is Outcome.SHUTDOWN


def test_the_client_leaving_ends_the_session_without_an_error():
    """A client close is the client_closed outcome, with nothing to tell it."""
    core, port, _ = opened()
    core.client_closed()
    assert port.ending == Ending(Outcome.CLIENT_CLOSED, 1000)


def test_an_unreadable_server_session_is_never_forwarded():
    """A session.updated the relay cannot parse would show the instructions: the session ends."""
    core, port, _ = opened()
    core.upstream_text('{"type": "session.updated", "session": {"instructions": "SECRET"', 1.0)
    assert all(kind != "client" for kind, _ in port.log)
    assert port.ending is not None and port.ending.outcome is Outcome.UPSTREAM_ERROR
