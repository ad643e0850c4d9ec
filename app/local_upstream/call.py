"""One WebRTC call of the local upstream: an aiortc peer connection around a `RealtimeSession`.

What OpenAI's calls do (REALTIME.md §15; https://developers.openai.com/api/docs/guides/realtime-webrtc
and https://developers.openai.com/api/docs/guides/realtime-server-controls), as this call does it:

- The caller's `oai-events` data channel carries client and server events, one JSON event per
  message. `session.created` goes out when it opens; server events from before that (a sideband
  may steer the call first) wait, bounded, and follow it.
- The caller's audio track (Opus, 48 kHz) becomes the session's 24 kHz PCM16 input (`hear`):
  server VAD, commits and transcription work as with appends. The answer's audio plays on the
  answer's track (`media.Speaker`) instead of going out as `response.output_audio.delta`, with
  `output_audio_buffer.started`, `.stopped` and `.cleared` (barge-in, or the client's
  `output_audio_buffer.clear`, which calls accept). The answer echoes the caller, as on the
  WebSocket.
- Sidebands (`?call_id=` WebSockets) get every server event except `session.created`, and
  their client events go to the session as the channel's do.
- One client event or chunk of audio is in the session at a time (`_turn`), as one WebSocket's
  receive loop has it, and server events leave in one order on every path (`_out`).
- The call ends on a hang-up, when the peer connection closes or fails, when it does not
  connect within `CONNECT_TIMEOUT_S`, when the caller floods the channel or stops reading it, or
  when the server stops. Ending stops every task of the call, closes the peer connection and
  closes the sidebands with 1000, each bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from app.local_upstream import media, pcm
from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.events import server_event
from app.local_upstream.records import CallRecord, ConnectionRecord
from app.local_upstream.session import RealtimeSession

logger = logging.getLogger(__name__)

CHANNEL_LABEL = "oai-events"
CONNECT_TIMEOUT_S = 30.0  # from the answer to a connected peer
CLOSE_TIMEOUT_S = 5.0
MAX_QUEUED_EVENTS = 256  # data-channel events waiting for the session; more ends the call
MAX_EARLY_EVENTS = 256  # server events waiting for the data channel to open; more are dropped
MAX_CHANNEL_BUFFER = 1 << 20  # bytes the caller has not taken yet; more ends the call
MAX_UNHEARD_BYTES = 10 * media.RATE * 2  # caller audio waiting for the session (10 s)


class Call:
    """A call from its offer to its end. `answer()` it, then it runs until `end()`.

    Args:
        record: Where the call is recorded (its id, offer and `session` part set).
        config: The server's settings, read as a WebSocket session reads them.
        model: The session's model unless the `session` part names one.
        on_closed: Called once, when the call has ended and everything of it is closed.

    Raises:
        ClientEventError: the `session` part is not a valid session (nothing was opened).
    """

    def __init__(
        self,
        record: CallRecord,
        config: LocalUpstreamConfig,
        model: str,
        on_closed: Callable[[Call], None],
    ) -> None:
        self.id = record.id
        self.record = record
        self.ended = asyncio.Event()
        self._on_closed = on_closed
        self.session = RealtimeSession(
            model=model,
            config=config,
            send=self._send,
            abort=lambda: self.end_soon("aborted"),
            events=record.events,
            input_audio=None,
            handlers={"output_audio_buffer.clear": self._clear_output},
        )
        if record.session is not None:
            self.session.configure(record.session)
        self._turn = asyncio.Lock()
        self._out = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ending: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()  # the peer connection is closed
        self._channel: RTCDataChannel | None = None
        self._channel_ready = False  # `session.created` went out on it
        self._early: list[tuple[dict[str, Any], str]] = []
        self._inbox: asyncio.Queue[str | bytes] = asyncio.Queue(MAX_QUEUED_EVENTS)
        self._unheard = bytearray()
        self._heard = asyncio.Event()
        self._listening = False
        self._sidebands: dict[ServerConnection, ConnectionRecord] = {}
        self._formats: dict[str, str] = {}  # each response's output audio format
        self._speaker = media.Speaker(self._playback_event)
        # No STUN server: the answer has host candidates only. aiortc's default queries
        # stun.l.google.com and waits up to 5 s for it, per answer, where it cannot be reached.
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        # Added before the offer is applied, the track takes the offer's audio transceiver:
        # one m=audio line, sendrecv, as OpenAI's answers have.
        self._pc.addTrack(self._speaker)
        self._pc.on("datachannel", self._on_channel)
        self._pc.on("track", self._on_track)
        self._pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer: str) -> str:
        """The SDP answer to `offer`, with its ICE candidates: aiortc gathers them before
        `setLocalDescription` returns (no trickle ICE, as OpenAI's answers have none).

        Raises:
            ValueError, LookupError, aiortc's InvalidAccessError or InvalidStateError: the
                offer is not one aiortc can answer.
        """
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        self._spawn(self._deadline(), "deadline")
        return str(self._pc.localDescription.sdp)

    async def serve_sideband(self, ws: ServerConnection, record: ConnectionRecord) -> None:
        """Attach a `?call_id=` WebSocket until it closes or the call ends (1000)."""
        if self.ended.is_set():
            await ws.close(CloseCode.NORMAL_CLOSURE, "call ended")
            return
        self._sidebands[ws] = record
        self.record.sidebands.append(record)
        try:
            async for message in ws:
                await self._receive(message, record.events)
        finally:
            self._sidebands.pop(ws, None)

    async def hang_up(self) -> None:
        """`POST .../hangup`: end the call; return once the peer connection is closed.

        The sidebands close after that: a relay may read its sideband only once its hang-up
        has been answered, and their closing handshakes would wait for it.
        """
        self.record.hung_up = True
        self.end_soon("hangup")
        await self._disconnected.wait()  # bounded: `_end` sets it, whatever happens

    def end_soon(self, reason: str) -> None:
        """Start ending the call (once; later reasons are ignored)."""
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(
                self._end(reason), name=f"local-upstream-{self.id}-end"
            )

    async def end(self, reason: str) -> None:
        """End the call and wait until everything of it is closed (bounded)."""
        self.end_soon(reason)
        assert self._ending is not None
        await asyncio.shield(self._ending)

    # -- the data channel and the caller's audio, in

    def _on_channel(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL or self._channel is not None:
            return
        self._channel = channel  # open already: aiortc announces it once open
        channel.on("message", self._on_message)
        self._spawn(self._read_channel(), "channel")

    def _on_message(self, message: str | bytes) -> None:
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            logger.warning("call %s: over %d events waiting; ending it", self.id, MAX_QUEUED_EVENTS)
            self.end_soon("flooded")

    async def _read_channel(self) -> None:
        async with self._turn:
            await self.session.start()  # `session.created`, the channel's first event
        while True:
            await self._receive(await self._inbox.get(), self.record.events)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self._listening:
            return
        self._listening = True
        self._spawn(media.listen(track, self._hear), "listen")
        self._spawn(self._feed(), "feed")

    def _hear(self, audio: bytes) -> None:
        self._unheard += audio
        excess = len(self._unheard) - MAX_UNHEARD_BYTES
        if excess > 0:  # the session is stuck (a long transcription): drop the oldest audio
            del self._unheard[:excess]
        self._heard.set()

    async def _feed(self) -> None:
        while True:
            await self._heard.wait()
            self._heard.clear()
            audio, self._unheard = bytes(self._unheard), bytearray()
            async with self._turn:
                if self.ended.is_set():
                    return
                await self.session.hear(audio)

    async def _receive(self, message: str | bytes, events: list[dict[str, Any]]) -> None:
        async with self._turn:
            if not self.ended.is_set():
                await self.session.receive(message, events)

    # -- server events and answer audio, out

    async def _send(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "response.output_audio.delta":
            self._play(event)
            return
        if kind == "response.created":
            output = event["response"]["audio"]["output"]["format"]["type"]
            self._formats[event["response"]["id"]] = output
        text = json.dumps(event)
        async with self._out:
            if self.ended.is_set():
                return
            self._to_channel(event, text)
            if kind != "session.created":  # the channel's alone (REALTIME.md §15.4)
                for ws, record in list(self._sidebands.items()):
                    try:
                        await ws.send(text)
                    except ConnectionClosed:
                        continue
                    record.sent.append(event)
        if kind == "response.done":
            self._formats.pop(event["response"]["id"], None)
            self._speaker.finish(event["response"]["id"])
        elif kind == "input_audio_buffer.speech_started":
            turn_detection = self.session.session["audio"]["input"]["turn_detection"]
            if turn_detection is not None and turn_detection.get("interrupt_response"):
                await self._clear(always=False)  # barge-in: the caller talks over the answer

    def _to_channel(self, event: dict[str, Any], text: str) -> None:
        if event["type"] == "session.created":
            self._deliver(event, text)
            for early in self._early:
                self._deliver(*early)
            self._early.clear()
            self._channel_ready = True
        elif self._channel_ready:
            self._deliver(event, text)
        elif len(self._early) < MAX_EARLY_EVENTS:
            self._early.append((event, text))
        else:
            logger.warning("call %s: %s dropped before the channel opened", self.id, event["type"])

    def _deliver(self, event: dict[str, Any], text: str) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER:
            logger.warning("call %s: the caller stopped reading its channel; ending it", self.id)
            self.end_soon("not reading")
            return
        try:
            channel.send(text)
        except ValueError:  # over the caller's a=max-message-size
            logger.warning("call %s: %s too large for the channel", self.id, event["type"])
            return
        self.record.sent.append(event)

    def _play(self, event: dict[str, Any]) -> None:
        response_id = event["response_id"]
        audio = base64.b64decode(event["delta"])
        fmt = self._formats.get(response_id, pcm.PCM)
        self._speaker.play(response_id, pcm.convert(audio, fmt, pcm.PCM))

    def _playback_event(self, kind: str, response_id: str) -> None:
        self._spawn(self._send(server_event(kind, response_id=response_id)), kind)

    async def _clear_output(self, event: dict[str, Any]) -> None:
        await self._clear(always=True)

    async def _clear(self, *, always: bool) -> None:
        """Drop the answer audio left to play and say so (`always`: even if there was none)."""
        cleared = self._speaker.clear()
        if cleared is None and not always:
            return
        response_id = cleared or self._speaker.last_response_id
        await self._send(server_event("output_audio_buffer.cleared", response_id=response_id))

    # -- lifetime

    def _on_state(self) -> None:
        state = self._pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self.end_soon(f"peer {state}")

    async def _deadline(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._connected.wait()
        except TimeoutError:
            logger.info("call %s: not connected within %.0f s", self.id, CONNECT_TIMEOUT_S)
            self.end_soon("not connected")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        if self.ended.is_set():
            work.close()
            return
        task = asyncio.get_running_loop().create_task(
            self._guard(work, name), name=f"local-upstream-{self.id}-{name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, work: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await work
        except Exception:
            # The boundary of a call's task: log once, then end the call.
            logger.exception("call %s: %s failed", self.id, name)
            self.end_soon("internal error")

    async def _end(self, reason: str) -> None:
        self.record.end_reason = reason
        self.ended.set()
        logger.info("local upstream: call %s ending (%s)", self.id, reason)
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        await self.session.aclose()
        self._speaker.stop()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._pc.close()
        except TimeoutError:
            logger.warning("call %s: the peer connection did not close in time", self.id)
        self._disconnected.set()
        # Each close is bounded by the server's close timeout.
        closing = [ws.close(CloseCode.NORMAL_CLOSURE, "call ended") for ws in self._sidebands]
        await asyncio.gather(*closing, return_exceptions=True)
        self.record.closed.set()
        self._on_closed(self)
