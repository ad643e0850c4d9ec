"""Limits: per-tier concurrent sessions as leases, in process or in Redis.

`leases` holds the contract (caps, leases, `Limiter`) with the admission and renewal policy;
`memory` and `redis` implement it, and `make_limiter` picks one from the settings.
"""

from __future__ import annotations

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from app.config import ConfigError, Settings
from app.limits.leases import Limiter
from app.limits.memory import MemoryLimiter
from app.limits.redis import RedisLimiter, client_options, sentinel_limiter


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
            return RedisLimiter(Redis.from_url(url, **client_options()), ttl)
        if scheme in ("redis+cluster", "rediss+cluster"):
            seed = scheme.removesuffix("+cluster") + url[len(scheme) :]
            return RedisLimiter(RedisCluster.from_url(seed, **client_options()), ttl)
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            return sentinel_limiter(url, ttl)
    except (ValueError, TypeError, RedisError) as exc:
        raise ConfigError(f"RELAY_REDIS_URL: unusable {scheme}:// URL ({exc})") from None
    raise ConfigError(
        "RELAY_REDIS_URL: use redis://, rediss://, unix://, redis+cluster:// or redis+sentinel://"
    )
