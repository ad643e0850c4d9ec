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
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final
from urllib.parse import parse_qs

from app.audio.wire import AudioOptions, ClientAudio, audio_options
from app.auth.credentials import Authenticator, CredentialKind, Identity, credential_from
from app.auth.origin import check_origin
from app.codes import BudgetScope, Outcome, RejectionReason
from app.config import Settings
from app.core.beta import is_beta
from app.core.budget import Budget, ResponseGate
from app.core.policy import SessionPolicy
from app.core.session import Deadlines, Ending
from app.core.usage import Pricing
from app.errors import (
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
from app.transport.fast import DirectWebSocketProtocol, guard_uvicorn_protocol
from app.transport.legs import DIRECT_EXTENSION, AsgiLeg, ClientLeg, UpstreamLeg
from app.transport.pipe import Pipe
from app.transport.upstream import Upstream

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REALTIME_SUBPROTOCOL: Final = "realtime"
_BYTES_PER_SECOND: Final = {"audio/pcm": 48_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}

_REJECTION_REASONS: Final[dict[str, RejectionReason]] = {
    ErrorCode.UNAUTHORIZED: RejectionReason.UNAUTHORIZED,
    ErrorCode.ORIGIN_NOT_ALLOWED: RejectionReason.ORIGIN,
    ErrorCode.MODEL_NOT_ALLOWED: RejectionReason.MODEL,
    ErrorCode.SESSION_LIMIT_REACHED: RejectionReason.LIMIT,
    ErrorCode.UNSUPPORTED_PROTOCOL: RejectionReason.PROTOCOL,
    ErrorCode.LIMITER_UNAVAILABLE: RejectionReason.LIMITER,
    ErrorCode.SERVER_SHUTTING_DOWN: RejectionReason.SHUTDOWN,
    ErrorCode.BUDGET_EXHAUSTED: RejectionReason.BUDGET,
}


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
        self.sessions: set[RelaySession] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self._policies: dict[tuple[str, str, str, str, frozenset[str]], SessionPolicy] = {}

    def policy(self, tier: str, model: str, audio: AudioOptions) -> SessionPolicy:
        """The stateless policy of `tier` on `model` with these formats, built once."""
        tier_settings = self.settings.tiers[tier]
        # An MCP server reached after start-up adds tools: sessions from then on get them.
        tools = self.toolbox.names(tier_settings)
        key = (tier, model, audio.input_format["type"], audio.output_format["type"], tools)
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
            session.stop()
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
        self.upstream: UpstreamLeg | None = None
        # The direct leg, when the relay's own protocol serves this socket (`server_config`): it
        # offers itself before the ASGI app runs.
        direct = (scope.get("extensions") or {}).get(DIRECT_EXTENSION)
        self.direct: DirectWebSocketProtocol | None = direct["leg"] if direct else None
        self.leg: ClientLeg | None = None  # set once the upstream is open
        self.pipe: Pipe | None = None
        self.stopping = False  # a drain asked the session to end with 1012
        self._spending: set[asyncio.Task[None]] = set()
        self._event_ids = itertools.count(1)

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
            try:
                await check_daily_budget(
                    relay.spend,
                    settings.tiers[tier],
                    client,
                    fail_open=settings.limits_fail_open,
                    log=self.log,
                )
            except BudgetExhaustedError:
                relay.metrics.budget_exhausted(tier, BudgetScope.CLIENT_DAY)
                raise
            caps = session_caps(settings, tier, client, model)
            lease = await admit(
                relay.limiter, caps, fail_open=settings.limits_fail_open, log=self.log
            )
            await self._serve(identity, model, await self._audio(query), lease)
        except (
            AdmissionError,
            BudgetExhaustedError,
            LimiterUnavailableError,
            ShuttingDownError,
        ) as exc:
            relay.metrics.reject(tier, _REJECTION_REASONS.get(exc.code, RejectionReason.PROTOCOL))
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
            await self._send_text(self.error_text(exc))
            return ClientAudio(AudioOptions())

    async def _serve(
        self, identity: Identity, model: str, audio: ClientAudio, lease: Lease | None
    ) -> None:
        relay, settings = self.relay, self.relay.settings
        started = time.perf_counter()
        self.upstream = upstream = await relay.upstream.connect(model)
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
        pipe = self.pipe = Pipe(
            self.leg,
            upstream,
            audio,
            policy=relay.policy(identity.tier, model, options),
            deadlines=Deadlines(
                start_seconds=settings.upstream.connect_timeout_seconds,
                max_session_seconds=tier.max_session_seconds,
                idle_seconds=tier.idle_timeout_seconds,
            ),
            meter=meter,
            session_id=self.id,
            event_ids=self._event_ids,
            count_error=relay.metrics.error,
            max_message_bytes=settings.client_max_message_bytes,
            max_queue=settings.upstream.max_queue,
            log=self.log,
            run_tool=self._tool_runner(identity),
            tool_concurrency=settings.tool_concurrency,
            show_tool_calls=tier.show_tool_calls,
            budget=Budget(tier.max_tokens_per_session, tier.max_cost_usd_per_session),
            gate=ResponseGate(tier.max_concurrent_responses, tier.max_responses_per_minute),
            pricing=relay.pricing.price,
            count_budget=lambda scope: relay.metrics.budget_exhausted(identity.tier, scope),
            count_ignored=relay.metrics.field_ignored,
            beta=is_beta(self.scope["headers"], self.scope.get("subprotocols") or []),
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
            if self._spending:  # what the last responses cost still counts: not cancelled
                await asyncio.wait(self._spending, timeout=settings.upstream.close_timeout_seconds)
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
            pipe = self.pipe
            if limit is not None and total >= limit and pipe is not None:
                try:
                    pipe.core.exhaust(
                        BudgetScope.CLIENT_DAY, "this client has reached its daily spending limit"
                    )
                except Exception as exc:  # the upstream is gone, or a bug: `run` says which
                    pipe.failed(exc)

        def spent(usd: float) -> None:
            task = asyncio.get_running_loop().create_task(record(usd))
            self._spending.add(task)
            task.add_done_callback(self._spending.discard)

        return spent

    async def _renew(self, lease: Lease, pipe: Pipe) -> None:
        """Keep the session's lease alive; a renewal refused ends the session."""
        interval = self.relay.settings.lease_ttl_seconds / 3
        try:
            await heartbeat(self.relay.limiter, lease, interval, log=self.log)
        except RelayError as exc:
            pipe.core.fail(exc)
        except Exception as exc:  # a bug: `run` reports it
            pipe.failed(exc)

    def stop(self) -> None:
        """End the session with 1012 (a drain's last step)."""
        self.stopping = True
        if self.pipe is not None:
            self.pipe.core.drain()

    async def warn(self, error: RelayError) -> None:
        """Send `error` as a warning; the session goes on. Never raises."""
        if self.pipe is not None:
            with contextlib.suppress(Exception):  # the client may be gone
                self.pipe.core.warn(error)
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
