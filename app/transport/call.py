"""WebRTC calls under the relay's control: admitted at the offer, steered over the sideband.

`open_call` is `POST /v1/realtime/calls` (`api/calls.py`) once the offer is read: the client is
admitted as on `/ws` (origin, credential, tier, model, daily budget, a leased slot), the call is
created upstream with the server's key and the server's session (the client's `session` part
judged as a `session.update` is), and the call's sideband is opened before the SDP answer goes
back, so the relay is in control before the caller can speak. A `CallSession` then runs the
session core over the sideband (`sideband.Sideband`) until the core decides the call ends:
budget, `max_session_seconds`, idle, drain, a client that keeps changing locked fields, or the
sideband closing. Then the relay hangs the call up (unless the upstream ended it), closes the
sideband and releases the lease.

The caller's audio and data-channel events never pass through the relay
(https://developers.openai.com/api/docs/guides/realtime-webrtc): what the relay enforces on a call,
and what it cannot, is in the README ("WebRTC calls").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

from app.audio.wire import AudioOptions, ClientAudio
from app.auth.credentials import Identity
from app.codes import Outcome, RejectionReason, Transport
from app.core.session import Ending
from app.core.watch import SessionWatch
from app.errors import (
    CloseCode,
    RelayError,
    UnsupportedClientError,
    UpstreamError,
)
from app.limits.leases import Lease
from app.metrics import SessionMeter
from app.transport.legs import UpstreamLeg
from app.transport.relay import REFUSALS, Headers, Relay, ServedSession
from app.transport.sideband import Sideband

_NO_AUDIO: Final = (48_000, 48_000)  # the meter's audio rates: a call's audio is never the relay's


class CallSession(ServedSession):
    """One WebRTC call, from its creation upstream to its hang-up."""

    def __init__(self, relay: Relay, identity: Identity, model: str) -> None:
        super().__init__(relay)
        self.identity, self.model = identity, model
        self.log.extra = {"session": self.id, "tier": identity.tier}
        self.lease: Lease | None = None
        self.call_id = ""
        self.task: asyncio.Task[None] | None = None

    async def start(self, call_id: str, session: dict[str, Any]) -> None:
        """Open the call's sideband and its core (`session`: the call's, as created); the call
        then runs in its own task.

        Raises:
            UpstreamError: the sideband could not be opened (the caller hangs up).
        """
        relay, settings = self.relay, self.relay.settings
        self.call_id = call_id
        started = time.perf_counter()
        sideband = await relay.upstream.connect(self.model, call_id=call_id)
        relay.metrics.upstream_connect.observe(time.perf_counter() - started)
        policy = relay.policy(self.identity.tier, self.model, AudioOptions(), call=True)
        meter = relay.metrics.session(
            self.identity.tier, self.model, _NO_AUDIO, ClientAudio(AudioOptions()), Transport.WEBRTC
        )
        meter.note_session(session)  # the sideband gets no session.created

        core = self._core(
            self.identity,
            policy,
            meter,
            watch=SessionWatch(policy),
            count_restored=relay.metrics.field_restored,
        )
        self.driver = driver = Sideband(
            sideband,
            session=session,
            core=core,
            log=self.log,
            run_tool=self._tool_runner(self.identity),
            tool_concurrency=settings.tool_concurrency,
            on_spent=self._spender(self.identity),
        )
        relay.hold(self)
        relay.calls[call_id] = self
        self.task = asyncio.get_running_loop().create_task(self._run(driver, sideband, meter))

    async def _run(self, driver: Sideband, sideband: UpstreamLeg, meter: SessionMeter) -> None:
        relay, settings = self.relay, self.relay.settings
        if self.stopping:
            driver.core.drain()
        renewing = None
        if self.lease is not None:
            renewing = asyncio.create_task(self._renew(self.lease, driver))
        ending: Ending | None = None
        try:
            ending = await driver.run()
        except Exception:
            self.log.exception("call failed")
        finally:
            if renewing is not None:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
            timeout = settings.upstream.close_timeout_seconds
            await driver.settle(timeout)
            await self._spent()
            outcome = ending.outcome if ending is not None else Outcome.ERROR
            try:
                await relay.upstream.hang_up(self.call_id)  # idempotent: an ended call is a 404
                await sideband.close(CloseCode.NORMAL, timeout)
                relay.metrics.upstream_closed(sideband.close_code)
            finally:
                meter.close(outcome)
                if self.lease is not None:
                    await relay.limiter.release(self.lease)
                relay.calls.pop(self.call_id, None)
                relay.release(self)
            reason = f" ({ending.error.code})" if ending and ending.error else ""
            self.log.info("call %s ended: outcome=%s%s", self.call_id, outcome, reason)

    def hang_up(self) -> None:
        """The caller asked (`POST /v1/realtime/calls/{id}/hangup`): end the call."""
        if self.driver is not None:
            try:
                self.driver.core.client_closed()
            except Exception as exc:  # the sideband is closing, or a bug: `_run` says which
                self.driver.failed(exc)


async def open_call(
    relay: Relay,
    headers: Headers,
    offer: bytes,
    requested: dict[str, Any] | None,
    query_model: str | None,
) -> tuple[CallSession, bytes]:
    """Admit a caller, create its call upstream and take control of it: the call and the SDP
    answer for the caller.

    Raises:
        RelayError: refused (the same codes as `/ws`) or the upstream failed; nothing is left
            open upstream.
    """
    tier = "-"
    call: CallSession | None = None
    try:
        identity = relay.identify(headers)
        tier = identity.tier
        if not relay.settings.tiers[tier].webrtc:
            raise UnsupportedClientError("WebRTC calls are not available to this client")
        wanted = requested.get("model") if requested else None
        model = relay.choose_model(identity, wanted if isinstance(wanted, str) else query_model)
        session, ignored = relay.policy(tier, model, AudioOptions(), call=True).call_session(
            requested
        )
        for path in ignored:
            relay.metrics.field_ignored(path)
        call = CallSession(relay, identity, model)
        call.lease = await relay.lease(identity, model, call.log)
        session = {**session, "model": model}
        call_id, answer = await relay.upstream.create_call(offer, session)
    except REFUSALS as exc:
        relay.refused(tier, exc, Transport.WEBRTC)
        await _release(relay, call)
        raise
    except UpstreamError:
        relay.metrics.reject(tier, RejectionReason.UPSTREAM, Transport.WEBRTC)
        await _release(relay, call)
        raise
    except RelayError:  # the session part: not an object, or locked fields in `refuse` mode
        await _release(relay, call)
        raise
    except BaseException:  # cancelled (a shutdown), or a bug: the slot is not kept
        await _release(relay, call)
        raise
    try:
        await call.start(call_id, session)
    except BaseException:
        relay.metrics.reject(tier, RejectionReason.UPSTREAM, Transport.WEBRTC)
        await relay.upstream.hang_up(call_id)
        await _release(relay, call)
        raise
    return call, answer


async def _release(relay: Relay, call: CallSession | None) -> None:
    if call is not None and call.lease is not None:
        await relay.limiter.release(call.lease)
