"""The `Limiter` contract over every implementation, then what only Redis can do: fail and recover.

The contract suite runs against `MemoryLimiter`, `RedisLimiter` on a private `redis-server` and
`RedisLimiter` on a private one-node Redis Cluster (which refuses scripts whose keys span slots).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection, connect

from app.config import ConfigError, Settings
from app.errors import LimiterUnavailableError, SessionLimitError
from app.limits import make_limiter
from app.limits.leases import (
    Cap,
    Lease,
    Limiter,
    Renewal,
    RenewalResult,
    admit,
    heartbeat,
    session_caps,
)
from app.limits.memory import MemoryLimiter
from app.limits.redis import RedisLimiter
from tests.helpers import RelayServer, relay_settings, until_closed
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SHORT_TTL = 1.5  # the shortest lease Settings allows is just over 1 s
WAIT = 10.0  # bound on every wait for a lease to expire or a store to fail

Replicas = Callable[..., Awaitable[list[Limiter]]]

HELD = RenewalResult(Renewal.HELD)
RETAKEN = RenewalResult(Renewal.RETAKEN)


def settings(**overrides: Any) -> Settings:
    return Settings(openai_api_key="sk-test", **overrides)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[RedisServer]:
    """A private one-node Redis Cluster owning every slot, shared by this module's tests.

    A new cluster takes about 2 s to accept writes, hence one per module, emptied per test.
    """
    # The cluster bus port defaults to port + 10000, which a high free port cannot have.
    with RedisServer("--cluster-enabled", "yes", "--cluster-port", str(_free_port())) as server:
        with redis.Redis.from_url(server.url) as client:  # sync: fixtures requested dynamically
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + WAIT
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "the one-node cluster did not come up"
                time.sleep(0.05)
        yield server


@pytest.fixture
def cluster_server(cluster_node: RedisServer) -> RedisServer:
    """The module's one-node cluster, emptied."""
    with redis.Redis.from_url(cluster_node.url) as client:
        client.flushall()
    return cluster_node


