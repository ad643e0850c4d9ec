"""Concurrent-session limits: the `Limiter` contract, its Redis and in-process implementations.

A session holds one slot in every cap that applies to it (its tier, its client within the tier,
its model) from admission until it ends. Admission takes all of them in one atomic step or none.

Slots are leases, not counters (as in redis-py's `Lock`): each session holds a member (its
admission time and a random token) with an expiry in every cap. The relay renews it on a heartbeat
(`heartbeat`) and releases it when the session ends, so a replica killed with SIGKILL leaks its
slots for at most one TTL. With Redis (`RedisLimiter`) every replica sharing the store shares the
caps; without it (`MemoryLimiter`) one process holds them. `make_limiter` picks one from the
settings and `admit` applies the fail-open policy at admission.

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
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from app.config import ConfigError, Settings
from app.errors import LimiterUnavailableError, SessionLimitError

logger = logging.getLogger(__name__)

# A dead Redis must fail admission fast rather than hold the client's handshake: short socket
# timeouts, one quick retry (a pooled connection may simply be stale after a Redis restart), and
# an overall bound per operation on top, since Cluster and Sentinel add their own rediscovery.
SOCKET_TIMEOUT_SECONDS: Final = 1.0
OPERATION_TIMEOUT_SECONDS: Final = 3.0
SENTINEL_PORT: Final = 26379
# What a store failure can raise: redis-py's errors, its Cluster errors (not `RedisError`s) and
# socket errors (including `TimeoutError` from the overall bound).
_STORE_ERRORS: Final = (RedisError, RedisClusterException, OSError)

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


def _limit_error(cap: Cap) -> SessionLimitError:
    return SessionLimitError(f"the {cap.name} session limit is reached", cap=cap.name)


def _over_limit_error(cap: Cap) -> SessionLimitError:
    return SessionLimitError(
        f"the session was ended because the {cap.name} session cap was over its limit after "
        "the limits store lost its data",
        cap=cap.name,
    )


class MemoryLimiter:
    """The embedded default: leases in this process, for a single relay instance.

    No `await` separates checking a cap from taking it, so each call is atomic on the event loop.
    Its store cannot lose its data, but a lease can still lapse (an event loop blocked past the
    TTL), so renewals follow the same rules as Redis's, with members timed by the monotonic clock.
    """

    def __init__(self, ttl_seconds: float = 30.0) -> None:
        self.ttl = ttl_seconds
        self._caps: dict[str, dict[str, float]] = {}  # cap key -> member -> expiry (monotonic)

    def _live(self, key: str, now: float) -> dict[str, float]:
        holders = self._caps.setdefault(key, {})
        for token in [t for t, expiry in holders.items() if expiry <= now]:
            del holders[token]
        return holders

    async def acquire(self, caps: Sequence[Cap]) -> Lease:
        now_ns = time.monotonic_ns()
        now = now_ns / 1e9
        member = f"{now_ns // 1_000_000:013d}:{secrets.token_hex(16)}"
        for cap in caps:
            if len(self._live(cap.key, now)) >= cap.limit:
                raise _limit_error(cap)
        for cap in caps:
            self._caps[cap.key][member] = now + self.ttl
        return Lease(token=member, caps=tuple(caps))

    async def renew(self, lease: Lease) -> RenewalResult:
        now = time.monotonic()
        member = lease.token
        retaken = False
        for cap in lease.caps:
            holders = self._live(cap.key, now)
            retaken = retaken or member not in holders
            holders[member] = now + self.ttl
        for cap in lease.caps:
            holders = self._caps[cap.key]
            excess = len(holders) - cap.limit
            if excess > 0 and sum(other > member for other in holders) < excess:
                self._remove(lease)
                return RenewalResult(Renewal.OVER_LIMIT, cap)
        return RenewalResult(Renewal.RETAKEN if retaken else Renewal.HELD)

    def _remove(self, lease: Lease) -> None:
        for cap in lease.caps:
            holders = self._caps.get(cap.key)
            if holders is not None:
                holders.pop(lease.token, None)
                if not holders:
                    del self._caps[cap.key]

    async def release(self, lease: Lease) -> None:
        self._remove(lease)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._caps.clear()


# The scripts read the clock with TIME on the Redis server, so replicas' clocks never matter.
# Scripts that write after TIME need effects replication, the default since Redis 5.
# Scores are expiries in Unix milliseconds; a member whose score is <= now has expired.
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
"""

# A key lives at least as long as the lease just written into it, and never shorter than it was
# (another replica may run a longer TTL); an abandoned cap disappears one TTL after its last write.
_KEEP_KEY = """
    if redis.call('PTTL', key) < ttl then
        redis.call('PEXPIRE', key, ttl)
    end
"""

