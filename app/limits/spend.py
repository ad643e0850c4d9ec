"""Spend per client per UTC day: the `SpendStore` contract, in process or in Redis, and the check.

Sessions report what they spend (`add`, in USD); `check_daily_budget` refuses a client whose
tier has `max_cost_usd_per_client_per_day` once its total for the current UTC day reaches it. The
day is the UTC date of the store's clock (injectable, for tests), so totals start again at
midnight UTC. `MemorySpendStore` holds one process's totals; `RedisSpendStore` shares them between
every replica that uses the same Redis. `make_spend_store` picks one from the settings, as
`make_limiter` picks a limiter. Totals per tier (`totals_by_tier`) feed the admin API
(`app.api.admin`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from redis.asyncio import Redis, RedisCluster

from app.config import Settings, TierSettings
from app.errors import BudgetExhaustedError, LimiterUnavailableError
from app.limits import make_limiter

# The limiter's fail-fast bound and its list of store errors: the same store, failing alike.
from app.limits.redis import _STORE_ERRORS, OPERATION_TIMEOUT_SECONDS, RedisLimiter

logger = logging.getLogger(__name__)

_Log = logging.Logger | logging.LoggerAdapter[logging.Logger]
Clock = Callable[[], datetime]

# A day's keys outlive the day by one more, so yesterday's totals stay readable past midnight;
# each write pushes the expiry ahead again.
KEY_TTL_SECONDS: Final = 2 * 86_400

DAILY_LIMIT_MESSAGE: Final = "this client has reached its daily spending limit"


def utc_now() -> datetime:
    """The current time, aware, in UTC: the stores' default clock."""
    return datetime.now(UTC)


def utc_day(now: datetime) -> str:
    """The UTC date of `now` as ``YYYY-MM-DD``; a naive `now` is taken to be UTC already."""
    if now.tzinfo is None:
        return now.date().isoformat()
    return now.astimezone(UTC).date().isoformat()


def _checked(usd: float) -> float:
    if not math.isfinite(usd) or usd < 0:
        raise ValueError(f"spend must be a finite, non-negative amount of USD, not {usd!r}")
    return float(usd)


class SpendStore(Protocol):
    """USD spent per client and per tier, by UTC day, shared by the replicas using one store."""

    async def add(self, client: str, tier: str, usd: float) -> float:
        """Record `usd` spent by `client` (in `tier`) today, atomically.

        Returns:
            The client's total for today (UTC), this spend included.

        Raises:
            ValueError: `usd` is negative, infinite or NaN; nothing was recorded.
            LimiterUnavailableError: the store cannot be reached; nothing may have been recorded.
        """
        ...

    async def today(self, client: str) -> float:
        """What `client` has spent today (UTC), in USD; 0.0 for a client not seen today.

        Raises:
            LimiterUnavailableError: the store cannot be reached.
        """
        ...

    async def totals_by_tier(self) -> dict[str, float]:
        """Tier -> USD spent today (UTC) by its clients; tiers with no spend are absent.

        Raises:
            LimiterUnavailableError: the store cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Close the store's connections."""
        ...


class MemorySpendStore:
    """Totals held in this process, for a single relay instance; days before yesterday are
    dropped as new days begin, so memory stays bounded by two days of clients.

    Args:
        clock: the current time (aware; naive is taken as UTC), for tests.
    """

    def __init__(self, clock: Clock = utc_now) -> None:
        self.clock = clock
        self._clients: dict[str, dict[str, float]] = {}  # day -> client -> USD
        self._tiers: dict[str, dict[str, float]] = {}  # day -> tier -> USD

    def _day(self) -> str:
        return utc_day(self.clock())

    def _prune(self, day: str) -> None:
        """Forget the days before the one before `day` (ISO dates sort as strings)."""
        yesterday = (datetime.fromisoformat(day) - timedelta(days=1)).date().isoformat()
        for totals in (self._clients, self._tiers):
            for old in [stored for stored in totals if stored < yesterday]:
                del totals[old]

    async def add(self, client: str, tier: str, usd: float) -> float:
        usd = _checked(usd)
        day = self._day()
        if day not in self._clients:
            self._prune(day)
        clients = self._clients.setdefault(day, {})
        tiers = self._tiers.setdefault(day, {})
        clients[client] = clients.get(client, 0.0) + usd
        tiers[tier] = tiers.get(tier, 0.0) + usd
        return clients[client]

    async def today(self, client: str) -> float:
        return self._clients.get(self._day(), {}).get(client, 0.0)

    async def totals_by_tier(self) -> dict[str, float]:
        return dict(self._tiers.get(self._day(), {}))

    async def aclose(self) -> None:
        self._clients.clear()
        self._tiers.clear()


# KEYS[1]  the day's hash of client -> USD.
# KEYS[2]  the day's hash of tier -> USD.
# ARGV[1]  the client.
# ARGV[2]  the tier.
# ARGV[3]  the USD to add (a decimal string).
# ARGV[4]  the keys' expiry in seconds, pushed ahead by every write.
# Returns the client's total for the day as a decimal string (Lua numbers would be truncated to
# integers on the way back).
ADD_SCRIPT: Final = """
local total = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[3])
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return total
"""


