"""Leases in Redis: `RedisLimiter`, the Lua scripts it runs, and its clients.

Every replica that uses the same Redis shares the caps. Each script covers all of a session's caps
in one atomic step and reads the time from Redis's clock; `app.limits.leases` describes the leases.
Its clients fail fast when Redis is down (`client_options`); `sentinel_limiter` finds the master
behind Sentinel. `app.limits.make_limiter` builds the client `RELAY_REDIS_URL` names.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from app.errors import LimiterUnavailableError
from app.limits.leases import Cap, Lease, Renewal, RenewalResult, limit_error

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
        raise limit_error(caps[int(result) - 1])

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


def client_options() -> dict[str, Any]:
    """redis-py connection options that make a dead Redis fail fast (`SOCKET_TIMEOUT_SECONDS`)."""
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


def sentinel_limiter(url: str, ttl: float) -> RedisLimiter:
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
        key: value for key, value in client_options().items() if key.startswith("socket_")
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
    options = {**client_options(), **options, "ssl": tls}
    # redis-py leaves the asyncio Sentinel unannotated.
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **options)  # type: ignore[no-untyped-call]
    return RedisLimiter(sentinel.master_for(path[0]), ttl, closing=[sentinel])
