"""The session core: one session's rules, with no socket, no event loop and no clock read.

After websockets' `Protocol` and h11's `Connection`: a transport feeds it what happened (a client
frame, an upstream frame, a timer that fired, a peer that left), each with the time it happened
on the transport's clock, and the core answers with decisions on its `Decisions` port: send this
text upstream, show this event to the client, reply with this `error`, start reading the client,
wake me at this time, end the session this way. A unit test drives it with strings and numbers
(tests/test_core.py); the transports in `app/transport/` carry the decisions out.

What it owns:

* the event policy (`SessionPolicy`: what a client may send, what it sees of the server's session);
* the injection handshake: the client is not read until the upstream has accepted the server's
  session (`session.created`, then `session.update` from the relay, then `session.updated`), and
  that must happen within `Deadlines.start_seconds`;
* the responses in flight (`response.created` to `response.done`), and the relay's own
  `response.create` after its tools' outputs, sent only while none is active;
* the tool calls (`core.tools`): which the relay runs, which the client never sees, and which a
  client may answer;
* the deadlines: the session's length, its idle time (no client event but audio, and no speech
  detected upstream) and the start;
* for a WebRTC call, whose client events never pass through the relay, the session as the
  upstream reports it (`core.watch`): a locked field the client changed is put back at once,
  and a call that keeps changing them ends;
* how a session ends (`Ending`: outcome, close code, and the error that tells the client why);
* what the meter counts (`Meter`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Final, Protocol

from app.codes import Outcome
from app.config import ModelPrice
from app.core.beta import (
    TRANSLATED_CLIENT_TYPES,
    client_event_to_ga,
    ga_param_to_beta,
    upstream_event_to_beta,
)
from app.core.budget import Budget, Reached, ResponseGate
from app.core.policy import INJECTED_EVENT_ID, SessionPolicy
from app.core.tools import ToolCalls
from app.core.usage import usage_totals
from app.core.watch import RESTORE_EVENT_ID, SessionWatch
from app.errors import (
    BudgetExhaustedError,
    ClientError,
    ClientTimeoutError,
    CloseCode,
    ErrorCode,
    InvalidEventError,
    ItemNotAllowedError,
    LockedFieldsChangedError,
    RateLimitedError,
    RelayError,
    SessionEndedError,
    ShuttingDownError,
    UpstreamClosedError,
    UpstreamError,
    UpstreamTimeoutError,
    event_for,
)

logger = logging.getLogger(__name__)

# Error codes that name how a session ended; any other RelayError ends it as `error`, and an
# upstream failure as `upstream_error`.
_OUTCOMES: Final[dict[str, Outcome]] = {
    ErrorCode.CLIENT_TIMEOUT: Outcome.CLIENT_TIMEOUT,
    ErrorCode.SESSION_LIMIT_REACHED: Outcome.LIMIT,  # over its cap after Redis lost its data
    ErrorCode.SESSION_EXPIRED: Outcome.EXPIRED,
    ErrorCode.SESSION_IDLE: Outcome.IDLE,
    ErrorCode.SERVER_SHUTTING_DOWN: Outcome.SHUTDOWN,
    ErrorCode.FIELD_LOCKED: Outcome.FIELD_LOCKED,
}
# A WebRTC call's locked fields are put back this many times; the next change ends the call.
MAX_RESTORES: Final = 2


class Phase(Enum):
    """Where a session is: its start (the injection handshake), open, or ended."""

    STARTING = auto()  # waiting for the upstream's session.created
    INJECTING = auto()  # the server's session sent; waiting for session.updated
    OPEN = auto()  # the client is read
    ENDED = auto()


@dataclass(frozen=True, slots=True)
class Ending:
    """How a session ends: its outcome, the close code the client gets, and why (if it is told)."""

    outcome: Outcome
    close_code: int
    error: RelayError | None = None


def ending_for(error: RelayError) -> Ending:
    """The ending that `error` causes: its close code, and the outcome its code names."""
    outcome = _OUTCOMES.get(error.code, Outcome.ERROR)
    if isinstance(error, UpstreamError):
        outcome = Outcome.UPSTREAM_ERROR
    return Ending(outcome, error.close_code, error)


@dataclass(frozen=True, slots=True)
class Deadlines:
    """A session's time limits, in seconds; None for no limit."""

    start_seconds: float  # the upstream must accept the server's session within this
    max_session_seconds: float | None = None
    idle_seconds: float | None = None


