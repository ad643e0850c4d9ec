"""A WebRTC call's audio: the caller's track read as PCM16, and the answer's track (`Speaker`).

On a WebRTC call the server plays the response audio itself, paced on the RTP track, and tells
the caller with `output_audio_buffer.started` when a response's audio starts playing and
`output_audio_buffer.stopped` when it has drained after `response.done`; a barge-in or a client
`output_audio_buffer.clear` drops what is left (`output_audio_buffer.cleared`), REALTIME.md §15.3,
https://developers.openai.com/api/docs/guides/realtime-conversations#client-and-server-events-for-audio-in-webrtc.
`Speaker` is that buffer: 24 kHz mono PCM16 in, 20 ms frames out in real time, silence when idle
(aiortc's Opus encoder takes it from there). Each response's audio plays whole and in the order
it started; `on_event(type, response_id)` reports the three events.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

logger = logging.getLogger(__name__)

RATE = 24_000  # the session's PCM16 rate (REALTIME.md §11)
FRAME_SAMPLES = RATE // 50  # 20 ms, one RTP packet of Opus
FRAME_BYTES = FRAME_SAMPLES * 2
MAX_QUEUED_BYTES = 5 * 60 * RATE * 2  # five minutes of answer audio waiting to play

PlaybackEvent = Callable[[str, str], None]


@dataclass
class _Playback:
    response_id: str
    audio: bytearray = field(default_factory=bytearray)
    finished: bool = False  # `response.done` was sent: no more audio comes
    started: bool = False


class Speaker(MediaStreamTrack):
    """The answer's audio track: plays each response's audio and reports what it plays.

    Args:
        on_event: Called (synchronously, from `recv`) with `output_audio_buffer.started` or
            `.stopped` and the response's id.
        max_bytes: Audio queued at most; beyond it a response's audio is cut short.
    """

    kind = "audio"

    def __init__(self, on_event: PlaybackEvent, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        super().__init__()
        self._on_event = on_event
        self._max_bytes = max_bytes
        self._queue: deque[_Playback] = deque()
        self._queued = 0
        self._cut: set[str] = set()  # responses cleared: their late audio is dropped
        self._start: float | None = None
        self._pts = 0
        self.last_response_id: str | None = None  # the last response whose audio started

    def play(self, response_id: str, audio: bytes) -> None:
        """Queue a response's audio (24 kHz mono PCM16)."""
        if response_id in self._cut:
            return
        playback = next((p for p in self._queue if p.response_id == response_id), None)
        if playback is None:
            playback = _Playback(response_id)
            self._queue.append(playback)
        room = self._max_bytes - self._queued
        if len(audio) > room:
            logger.warning("local upstream: answer audio over %d bytes dropped", self._max_bytes)
            audio = audio[: max(0, room) & ~1]
        playback.audio += audio
        self._queued += len(audio)

    def finish(self, response_id: str) -> None:
        """The response is done: `stopped` follows once its audio has played."""
        for playback in self._queue:
            if playback.response_id == response_id:
                playback.finished = True

    def clear(self) -> str | None:
        """Drop every queued response's audio; the id of the one playing (or next), if any."""
        if not self._queue:
            return None
        first = self._queue[0].response_id
        self._cut.clear()  # only responses queued now can still stream audio
        self._cut.update(p.response_id for p in self._queue if not p.finished)
        self._queue.clear()
        self._queued = 0
        return first

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(self._next_chunk())
        frame.sample_rate, frame.pts = RATE, self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME_SAMPLES
        return frame

    def _next_chunk(self) -> bytes:
        chunk = bytearray()
        while self._queue and len(chunk) < FRAME_BYTES:
            playback = self._queue[0]
            if playback.audio and not playback.started:
                playback.started = True
                self.last_response_id = playback.response_id
                self._on_event("output_audio_buffer.started", playback.response_id)
            taken = playback.audio[: FRAME_BYTES - len(chunk)]
            del playback.audio[: len(taken)]
            self._queued -= len(taken)
            chunk += taken
            if playback.audio or not playback.finished:
                break  # a frame's worth, or waiting for more of this response: silence till then
            self._queue.popleft()
            if playback.started:
                self._on_event("output_audio_buffer.stopped", playback.response_id)
        return bytes(chunk.ljust(FRAME_BYTES, b"\0"))


async def listen(track: MediaStreamTrack, hear: Callable[[bytes], None]) -> None:
    """Read the caller's audio track until it ends, handing `hear` 24 kHz mono PCM16.

    aiortc decodes Opus to 48 kHz stereo into a queue without a bound, so this never waits on
    anything but the track: `hear` must only store what it is given.
    """
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if not isinstance(frame, av.AudioFrame):
            continue
        for out in resampler.resample(frame):
            hear(bytes(out.planes[0])[: out.samples * 2])