def _text(value: bytes | str) -> str:
    """A reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


class _Closeable(Protocol):
    async def aclose(self) -> None: ...


class RedisSpendStore:
    """Totals in Redis, shared by every replica that uses the same store and prefix.

    A day's totals are two hashes, ``<prefix>:{spend}:<YYYY-MM-DD>:clients`` (client -> USD) and
    ``…:tiers`` (tier -> USD), expiring `KEY_TTL_SECONDS` after their last write. The hash tag puts
    both in one Redis Cluster slot, so one script updates them together; amounts are added with
    HINCRBYFLOAT, so concurrent replicas never lose an update. The day is the store's clock's, not
    Redis's: replicas' clocks must agree to the second around midnight, as NTP keeps them.

    Args:
        client: a `redis.asyncio` client with short socket timeouts (`make_spend_store` builds
            one as `make_limiter` does).
        prefix: the first part of every key, to share one Redis between deployments.
        clock: the current time (aware; naive is taken as UTC), for tests.
        owner: what `aclose` closes in place of `client`, when something else owns it (the
            limiter `make_spend_store` built the client with).
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        prefix: str = "relay",
        *,
        clock: Clock = utc_now,
        owner: _Closeable | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self._prefix = f"{prefix}:{{spend}}:"
        self._owner: _Closeable = owner if owner is not None else client
        self._add = client.register_script(ADD_SCRIPT)

    def keys(self, day: str) -> tuple[str, str]:
        """The Redis keys of `day`'s hashes: clients, then tiers."""
        return f"{self._prefix}{day}:clients", f"{self._prefix}{day}:tiers"

    async def _call(self, command: Any) -> Any:
        """Await a Redis call: the one place Redis errors become `LimiterUnavailableError`."""
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_SECONDS):
                return await command
        except _STORE_ERRORS as exc:
            logger.debug("spend store error: %s", type(exc).__name__, exc_info=True)
            raise LimiterUnavailableError(
                "the spending limits store is unavailable; retry shortly"
            ) from exc

    async def add(self, client: str, tier: str, usd: float) -> float:
        amount = repr(_checked(usd))
        keys = self.keys(utc_day(self.clock()))
        total = await self._call(
            self._add(keys=list(keys), args=[client, tier, amount, KEY_TTL_SECONDS])
        )
        return float(_text(total))

    async def today(self, client: str) -> float:
        clients, _ = self.keys(utc_day(self.clock()))
        total = await self._call(self.client.hget(clients, client))
        return 0.0 if total is None else float(_text(total))

    async def totals_by_tier(self) -> dict[str, float]:
        _, tiers = self.keys(utc_day(self.clock()))
        totals = await self._call(self.client.hgetall(tiers))
        return {_text(tier): float(_text(usd)) for tier, usd in totals.items()}

    async def aclose(self) -> None:
        await self._owner.aclose()


def make_spend_store(settings: Settings, *, clock: Clock = utc_now) -> SpendStore:
    """The store `RELAY_REDIS_URL` asks for; no I/O happens until the first call.

    Unset: `MemorySpendStore`. Otherwise `RedisSpendStore` on a client of its own, built by
    `make_limiter` (every URL form it takes, its fail-fast timeouts, its `ConfigError`s); the
    store owns that limiter and closes it, and uses nothing of it but the client.

    Raises:
        ConfigError: the URL cannot be used.
    """
    if not settings.redis_url:
        return MemorySpendStore(clock)
    limiter = make_limiter(settings)
    assert isinstance(limiter, RedisLimiter)  # a Redis URL makes a RedisLimiter
    return RedisSpendStore(limiter.client, clock=clock, owner=limiter)


async def check_daily_budget(
    store: SpendStore,
    tier: TierSettings,
    client: str | None,
    *,
    fail_open: bool = False,
    log: _Log = logger,
) -> None:
    """Refuse a client that has spent its tier's `max_cost_usd_per_client_per_day` today.

    Anonymous clients (`client` None) share no identity, so the daily budget does not apply to
    them, nor to tiers without one (then the store is not asked).

    Args:
        store: the relay's spend store.
        tier: the client's tier.
        client: the client's identity, or None.
        fail_open: `RELAY_LIMITS_FAIL_OPEN`: let the client through when the store is down.
        log: where to say that the budget went unchecked.

    Raises:
        BudgetExhaustedError: the client's spend today is at or over the limit.
        LimiterUnavailableError: the store is down and `fail_open` is off.
    """
    limit = tier.max_cost_usd_per_client_per_day
    if limit is None or client is None:
        return
    try:
        spent = await store.today(client)
    except LimiterUnavailableError as exc:
        if not fail_open:
            raise
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unknown"
        log.warning("spend store unavailable (%s): daily budget not checked (fail open)", cause)
        return
    if spent >= limit:
        raise BudgetExhaustedError(DAILY_LIMIT_MESSAGE)