# KEYS[1..n]  the caps' sorted sets (member -> expiry), all in one Cluster slot.
# ARGV[1]     the new lease's random token.
# ARGV[2]     the lease TTL in milliseconds.
# ARGV[2+i]   the limit of KEYS[i].
# Returns the lease's member, its admission time and token ('<ms, 13 digits>:<token>', so members
# sort in admission order), when it now holds a slot in every cap. Otherwise returns i (an
# integer), the first full cap, and nothing was taken (expired members of the caps checked so far
# were purged). After a failover the time is the new master's: a skew between the two machines'
# clocks shifts which sessions count as the newest.
ACQUIRE_SCRIPT: Final = (
    _NOW
    + """
for i, key in ipairs(KEYS) do
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= tonumber(ARGV[2 + i]) then
        return i
    end
end
local member = string.format('%013d', now) .. ':' .. ARGV[1]
for _, key in ipairs(KEYS) do
    redis.call('ZADD', key, now + ttl, member)
"""
    + _KEEP_KEY
    + """
end
return member
"""
)

# KEYS[1..n]  the lease's caps.
# ARGV[1]     the lease's member (from ACQUIRE).
# ARGV[2]     the lease TTL in milliseconds.
# ARGV[2+i]   the limit of KEYS[i].
# Returns {retaken, over}. retaken: how many caps no longer held the member (it expired, or Redis
# lost its data) and had it added back, whatever their count. over: 0, or the first cap i that
# now counts more than its limit with this member among its `count - limit` newest (members sort
# in admission order); then the member was removed from every cap.
# Reading the members is O(count), but it happens only while a cap is over its limit, that is for
# about one renewal interval after Redis lost its data; otherwise a renewal costs a ZCARD per cap.
# Lua compares strings with strcoll (Redis takes LC_COLLATE from its environment); members of
# this one fixed-width format order alike in byte order and in the usual locales.
RENEW_SCRIPT: Final = (
    _NOW
    + """
local member = ARGV[1]
local retaken = 0
for _, key in ipairs(KEYS) do
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    retaken = retaken + redis.call('ZADD', key, now + ttl, member)
"""
    + _KEEP_KEY
    + """
end
for i, key in ipairs(KEYS) do
    local excess = redis.call('ZCARD', key) - tonumber(ARGV[2 + i])
    if excess > 0 then
        local newer = 0
        for _, other in ipairs(redis.call('ZRANGE', key, 0, -1)) do
            -- A member without the admission stamp (written by a relay before stamps) counts
            -- as the oldest: it must not make stamped sessions give up in its place.
            if other > member and string.find(other, '^%d%d%d%d%d%d%d%d%d%d%d%d%d:') then
                newer = newer + 1
                if newer >= excess then
                    break
                end
            end
        end
        if newer < excess then
            for _, lost in ipairs(KEYS) do
                redis.call('ZREM', lost, member)
            end
            return {retaken, i}
        end
    end
end
return {retaken, 0}
"""
)

# KEYS[1..n]  the lease's caps.
# ARGV[1]     the lease's member.
# Returns how many caps held the member (0 when it was already released or expired).
RELEASE_SCRIPT: Final = """
local held = 0
for _, key in ipairs(KEYS) do
    held = held + redis.call('ZREM', key, ARGV[1])
end
return held
"""


class _Closeable(Protocol):
    async def aclose(self) -> None: ...


class RedisLimiter:
    """Leases in Redis, shared by every replica that uses the same store and prefix.

    Each cap is a sorted set of lease members scored by expiry, named
    ``<prefix>:{limits}:<cap key>``. The hash tag puts every cap in one Redis Cluster slot, so one
    script can cover all of a session's caps; the load (a few small commands per session start,
    end and heartbeat) fits one shard easily.

    Args:
        client: a `redis.asyncio` client; the limiter owns it and closes it in `aclose`. Give it
            short socket timeouts (`make_limiter` does) so a dead Redis fails fast.
        ttl_seconds: how long a lease lives without renewal.
        prefix: the first part of every key, to share one Redis between deployments.
        closing: further resources closed by `aclose` after the client (a `Sentinel`).
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        ttl_seconds: float,
        prefix: str = "relay",
        *,
        closing: Sequence[_Closeable] = (),
    ) -> None:
        self.client = client
        self.ttl = ttl_seconds
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._prefix = f"{prefix}:{{limits}}:"
        self._closing = tuple(closing)
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    def key(self, cap: Cap) -> str:
        """The Redis key of `cap`'s sorted set."""
        return self._prefix + cap.key

    async def _run(self, script: AsyncScript, caps: Sequence[Cap], args: list[Any]) -> Any:
        """Run `script` over `caps`: the one place Redis errors become `LimiterUnavailableError`.

        `AsyncScript` sends EVALSHA and loads the script on NOSCRIPT, as after a Redis restart.
        """
        keys = [self.key(cap) for cap in caps]
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_SECONDS):
                result = await script(keys=keys, args=args)
        except _STORE_ERRORS as exc:
            logger.debug("limits store error: %s", type(exc).__name__, exc_info=True)
            raise LimiterUnavailableError(
                "the session limits store is unavailable; retry shortly"
            ) from exc
        return result

    async def acquire(self, caps: Sequence[Cap]) -> Lease:
        token = secrets.token_hex(16)
        if not caps:
            return Lease(token=token, caps=())
        limits = [cap.limit for cap in caps]
        result = await self._run(self._acquire, caps, [token, self._ttl_ms, *limits])
        # A Lua string comes back as bytes (as str with decode_responses), a number as an int.
        if isinstance(result, bytes):
            result = result.decode()
        if isinstance(result, str):
            return Lease(token=result, caps=tuple(caps))
        raise _limit_error(caps[int(result) - 1])

    async def renew(self, lease: Lease) -> RenewalResult:
        if not lease.caps:
            return RenewalResult(Renewal.HELD)
        limits = [cap.limit for cap in lease.caps]
        retaken, over = await self._run(
            self._renew, lease.caps, [lease.token, self._ttl_ms, *limits]
        )
        if int(over):
            return RenewalResult(Renewal.OVER_LIMIT, lease.caps[int(over) - 1])
        return RenewalResult(Renewal.RETAKEN if int(retaken) else Renewal.HELD)

    async def release(self, lease: Lease) -> None:
        if not lease.caps:
            return
        try:
            await self._run(self._release, lease.caps, [lease.token])
        except LimiterUnavailableError:
            logger.warning("could not release a lease; it expires within %.0f s", self.ttl)

    async def ready(self) -> bool:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_SECONDS):
                return bool(await self.client.ping())
        except _STORE_ERRORS:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()
        for resource in self._closing:
            await resource.aclose()


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


