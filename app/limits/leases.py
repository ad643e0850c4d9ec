"""Concurrent-session limits: caps, leases, the `Limiter` contract, and admission and renewal.

A session holds one slot in every cap that applies to it (its tier, its client within the tier,
its model) from admission until it ends. Admission takes all of them in one atomic step or none.

Slots are leases, not counters (as in redis-py's `Lock`): each session holds a member (its
admission time and a random token) with an expiry in every cap. The relay renews it on a heartbeat
(`heartbeat`) and releases it when the session ends, so a replica killed with SIGKILL leaks its
slots for at most one TTL. With Redis (`app.limits.redis.RedisLimiter`) every replica sharing the
store shares the caps; without it (`app.limits.memory.MemoryLimiter`) one process holds them.
`app.limits.make_limiter` picks one from the settings and `admit` applies the fail-open policy at
admission.

A renewal that finds its slot gone takes it again whatever the count: the session is live. So when
Redis loses its data (it restarted empty, or failed over to a replica that had not received the
leases), the sessions admitted into the emptied store and the older ones that re-register on their
next renewal can together exceed a cap. To converge back to the cap, each lease's member encodes its
admission time from Redis's clock, so members sort in admission order, and a renewal that finds a
cap over its limit with its own lease among the cap's newest `count - limit` gives up that lease
(`Renewal.OVER_LIMIT`); `heartbeat` then ends the session with `session_limit_reached` (1008). The
newest sessions are the ones ended, and the count is back at the cap about one renewal interval
after the older sessions have re-registered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from app.config import Settings
from app.errors import LimiterUnavailableError, SessionLimitError

logger = logging.getLogger(__name__)

_Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


@dataclass(frozen=True, slots=True)
class Cap:
    """One concurrency cap: `key` identifies the counted set, `name` is what a client is told."""

    key: str
    limit: int
    name: str


@dataclass(frozen=True, slots=True)
class Lease:
    """A session's slots: the same member held in each cap.

    `token` is that member: its admission time and a random token, ``<ms, 13 digits>:<hex>``, so
    members sort (as strings) in admission order, to the millisecond. `RedisLimiter` reads the
    time from Redis's clock, so members written by different replicas compare. A lease with no
    caps is stored nowhere and holds only the token.
    """

    token: str
    caps: tuple[Cap, ...]


class Renewal(Enum):
    """What a renewal found."""

    HELD = "held"  # every slot was still held
    RETAKEN = "retaken"  # some slots were gone and were taken again
    OVER_LIMIT = "over_limit"  # a cap was over its limit with this lease among its newest: gone


@dataclass(frozen=True, slots=True)
class RenewalResult:
    """A renewal's outcome: `status`, and for `Renewal.OVER_LIMIT` the cap over its limit."""

    status: Renewal
    cap: Cap | None = None


class Limiter(Protocol):
    """Admits sessions under caps shared by every relay replica that uses the same store."""

    async def acquire(self, caps: Sequence[Cap]) -> Lease:
        """Take a slot in every cap, atomically.

        Args:
            caps: the caps the session counts against; none at all takes nothing and needs no
                store.

        Returns:
            The lease, valid for the limiter's TTL unless renewed.

        Raises:
            SessionLimitError: a cap is full (named in the error); no slot was taken.
            LimiterUnavailableError: the store cannot be reached; no slot was taken.
        """
        ...

    async def renew(self, lease: Lease) -> RenewalResult:
        """Push the lease's expiry one TTL ahead of now, in every cap.

        A slot that is gone (its lease expired after renewals failed for longer than the TTL, or
        Redis lost its data) is taken again even if the cap is now full: the session is live, so
        counting it keeps the tally true and holds back new admissions. Sessions admitted while
        the slot was gone may then leave a cap over its limit; the newest of them give way: when
        a cap counts more than its limit and this lease is among its `count - limit` newest (by
        admission time), the lease is removed from every cap and reported over the limit.

        Returns:
            `Renewal.HELD` when every slot was still held; `Renewal.RETAKEN` when some had to be
            taken again (a cap may now count more than its limit, but this lease is not among
            its newest); `Renewal.OVER_LIMIT`, with the first such cap, when the lease gave all
            its slots up: end the session.

        Raises:
            LimiterUnavailableError: the store cannot be reached (the caller retries next beat).
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give the slots back. Idempotent, and never raises: if the store cannot be reached,
        the lease is logged and left to expire within its TTL."""
        ...

    async def ready(self) -> bool:
        """True when the store answers."""
        ...

    async def aclose(self) -> None:
        """Close the store's connections."""
        ...