@pytest.fixture(params=["memory", "redis", "cluster"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    """Makes `n` limiters sharing one store, as `n` relay replicas would, closed after the test.

    Redis replicas each get their own client (their own connections, racing for real); the
    in-process limiter is one process's store, so its replicas are one object.
    """
    made: list[Limiter] = []
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        server = request.getfixturevalue("cluster_server")
        url = f"redis+cluster://127.0.0.1:{server.port}"

    async def make(n: int = 1, ttl: float = 30.0) -> list[Limiter]:
        limiters = [make_limiter(settings(redis_url=url, lease_ttl_seconds=ttl))]
        if url is None:
            limiters *= n
        else:
            limiters += [
                make_limiter(settings(redis_url=url, lease_ttl_seconds=ttl)) for _ in range(n - 1)
            ]
        made.extend(limiters)
        return limiters

    yield make
    for limiter in made:
        await limiter.aclose()


@pytest.fixture
async def limiter(replicas: Replicas) -> Limiter:
    return (await replicas())[0]


async def redis_limiter(url: str, ttl: float = 30.0) -> RedisLimiter:
    limiter = make_limiter(settings(redis_url=url, lease_ttl_seconds=ttl))
    assert isinstance(limiter, RedisLimiter)
    return limiter


async def outlive_ttl(ttl: float = SHORT_TTL) -> None:
    """Sleep past the TTL: unrenewed leases lapse, as when the store loses them."""
    await asyncio.sleep(ttl + 0.3)


async def assert_holds_exactly_its_limit(limiter: Limiter, cap: Cap, holder: Lease) -> None:
    """`cap` is full, and with `holder` released there is room for exactly one more."""
    with pytest.raises(SessionLimitError):
        await limiter.acquire([cap])
    await limiter.release(holder)
    await limiter.acquire([cap])
    with pytest.raises(SessionLimitError):
        await limiter.acquire([cap])


TIER = Cap("tier:t", 2, "tier")


# The contract


async def test_cap_is_respected(limiter: Limiter) -> None:
    """A cap of 2 admits two sessions and refuses the third, naming the cap."""
    await limiter.acquire([TIER])
    await limiter.acquire([TIER])
    with pytest.raises(SessionLimitError) as refused:
        await limiter.acquire([TIER])
    assert refused.value.cap == "tier"
    assert refused.value.code == "session_limit_reached"


async def test_release_frees_the_slot(limiter: Limiter) -> None:
    """A released lease gives its slot back, and releasing twice is harmless."""
    cap = Cap("tier:t", 1, "tier")
    lease = await limiter.acquire([cap])
    await limiter.release(lease)
    await limiter.release(lease)
    again = await limiter.acquire([cap])
    with pytest.raises(SessionLimitError):
        await limiter.acquire([cap])
    await limiter.release(again)


async def test_full_cap_takes_no_slot_in_the_others(limiter: Limiter) -> None:
    """Admission is all or nothing: refused by one full cap, it holds nothing in the others."""
    wide, narrow = Cap("tier:t", 3, "tier"), Cap("client:t:a", 1, "client")
    await limiter.acquire([wide, narrow])
    for _ in range(5):
        with pytest.raises(SessionLimitError) as refused:
            await limiter.acquire([wide, narrow])
        assert refused.value.cap == "client"
    await limiter.acquire([wide])
    await limiter.acquire([wide])
    with pytest.raises(SessionLimitError):
        await limiter.acquire([wide])


async def test_no_caps_take_nothing(limiter: Limiter) -> None:
    """A session under no cap gets an empty lease that renews and releases."""
    lease = await limiter.acquire([])
    assert lease.caps == ()
    assert await limiter.renew(lease) == HELD
    await limiter.release(lease)


async def test_lease_expires_without_renewal_and_renew_retakes_it(replicas: Replicas) -> None:
    """An unrenewed lease frees its slot after the TTL; renewing it later takes the slot again."""
    (limiter,) = await replicas(ttl=SHORT_TTL)
    cap = Cap("tier:t", 1, "tier")
    lost = await limiter.acquire([cap])
    started = time.monotonic()
    with anyio.fail_after(WAIT):
        while True:
            try:
                newcomer = await limiter.acquire([cap])
                break
            except SessionLimitError:
                await asyncio.sleep(0.1)
    assert time.monotonic() - started > SHORT_TTL - 0.5  # it lived (about) its TTL
    await limiter.release(newcomer)
    assert await limiter.renew(lost) == RETAKEN  # lost, taken again: the session is still live
    with pytest.raises(SessionLimitError):
        await limiter.acquire([cap])
    assert await limiter.renew(lost) == HELD


async def test_renewal_keeps_the_lease_past_its_ttl(replicas: Replicas) -> None:
    """A lease renewed every third of its TTL (`heartbeat`) outlives the TTL and keeps its slot."""
    (limiter,) = await replicas(ttl=SHORT_TTL)
    cap = Cap("tier:t", 1, "tier")
    lease = await limiter.acquire([cap])
    async with anyio.create_task_group() as group:
        group.start_soon(heartbeat, limiter, lease, SHORT_TTL / 3)
        await asyncio.sleep(SHORT_TTL * 1.4)
        with pytest.raises(SessionLimitError):
            await limiter.acquire([cap])
        group.cancel_scope.cancel()
    assert await limiter.renew(lease) == HELD  # intact: it never lapsed


async def test_concurrent_acquires_admit_exactly_the_cap(replicas: Replicas) -> None:
    """Fifty simultaneous admissions from five replicas against a cap of 10 admit exactly 10."""
    limiters = await replicas(n=5)
    cap = Cap("tier:t", 10, "tier")
    results = await asyncio.gather(
        *(limiters[i % 5].acquire([cap]) for i in range(50)), return_exceptions=True
    )
    admitted = [r for r in results if isinstance(r, Lease)]
    refused = [r for r in results if isinstance(r, SessionLimitError)]
    assert (len(admitted), len(refused)) == (10, 40)
    assert len({lease.token for lease in admitted}) == 10


async def test_admit_takes_the_lease(limiter: Limiter) -> None:
    """`admit` returns the lease, passes a full cap's refusal on, and needs no store for no caps."""
    cap = Cap("tier:t", 1, "tier")
    assert await admit(limiter, [], fail_open=False) is None
    assert isinstance(await admit(limiter, [cap], fail_open=True), Lease)
    with pytest.raises(SessionLimitError):
        await admit(limiter, [cap], fail_open=True)


async def test_members_sort_in_admission_order(limiter: Limiter) -> None:
    """A lease's member is its admission time and a token: members sort in admission order."""
    cap = Cap("tier:t", 5, "tier")
    members = []
    for _ in range(3):
        members.append((await limiter.acquire([cap])).token)
        await asyncio.sleep(0.005)  # members order to the millisecond
    assert sorted(members) == members
    assert all(re.fullmatch(r"\d{13}:[0-9a-f]{32}", member) for member in members)


async def test_renewals_over_the_cap_end_the_newest_leases(replicas: Replicas) -> None:
    """Lapsed leases retaken over a full cap: the newest renew OVER_LIMIT, back to the cap."""
    (limiter,) = await replicas(ttl=SHORT_TTL)
    cap = Cap("tier:t", 5, "tier")
    old = [await limiter.acquire([cap]) for _ in range(5)]
    await outlive_ttl()  # their sessions live on, but the store forgot them
    new = [await limiter.acquire([cap]) for _ in range(5)]
    assert await limiter.renew(new[0]) == HELD  # the old ones are not back yet
    for lease in old:
        assert await limiter.renew(lease) == RETAKEN
    for lease in new:
        assert await limiter.renew(lease) == RenewalResult(Renewal.OVER_LIMIT, cap)
    for lease in old:
        assert await limiter.renew(lease) == HELD
    await assert_holds_exactly_its_limit(limiter, cap, old[0])


async def test_over_limit_leaves_every_cap_and_names_the_cap(replicas: Replicas) -> None:
    """A lease newest in a cap over its limit leaves all its caps; the result names that cap."""
    (limiter,) = await replicas(ttl=SHORT_TTL)
    wide, narrow = Cap("tier:t", 4, "tier"), Cap("client:t:a", 2, "client")
    old = [await limiter.acquire([wide, narrow]) for _ in range(2)]
    await outlive_ttl()
    newest = await limiter.acquire([wide, narrow])
    other = await limiter.acquire([wide])
    for lease in old:  # the second takes `narrow` over its limit, but `newest` is newer
        assert await limiter.renew(lease) == RETAKEN
    assert await limiter.renew(newest) == RenewalResult(Renewal.OVER_LIMIT, narrow)
    assert await limiter.renew(other) == HELD
    await limiter.acquire([wide])  # `newest` left `wide` too: old, old, other and this one
    with pytest.raises(SessionLimitError):
        await limiter.acquire([wide])
    with pytest.raises(SessionLimitError):
        await limiter.acquire([narrow])


async def test_heartbeat_ends_a_session_over_the_cap(replicas: Replicas) -> None:
    """`heartbeat` raises `session_limit_reached` (1008, the cap named) when over the limit."""
    (limiter,) = await replicas(ttl=SHORT_TTL)
    cap = Cap("tier:t", 1, "tier")
    old = await limiter.acquire([cap])
    await outlive_ttl()
    new = await limiter.acquire([cap])
    assert await limiter.renew(old) == RETAKEN
    with anyio.fail_after(WAIT), pytest.raises(SessionLimitError) as ended:
        await heartbeat(limiter, new, SHORT_TTL / 3)
    assert (ended.value.code, ended.value.close_code, ended.value.cap) == (
        "session_limit_reached",
        1008,
        "tier",
    )
    assert "ended" in ended.value.message and "lost its data" in ended.value.message
    assert await limiter.renew(old) == HELD
    with pytest.raises(SessionLimitError):
        await limiter.acquire([cap])


# Redis only: outages, restarts, replicas, key layout, URLs


async def test_redis_down_fails_fast(redis_server: RedisServer) -> None:
    """With Redis stopped, acquire and renew raise LimiterUnavailableError promptly, release
    does not raise, and the limiter reports not ready."""
    limiter = await redis_limiter(redis_server.url)
    cap = Cap("tier:t", 1, "tier")
    lease = await limiter.acquire([cap])
    redis_server.stop()
    try:
        with anyio.fail_after(WAIT):
            with pytest.raises(LimiterUnavailableError) as down:
                await limiter.acquire([cap])
            assert down.value.code == "limiter_unavailable"
            assert down.value.close_code == 1013
            with pytest.raises(LimiterUnavailableError):
                await limiter.renew(lease)
            await limiter.release(lease)
            assert not await limiter.ready()
    finally:
        await limiter.aclose()


async def test_cluster_down_fails_fast() -> None:
    """A Redis Cluster URL with no node answering fails admission with LimiterUnavailableError."""
    limiter = make_limiter(settings(redis_url=f"redis+cluster://127.0.0.1:{_free_port()}"))
    try:
        with anyio.fail_after(WAIT):
            with pytest.raises(LimiterUnavailableError):
                await limiter.acquire([TIER])
            assert not await limiter.ready()
    finally:
        await limiter.aclose()


async def test_renew_after_empty_restart_reestablishes_the_lease(
    redis_server: RedisServer,
) -> None:
    """After Redis restarts empty, the next renewal puts the lease back and the cap holds again."""
    limiter = await redis_limiter(redis_server.url)
    cap = Cap("tier:t", 1, "tier")
    try:
        lease = await limiter.acquire([cap])
        redis_server.restart()
        assert await limiter.renew(lease) == RETAKEN
        with pytest.raises(SessionLimitError):
            await limiter.acquire([cap])
        assert await limiter.renew(lease) == HELD
        assert await limiter.ready()
    finally:
        await limiter.aclose()


async def test_empty_restart_over_the_cap_ends_the_newest(redis_server: RedisServer) -> None:
    """Redis restarts empty under a full cap of 5, admits 5 more: the 5 newest end, 5 remain."""
    limiter = await redis_limiter(redis_server.url)
    cap = Cap("tier:t", 5, "tier")
    key = limiter.key(cap)
    try:
        old = [await limiter.acquire([cap]) for _ in range(5)]
        redis_server.restart()
        new = [await limiter.acquire([cap]) for _ in range(5)]
        with pytest.raises(SessionLimitError):
            await limiter.acquire([cap])
        assert await limiter.renew(new[0]) == HELD  # not over the limit yet
        for lease in old:
            assert await limiter.renew(lease) == RETAKEN
        assert await limiter.client.zcard(key) == 10
        for lease in new:
            assert await limiter.renew(lease) == RenewalResult(Renewal.OVER_LIMIT, cap)
        assert await limiter.client.zcard(key) == 5
        for lease in old:
            assert await limiter.renew(lease) == HELD
        for lease in old:
            assert await limiter.client.zscore(key, lease.token) is not None
        with pytest.raises(SessionLimitError):
            await limiter.acquire([cap])
    finally:
        await limiter.aclose()


async def test_unstamped_members_count_as_the_oldest(redis_server: RedisServer) -> None:
    """A member written before admission stamps never makes a stamped lease outlive it."""
    limiter = await redis_limiter(redis_server.url)
    cap = Cap("tier:t", 1, "tier")
    key = limiter.key(cap)
    try:
        lease = await limiter.acquire([cap])
        # A bare token, as a relay of the previous version writes: "f..." sorts after "17...".
        far = (await limiter.client.time())[0] * 1000 + 60_000
        await limiter.client.zadd(key, {"f" * 32: far})
        assert await limiter.renew(lease) == RenewalResult(Renewal.OVER_LIMIT, cap)
        assert await limiter.client.zrange(key, 0, -1) == [b"f" * 32]
    finally:
        await limiter.aclose()


async def test_empty_restart_under_the_cap_retakes_quietly(redis_server: RedisServer) -> None:
    """After an empty restart, renewals within the cap's limit retake their leases quietly."""
    limiter = await redis_limiter(redis_server.url)
    cap = Cap("tier:t", 5, "tier")
    try:
        old = [await limiter.acquire([cap]) for _ in range(3)]
        redis_server.restart()
        new = [await limiter.acquire([cap]) for _ in range(2)]
        for lease in old:
            assert await limiter.renew(lease) == RETAKEN
        for lease in [*new, *old]:
            assert await limiter.renew(lease) == HELD
        assert await limiter.client.zcard(limiter.key(cap)) == 5
        with pytest.raises(SessionLimitError):
            await limiter.acquire([cap])
    finally:
        await limiter.aclose()


async def test_decoded_responses_take_and_renew_leases(redis_server: RedisServer) -> None:
    """A client made with ``decode_responses=true`` (a URL option) reads the scripts' replies."""
    limiter = await redis_limiter(redis_server.url + "?decode_responses=true")
    cap = Cap("tier:t", 1, "tier")
    try:
        lease = await limiter.acquire([cap])
        assert re.fullmatch(r"\d{13}:[0-9a-f]{32}", lease.token)
        with pytest.raises(SessionLimitError):
            await limiter.acquire([cap])
        assert await limiter.renew(lease) == HELD
    finally:
        await limiter.aclose()


async def test_heartbeat_outlives_an_outage(redis_server: RedisServer) -> None:
    """A heartbeat keeps running while Redis is down and retakes the lease once it is back."""
    limiter = await redis_limiter(redis_server.url, ttl=SHORT_TTL)
    cap = Cap("tier:t", 1, "tier")
    try:
        lease = await limiter.acquire([cap])
        async with anyio.create_task_group() as group:
            group.start_soon(heartbeat, limiter, lease, SHORT_TTL / 3)
            redis_server.stop()
            await asyncio.sleep(SHORT_TTL)  # several failed beats: the task must not end
            redis_server.start()
            with anyio.fail_after(WAIT):
                while True:  # the first beat after the restart takes the slot again
                    try:
                        probe = await limiter.acquire([cap])
                    except SessionLimitError:
                        break
                    await limiter.release(probe)
                    await asyncio.sleep(0.05)
            group.cancel_scope.cancel()
    finally:
        await limiter.aclose()


async def test_admit_fails_open_or_closed(redis_server: RedisServer) -> None:
    """With Redis down, `admit` refuses by default and admits without a lease when failing open."""
    limiter = await redis_limiter(redis_server.url)
    redis_server.stop()
    try:
        with anyio.fail_after(WAIT):
            with pytest.raises(LimiterUnavailableError):
                await admit(limiter, [TIER], fail_open=False)
            assert await admit(limiter, [TIER], fail_open=True) is None
    finally:
        await limiter.aclose()


async def test_two_replicas_share_one_cap(redis_server: RedisServer) -> None:
    """Two limiters on separate clients (two replicas) count against the same cap."""
    first = await redis_limiter(redis_server.url)
    second = await redis_limiter(redis_server.url)
    try:
        await first.acquire([TIER])
        held = await second.acquire([TIER])
        with pytest.raises(SessionLimitError):
            await first.acquire([TIER])
        await second.release(held)
        await first.acquire([TIER])
    finally:
        await first.aclose()
        await second.aclose()


async def test_keys_share_one_slot_and_expire(redis_server: RedisServer) -> None:
    """A session's cap keys hash to one Cluster slot and carry a TTL, so abandoned caps vanish."""
    limiter = await redis_limiter(redis_server.url, ttl=SHORT_TTL)
    config = settings(
        tiers={"pro": {"max_sessions": 5, "max_sessions_per_client": 2}},
        model_limits={"gpt-realtime": 100},
    )
    caps = session_caps(config, "pro", "sub:{odd}", "gpt-realtime")
    try:
        await limiter.acquire(caps)
        keys = [limiter.key(cap) for cap in caps]
        assert len({key_slot(key.encode()) for key in keys}) == 1
        for key in keys:
            assert 0 < await limiter.client.pttl(key) <= SHORT_TTL * 1000
    finally:
        await limiter.aclose()


async def test_sentinel_url_finds_the_master(redis_server: RedisServer) -> None:
    """A `redis+sentinel://` URL reaches the master a real Sentinel names, and leases work."""
    monitor = f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
    with RedisServer("--sentinel", config=monitor) as sentinel:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        limiter = make_limiter(settings(redis_url=url))
        try:
            await limiter.acquire([TIER])
            assert await limiter.ready()
        finally:
            await limiter.aclose()
    with redis.Redis.from_url(redis_server.url) as direct:
        assert direct.zcard("relay:{limits}:tier:t") == 1


def test_session_caps_follow_the_settings() -> None:
    """Tier, per-client and model caps apply exactly when the settings define them."""
    config = settings(
        tiers={"pro": {"max_sessions": 5, "max_sessions_per_client": 2}, "free": {}},
        model_limits={"gpt-realtime": 100},
    )
    assert session_caps(config, "pro", "key:ab", "gpt-realtime") == [
        Cap("tier:pro", 5, "tier"),
        Cap("client:pro:key:ab", 2, "client"),
        Cap("model:gpt-realtime", 100, "model"),
    ]
    assert session_caps(config, "free", "key:ab", "gpt-realtime-mini") == []


async def test_make_limiter_reads_the_url() -> None:
    """Each URL form builds the right client, with no I/O, and a bad scheme fails naming the
    variable."""
    assert isinstance(make_limiter(settings()), MemoryLimiter)
    made: list[Limiter] = []
    try:
        plain = make_limiter(settings(redis_url="redis://:pw@127.0.0.1:1/2"))
        made.append(plain)
        assert isinstance(plain, RedisLimiter) and isinstance(plain.client, Redis)
        assert plain.client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
        cluster = make_limiter(settings(redis_url="redis+cluster://127.0.0.1:1"))
        made.append(cluster)
        assert isinstance(cluster, RedisLimiter) and isinstance(cluster.client, RedisCluster)
        sentinel = make_limiter(
            settings(
                redis_url="redis+sentinel://:pw@s1:26380,s2/mymaster/3"
                "?sentinel_password=spw&socket_timeout=2"
            )
        )
        made.append(sentinel)
        assert isinstance(sentinel, RedisLimiter) and isinstance(sentinel.client, Redis)
        pool = sentinel.client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "mymaster"
        kwargs = pool.connection_kwargs
        assert (kwargs["password"], kwargs["db"], kwargs["socket_timeout"]) == ("pw", 3, 2.0)
        manager = pool.sentinel_manager
        addresses = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in manager.sentinels
        ]
        assert addresses == [("s1", 26380), ("s2", 26379)]
        assert manager.sentinels[0].connection_pool.connection_kwargs["password"] == "spw"
    finally:
        for limiter in made:
            await limiter.aclose()
    with pytest.raises(ConfigError, match="RELAY_REDIS_URL"):
        make_limiter(settings(redis_url="memcached://127.0.0.1"))
    with pytest.raises(ConfigError) as bad:
        make_limiter(settings(redis_url="redis+sentinel://:secretpw@host"))
    assert "secretpw" not in str(bad.value)


# Through a relay


async def open_session(url: str) -> ClientConnection:
    """Connect and wait for `session.created`: the relay admitted the session."""
    ws = await connect(url, open_timeout=WAIT)
    async with asyncio.timeout(WAIT):
        event = json.loads(await ws.recv())
    assert event["type"] == "session.created", event
    return ws


async def until_quiet(client: Redis, key: str, count: int, lease_ttl: float, quiet: float) -> None:
    """Wait until `key` holds `count` leases and none is renewed again for `quiet` seconds.

    A heartbeat renews every third of the TTL, and a lease's score is its last renewal plus the
    TTL, both on Redis's clock.
    """
    interval_ms = lease_ttl * 1000 / 3
    async with asyncio.timeout(WAIT):
        while True:
            clock: Any = await client.time()
            leases: Any = await client.zrange(key, 0, -1, withscores=True)
            now_ms = clock[0] * 1000 + clock[1] / 1000
            scores = [float(score) for _, score in leases]
            next_ms = min(scores, default=now_ms) - lease_ttl * 1000 + interval_ms
            if len(scores) == count and next_ms - now_ms >= quiet * 1000:
                return
            await asyncio.sleep(0.005)


async def test_relay_ends_the_newest_sessions_over_the_cap_after_redis_restarts_empty(
    relay_factory: Callable[..., Awaitable[RelayServer]], upstream: Any, redis_server: RedisServer
) -> None:
    """After an empty Redis restart over the cap, the relay ends the newest sessions with 1008."""
    ttl = SHORT_TTL  # renewals every 0.5 s
    settings = relay_settings(
        upstream.url,
        redis_url=redis_server.url,
        tiers={"default": {"max_sessions": 5}},
        lease_ttl_seconds=ttl,
    )
    relay = await relay_factory(settings)
    client = Redis.from_url(redis_server.url)
    key = "relay:{limits}:tier:default"
    opened: list[ClientConnection] = []
    try:
        # Opened together, the sessions renew together, leaving a quiet window between beats.
        old = await asyncio.gather(*(open_session(relay.ws_url) for _ in range(5)))
        opened += old
        # The old sessions renew next in 0.3 s or more: the new ones are admitted before that.
        await until_quiet(client, key, 5, ttl, quiet=0.3)
        redis_server.restart()
        await client.connection_pool.disconnect()  # its connections died with the server
        new = await asyncio.gather(*(open_session(relay.ws_url) for _ in range(5)))
        opened += new
        for events in await asyncio.gather(*(until_closed(ws) for ws in new)):
            error = events[-1]
            assert error["type"] == "error", events
            assert (error["error"]["code"], error["error"]["param"]) == (
                "session_limit_reached",
                "tier",
            )
            assert "lost its data" in error["error"]["message"]
        assert [ws.close_code for ws in new] == [1008] * 5
        await asyncio.sleep(2 * ttl / 3)  # two more renewals: the old sessions are not ended
        for ws in old:
            async with asyncio.timeout(WAIT):
                await (await ws.ping())
        assert await client.zcard(key) == 5
    finally:
        for ws in opened:
            async with asyncio.timeout(WAIT):
                await ws.close()
        await client.aclose()