def _client_options() -> dict[str, Any]:
    return {
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": SOCKET_TIMEOUT_SECONDS,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1),
    }


def _sentinel_address(item: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError("a Sentinel address has no host")
    return host, int(port) if port else SENTINEL_PORT


def _sentinel_limiter(url: str, ttl: float) -> RedisLimiter:
    """``redis+sentinel://[[user]:[password]@]host[:port][,host[:port]...]/service[/db][?query]``.

    redis-py has no Sentinel URL, so this form is the relay's own. The user and password are the
    master's; ``sentinel_username`` and ``sentinel_password`` in the query authenticate to the
    Sentinels (unset: no auth); other query values are redis-py connection options, as in
    ``redis://`` URLs. The scheme ``rediss+sentinel://`` connects to the master over TLS.
    """
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    sentinels = [_sentinel_address(item.strip()) for item in hostlist.split(",")]
    path = [unquote(part) for part in parts.path.split("/") if part]
    if not path:
        raise ValueError("the URL names no Sentinel service")
    query = dict(parse_qsl(parts.query))
    sentinel_kwargs: dict[str, Any] = {
        key: value for key, value in _client_options().items() if key.startswith("socket_")
    }
    for name in ("sentinel_username", "sentinel_password"):
        if name in query:
            sentinel_kwargs[name.removeprefix("sentinel_")] = query.pop(name)
    # redis-py types the query options and decodes the credentials, as for a redis:// URL.
    tls = parts.scheme.lower().startswith("rediss")
    auth = f"{userinfo}@" if userinfo else ""
    db = f"/{path[1]}" if len(path) > 1 else ""
    options: dict[str, Any] = dict(parse_url(f"redis://{auth}sentinel{db}?{urlencode(query)}"))
    options.pop("host", None)
    options = {**_client_options(), **options, "ssl": tls}
    # redis-py leaves the asyncio Sentinel unannotated.
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **options)  # type: ignore[no-untyped-call]
    return RedisLimiter(sentinel.master_for(path[0]), ttl, closing=[sentinel])


def make_limiter(settings: Settings) -> Limiter:
    """The limiter `RELAY_REDIS_URL` asks for; no I/O happens until the first call.

    - unset: `MemoryLimiter`, for a single instance.
    - ``redis://`` / ``rediss://`` / ``unix://``: one Redis server (``Redis.from_url``).
    - ``redis+cluster://host:port`` / ``rediss+cluster://``: Redis Cluster, discovered from that
      seed node (``RedisCluster.from_url``).
    - ``redis+sentinel://host:port[,host:port]/service[/db]`` / ``rediss+sentinel://``: the
      master of `service`, found through Sentinel and followed on failover.

    Query values are redis-py connection options and override the relay's short timeouts.

    Raises:
        ConfigError: the URL cannot be used (it is never echoed: it may hold a password).
    """
    url, ttl = settings.redis_url, settings.lease_ttl_seconds
    if not url:
        return MemoryLimiter(ttl)
    scheme = url.partition("://")[0].lower()
    try:
        if scheme in ("redis", "rediss", "unix"):
            return RedisLimiter(Redis.from_url(url, **_client_options()), ttl)
        if scheme in ("redis+cluster", "rediss+cluster"):
            seed = scheme.removesuffix("+cluster") + url[len(scheme) :]
            return RedisLimiter(RedisCluster.from_url(seed, **_client_options()), ttl)
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            return _sentinel_limiter(url, ttl)
    except (ValueError, TypeError, RedisError) as exc:
        raise ConfigError(f"RELAY_REDIS_URL: unusable {scheme}:// URL ({exc})") from None
    raise ConfigError(
        "RELAY_REDIS_URL: use redis://, rediss://, unix://, redis+cluster:// or redis+sentinel://"
    )