class Decisions(Protocol):
    """What the core asks a transport to do. Each call is one decision, carried out at once."""

    def to_upstream(self, text: str) -> None: ...
    def to_client(self, event_type: str, text: str) -> None: ...
    def reply(self, text: str) -> None: ...  # an `error` event a client frame caused
    def flush_input(self) -> None: ...  # the client's input audio ends here (a commit)
    def run_tool(self, call_id: str, name: str, arguments: str) -> None: ...  # then `tool_done`
    def spent(self, usd: float) -> None: ...  # the session's usage cost this much more
    def opened(self) -> None: ...  # the server's session is in place: read the client
    def schedule(self, at: float | None) -> None: ...  # call `timer` at `at` (None: never)
    def end(self, ending: Ending) -> None: ...  # close both sides; no more decisions follow


class Meter(Protocol):
    """What the core reports for metrics (`metrics.SessionMeter`); times on the core's clock."""

    def client_event(
        self, event_type: str, event: dict[str, Any], size: int, start: float
    ) -> None: ...
    def client_audio(self, size: int, start: float, decoded: float) -> None: ...
    def upstream_event(
        self, event_type: str, event: dict[str, Any] | None, text: str, start: float
    ) -> None: ...


class SessionCore:
    """The rules of one session, sans-I/O.

    Args:
        policy: the session's event policy, built at connect.
        deadlines: its time limits.
        meter: where its events are counted.
        out: the transport that carries out its decisions.
        session_id: the relay's id for the session (the prefix of its own event ids).
        event_ids: the numbers of the relay's own events to this client (shared with whoever
            sent it events before the core existed, so no id repeats).
        count_error: called with the code of each `error` event the relay itself sends.
        show_tool_calls: forward the server tools' calls and outputs to the client.
        budget: the session's spending limits (and what it has spent).
        gate: how many responses the client may start, at once and per minute.
        pricing: the price of a model (None: unpriced).
        count_budget: called with the scope of each budget the session exhausts.
        count_ignored: called with each field path removed from a client event (`ignore` mode).
        beta: the client speaks the beta dialect: its events are translated to GA before they
            are judged, and what it is shown back to beta (`core.beta`).
        watch: a WebRTC call's: what the client changed of the server's session (`core.watch`),
            put back by the relay up to `max_restores` times; then the call ends.
        count_restored: called with each field path put back.
        log: the session's logger.
    """

    def __init__(
        self,
        policy: SessionPolicy,
        deadlines: Deadlines,
        meter: Meter,
        out: Decisions,
        *,
        session_id: str,
        event_ids: Iterator[int] | None = None,
        count_error: Callable[[str], None] = lambda code: None,
        show_tool_calls: bool = False,
        budget: Budget | None = None,
        gate: ResponseGate | None = None,
        pricing: Callable[[str], ModelPrice | None] = lambda model: None,
        count_budget: Callable[[str], None] = lambda scope: None,
        count_ignored: Callable[[str], None] = lambda path: None,
        beta: bool = False,
        watch: SessionWatch | None = None,
        max_restores: int = MAX_RESTORES,
        count_restored: Callable[[str], None] = lambda path: None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
    ) -> None:
        self.policy, self.deadlines, self.meter, self.out = policy, deadlines, meter, out
        self.phase = Phase.STARTING
        self.responses: set[str] = set()  # ids of the responses in flight
        self.tools = ToolCalls(policy.server_tool_names, show=show_tool_calls)
        self.budget = budget if budget is not None else Budget()
        self.gate = gate if gate is not None else ResponseGate(max_concurrent=1, per_minute=None)
        self._pricing, self._count_budget = pricing, count_budget
        self._count_ignored = count_ignored
        self.beta = beta
        self._watch, self._max_restores, self._count_restored = watch, max_restores, count_restored
        self.restores = 0
        self._price = pricing(policy.model)
        self._transcription_model: str | None = None
        self._unspent: tuple[int, float] | None = None
        self._cancelled: set[str] = set()
        # Ended with responses in flight: their response.done still counts (`_settle`).
        self.settling = False
        # The relay's own response.create: its event id, and whether it is still unanswered
        # (no response.created since). Tool events carry a prefix the client cannot know.
        self._follow_up: str | None = None
        self._follow_up_pending = False
        self._tool_prefix = f"relay_tool_{session_id[12:24]}_"
        self.ending: Ending | None = None
        self._count_error = count_error
        self._log = log
        self._event_ids = event_ids if event_ids is not None else itertools.count(1)
        self._id_prefix = f"event_relay_{session_id[:12]}_"
        self._started = self._activity = 0.0
        # Upstream events whose arrival changes the core's state; every other one only passes.
        # Each returns the text to show the client, or None to show nothing.
        self._tracked: dict[str, _Tracker] = {
            "input_audio_buffer.speech_started": self._speech_started,
            "response.created": self._response_created,
            "response.output_item.done": self._output_item_done,
            "response.done": self._response_done,
            "error": self._error,
            "session.updated": self._session_updated,
            "conversation.item.input_audio_transcription.completed": self._transcribed,
        }
        if policy.server_tool_names:
            self._tracked |= {
                "response.output_item.added": self._output_item_added,
                "response.function_call_arguments.delta": self._arguments,
                "response.function_call_arguments.done": self._arguments,
                "conversation.item.added": self._conversation_item,
                "conversation.item.done": self._conversation_item,
                "conversation.item.created": self._conversation_item,
                "conversation.item.retrieved": self._conversation_item,
            }

    # -- the start -----------------------------------------------------------------------------

    def start(self, now: float, *, injected: dict[str, Any] | None = None) -> None:
        """The upstream is open: wait for its `session.created`, within the start deadline.

        `injected`: the session in place already (a WebRTC call is created with it), so the
        session is open at once.
        """
        self._started = self._activity = now
        if injected is not None:
            self._session_updated({"session": injected}, "")
            self.phase = Phase.OPEN
            self.out.schedule(self._next_deadline())
            self.out.opened()
            return
        self.out.schedule(now + self.deadlines.start_seconds)

    def _starting(
        self, event_type: str, event: dict[str, Any] | None, text: str, now: float
    ) -> None:
        """An upstream event before the server's session is in place (the handshake)."""
        if self.phase is Phase.STARTING:
            self.out.to_client(event_type, self._shown(event_type, text))
            self.meter.upstream_event(event_type, event, text, now)
            if event_type != "session.created":
                raise UpstreamError(f"the upstream sent {event_type or 'a non-event'} first")
            self.out.to_upstream(self.policy.injected)
            self.phase = Phase.INJECTING
            return
        if event_type == "error" and _caused_by(event, INJECTED_EVENT_ID):
            error = event["error"] if event else {}
            self._log.warning(
                "the upstream refused the injected session: %s (param %s)",
                error.get("code"),
                error.get("param"),
            )
            # Its message stays in the log: it may describe the server's tools.
            raise UpstreamError(
                "the upstream refused the relay's session settings",
                code=ErrorCode.UPSTREAM_REJECTED_SESSION,
            )
        self.out.to_client(event_type, self._shown(event_type, text))
        self.meter.upstream_event(event_type, event, text, now)
        if event_type == "session.updated":
            if event is not None:
                self._session_updated(event, text)
            self.phase = Phase.OPEN
            self.out.schedule(self._next_deadline())
            self.out.opened()  # may deliver client frames that waited, before it returns

    # -- client -> upstream --------------------------------------------------------------------

    def client_text(self, text: str, now: float) -> None:
        """A client text frame: forwarded upstream, or refused with an `error` reply."""
        if self.phase is not Phase.OPEN:
            return
        answered: list[str] | None = None  # no list per event on the hot path
        if self.beta:
            text = self._beta_to_ga(text)
        try:
            event_type, event, text, ignored = self.policy.decide(text)
            try:
                if event_type in _ITEM_EVENTS:  # rare: items and responses the client asks for
                    if event_type == "response.create":
                        refusal = self.gate.refusal(now, len(self.responses))
                        if refusal is not None:
                            raise RateLimitedError(f"{refusal}: this response was not started")
                    answered = self._client_items(event_type, event)
                elif event_type == "session.update" and self.policy.server_tools:
                    text = self._with_server_tools(event, text)
            except ClientError as exc:
                event_id = event.get("event_id")
                exc.client_event_id = event_id if isinstance(event_id, str) else None
                raise
        except ClientError as exc:
            self.refuse(exc)
            return
        if ignored:  # rare: fields this tier locks, removed rather than refused
            self._log.debug("ignored %s in a client's %s", ", ".join(ignored), event_type)
            for path in ignored:
                self._count_ignored(path)
        if event_type == "input_audio_buffer.commit":  # rare: once a turn
            self.out.flush_input()
        self.out.to_upstream(text)
        if answered:
            self.tools.close_client_calls(answered)
        if event_type == "response.create":
            self.gate.accepted(now)
        if event_type != "input_audio_buffer.append":
            self._activity = now  # audio alone is not activity: a silent microphone streams
        self.meter.client_event(event_type, event, len(text), now)

    def _beta_to_ga(self, text: str) -> str:
        """A beta client's frame in GA; audio appends (the same in both) are not parsed."""
        match = _TYPE_PREFIX.match(text)
        if match is None or match.group(1) not in TRANSLATED_CLIENT_TYPES:
            return text
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            return text  # the policy says why
        if not isinstance(event, dict):
            return text
        translated, dropped = client_event_to_ga(event)
        if dropped:
            self._log.debug("dropped beta fields without a GA equivalent: %s", ", ".join(dropped))
        return text if translated is event else json.dumps(translated, separators=(",", ":"))

    def _client_items(self, event_type: str, event: dict[str, Any]) -> list[str]:
        """The client calls its items answer; refuses outputs for no open client call."""
        if event_type in _ITEM_ID_EVENTS:
            if self.tools.hidden(event.get("item_id")):
                raise ItemNotAllowedError(
                    "that item is the server's", code=ErrorCode.ITEM_NOT_ALLOWED, param="item_id"
                )
            return []
        items: Any = [event.get("item")]
        if event_type == "response.create":
            response = event.get("response")
            if not isinstance(response, dict):
                return []
            self._check_tool_names(response.get("tools"), "response.tools")
            items = response.get("input")
            if not isinstance(items, list):
                return []
        answered = self.tools.client_outputs(items)
        if isinstance(answered, str):
            raise ItemNotAllowedError(
                f"no open call {answered!r} of a client tool to answer",
                code=ErrorCode.INVALID_CALL_ID,
                param="call_id",
            )
        return answered

    def _with_server_tools(self, event: dict[str, Any], text: str) -> str:
        """A client's session.update that sets tools keeps the server's tools beside its own."""
        session = event.get("session")
        if not isinstance(session, dict) or not isinstance(session.get("tools"), list):
            return text
        tools: list[Any] = session["tools"]
        self._check_tool_names(tools, "session.tools")
        merged = {**event, "session": {**session, "tools": [*tools, *self.policy.server_tools]}}
        return json.dumps(merged, separators=(",", ":"))

    def _check_tool_names(self, tools: Any, param: str) -> None:
        """A client's own tools may not take a server tool's name (the relay would run it)."""
        if not isinstance(tools, list):
            return
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if isinstance(name, str) and name in self.policy.server_tool_names:
                raise InvalidEventError(f"the tool name {name[:64]!r} is the server's", param=param)

    def client_audio(self, append: str | None, size: int, now: float, decoded: float) -> None:
        """A binary audio frame, decoded by the transport into `append` (None: nothing yet)."""
        if self.phase is not Phase.OPEN:
            return
        if append is not None:
            self.out.to_upstream(append)
        self.meter.client_audio(size, now, decoded)

    def refuse(self, error: ClientError) -> None:
        """Tell the client its frame was refused; the session goes on."""
        if self.phase is not Phase.ENDED:
            self.out.reply(self.error_text(error))

    def client_closed(self) -> None:
        self._end(Ending(Outcome.CLIENT_CLOSED, CloseCode.NORMAL))

    def client_timed_out(self) -> None:
        self._end(
            ending_for(ClientTimeoutError("the client did not answer keepalive pings in time"))
        )

    # -- upstream -> client --------------------------------------------------------------------

    def upstream_text(self, text: str, now: float) -> None:
        """An upstream text frame: shown to the client (redacted where the policy says)."""
        phase = self.phase
        if phase is Phase.ENDED:
            if self.settling:
                self._settle(text)
            return
        try:
            event_type, event, text = self.policy.upstream_event(text)
            if phase is not Phase.OPEN:
                self._starting(event_type, event, text, now)
                return
        except UpstreamError as exc:
            self._end(ending_for(exc))
            return
        track = self._tracked.get(event_type)
        if track is not None:  # rare: the events whose arrival changes the session
            if event_type == "input_audio_buffer.speech_started":  # typed, not parsed
                self._activity = now
            elif event is not None:
                shown = track(event, text)
                if shown is None:
                    return
                text = shown
        self.out.to_client(event_type, self._shown(event_type, text) if self.beta else text)
        self.meter.upstream_event(event_type, event, text, now)
        if self._unspent is not None:  # usage this event reported: counted once it is shown
            self._spend(*self._unspent)

    def upstream_closed(
        self, code: int | None, *, keepalive_failed: bool, client_slow: bool
    ) -> None:
        """The upstream socket closed with `code` (None: no close frame).

        `keepalive_failed`: the relay gave up on its pings; `client_slow`: the relay had stopped
        reading the upstream because the client was not reading, which is then to blame.
        """
        if code in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            self._end(Ending(Outcome.COMPLETED, code))
        elif keepalive_failed:
            if client_slow:
                self.fail(ClientTimeoutError("the client read too slowly to keep the session"))
            else:
                self.fail(UpstreamTimeoutError("the upstream stopped answering keepalive pings"))
        elif code is None or code == CloseCode.ABNORMAL:  # no close frame: the socket was lost
            self.fail(UpstreamClosedError("the upstream connection was lost"))
        else:
            self.fail(UpstreamClosedError(f"the upstream closed the session ({code})"))

    def _speech_started(self, event: dict[str, Any], text: str) -> str:
        return text  # `upstream_text` notes the activity: this event is typed, never parsed

    def _response_created(self, event: dict[str, Any], text: str) -> str:
        response_id = _response_id(event)
        if response_id is not None:
            self.responses.add(response_id)
        self.tools.response_created(event)
        self.gate.created()
        # The relay's ask is answered, or a response came first (then its refusal follows).
        self._follow_up_pending = False
        return text

    def _response_done(self, event: dict[str, Any], text: str) -> str:
        response_id = _response_id(event)
        if response_id is not None:
            self.responses.discard(response_id)
        text = self.tools.response_done(event, text)
        response = event.get("response")
        if isinstance(response, dict) and response.get("usage") is not None:
            self._unspent = usage_totals(response["usage"], self._price)
        self._go_on()
        return text

    def _session_updated(self, event: dict[str, Any], text: str) -> str:
        """Notes the transcription model, whose usage is priced as its own; on a WebRTC call,
        puts back what the client changed of the server's session."""
        if self._watch is not None and self.phase is Phase.OPEN:
            self._restore(self._watch, event.get("session"))
        try:
            model = event["session"]["audio"]["input"]["transcription"]["model"]
        except (KeyError, TypeError):
            return text
        if isinstance(model, str):
            self._transcription_model = model
        return text

    def _restore(self, watch: SessionWatch, session: Any) -> None:
        """Put back the locked fields a WebRTC client changed; past `max_restores`, hang up."""
        changed = watch.changed(session)
        if not changed:
            return
        for path in changed:
            self._count_restored(path)
        self.restores += 1
        if self.restores > self._max_restores:
            self._log.warning("the client changed %s again: ending the call", ", ".join(changed))
            message = f"the client kept changing fields its tier locks ({', '.join(changed)})"
            self.fail(LockedFieldsChangedError(message, param=changed[0]))
            return
        self._log.warning("the client changed %s: restoring them", ", ".join(changed))
        event_id = f"{RESTORE_EVENT_ID}_{next(self._event_ids)}"
        self.out.to_upstream(watch.restoring(changed, event_id))

    def _transcribed(self, event: dict[str, Any], text: str) -> str:
        usage = event.get("usage")
        if usage is not None and self._transcription_model is not None:
            self._unspent = usage_totals(usage, self._pricing(self._transcription_model))
        return text

    # -- budgets -------------------------------------------------------------------------------

    def _spend(self, tokens: int, cost_usd: float) -> None:
        self._unspent = None
        if cost_usd > 0:
            self.out.spent(cost_usd)
        reached = self.budget.add(tokens, cost_usd)
        if reached is None:
            return
        what, scope = reached
        kind = "token" if scope == "session_tokens" else "spending"
        if what is Reached.WARNING:
            message = f"this session has used 80 % of its {kind} budget"
            self.warn(BudgetExhaustedError(message, code=ErrorCode.BUDGET_WARNING))
        else:
            self.exhaust(scope, f"this session has used its {kind} budget")

    def exhaust(self, scope: str, message: str) -> None:
        """A budget is spent: cancel what is being said, tell the client, close with 1008."""
        if self.phase is Phase.ENDED:
            return
        self._count_budget(scope)
        self.fail(BudgetExhaustedError(message))  # cancels the responses in flight

    def _output_item_added(self, event: dict[str, Any], text: str) -> str | None:
        return text if self.tools.item_added(event) else None

    def _arguments(self, event: dict[str, Any], text: str) -> str | None:
        return text if self.tools.arguments(event) else None

    def _output_item_done(self, event: dict[str, Any], text: str) -> str | None:
        show, call = self.tools.item_done(event)
        if call is not None:
            self.out.run_tool(*call)
        return text if show else None

    def _conversation_item(self, event: dict[str, Any], text: str) -> str | None:
        return text if self.tools.conversation_item(event) else None

    def _error(self, event: dict[str, Any], text: str) -> str | None:
        """Errors about the relay's own tool events are the relay's, not the client's."""
        error = event.get("error")
        caused_by = error.get("event_id") if isinstance(error, dict) else None
        if not isinstance(caused_by, str) or not caused_by.startswith(self._tool_prefix):
            return text
        code = error.get("code") if isinstance(error, dict) else None
        if caused_by == self._follow_up and code == "conversation_already_has_active_response":
            # A response started upstream first (server VAD, a client's): ask again once it is
            # done. Its response.created came before this error, so one is active now.
            self._follow_up, self._follow_up_pending = None, False
            self.tools.follow_up_due = True
            self._go_on()
            return None
        self._log.warning("the upstream refused the relay's tool event: %s", code)
        return None

    # -- server tools --------------------------------------------------------------------------

    def tool_done(self, call_id: str, output: str, now: float) -> None:
        """A server tool's call has its output: the model gets it, then goes on."""
        if self.phase is not Phase.OPEN:
            return
        event = {
            "type": "conversation.item.create",
            "event_id": f"{self._tool_prefix}{next(self._event_ids)}",
            "item": {"type": "function_call_output", "call_id": call_id, "output": output},
        }
        self.out.to_upstream(json.dumps(event, separators=(",", ":")))
        self.tools.answered(call_id, self.responses)
        self._go_on()

    def _go_on(self) -> None:
        """Ask for the next response once every server call is answered and none is active.

        Never while a response is active or the relay's last ask is unanswered, so the relay
        never causes `conversation_already_has_active_response`; if a response started upstream
        meanwhile (server VAD), the upstream's refusal is hidden and the relay asks again later.
        """
        if not self.tools.follow_up_due or self.responses or self._follow_up_pending:
            return
        self.tools.follow_up_due = False
        self._follow_up_pending = True
        self._follow_up = f"{self._tool_prefix}{next(self._event_ids)}"
        event = {"type": "response.create", "event_id": self._follow_up}
        self.out.to_upstream(json.dumps(event, separators=(",", ":")))

    # -- time and the end ----------------------------------------------------------------------

    def timer(self, now: float) -> None:
        """The time asked for by `schedule` has come: end the session if a deadline passed."""
        if self.phase is Phase.ENDED:
            return
        if self.phase is not Phase.OPEN:
            if now >= self._started + self.deadlines.start_seconds:
                self.fail(UpstreamError("the upstream did not start a session in time"))
            else:
                self.out.schedule(self._started + self.deadlines.start_seconds)
            return
        deadlines = self.deadlines
        limit = deadlines.max_session_seconds
        if limit is not None and now >= self._started + limit:
            error = SessionEndedError(
                f"the session reached its {limit:.0f} s limit", code=ErrorCode.SESSION_EXPIRED
            )
            self.fail(error)
            return
        idle = deadlines.idle_seconds
        if idle is not None and now >= self._activity + idle:
            self.fail(
                SessionEndedError(
                    f"the session was idle for {idle:.0f} s", code=ErrorCode.SESSION_IDLE
                )
            )
            return
        self.out.schedule(self._next_deadline())  # activity moved the idle deadline on

    def _next_deadline(self) -> float | None:
        deadlines = self.deadlines
        times = []
        if deadlines.max_session_seconds is not None:
            times.append(self._started + deadlines.max_session_seconds)
        if deadlines.idle_seconds is not None:
            times.append(self._activity + deadlines.idle_seconds)
        return min(times) if times else None

    def drain(self) -> None:
        """The relay is shutting down: end the session with 1012, so the client reconnects."""
        self.fail(ShuttingDownError("the relay is restarting; reconnect"))

    def _shown(self, event_type: str, text: str) -> str:
        """What the client sees of an upstream event: in its own dialect."""
        return upstream_event_to_beta(event_type, text) if self.beta else text

    def warn(self, error: RelayError) -> None:
        """Send `error` as a warning; the session goes on."""
        if self.phase is not Phase.ENDED:
            self.out.to_client("error", self.error_text(error))

    def fail(self, error: RelayError) -> None:
        """End the session because of `error`, which the client is told."""
        self._end(ending_for(error))

    def _end(self, ending: Ending) -> None:
        if self.phase is Phase.ENDED:
            return
        self.phase = Phase.ENDED
        self.ending = ending
        self.out.schedule(None)
        if self.responses and ending.outcome not in _UPSTREAM_GONE:
            # What the responses in flight cost is billed: cancel them, and count the usage of
            # their response.done (`settling`) before the upstream closes.
            self.settling = True
            for response_id in sorted(self.responses - self._cancelled):
                self._cancel(response_id)
        self.out.end(ending)

    def _cancel(self, response_id: str) -> None:
        self._cancelled.add(response_id)
        event = {"type": "response.cancel", "response_id": response_id}
        self.out.to_upstream(json.dumps(event, separators=(",", ":")))

    def _settle(self, text: str) -> None:
        """After the end: count the usage of the responses that were in flight (not shown)."""
        try:
            event_type, event, _ = self.policy.upstream_event(text)
        except UpstreamError:
            return
        if event_type != "response.done" or event is None:
            return
        response = event.get("response")
        response_id = _response_id(event)
        if response_id is not None:
            self.responses.discard(response_id)
        if isinstance(response, dict) and response.get("usage") is not None:
            _, cost_usd = usage_totals(response["usage"], self._price)
            if cost_usd > 0:
                self.out.spent(cost_usd)
        if not self.responses:
            self.settling = False

    def error_text(self, error: RelayError) -> str:
        """The `error` event telling this client about `error`, counted as sent."""
        self._count_error(error.code)
        event_id = f"{self._id_prefix}{next(self._event_ids)}"
        event = event_for(error, event_id=event_id, client_event_id=error.client_event_id)
        param = event["error"]["param"]
        if self.beta and param is not None:
            event["error"]["param"] = ga_param_to_beta(param)
        return json.dumps(event, separators=(",", ":"))


# Client events that name items or carry them: judged against the session's tool calls.
_ITEM_ID_EVENTS: Final = frozenset(
    {"conversation.item.retrieve", "conversation.item.delete", "conversation.item.truncate"}
)
# Client events are typed from their first bytes, as the upstream's are (policy.py).
_TYPE_PREFIX: Final = re.compile(r'\{\s*"type"\s*:\s*"([^"\\]+)"')
# Endings after which nothing more comes from the upstream.
_UPSTREAM_GONE: Final = frozenset({Outcome.UPSTREAM_ERROR, Outcome.COMPLETED})
_ITEM_EVENTS: Final = frozenset({"conversation.item.create", "response.create", *_ITEM_ID_EVENTS})

_Tracker = Callable[[dict[str, Any], str], str | None]


def _caused_by(event: dict[str, Any] | None, event_id: str) -> bool:
    error = event.get("error") if event else None
    return isinstance(error, dict) and error.get("event_id") == event_id


def _response_id(event: dict[str, Any] | None) -> str | None:
    response = event.get("response") if event else None
    response_id = response.get("id") if isinstance(response, dict) else None
    return response_id if isinstance(response_id, str) else None
