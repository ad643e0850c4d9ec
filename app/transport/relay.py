"""The `/ws` endpoint: accept, authenticate, lease, open the upstream, pump both ways, close.

This is the only module that holds both sockets. A `RelaySession` lives for one client
connection; its two pumps run in an `asyncio.TaskGroup` and the first to end (or fail) ends the
session, which then closes both sides with a chosen code, releases its lease and records metrics.

The endpoint is a plain ASGI app rather than a FastAPI route: the hot path calls the server's
`receive`/`send` directly, with no per-message wrapper objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any, Final
from urllib.parse import parse_qs

from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode

from app.audio.wire import AudioOptions, ClientAudio, audio_options
from app.auth.credentials import (
    Authenticator,
    CredentialKind,
    Identity,
    check_origin,
    credential_from,
)
from app.config import Settings, TierSettings
from app.core.policy import INJECTED_EVENT_ID, SessionPolicy
from app.errors import (
    AdmissionError,
    ClientError,
    ClientTimeoutError,
    CloseCode,
    InvalidAudioError,
    LimiterUnavailableError,
    MessageTooBigError,
    ModelNotAllowedError,
    RelayError,
    SessionEndedError,
    ShuttingDownError,
    UnsupportedClientError,
    UpstreamClosedError,
    UpstreamError,
    UpstreamTimeoutError,
    event_for,
)
from app.limits.leases import Lease, Limiter, admit, heartbeat, session_caps
from app.metrics import RelayMetrics, SessionMeter
from app.transport.legs import (
    DIRECT_EXTENSION,
    AsgiLeg,
    ClientGoneError,
    ClientLeg,
    DirectWebSocketProtocol,
    UpstreamConnection,
    UpstreamGoneError,
    guard_uvicorn_protocol,
)
from app.transport.upstream import Upstream, close_quietly

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REALTIME_SUBPROTOCOL: Final = "realtime"
_BYTES_PER_SECOND: Final = {"audio/pcm": 48_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}

_REJECTION_REASONS: Final = {
    "unauthorized": "unauthorized",
    "origin_not_allowed": "origin",
    "model_not_allowed": "model",
    "session_limit_reached": "limit",
    "unsupported_protocol": "protocol",
    "limiter_unavailable": "limiter",
    "server_shutting_down": "shutdown",
}


_AUDIO_OUTPUT_EVENTS: Final = frozenset(
    {"response.output_audio.delta", "response.output_audio.done", "response.done"}
)


# Binary audio output: a delta's first packet is encoded and sent at once, each later one a timer
# of this apart (2 ms per 20 ms packet). Queued with `call_soon` instead, the packets of every
# talking session ran ahead of the socket reads at each loop turn, and a new delta's first packet
# waited behind them: p99 2.3-2.6 ms against 1.5 ms with the gap, at 100 Opus sessions
# (bench/relay_bench.py --codec opus).
_PACKET_GAP_SECONDS: Final = 0.002

_OUTCOMES: Final = {
    "client_timeout": "client_timeout",
    "session_limit_reached": "limit",  # a cap over its limit after Redis lost its data
    "session_expired": "expired",
    "session_idle": "idle",
    "server_shutting_down": "shutdown",
}


class _Ended(Exception):
    """A pump saw its peer go away: how the session ends, and the close code for the client."""

    def __init__(self, outcome: str, close_code: int) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.close_code = close_code


class Relay:
    """Everything the sessions share: settings, upstream, policy inputs, limiter, metrics."""

    def __init__(self, settings: Settings, metrics: RelayMetrics, limiter: Limiter) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limiter = limiter
        self.upstream = Upstream(settings)
        self.auth = Authenticator(settings)
        self.draining = False
        self.sessions: set[RelaySession] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self._policies: dict[tuple[str, str, str, str], SessionPolicy] = {}

    def policy(self, tier: str, model: str, audio: AudioOptions) -> SessionPolicy:
        """The stateless policy of `tier` on `model` with these formats, built once."""
        key = (tier, model, audio.input_format["type"], audio.output_format["type"])
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = SessionPolicy(
                self.settings.session,
                self.settings.tiers[tier].client_may_set,
                model=model,
                input_format=audio.input_format,
                output_format=audio.output_format,
            )
        return policy

    async def drain(self, window: float) -> None:
        """Stop admitting, warn live sessions, and close those left after `window` with 1012."""
        self.draining = True
        logger.warning("draining: %d live sessions, closing in %.0f s", len(self.sessions), window)
        warning = f"the relay is shutting down; this session will be closed in {window:.0f} s"
        async with asyncio.TaskGroup() as group:  # warn() is bounded and never raises
            for session in list(self.sessions):
                group.create_task(session.warn(ShuttingDownError(warning)))
        await self._all_ended(window)
        for session in list(self.sessions):
            session.stopping.set()
        await self._all_ended(self.settings.upstream.close_timeout_seconds + 1.0)

    async def _all_ended(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._no_sessions.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point for `/ws` and `/v1/realtime`."""
        session = RelaySession(self, scope, receive, send)
        self.sessions.add(session)
        self._no_sessions.clear()
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            if not self.sessions:
                self._no_sessions.set()


