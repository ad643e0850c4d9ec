"""The `/ws` endpoint: accept, admit, open the upstream, run the data plane, close.

A `RelaySession` lives for one client connection. It accepts the WebSocket (a browser cannot
read a refused handshake's status, so refusals are an `error` event and a close), admits the
client (origin, credential, model, leased slot), opens the upstream, and hands both sockets to a
`Pipe` (`pipe.py`), which runs the session core until it decides how the session ends. Then it
closes the upstream first, the client with the core's close code, and releases the lease.

`Relay` is what the sessions share: settings, the upstream's targets, policies built once per
(tier, model, formats), the limiter, metrics, and the drain.

The endpoint is a plain ASGI app rather than a FastAPI route: the hot path never goes through
`receive`/`send` wrappers, and under the relay's own server not through ASGI at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

from app.audio.wire import AudioOptions, ClientAudio, audio_options
from app.auth.credentials import Authenticator, CredentialKind, Identity, credential_from
from app.auth.origin import check_origin
from app.codes import BudgetScope, Outcome, RejectionReason, Transport
from app.config import Settings
from app.core.beta import is_beta
from app.core.budget import Budget, ResponseGate
from app.core.policy import SessionPolicy
from app.core.session import Deadlines, Decisions, Ending, Meter, SessionCore
from app.core.usage import Pricing
from app.errors import (
    TRANSCRIPTION_NOT_ALLOWED,
    AdmissionError,
    BudgetExhaustedError,
    CloseCode,
    ErrorCode,
    InvalidAudioError,
    LimiterUnavailableError,
    ModelNotAllowedError,
    RelayError,
    ShuttingDownError,
    UnsupportedClientError,
    UpstreamError,
    event_for,
)
from app.limits.leases import Lease, Limiter, admit, heartbeat, session_caps
from app.limits.spend import SpendStore, check_daily_budget
from app.metrics import RelayMetrics
from app.tools import Toolbox, ToolCall, ToolContext
from app.transport.driver import CoreDriver, CoreFactory, Log
from app.transport.fast import DirectWebSocketProtocol, guard_uvicorn_protocol
from app.transport.legs import DIRECT_EXTENSION, AsgiLeg, ClientLeg, UpstreamLeg
from app.transport.pipe import Pipe
from app.transport.upstream import Upstream

if TYPE_CHECKING:
    from app.transport.call import CallSession

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]

REALTIME_SUBPROTOCOL: Final = "realtime"
_BYTES_PER_SECOND: Final = {"audio/pcm": 48_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}

REJECTION_REASONS: Final[dict[str, RejectionReason]] = {
    ErrorCode.UNAUTHORIZED: RejectionReason.UNAUTHORIZED,
    ErrorCode.ORIGIN_NOT_ALLOWED: RejectionReason.ORIGIN,
    ErrorCode.MODEL_NOT_ALLOWED: RejectionReason.MODEL,
    ErrorCode.SESSION_LIMIT_REACHED: RejectionReason.LIMIT,
    ErrorCode.UNSUPPORTED_PROTOCOL: RejectionReason.PROTOCOL,
    ErrorCode.LIMITER_UNAVAILABLE: RejectionReason.LIMITER,
    ErrorCode.SERVER_SHUTTING_DOWN: RejectionReason.SHUTDOWN,
    ErrorCode.BUDGET_EXHAUSTED: RejectionReason.BUDGET,
}


# What refuses a session before it reaches the upstream: the client's credential, origin, model
# or limits, or the relay's state.
REFUSALS: Final = (AdmissionError, BudgetExhaustedError, LimiterUnavailableError, ShuttingDownError)


class _ClientLeft(Exception):
    """The client went away while the session was being set up."""


class Relay:
    """Everything the sessions share: settings, upstream, policy inputs, limiter, metrics."""

    def __init__(
        self,
        settings: Settings,
        metrics: RelayMetrics,
        limiter: Limiter,
        toolbox: Toolbox,
        spend: SpendStore,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limiter = limiter
        self.toolbox = toolbox
        self.spend = spend
        self.pricing = Pricing(settings.prices, settings.price_aliases)
        self.upstream = Upstream(settings)
        self.auth = Authenticator(settings)
        self.draining = False
        self.sessions: set[ServedSession] = set()  # WebSocket sessions and WebRTC calls
        self.calls: dict[str, CallSession] = {}  # by call id
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self._policies: dict[tuple[str, str, str, str, str, frozenset[str]], SessionPolicy] = {}

    def policy(
        self,
        tier: str,
        model: str,
        audio: AudioOptions,
        *,
        transcription: bool = False,
        call: bool = False,
    ) -> SessionPolicy:
        """The stateless policy of `tier` on `model` with these formats, built once.

        `transcription`: a transcription-only session, whose `model` is the transcription model;
        `call`: a WebRTC call's (no formats: its audio is not the relay's).
        """
        tier_settings = self.settings.tiers[tier]
        # An MCP server reached after start-up adds tools: sessions from then on get them.
        tools = self.toolbox.names(tier_settings)
        input_type, output_type = audio.input_format["type"], audio.output_format["type"]
        kind = "transcription" if transcription else "call" if call else "realtime"
        key = (tier, model, kind, input_type, output_type, tools)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = SessionPolicy(
                self.settings.session,
                tier_settings.client_may_set,
                model=model,
                input_format=audio.input_format,
                output_format=audio.output_format,
                client_may_create=tier_settings.client_may_create,
                server_tools=self.toolbox.definitions(tier_settings),
                allowed_values=tier_settings.allowed_values,
                ignore_locked=tier_settings.locked_fields == "ignore",
                transcription=transcription,
                call=call,
            )
        return policy

    def identify(self, headers: Headers, offered: Iterable[str] = ()) -> Identity:
        """Who a new client is: refused while draining, from a foreign origin, or unknown.

        Raises:
            ShuttingDownError, OriginNotAllowedError, UnauthorizedError.
        """
        if self.draining:
            raise ShuttingDownError("the relay is shutting down; reconnect")
        check_origin(headers, self.settings.allowed_origins)
        return self.auth.authenticate(credential_from(headers, offered))

    def choose_model(self, identity: Identity, requested: str | None) -> str:
        """The model a session uses: the one asked for, else the credential's, else the tier's
        default; it must be the tier's and, for a credential bound to a model, that one."""
        allowed = self.settings.tier_models(identity.tier)
        model = requested or identity.model or allowed[0]
        if identity.model is not None and model != identity.model:
            raise ModelNotAllowedError(f"this token is for model {identity.model[:64]!r} only")
        if model not in allowed:
            raise ModelNotAllowedError(f"model {model[:64]!r} is not available to this client")
        return model

    async def lease(self, identity: Identity, model: str, log: Log) -> Lease | None:
        """A slot in every cap the session counts against, after its client's daily budget.

        Raises:
            BudgetExhaustedError, SessionLimitError, LimiterUnavailableError.
        """
        settings = self.settings
        client = None if identity.kind is CredentialKind.ANONYMOUS else identity.client_id
        try:
            await check_daily_budget(
                self.spend,
                settings.tiers[identity.tier],
                client,
                fail_open=settings.limits_fail_open,
                log=log,
            )
        except BudgetExhaustedError:
            self.metrics.budget_exhausted(identity.tier, BudgetScope.CLIENT_DAY)
            raise
        caps = session_caps(settings, identity.tier, client, model)
        return await admit(self.limiter, caps, fail_open=settings.limits_fail_open, log=log)

    def refused(
        self, tier: str, error: RelayError, transport: Transport = Transport.WEBSOCKET
    ) -> None:
        """Count a session refused before the upstream, by the reason its error names."""
        reason = REJECTION_REASONS.get(error.code, RejectionReason.PROTOCOL)
        self.metrics.reject(tier, reason, transport)

    def hold(self, session: ServedSession) -> None:
        """Count `session` among the live ones (a drain warns and stops them)."""
        self.sessions.add(session)
        self._no_sessions.clear()

    def release(self, session: ServedSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()

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
            session.stop()
        await self._all_ended(self.settings.upstream.close_timeout_seconds + 1.0)

    async def end_calls(self) -> None:
        """Hang up the calls still live (at shutdown, after the drain): bounded."""
        tasks = [call.task for call in self.calls.values() if call.task is not None]
        for call in list(self.calls.values()):
            call.stop()
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self.settings.upstream.close_timeout_seconds)

    async def _all_ended(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._no_sessions.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point for `/ws` and `/v1/realtime`."""
        session = RelaySession(self, scope, receive, send)
        self.hold(session)
        try:
            await session.run()
        finally:
            self.release(session)


class ServedSession:
    """What a WebSocket session and a WebRTC call share once admitted: their core's driver, the
    server tools they run, the spend they record, the lease they renew, and the drain."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.id = uuid.uuid4().hex
        self.log = logging.LoggerAdapter(logger, {"session": self.id, "tier": "-"})
        self.driver: CoreDriver | None = None  # set once the upstream is open
        self.stopping = False  # a drain asked the session to end
        self._spending: set[asyncio.Task[None]] = set()
        self._event_ids = itertools.count(1)

    def stop(self) -> None:
        """End the session as a drain does (1012 for a WebSocket; a call is hung up)."""
        self.stopping = True
        if self.driver is not None:
            self.driver.core.drain()

    async def warn(self, error: RelayError) -> None:
        """Send `error` as a warning; the session goes on. Never raises."""
        if self.driver is not None:
            with contextlib.suppress(Exception):  # the client may be gone
                self.driver.core.warn(error)

    def _core(
        self, identity: Identity, policy: SessionPolicy, meter: Meter, **options: Any
    ) -> CoreFactory:
        """Builds the session's core around its adapter: the tier's deadlines, budgets and
        response limits, the relay's prices and counters, and `options` of the transport's."""
        relay, settings = self.relay, self.relay.settings
        tier = settings.tiers[identity.tier]
        deadlines = Deadlines(
            start_seconds=settings.upstream.connect_timeout_seconds,
            max_session_seconds=tier.max_session_seconds,
            idle_seconds=tier.idle_timeout_seconds,
        )

        def core(out: Decisions) -> SessionCore:
            return SessionCore(
                policy,
                deadlines,
                meter,
                out,
                session_id=self.id,
                event_ids=self._event_ids,
                count_error=relay.metrics.relay_error,
                budget=Budget(tier.max_tokens_per_session, tier.max_cost_usd_per_session),
                gate=ResponseGate(tier.max_concurrent_responses, tier.max_responses_per_minute),
                pricing=relay.pricing.price,
                count_budget=lambda scope: relay.metrics.budget_exhausted(identity.tier, scope),
                log=self.log,
                **options,
            )

        return core

    def _tool_runner(self, identity: Identity) -> Callable[[str, str, str], Awaitable[str]]:
        """Runs this session's server tool calls, with who asked (sent to HTTP tools)."""
        toolbox = self.relay.toolbox
        client = None if identity.kind is CredentialKind.ANONYMOUS else identity.client_id
        context = ToolContext(session_id=self.id, tier=identity.tier, client=client)

        async def run(call_id: str, name: str, arguments: str) -> str:
            return await toolbox.run(ToolCall(call_id, name, arguments), context)

        return run

    def _spender(self, identity: Identity) -> Callable[[float], None]:
        """Records this session's spend for its client's day; past the tier's daily limit, the
        session ends. Each record is a task the session awaits (bounded) before it closes."""
        relay = self.relay
        limit = relay.settings.tiers[identity.tier].max_cost_usd_per_client_per_day
        client = identity.client_id if identity.kind is not CredentialKind.ANONYMOUS else None
        if client is None:
            return lambda usd: None

        async def record(usd: float) -> None:
            try:
                total = await relay.spend.add(client, identity.tier, usd)
            except Exception as exc:  # Redis down: the session's own budgets still hold
                self.log.warning("spend not recorded: %s", type(exc).__name__)
                return
            driver = self.driver
            if limit is not None and total >= limit and driver is not None:
                try:
                    driver.core.exhaust(
                        BudgetScope.CLIENT_DAY, "this client has reached its daily spending limit"
                    )
                except Exception as exc:  # the upstream is gone, or a bug: `run` says which
                    driver.failed(exc)

        def spent(usd: float) -> None:
            task = asyncio.get_running_loop().create_task(record(usd))
            self._spending.add(task)
            task.add_done_callback(self._spending.discard)

        return spent

    async def _spent(self) -> None:
        """What the last responses cost still counts: the spend records end, not cancelled."""
        if self._spending:
            timeout = self.relay.settings.upstream.close_timeout_seconds
            await asyncio.wait(self._spending, timeout=timeout)

    async def _renew(self, lease: Lease, driver: CoreDriver) -> None:
        """Keep the session's lease alive; a renewal refused ends the session."""
        interval = self.relay.settings.lease_ttl_seconds / 3
        try:
            await heartbeat(self.relay.limiter, lease, interval, log=self.log)
        except RelayError as exc:
            driver.core.fail(exc)
        except Exception as exc:  # a bug: `run` reports it
            driver.failed(exc)


class RelaySession(ServedSession):
    """One client connection and, once admitted, its upstream connection."""

    def __init__(self, relay: Relay, scope: Scope, receive: Receive, send: Send) -> None:
        super().__init__(relay)
        self.scope = scope
        self.receive = receive
        self.send = send
        self.client_open = False
        self.upstream: UpstreamLeg | None = None
        # The direct leg, when the relay's own protocol serves this socket (`server_config`): it
        # offers itself before the ASGI app runs.
        direct = (scope.get("extensions") or {}).get(DIRECT_EXTENSION)
        self.direct: DirectWebSocketProtocol | None = direct["leg"] if direct else None
        self.leg: ClientLeg | None = None  # set once the upstream is open
        self.pipe: Pipe | None = None

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
            identity = relay.identify(self.scope["headers"], offered)
            tier = identity.tier
            self.log.extra = {"session": self.id, "tier": tier}
            query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
            model, transcription = self._model(identity, query)
            lease = await relay.lease(identity, model, self.log)
            await self._serve(identity, model, transcription, await self._audio(query), lease)
        except REFUSALS as exc:
            relay.refused(tier, exc)
            self.log.info("refused: %s", exc.code)
            await self._close(exc.close_code, exc)
        except UpstreamError as exc:  # the upstream could not be opened
            relay.metrics.reject(tier, RejectionReason.UPSTREAM)
            self.log.warning("upstream failed: %s", exc.code, exc_info=exc.__cause__ is not None)
            await self._close(exc.close_code, exc)
        except _ClientLeft:
            self.log.info("the client left during admission")
        except Exception:
            self.log.exception("session failed")
            await self._close(CloseCode.INTERNAL, RelayError("internal relay error"))
        finally:
            if lease is not None:
                await relay.limiter.release(lease)

    def _model(self, identity: Identity, query: dict[str, list[str]]) -> tuple[str, bool]:
        """The session's model, and whether it is a transcription-only session.

        A transcription session (`?intent=transcription`, no `model`, as OpenAI's) uses the
        transcription model of RELAY_SESSION__TRANSCRIPTION.
        """
        if "call_id" in query:
            raise UnsupportedClientError("the relay does not attach to calls (?call_id=)")
        if "intent" in query:
            return self._transcription_model(identity, query), True
        return self.relay.choose_model(identity, query.get("model", [""])[0]), False

    def _transcription_model(self, identity: Identity, query: dict[str, list[str]]) -> str:
        settings = self.relay.settings
        if query["intent"] != ["transcription"] or "model" in query:
            raise UnsupportedClientError(
                "intent=transcription is the only intent, and it takes no model"
            )
        transcription = settings.session.transcription
        if not settings.tiers[identity.tier].transcription_sessions or transcription is None:
            raise ModelNotAllowedError(TRANSCRIPTION_NOT_ALLOWED)
        model = str(transcription.get("model", ""))
        if identity.model is not None and identity.model != model:
            raise ModelNotAllowedError(f"this token is for model {identity.model[:64]!r} only")
        return model

    async def _audio(self, query: dict[str, list[str]]) -> ClientAudio:
        """The session's codecs; bad parameters are reported and the defaults used instead."""
        try:
            session = self.relay.settings.session
            return ClientAudio(
                audio_options(query, session.g711_passthrough, session.opus_complexity)
            )
        except InvalidAudioError as exc:
            await self._send_text(self.error_text(exc))
            return ClientAudio(AudioOptions())

    async def _serve(
        self,
        identity: Identity,
        model: str,
        transcription: bool,
        audio: ClientAudio,
        lease: Lease | None,
    ) -> None:
        relay, settings = self.relay, self.relay.settings
        started = time.perf_counter()
        self.upstream = upstream = await relay.upstream.connect(model, transcription=transcription)
        relay.metrics.upstream_connect.observe(time.perf_counter() - started)
        self.log.info("upstream open: model=%s", model)
        options = audio.options
        rates = (
            _BYTES_PER_SECOND[options.input_format["type"]],
            _BYTES_PER_SECOND[options.output_format["type"]],
        )
        meter = relay.metrics.session(identity.tier, model, rates, audio)
        tier = settings.tiers[identity.tier]
        # The server's session is injected before any client event is read: client frames wait
        # in the server's bounded receive queue meanwhile, in order.
        self.leg = self.direct or AsgiLeg(self.receive, self.send)
        policy = relay.policy(identity.tier, model, options, transcription=transcription)
        beta = is_beta(self.scope["headers"], self.scope.get("subprotocols") or [])

        core = self._core(
            identity,
            policy,
            meter,
            show_tool_calls=tier.show_tool_calls,
            count_ignored=relay.metrics.field_ignored,
            beta=beta,
        )
        pipe = self.pipe = self.driver = Pipe(
            self.leg,
            upstream,
            audio,
            core=core,
            meter=meter,
            count_error=relay.metrics.error,
            max_message_bytes=settings.client_max_message_bytes,
            max_queue=settings.upstream.max_queue,
            log=self.log,
            run_tool=self._tool_runner(identity),
            tool_concurrency=settings.tool_concurrency,
            on_spent=self._spender(identity),
        )
        if self.stopping:
            pipe.core.drain()
        renewing = None
        if lease is not None:
            renewing = asyncio.create_task(self._renew(lease, pipe))
        ending: Ending | None = None
        try:
            ending = await pipe.run()  # an unforeseen failure is raised: `run` reports it
        finally:
            if renewing is not None:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
            await pipe.settle(settings.upstream.close_timeout_seconds)
            await self._spent()
            # Upstream first: a client that stopped reading must not hold the upstream socket.
            await upstream.close(CloseCode.NORMAL, settings.upstream.close_timeout_seconds)
            relay.metrics.upstream_closed(upstream.close_code)
            outcome = ending.outcome if ending is not None else Outcome.ERROR
            meter.close(outcome)
            self.log.info("session closed: outcome=%s", outcome)
        if ending.outcome is Outcome.CLIENT_CLOSED:
            self.client_open = False
        elif ending.error is not None:
            self.log.info("session ended: %s", ending.error.code)
        await self._close(ending.close_code, ending.error)

    async def warn(self, error: RelayError) -> None:
        """Send `error` as a warning; the session goes on. Never raises."""
        if self.driver is not None:
            await super().warn(error)
            return
        if self.client_open:
            with contextlib.suppress(_ClientLeft, TimeoutError):
                async with asyncio.timeout(1.0):  # a stuck client must not hold up the others
                    await self._send_text(self.error_text(error))

    async def _send_text(self, text: str) -> None:
        """Send before the data plane runs (admission), through ASGI."""
        try:
            await self.send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError):  # uvicorn: ClientDisconnected, or sent after close
            self.client_open = False
            raise _ClientLeft from None

    def error_text(self, exc: RelayError) -> str:
        """The `error` event telling this client about `exc`, counted as sent."""
        self.relay.metrics.relay_error(exc.code)
        event_id = f"event_relay_{self.id[:12]}_{next(self._event_ids)}"
        event = event_for(exc, event_id=event_id, client_event_id=exc.client_event_id)
        return json.dumps(event, separators=(",", ":"))

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