def limit_error(cap: Cap) -> SessionLimitError:
    """The refusal of a session because `cap` is full."""
    return SessionLimitError(f"the {cap.name} session limit is reached", cap=cap.name)


def _over_limit_error(cap: Cap) -> SessionLimitError:
    return SessionLimitError(
        f"the session was ended because the {cap.name} session cap was over its limit after "
        "the limits store lost its data",
        cap=cap.name,
    )


async def admit(
    limiter: Limiter, caps: Sequence[Cap], *, fail_open: bool, log: _Log = logger
) -> Lease | None:
    """Admission policy: take the session's slots, or decide what a store outage means.

    Args:
        limiter: the relay's limiter.
        caps: the caps that apply to the session (`session_caps`).
        fail_open: `RELAY_LIMITS_FAIL_OPEN`: admit without a lease when the store is down.
        log: where to say that a session was admitted without a lease.

    Returns:
        The lease to renew and release, or None when no cap applies or the session was admitted
        without one (fail open).

    Raises:
        SessionLimitError: a cap is full.
        LimiterUnavailableError: the store is down and `fail_open` is off.
    """
    if not caps:
        return None
    try:
        return await limiter.acquire(caps)
    except LimiterUnavailableError as exc:
        if not fail_open:
            raise
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unknown"
        log.warning("limits store unavailable (%s): admitted without a lease (fail open)", cause)
        return None


async def heartbeat(limiter: Limiter, lease: Lease, interval: float, *, log: _Log = logger) -> None:
    """Renew `lease` every `interval` seconds (a third of the TTL) until cancelled.

    Run it in the session's task group. A store outage never ends the session: the failure is
    logged and the next beat tries again; a lease found lost is re-established and logged. A
    lease that a renewal gave up because its cap was over its limit (`Renewal.OVER_LIMIT`: the
    store lost its data and admitted newer sessions meanwhile) ends the session.
    Cancel it before releasing the lease: a renewal that landed after the release would take the
    slots again (for one TTL at most).

    Raises:
        SessionLimitError: the lease was over its cap's limit and was given up; the error names
            the cap (close 1008).
    """
    while True:
        await asyncio.sleep(interval)
        try:
            renewal = await limiter.renew(lease)
        except LimiterUnavailableError:
            log.warning("lease renewal failed: limits store unavailable; retrying")
            continue
        if renewal.status is Renewal.OVER_LIMIT:
            assert renewal.cap is not None  # an over-limit renewal names its cap
            log.warning("lease given up: the %s cap is over its limit", renewal.cap.name)
            raise _over_limit_error(renewal.cap)
        if renewal.status is Renewal.RETAKEN:
            log.warning("lease was lost (store restarted or unreachable past the TTL); retaken")


def session_caps(settings: Settings, tier: str, client_id: str | None, model: str) -> list[Cap]:
    """The caps a session of `client_id` in `tier` on `model` holds a slot in.

    Keys are ``tier:<tier>``, ``client:<tier>:<client_id>`` and ``model:<model>``; the names the
    client is told are ``tier``, ``client`` and ``model``. Anonymous clients (`client_id` None)
    share no identity, so the per-client cap does not apply to them; the tier's cap does.
    """
    limits = settings.tiers[tier]
    caps = []
    if limits.max_sessions is not None:
        caps.append(Cap(f"tier:{tier}", limits.max_sessions, "tier"))
    if limits.max_sessions_per_client is not None and client_id is not None:
        caps.append(Cap(f"client:{tier}:{client_id}", limits.max_sessions_per_client, "client"))
    if model in settings.model_limits:
        caps.append(Cap(f"model:{model}", settings.model_limits[model], "model"))
    return caps