class RelaySession:
    """One client connection and, once admitted, its upstream connection."""

    def __init__(self, relay: Relay, scope: Scope, receive: Receive, send: Send) -> None:
        self.relay = relay
        self.scope = scope
        self.receive = receive
        self.send = send
        self.id = uuid.uuid4().hex
        self.log = logging.LoggerAdapter(logger, {"session": self.id, "tier": "-"})
        self.client_open = False
        self.upstream: UpstreamConnection | None = None
        # The direct leg, when the relay's own protocol serves this socket (`server_config`): it
        # offers itself before the ASGI app runs.
        direct = (scope.get("extensions") or {}).get(DIRECT_EXTENSION)
        self.direct: DirectWebSocketProtocol | None = direct["leg"] if direct else None
        self.leg: ClientLeg | None = None  # set while the data plane runs
        self.pipe: _Pipe | None = None
        self.stopping = asyncio.Event()  # set by a drain: end the session with 1012
        self._event_ids = itertools.count(1)

    def event_id(self) -> str:
        """An id for an event the relay itself sends this client."""
        return f"event_relay_{self.id[:12]}_{next(self._event_ids)}"

    async def run(self) -> None:
        relay = self.relay
        await self.receive()  # websocket.connect
        if self.direct is None:
            guard_uvicorn_protocol(self.receive, self.relay.settings.client_max_fragments)
        offered = self.scope.get("subprotocols") or []
        subprotocol = REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None
        # Accept before judging: a browser cannot read a refused handshake's HTTP status.
        await self.send({"type": "websocket.accept", "subprotocol": subprotocol})
        self.client_open = True
        tier = "-"
        lease: Lease | None = None
        try:
            if relay.draining:
                raise ShuttingDownError("the relay is shutting down; reconnect")
            settings = relay.settings
            check_origin(self.scope["headers"], settings.allowed_origins)
            identity = relay.auth.authenticate(credential_from(self.scope["headers"], offered))
            tier = identity.tier
            self.log.extra = {"session": self.id, "tier": tier}
            query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
            model = self._model(identity, query)
            client = None if identity.kind is CredentialKind.ANONYMOUS else identity.client_id
            caps = session_caps(settings, tier, client, model)
            lease = await admit(
                relay.limiter, caps, fail_open=settings.limits_fail_open, log=self.log
            )
            await self._serve(identity, model, await self._audio(query), lease)
        except (AdmissionError, LimiterUnavailableError, ShuttingDownError) as exc:
            relay.metrics.reject(tier, _REJECTION_REASONS.get(exc.code, "protocol"))
            self.log.info("refused: %s", exc.code)
            await self._close(exc.close_code, exc)
        except UpstreamError as exc:
            if self.upstream is None:
                relay.metrics.reject(tier, "upstream")
            self.log.warning("upstream failed: %s", exc.code, exc_info=exc.__cause__ is not None)
            await self._close(exc.close_code, exc)
        except _Ended:
            self.log.info("the client left during admission")
        except Exception:
            self.log.exception("session failed")
            await self._close(CloseCode.INTERNAL, RelayError("internal relay error"))
        finally:
            if lease is not None:
                await relay.limiter.release(lease)

    def _model(self, identity: Identity, query: dict[str, list[str]]) -> str:
        allowed = self.relay.settings.tier_models(identity.tier)
        if "call_id" in query or "intent" in query:
            raise UnsupportedClientError("the relay opens conversation sessions only (?model=)")
        requested: str = query.get("model", [identity.model or allowed[0]])[0]
        if identity.model is not None and requested != identity.model:
            raise ModelNotAllowedError(f"this token is for model {identity.model[:64]!r} only")
        if requested not in allowed:
            raise ModelNotAllowedError(f"model {requested[:64]!r} is not available to this client")
        return requested

    async def _audio(self, query: dict[str, list[str]]) -> ClientAudio:
        """The session's codecs; bad parameters are reported and the defaults used instead."""
        try:
            session = self.relay.settings.session
            return ClientAudio(
                audio_options(query, session.g711_passthrough, session.opus_complexity)
            )
        except InvalidAudioError as exc:
            await self._send_error(exc)
            return ClientAudio(AudioOptions())

    async def _serve(
        self, identity: Identity, model: str, audio: ClientAudio, lease: Lease | None
    ) -> None:
        relay = self.relay
        started = time.perf_counter()
        self.upstream = upstream = await relay.upstream.connect(model)
        relay.metrics.upstream_connect.observe(time.perf_counter() - started)
        self.log.info("upstream open: model=%s", model)
        options = audio.options
        policy = relay.policy(identity.tier, model, options)
        rates = (
            _BYTES_PER_SECOND[options.input_format["type"]],
            _BYTES_PER_SECOND[options.output_format["type"]],
        )
        meter = relay.metrics.session(identity.tier, model, rates, audio)
        outcome: str | None = None
        close_code: int = CloseCode.INTERNAL
        error: RelayError | None = None
        try:
            # Inject the server's session before any client event is read: client frames wait in
            # the server's bounded receive queue meanwhile, in order (REALTIME.md §12.1).
            await self._start_session(upstream, policy, meter)
            pipe = self.pipe = _Pipe(self, self._client_leg(), upstream, policy, meter, audio)
            async with asyncio.TaskGroup() as group:
                group.create_task(pipe.run())
                group.create_task(self._watch(relay.settings.tiers[identity.tier], meter))
                if lease is not None:
                    interval = relay.settings.lease_ttl_seconds / 3
                    group.create_task(heartbeat(relay.limiter, lease, interval, log=self.log))
        except* _Ended as ended:  # a peer went away: nothing to explain
            end = ended.exceptions[0]
            assert isinstance(end, _Ended)
            outcome, close_code = end.outcome, end.close_code
        except* RelayError as failed:
            if outcome is None:  # both pumps failed at once: the peer that went away wins
                first = failed.exceptions[0]
                assert isinstance(first, RelayError)
                error = first
                outcome, close_code = _OUTCOMES.get(error.code, "error"), error.close_code
                if isinstance(error, UpstreamError):
                    outcome = "upstream_error"
                self.log.info("session ended: %s", error.code)
        finally:
            # Upstream first: a client that stopped reading must not hold the upstream socket.
            await close_quietly(
                upstream, CloseCode.NORMAL, relay.settings.upstream.close_timeout_seconds
            )
            relay.metrics.upstream_closed(upstream.close_code)
            meter.close(outcome or "error")
            self.log.info("session closed: outcome=%s", outcome or "error")
            if outcome is not None:  # else `run` reports the unexpected failure, then closes
                await self._close(close_code, error)

    def _client_leg(self) -> ClientLeg:
        """The client socket as the data plane drives it: direct under `server_config`."""
        leg: ClientLeg = self.direct or AsgiLeg(self.receive, self.send)
        self.leg = leg
        return leg

    async def _watch(self, tier: TierSettings, meter: SessionMeter) -> None:
        """End the session when it has run too long, been idle too long, or the relay drains."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            deadlines = []
            if tier.max_session_seconds is not None:
                deadlines.append((started + tier.max_session_seconds, "session_expired"))
            if tier.idle_timeout_seconds is not None:
                idle_at = meter.last_activity - time.perf_counter() + loop.time()
                deadlines.append((idle_at + tier.idle_timeout_seconds, "session_idle"))
            wake, code = min(deadlines) if deadlines else (None, "")
            try:
                async with asyncio.timeout_at(wake):
                    await self.stopping.wait()
            except TimeoutError:
                if code == "session_idle" and tier.idle_timeout_seconds is not None:
                    idle = time.perf_counter() - meter.last_activity
                    if idle < tier.idle_timeout_seconds:
                        continue  # activity since the deadline was set
                    raise SessionEndedError(
                        f"the session was idle for {tier.idle_timeout_seconds:.0f} s", code=code
                    ) from None
                raise SessionEndedError(
                    f"the session reached its {tier.max_session_seconds:.0f} s limit", code=code
                ) from None
            raise ShuttingDownError("the relay is restarting; reconnect")

    async def warn(self, error: RelayError) -> None:
        """Send `error` as a warning; the session goes on. Never raises."""
        if self.client_open:
            with contextlib.suppress(_Ended, TimeoutError):
                async with asyncio.timeout(1.0):  # a stuck client must not hold up the others
                    await self._send_error(error)

    async def _start_session(
        self, upstream: UpstreamConnection, policy: SessionPolicy, meter: SessionMeter
    ) -> None:
        """Show the client `session.created` (redacted), then inject the server's session.

        Returns once the upstream has accepted it (`session.updated`): a session must never run
        without the server's instructions and tools. A refusal is logged with its code and
        reported to the client as `upstream_rejected_session`; its text stays here, since it may
        describe the server's tools.
        """
        try:
            async with asyncio.timeout(self.relay.settings.upstream.connect_timeout_seconds):
                message = await _text(upstream)
                start = time.perf_counter()
                event_type, event, text = policy.upstream_event(message)
                await self._send_client(text)
                meter.upstream_event(event_type, event, text, start)
                if event_type != "session.created":
                    raise UpstreamError(f"the upstream sent {event_type or 'a non-event'} first")
                await upstream.send(policy.injected)
                while event_type != "session.updated":
                    message = await _text(upstream)
                    start = time.perf_counter()
                    event_type, event, text = policy.upstream_event(message)
                    if event_type == "error" and _caused_by(event, INJECTED_EVENT_ID):
                        error = event["error"] if event else {}
                        self.log.warning(
                            "the upstream refused the injected session: %s (param %s)",
                            error.get("code"),
                            error.get("param"),
                        )
                        raise UpstreamError(
                            "the upstream refused the relay's session settings",
                            code="upstream_rejected_session",
                        )
                    await self._send_client(text)
                    meter.upstream_event(event_type, event, text, start)
        except TimeoutError:
            raise UpstreamError("the upstream did not start a session in time") from None
        except ConnectionClosed as exc:
            raise UpstreamClosedError("the upstream closed before the session started") from exc

    async def _send_client(self, text: str) -> None:
        if self.leg is not None:  # the data plane runs: one writer, in order
            try:
                self.leg.send_text(text)
            except ClientGoneError:
                self.client_open = False
                raise _Ended("client_closed", CloseCode.NORMAL) from None
            return
        try:
            await self.send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError):  # uvicorn: ClientDisconnected, or sent after close
            self.client_open = False
            raise _Ended("client_closed", CloseCode.NORMAL) from None

    def error_text(self, exc: RelayError) -> str:
        """The `error` event telling this client about `exc`, counted as sent."""
        self.relay.metrics.error("relay", exc.code)
        event = event_for(exc, event_id=self.event_id(), client_event_id=exc.client_event_id)
        return _dumps(event)

    async def _send_error(self, exc: RelayError) -> None:
        await self._send_client(self.error_text(exc))

    async def _close(self, code: int, error: RelayError | None = None) -> None:
        """Tell the client why (if there is a why), then close it; never raises.

        A client that does not read lets neither the `error` event nor the close out of the
        relay's buffer; the direct leg drops its connection after the close timeout.
        """
        timeout = self.relay.settings.upstream.close_timeout_seconds
        if self.direct is not None:
            self.direct.abort_after(2 * timeout)
        try:
            async with asyncio.timeout(timeout):
                if self.leg is not None:  # what the data plane sent goes first; its tasks end
                    await self.leg.finish()
                if not self.client_open:
                    return
                self.client_open = False
                if error is not None:
                    await self.send({"type": "websocket.send", "text": self.error_text(error)})
                reason = error.code if error is not None else ""
                await self.send({"type": "websocket.close", "code": int(code), "reason": reason})
        except (OSError, RuntimeError, TimeoutError):
            pass  # the client is gone or stuck; uvicorn drops the connection


class _Pipe:
    """A session's data plane: each message in, decided by the policy, out the other side.

    It runs inside the legs' protocol callbacks (`legs.py`), one message at a time, with no task
    per message, and ends the session by settling `ended`: with `_Ended` when a peer leaves, with
    a `RelayError` to explain. Binary audio output is paced (`_PACKET_GAP_SECONDS`), so socket
    reads go in between two packets' encoding, and upstream events wait behind the packets of
    the delta before them.
    """

    def __init__(
        self,
        session: RelaySession,
        client: ClientLeg,
        upstream: UpstreamConnection,
        policy: SessionPolicy,
        meter: SessionMeter,
        audio: ClientAudio,
    ) -> None:
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self.loop.create_future()
        self.client, self.upstream = client, upstream
        self.policy, self.meter, self.audio = policy, meter, audio
        self.limit = session.relay.settings.client_max_message_bytes
        self.binary_output = audio.binary_output
        # While binary audio frames are being paced out: the frames left, and upstream messages
        # (or its close) that arrived meanwhile, in order.
        self._frames: Iterator[bytes] | None = None
        self._backlog: deque[bytes | None] = deque()
        self._next_packet: asyncio.TimerHandle | None = None
        self._client_write_paused = False
        self._bad_delta_logged = False
        self.max_queue = session.relay.settings.upstream.max_queue

    async def run(self) -> None:
        self.upstream.attach(self)
        self.client.attach(self)
        try:
            await self.ended
        finally:
            if not self.ended.done():
                self.ended.cancel()
            # The close handshakes need both sockets read again; the pipe ignores what comes.
            self.client.resume_reading()
            self.upstream.resume_reading()

    def _end(self, reason: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_exception(reason)

    def _error(self, exc: RelayError) -> None:
        """Tell the client about a refused event; the session goes on."""
        self.client.reply_text(self.session.error_text(exc))

    # -- client -> upstream

    def client_text(self, text: str) -> None:
        if self.ended.done():
            return
        start = time.perf_counter()
        try:
            if len(text) > self.limit:
                raise MessageTooBigError(f"frames are limited to {self.limit} bytes")
            try:
                event_type, event = self.policy.client_event(text)
            except ClientError as exc:
                self._error(exc)
                return
            if event_type == "input_audio_buffer.commit":  # rare: once a turn
                tail = self.audio.flush_event()
                if tail is not None:
                    self.upstream.send_text(tail)
            self.upstream.send_text(text)
            self.meter.client_event(event_type, event, len(text), start)
        except Exception as exc:
            self._failed(exc)

    def client_bytes(self, frame: bytes) -> None:
        if self.ended.done():
            return
        start = time.perf_counter()
        try:
            if len(frame) > self.limit:
                raise MessageTooBigError(f"frames are limited to {self.limit} bytes")
            try:
                append = self.audio.append_event(frame)
            except InvalidAudioError as exc:
                self._error(exc)
                return
            decoded = time.perf_counter()
            if append is not None:
                self.upstream.send_text(append)
            self.meter.client_audio(len(frame), start, decoded)
        except Exception as exc:
            self._failed(exc)

    def client_closed(self) -> None:
        self.session.client_open = False
        self._end(_Ended("client_closed", CloseCode.NORMAL))

    def client_timed_out(self) -> None:
        self._end(ClientTimeoutError("the client did not answer keepalive pings in time"))

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

    # -- upstream -> client

    def upstream_text(self, data: bytes) -> None:
        if self.ended.done():
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
                raise UpstreamError("the upstream sent a frame that is not UTF-8") from None
            event_type, event, text = self.policy.upstream_event(text)
            if self.binary_output and event_type in _AUDIO_OUTPUT_EVENTS:
                self._binary_audio(event_type, text)
            else:
                self.client.send_text(text)
            self.meter.upstream_event(event_type, event, text, start)
        except Exception as exc:
            self._failed(exc)

    def _binary_audio(self, event_type: str, text: str) -> None:
        """Send an audio event with its audio as binary frames (`wire.py`)."""
        audio, client = self.audio, self.client
        if event_type == "response.output_audio.delta":
            split = audio.delta_frames(text)
            if split is None:
                self._bad_delta()
                return
            text, frames = split
            client.send_text(text)
            self._frames = frames
            self._pace()  # the first packet at once, the others `_PACKET_GAP_SECONDS` apart
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
        self.session.relay.metrics.error("upstream", "invalid_audio")
        if not self._bad_delta_logged:
            self._bad_delta_logged = True
            self.session.log.warning("skipped an upstream audio delta that is not base64 PCM")

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
                    self._pace_after(_PACKET_GAP_SECONDS)
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
            self._failed(exc)

    def upstream_binary(self, data: bytes) -> None:
        self.session.log.warning("dropped a binary frame from the upstream")

    def upstream_closed(self) -> None:
        if self._frames is not None:  # the audio before it goes out first
            self._backlog.append(None)
            return
        code = self.upstream.close_code
        sent = self.upstream.protocol.close_sent
        if code in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            self._end(_Ended("completed", code))
        elif sent is not None and sent.code == CloseCode.INTERNAL and code == 1006:
            # websockets' keepalive gave up (close 1011 sent, none received): a stalled upstream,
            # unless the relay was not reading it because the client did not read.
            if self._client_write_paused:
                self._end(ClientTimeoutError("the client read too slowly to keep the session"))
            else:
                self._end(UpstreamTimeoutError("the upstream stopped answering keepalive pings"))
        elif code is None or code == 1006:  # no close frame: the socket was lost
            self._end(UpstreamClosedError("the upstream connection was lost"))
        else:
            self._end(UpstreamClosedError(f"the upstream closed the session ({code})"))

    def upstream_write_paused(self, paused: bool) -> None:
        if self.ended.done():
            return
        if paused:
            self.client.pause_reading()
        else:
            self.client.resume_reading()

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, ClientGoneError):
            self.client_closed()
        elif isinstance(exc, UpstreamGoneError):
            self._end(UpstreamClosedError("the upstream connection closed"))
        else:
            self._end(exc)


async def _text(upstream: UpstreamConnection) -> str:
    message = await upstream.next_message()
    if message is None:
        raise UpstreamClosedError("the upstream closed before the session started")
    opcode, data = message
    if opcode is not Opcode.TEXT:
        raise UpstreamError("the upstream sent a binary frame where an event was due")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UpstreamError("the upstream sent a frame that is not UTF-8") from None


def _caused_by(event: dict[str, Any] | None, event_id: str) -> bool:
    error = event.get("error") if event else None
    return isinstance(error, dict) and error.get("event_id") == event_id


def _dumps(event: Any) -> str:
    return json.dumps(event, separators=(",", ":"))
