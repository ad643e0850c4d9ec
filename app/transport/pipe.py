"""A WebSocket session's data plane: the two sockets' callbacks, fed to the session core.

The `Pipe` is the transport adapter around `core.session.SessionCore` for a client WebSocket
and an upstream WebSocket. It is both legs' sink (`legs.py`): each complete message arrives from
a protocol callback, is stamped with the time and goes to the core, whose decisions the pipe
carries out at once, synchronously, with no task per message. It owns what is about sockets:

* flow control, as a proxy does it: when one side's write buffer is over its high-water mark,
  the other side stops being read;
* frame sizes (`RELAY_CLIENT_MAX_MESSAGE_BYTES`: larger closes with 1009);
* the client's wire format (`audio.wire`): binary audio in is decoded into appends, and audio
  out is encoded into binary frames, paced (`PACKET_GAP_SECONDS`) so that socket reads go in
  between two packets' encoding; upstream messages that arrive meanwhile wait behind them, and
  past `RELAY_UPSTREAM__MAX_QUEUE` of them the upstream stops being read;
* the timer the core asks for, and the server tool calls it asks to run (each a task, at most
  `RELAY_TOOL_CONCURRENCY` at once per session, cancelled with the session).

`run` returns the core's `Ending`; a failure the core did not foresee (a bug) is raised there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

from app.audio.wire import ClientAudio
from app.config import ModelPrice
from app.core.budget import Budget, ResponseGate
from app.core.policy import SessionPolicy
from app.core.session import Deadlines, Ending, SessionCore
from app.errors import InvalidAudioError, MessageTooBigError, UpstreamClosedError, UpstreamError
from app.metrics import SessionMeter
from app.transport.legs import ClientGoneError, ClientLeg, UpstreamGoneError, UpstreamLeg

AUDIO_OUTPUT_EVENTS: Final = frozenset(
    {"response.output_audio.delta", "response.output_audio.done", "response.done"}
)

# Binary audio output: a delta's first packet is encoded and sent at once, each later one this
# long after the one before (docs/design.md, "Pacing binary audio").
PACKET_GAP_SECONDS: Final = 0.002

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

_UNAVAILABLE: Final = '{"error": "the tool is not available"}'
_FAILED: Final = '{"error": "the tool failed"}'
_TOO_MANY_CALLS: Final = '{"error": "too many tool calls at once; try again"}'


class Pipe:
    """One session's data plane: the client leg, the upstream leg, and the core between them.

    `run` attaches the upstream and starts the core's clock; the client is attached (read) when
    the core decides the session is open.
    """

    def __init__(
        self,
        client: ClientLeg,
        upstream: UpstreamLeg,
        audio: ClientAudio,
        *,
        policy: SessionPolicy,
        deadlines: Deadlines,
        meter: SessionMeter,
        session_id: str,
        event_ids: Iterator[int],
        count_error: Callable[[str, str], None],
        max_message_bytes: int,
        max_queue: int,
        log: Log,
        run_tool: Callable[[str, str, str], Awaitable[str]] | None = None,
        tool_concurrency: int = 4,
        show_tool_calls: bool = False,
        budget: Budget | None = None,
        gate: ResponseGate | None = None,
        pricing: Callable[[str], ModelPrice | None] = lambda model: None,
        count_budget: Callable[[str], None] = lambda scope: None,
        count_ignored: Callable[[str], None] = lambda path: None,
        beta: bool = False,
        on_spent: Callable[[float], None] = lambda usd: None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[Ending] = self.loop.create_future()
        self.client, self.upstream, self.audio = client, upstream, audio
        self.core = SessionCore(
            policy,
            deadlines,
            meter,
            self,
            session_id=session_id,
            event_ids=event_ids,
            count_error=lambda code: count_error("relay", code),
            show_tool_calls=show_tool_calls,
            budget=budget,
            gate=gate,
            pricing=pricing,
            count_budget=count_budget,
            count_ignored=count_ignored,
            beta=beta,
            log=log,
        )
        self.spent = on_spent
        self._run_tool = run_tool
        self._tool_slots = asyncio.Semaphore(tool_concurrency)
        self._max_tool_calls = 4 * tool_concurrency
        self._tool_tasks: set[asyncio.Task[None]] = set()
        self.meter = meter
        self.log = log
        self._count_error = count_error
        self.limit = max_message_bytes
        self.max_queue = max_queue
        self.binary_output = audio.binary_output
        # While binary audio frames are being paced out: the frames left, and upstream messages
        # (or its close) that arrived meanwhile, in order.
        self._frames: Iterator[bytes] | None = None
        self._backlog: deque[bytes | None] = deque()
        self._next_packet: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._client_write_paused = False
        self._bad_delta_logged = False
        self._settled: asyncio.Event | None = None

    async def run(self) -> Ending:
        self.core.start(time.perf_counter())
        self.upstream.attach(self)  # may deliver what came with the handshake, at once
        try:
            return await self.ended
        finally:
            if not self.ended.done():
                self.ended.cancel()
            for handle in (self._timer, self._next_packet):
                if handle is not None:
                    handle.cancel()
            for task in self._tool_tasks:
                task.cancel()
            if self._tool_tasks:  # a session's tasks end with it (bounded: they were cancelled)
                await asyncio.wait(self._tool_tasks, timeout=1.0)
            # The close handshakes need both sockets read again; the core ignores what comes.
            self.client.resume_reading()
            self.upstream.resume_reading()

    def failed(self, exc: Exception) -> None:
        """Something raised while the session ran: a peer left, or a bug (raised by `run`)."""
        if isinstance(exc, ClientGoneError):
            self.core.client_closed()
        elif isinstance(exc, UpstreamGoneError):
            self.core.fail(UpstreamClosedError("the upstream connection closed"))
        elif not self.ended.done():
            self.ended.set_exception(exc)

    # -- the core's decisions (core.session.Decisions)

    def to_upstream(self, text: str) -> None:
        self.upstream.send_text(text)

    def to_client(self, event_type: str, text: str) -> None:
        if self.binary_output and event_type in AUDIO_OUTPUT_EVENTS:
            self._binary_audio(event_type, text)
        else:
            self.client.send_text(text)

    def reply(self, text: str) -> None:
        self.client.reply_text(text)

    def flush_input(self) -> None:
        tail = self.audio.flush_event()
        if tail is not None:
            self.upstream.send_text(tail)

    def run_tool(self, call_id: str, name: str, arguments: str) -> None:
        if len(self._tool_tasks) >= self._max_tool_calls:  # running and waiting their turn
            self.log.warning("tool %s: too many calls at once; answered with an error", name)
            self.core.tool_done(call_id, _TOO_MANY_CALLS, time.perf_counter())
            return
        task = self.loop.create_task(self._tool_call(call_id, name, arguments))
        self._tool_tasks.add(task)
        task.add_done_callback(self._tool_tasks.discard)

    async def _tool_call(self, call_id: str, name: str, arguments: str) -> None:
        output = _UNAVAILABLE  # the core runs only the tools the session was given
        if self._run_tool is not None:
            try:
                async with self._tool_slots:
                    output = await self._run_tool(call_id, name, arguments)
            except Exception as exc:  # a bug: the model still gets an answer, the call closes
                self.log.error("tool %s failed: %s", name, type(exc).__name__)
                output = _FAILED
        try:
            self.core.tool_done(call_id, output, time.perf_counter())
        except Exception as exc:
            self.failed(exc)

    def opened(self) -> None:
        self.client.attach(self)

    def schedule(self, at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None and not self.ended.done():
            self._timer = self.loop.call_later(max(at - time.perf_counter(), 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = None
        try:
            self.core.timer(time.perf_counter())
        except Exception as exc:
            self.failed(exc)

    def end(self, ending: Ending) -> None:
        if not self.ended.done():
            self.ended.set_result(ending)

    # -- client -> upstream (legs.ClientSink)

    def client_text(self, text: str) -> None:
        start = time.perf_counter()
        try:
            if len(text) > self.limit:
                self.core.fail(MessageTooBigError(f"frames are limited to {self.limit} bytes"))
                return
            self.core.client_text(text, start)
        except Exception as exc:
            self.failed(exc)

    def client_bytes(self, frame: bytes) -> None:
        if self.ended.done():
            return  # not worth decoding
        start = time.perf_counter()
        try:
            if len(frame) > self.limit:
                self.core.fail(MessageTooBigError(f"frames are limited to {self.limit} bytes"))
                return
            try:
                append = self.audio.append_event(frame)
            except InvalidAudioError as exc:
                self.core.refuse(exc)
                return
            self.core.client_audio(append, len(frame), start, time.perf_counter())
        except Exception as exc:
            self.failed(exc)

    def client_closed(self) -> None:
        self.core.client_closed()

    def client_timed_out(self) -> None:
        self.core.client_timed_out()

    def client_write_paused(self, paused: bool) -> None:
        self._client_write_paused = paused
        self._sync_upstream_reading()
        if not paused:
            self._pace_after(0.0)

    def _sync_upstream_reading(self) -> None:
        """Read the upstream only while the client keeps up and the paced-audio backlog is
        under `RELAY_UPSTREAM__MAX_QUEUE` messages."""
        if self.ended.done():  # `run` has resumed both sockets for the close handshakes
            return
        if self._client_write_paused or len(self._backlog) >= self.max_queue:
            self.upstream.pause_reading()
        else:
            self.upstream.resume_reading()

    # -- upstream -> client (legs.UpstreamSink)

    def upstream_text(self, data: bytes) -> None:
        if self.ended.done():  # the core only counts what the responses in flight cost
            if self.core.settling:
                self._settling_text(data)
            return
        if self._frames is not None:  # behind the audio frames of an earlier delta
            self._backlog.append(data)
            self._sync_upstream_reading()
            return
        start = time.perf_counter()
        try:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.core.fail(UpstreamError("the upstream sent a frame that is not UTF-8"))
                return
            self.core.upstream_text(text, start)
        except Exception as exc:
            self.failed(exc)

    def _settling_text(self, data: bytes) -> None:
        try:
            self.core.upstream_text(data.decode(errors="replace"), time.perf_counter())
        except Exception as exc:  # the session has ended: nothing left to fail
            self.log.warning("after the end: %s", type(exc).__name__)
        if not self.core.settling and self._settled is not None:
            self._settled.set()

    async def settle(self, within: float) -> None:
        """After the end, wait (at most `within`) for the responses that were in flight to
        report their usage: what they cost is billed, so it counts."""
        if not self.core.settling:
            return
        self._settled = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._settled.wait()

    def upstream_binary(self, data: bytes) -> None:
        self.log.warning("dropped a binary frame from the upstream")

    def upstream_closed(self) -> None:
        if self.ended.done():
            if self._settled is not None:
                self._settled.set()  # nothing more comes
            return
        if self._frames is not None:  # the audio before it goes out first
            self._backlog.append(None)
            return
        upstream = self.upstream
        self.core.upstream_closed(
            upstream.close_code,
            keepalive_failed=upstream.keepalive_failed,
            client_slow=self._client_write_paused,
        )

    def upstream_write_paused(self, paused: bool) -> None:
        if self.ended.done():
            return
        if paused:
            self.client.pause_reading()
        else:
            self.client.resume_reading()

    # -- binary audio out, paced

    def _binary_audio(self, event_type: str, text: str) -> None:
        """Send an audio event with its audio as binary frames (`audio.wire`)."""
        audio, client = self.audio, self.client
        if event_type == "response.output_audio.delta":
            split = audio.delta_frames(text)
            if split is None:
                self._bad_delta()
                return
            text, frames = split
            client.send_text(text)
            self._frames = frames
            self._pace()  # the first packet at once, the others `PACKET_GAP_SECONDS` apart
            return
        if event_type == "response.output_audio.done":
            tail = audio.end_of_audio()
        else:  # response.done: a cancelled response leaves a tail that must not leak
            tail = []
            audio.interrupted()
        client.send_text(text)
        for frame in tail:
            client.send_bytes(frame)

    def _bad_delta(self) -> None:
        """Skip an audio delta that is not one; the session goes on (logged once)."""
        self._count_error("upstream", "invalid_audio")
        if not self._bad_delta_logged:
            self._bad_delta_logged = True
            self.log.warning("skipped an upstream audio delta that is not base64 PCM")

    def _pace_after(self, delay: float) -> None:
        """Send the next packet in `delay` seconds, unless that is already planned."""
        if self._next_packet is None and self._frames is not None:
            self._next_packet = self.loop.call_later(delay, self._pace)

    def _pace(self) -> None:
        """Encode and send the next packet of a delta; then what waited behind it."""
        self._next_packet = None
        frames = self._frames
        if frames is None or self.ended.done() or self._client_write_paused:
            return  # `client_write_paused(False)` plans the next one
        try:
            started = time.perf_counter()
            frame = next(frames, None)
            if frame is not None:
                self.meter.transcoded(time.perf_counter() - started)
                self.client.send_bytes(frame)
                if not self._client_write_paused:
                    self._pace_after(PACKET_GAP_SECONDS)
                return
            self._frames = None
            backlog = self._backlog
            while backlog and self._frames is None:
                data = backlog.popleft()
                if data is None:
                    self.upstream_closed()
                else:
                    self.upstream_text(data)
            self._sync_upstream_reading()
        except Exception as exc:
            self.failed(exc)
