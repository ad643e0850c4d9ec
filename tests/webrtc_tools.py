"""A WebRTC caller for tests, as a browser is one: an aiortc peer with a microphone track playing
PCM16 24 kHz audio in real time and the `oai-events` data channel, whose remote audio is kept."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from typing import Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

RATE = 24_000
FRAME = 480  # 20 ms at 24 kHz


class Microphone(MediaStreamTrack):
    """Plays PCM16 24 kHz mono in 20 ms frames at real time, then silence."""

    kind = "audio"

    def __init__(self, pcm: bytes = b"") -> None:
        super().__init__()
        self.pending = bytearray(pcm)
        self._pts = 0
        self._start: float | None = None

    def play(self, pcm: bytes) -> None:
        self.pending += pcm

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        size = FRAME * 2
        chunk = bytes(self.pending[:size]).ljust(size, b"\0")
        del self.pending[:size]
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(chunk)
        frame.sample_rate, frame.pts = RATE, self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame


class Caller:
    """One call's browser side: offer, answer, events on the data channel, audio heard."""

    def __init__(self, pcm: bytes = b"") -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.microphone = Microphone(pcm)
        self.pc.addTrack(self.microphone)
        self.events: list[dict[str, Any]] = []
        self.heard = bytearray()  # the remote track, as PCM16 24 kHz mono
        self.opened = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", self._message)
        self.pc.on("track", self._track)

    def _message(self, message: str | bytes) -> None:
        self.events.append(json.loads(message))
        task = asyncio.ensure_future(self._notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()

    def _track(self, track: MediaStreamTrack) -> None:
        task = asyncio.ensure_future(self._listen(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for out in resampler.resample(frame):
                self.heard += bytes(out.planes[0])[: out.samples * 2]

    async def offer(self) -> str:
        """The SDP offer with its candidates (aiortc gathers before it returns)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    async def wait_for(self, event_type: str, count: int = 1, within: float = 15.0) -> dict:
        """The `count`-th event of `event_type` on the data channel (bounded wait)."""
        async with asyncio.timeout(within), self._arrived:
            while True:
                seen = [e for e in self.events if e["type"] == event_type]
                if len(seen) >= count:
                    return seen[count - 1]
                await self._arrived.wait()

    def loudness(self) -> float:
        """RMS of what the remote track played (PCM16 units)."""
        samples = np.frombuffer(bytes(self.heard), "<i2").astype(np.float64)
        return float(np.sqrt((samples**2).mean())) if len(samples) else 0.0

    async def close(self) -> None:
        self.microphone.stop()
        await self.pc.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
