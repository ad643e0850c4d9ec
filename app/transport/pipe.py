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
* and, as every adapter does (`driver.CoreDriver`), the core's timer, its tool calls and its end.

`run` returns the core's `Ending`; a failure the core did not foresee (a bug) is raised there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

from app.audio.wire import ClientAudio
from app.core.session import Ending
from app.errors import InvalidAudioError, MessageTooBigError, UpstreamClosedError
from app.metrics import SessionMeter
from app.transport.driver import CoreDriver, CoreFactory, Log, ToolRunner
from app.transport.legs import ClientGoneError, ClientLeg, UpstreamGoneError, UpstreamLeg

AUDIO_OUTPUT_EVENTS: Final = frozenset(
    {"response.output_audio.delta", "response.output_audio.done", "response.done"}
)

# Binary audio output: a delta's first packet is encoded and sent at once, each later one this
# long after the one before (docs/design.md, "Pacing binary audio").
PACKET_GAP_SECONDS: Final = 0.002


class Pipe(CoreDriver):
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
        core: CoreFactory,
        meter: SessionMeter,
        count_error: Callable[[str, str], None],
        max_message_bytes: int,
        max_queue: int,
        log: Log,
        run_tool: ToolRunner | None = None,
        tool_concurrency: int = 4,
        on_spent: Callable[[float], None] = lambda usd: None,
    ) -> None:
        self.client, self.upstream, self.audio = client, upstream, audio
        super().__init__(
            core, log=log, run_tool=run_tool, tool_concurrency=tool_concurrency, on_spent=on_spent
        )
        self.meter = meter
        self._count_error = count_error
        self.limit = max_message_bytes
        self.max_queue = max_queue
        self.binary_output = audio.binary_output
        # While binary audio frames are being paced out: the frames left, and upstream messages
        # (or its close) that arrived meanwhile, in order.
        self._frames: Iterator[bytes] | None = None
        self._backlog: deque[bytes | None] = deque()
        self._next_packet: asyncio.TimerHandle | None = None
        self._client_write_paused = False
        self._bad_delta_logged = False

    async def run(self) -> Ending:
        self.core.start(time.perf_counter())
        self.upstream.attach(self)  # may deliver what came with the handshake, at once
        try:
            return await self.ended
        finally:
            if self._next_packet is not None:
                self._next_packet.cancel()
            await self.stop()
            # The close handshakes need both sockets read again; the core ignores what comes.
            self.client.resume_reading()
            self.upstream.resume_reading()

    def failed(self, exc: Exception) -> None:
        """Something raised while the session ran: a peer left, or a bug (raised by `run`)."""
        if isinstance(exc, ClientGoneError):
            self.core.client_closed()
        elif isinstance(exc, UpstreamGoneError):
            self.core.fail(UpstreamClosedError("the upstream connection closed"))
        else:
            super().failed(exc)

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

    def opened(self) -> None:
        self.client.attach(self)

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
        if self._frames is not None and not self.ended.done():
            self._backlog.append(data)  # behind the audio frames of an earlier delta
            self._sync_upstream_reading()
            return
        super().upstream_text(data)

    def upstream_binary(self, data: bytes) -> None:
        self.log.warning("dropped a binary frame from the upstream")

    def upstream_closed(self) -> None:
        if self.ended.done():
            self.settled()  # nothing more comes
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
