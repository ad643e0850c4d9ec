"""Spend per client per UTC day: the `SpendStore` contract over every implementation, the daily
budget check (Redis down included) and the admin endpoint that reports it.

The contract suite runs against `MemorySpendStore`, `RedisSpendStore` on a private `redis-server`
and on a private one-node Redis Cluster (which refuses scripts whose keys span slots).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from app.api.admin import ADMIN_SPEND_PATH, admin_router
from app.config import Settings, TierSettings
from app.errors import BudgetExhaustedError, LimiterUnavailableError
from app.limits.spend import (
    KEY_TTL_SECONDS,
    MemorySpendStore,
    RedisSpendStore,
    SpendStore,
    check_daily_budget,
    make_spend_store,
    utc_day,
)
from tests.redis_server import RedisServer

# The one-node cluster fixtures of the limiter suite, shared rather than written again.
from tests.test_limits import cluster_node, cluster_server  # noqa: F401

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

ADMIN_KEY = "admin-key-for-tests-" + "x" * 12
BUDGET = TierSettings(max_cost_usd_per_client_per_day=1.0)


def settings(**overrides: Any) -> Settings:
    return Settings(openai_api_key="sk-test", **overrides)


class Clock:
    """A settable clock, starting at 23:59:30 UTC on 2025-03-31."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 31, 23, 59, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


Stores = Callable[..., Awaitable[list[SpendStore]]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
async def replicas(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Stores]:
    """Makes `n` stores sharing one store on `clock`, as `n` replicas would; closed after.

    Redis replicas each get their own client; the in-process store is one process's, so its
    replicas are one object.
    """
    made: list[SpendStore] = []
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        url = f"redis+cluster://127.0.0.1:{request.getfixturevalue('cluster_server').port}"

    def one() -> SpendStore:
        made.append(make_spend_store(settings(redis_url=url), clock=clock))
        return made[-1]

    async def make(n: int = 1) -> list[SpendStore]:
        return [one()] * n if url is None else [one() for _ in range(n)]

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
async def store(replicas: Stores) -> SpendStore:
    return (await replicas())[0]


# The contract


async def test_add_returns_the_running_total_for_today(store: SpendStore) -> None:
    assert await store.today("alice") == 0.0
    assert await store.add("alice", "pro", 0.25) == pytest.approx(0.25)
    assert await store.add("alice", "pro", 0.5) == pytest.approx(0.75)
    assert await store.add("bob", "pro", 0.125) == pytest.approx(0.125)
    assert await store.today("alice") == pytest.approx(0.75)
    assert await store.today("bob") == pytest.approx(0.125)
    assert await store.today("carol") == 0.0


async def test_tiny_amounts_add_up(store: SpendStore) -> None:
    """Amounts a few tokens cost (scientific notation in `repr`) count, without drift."""
    for _ in range(1000):
        await store.add("alice", "pro", 1e-05)
    assert await store.today("alice") == pytest.approx(0.01, rel=1e-9)


async def test_totals_by_tier_sum_their_clients(store: SpendStore) -> None:
    assert await store.totals_by_tier() == {}
    await store.add("alice", "pro", 0.5)
    await store.add("bob", "pro", 0.25)
    await store.add("carol", "free", 0.125)
    await store.add("carol", "free", 0.0)
    assert await store.totals_by_tier() == pytest.approx({"pro": 0.75, "free": 0.125})


async def test_client_ids_are_taken_as_they_are(store: SpendStore) -> None:
    """Ids with separators, braces, spaces or non-ASCII text are one client each."""
    odd = ["a:b", "{spend}", "with space", "café", "a:b:clients", ""]
    for i, client in enumerate(odd, start=1):
        await store.add(client, "pro", float(i))
    for i, client in enumerate(odd, start=1):
        assert await store.today(client) == pytest.approx(float(i))
    assert await store.totals_by_tier() == pytest.approx({"pro": 21.0})


async def test_the_day_rolls_over_at_midnight_utc(store: SpendStore, clock: Clock) -> None:
    await store.add("alice", "pro", 0.75)
    clock.now += timedelta(seconds=29)  # 23:59:59
    assert await store.today("alice") == pytest.approx(0.75)
    clock.now += timedelta(seconds=1)  # 00:00:00, April 1st
    assert await store.today("alice") == 0.0
    assert await store.totals_by_tier() == {}
    assert await store.add("alice", "pro", 0.25) == pytest.approx(0.25)
    assert await store.totals_by_tier() == pytest.approx({"pro": 0.25})
    clock.now -= timedelta(hours=1)  # back on March 31st: its totals are still there
    assert await store.today("alice") == pytest.approx(0.75)


async def test_the_day_is_the_utc_date_whatever_the_zone(store: SpendStore, clock: Clock) -> None:
    """02:00 in UTC+3 on April 1st is still March 31st in UTC."""
    await store.add("alice", "pro", 0.5)
    clock.now = datetime(2025, 4, 1, 2, 0, tzinfo=timezone(timedelta(hours=3)))
    assert await store.today("alice") == pytest.approx(0.5)


async def test_replicas_share_totals(replicas: Stores) -> None:
    """Concurrent adds from several replicas all count (HINCRBYFLOAT never loses an update)."""
    stores = await replicas(3)
    await asyncio.gather(*(s.add("alice", "pro", 0.5) for s in stores for _ in range(20)))
    for replica in stores:
        assert await replica.today("alice") == pytest.approx(30.0)
        assert await replica.totals_by_tier() == pytest.approx({"pro": 30.0})


@pytest.mark.parametrize("usd", [-0.01, float("nan"), float("inf")])
async def test_bad_amounts_are_refused_and_not_recorded(store: SpendStore, usd: float) -> None:
    with pytest.raises(ValueError):
        await store.add("alice", "pro", usd)
    assert await store.today("alice") == 0.0
    assert await store.totals_by_tier() == {}


def test_utc_day() -> None:
    assert utc_day(datetime(2025, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))) == "2024-12-31"
    assert utc_day(datetime(2025, 1, 1, 23, 59, tzinfo=UTC)) == "2025-01-01"
    assert utc_day(datetime(2025, 1, 1, 23, 59)) == "2025-01-01"  # naive: UTC already


# Only Redis and only memory


async def test_redis_keys_share_a_slot_and_expire(redis_server: RedisServer, clock: Clock) -> None:
    store = make_spend_store(settings(redis_url=redis_server.url), clock=clock)
    assert isinstance(store, RedisSpendStore)
    try:
        await store.add("alice", "pro", 0.5)
        clients, tiers = store.keys("2025-03-31")
        assert clients.startswith("relay:{spend}:") and tiers.startswith("relay:{spend}:")
        for key in (clients, tiers):
            ttl = await store.client.ttl(key)
            assert KEY_TTL_SECONDS - 5 <= ttl <= KEY_TTL_SECONDS
    finally:
        await store.aclose()


async def test_memory_store_forgets_days_before_yesterday(clock: Clock) -> None:
    store = MemorySpendStore(clock)
    await store.add("alice", "pro", 1.0)  # March 31st
    clock.now += timedelta(days=1)
    await store.add("bob", "pro", 1.0)  # April 1st: March 31st is yesterday, kept
    clock.now -= timedelta(days=1)
    assert await store.today("alice") == 1.0
    clock.now += timedelta(days=2)
    await store.add("bob", "pro", 1.0)  # April 2nd: March 31st goes
    clock.now -= timedelta(days=2)
    assert await store.today("alice") == 0.0


# The daily budget


async def test_budget_refuses_a_client_at_its_limit(store: SpendStore) -> None:
    await check_daily_budget(store, BUDGET, "alice")
    await store.add("alice", "pro", 0.75)
    await check_daily_budget(store, BUDGET, "alice")
    await store.add("alice", "pro", 0.25)
    with pytest.raises(BudgetExhaustedError) as refused:
        await check_daily_budget(store, BUDGET, "alice")
    assert refused.value.code == "budget_exhausted"
    assert refused.value.close_code == 1008
    assert refused.value.message == "this client has reached its daily spending limit"
    await check_daily_budget(store, BUDGET, "bob")  # another client's budget is its own


async def test_budget_starts_again_the_next_utc_day(store: SpendStore, clock: Clock) -> None:
    await store.add("alice", "pro", 5.0)
    with pytest.raises(BudgetExhaustedError):
        await check_daily_budget(store, BUDGET, "alice")
    clock.now += timedelta(minutes=1)
    await check_daily_budget(store, BUDGET, "alice")


async def test_budget_spares_anonymous_clients_and_tiers_without_one(store: SpendStore) -> None:
    await store.add("alice", "pro", 5.0)
    await check_daily_budget(store, BUDGET, None)
    await check_daily_budget(store, TierSettings(), "alice")


@pytest.mark.parametrize("fail_open", [False, True])
async def test_budget_with_redis_down(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, fail_open: bool
) -> None:
    """Fail closed by default (limiter_unavailable, 1013); fail open admits and says so."""
    store = make_spend_store(settings(redis_url=redis_server.url))
    try:
        await store.add("alice", "pro", 0.25)
        redis_server.stop()
        with pytest.raises(LimiterUnavailableError):
            await store.add("alice", "pro", 0.25)
        check = check_daily_budget(store, BUDGET, "alice", fail_open=fail_open)
        if fail_open:
            with caplog.at_level(logging.WARNING, logger="app.limits.spend"):
                await check
            assert "fail open" in caplog.text
        else:
            with pytest.raises(LimiterUnavailableError) as refused:
                await check
            assert refused.value.code == "limiter_unavailable"
            assert refused.value.close_code == 1013
        # Without a limit or an identity, the store is not asked: no outage to see.
        await check_daily_budget(store, TierSettings(), "alice")
        await check_daily_budget(store, BUDGET, None)
        redis_server.start()  # empty: nothing was persisted
        await check_daily_budget(store, BUDGET, "alice")
        assert await store.today("alice") == 0.0
    finally:
        await store.aclose()


# The admin endpoint


async def admin_get(app: FastAPI, key: str | None, **params: str) -> httpx.Response:
    headers = {b"Authorization": f"Bearer {key}".encode()} if key is not None else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        return await client.get(ADMIN_SPEND_PATH, headers=headers, params=params)


def admin_app(store: SpendStore, clock: Clock, admin_key: str | None = ADMIN_KEY) -> FastAPI:
    app = FastAPI()
    key = SecretStr(admin_key) if admin_key is not None else None
    app.include_router(admin_router(settings(admin_key=key), store, clock=clock))
    return app


async def test_admin_spend_with_the_right_key(store: SpendStore, clock: Clock) -> None:
    await store.add("alice", "pro", 0.5)
    await store.add("bob", "free", 0.25)
    app = admin_app(store, clock)

    response = await admin_get(app, ADMIN_KEY, client="alice")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body == {
        "day": "2025-03-31",
        "client": "alice",
        "client_usd": pytest.approx(0.5),
        "tiers": pytest.approx({"pro": 0.5, "free": 0.25}),
    }

    body = (await admin_get(app, ADMIN_KEY)).json()
    assert body["client"] is None and body["client_usd"] is None
    assert body["tiers"] == pytest.approx({"pro": 0.5, "free": 0.25})

    body = (await admin_get(app, ADMIN_KEY, client="nobody")).json()
    assert body["client"] == "nobody" and body["client_usd"] == 0.0

    clock.now += timedelta(minutes=1)
    body = (await admin_get(app, ADMIN_KEY, client="alice")).json()
    assert body == {"day": "2025-04-01", "client": "alice", "client_usd": 0.0, "tiers": {}}


@pytest.mark.parametrize(
    "key", [None, "", "wrong", ADMIN_KEY[:-1], ADMIN_KEY + "x", "clé-non-ascii"]
)
async def test_admin_spend_refuses_a_wrong_or_missing_key(
    key: str | None, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    app = admin_app(MemorySpendStore(clock), clock)
    with caplog.at_level(logging.DEBUG):
        response = await admin_get(app, key, client="alice")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert ADMIN_KEY not in response.text and ADMIN_KEY not in caplog.text


async def test_admin_spend_takes_a_non_ascii_key_sent_as_utf8(clock: Clock) -> None:
    app = admin_app(MemorySpendStore(clock), clock, admin_key="clé-d'admin")
    assert (await admin_get(app, "clé-d'admin")).status_code == 200
    assert (await admin_get(app, "cle-d'admin")).status_code == 401


async def test_admin_spend_takes_only_the_bearer_scheme(clock: Clock) -> None:
    app = admin_app(MemorySpendStore(clock), clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        response = await client.get(ADMIN_SPEND_PATH, headers={"Authorization": ADMIN_KEY})
    assert response.status_code == 401


@pytest.mark.parametrize("admin_key", [None, ""])
async def test_admin_spend_is_absent_without_an_admin_key(
    admin_key: str | None, clock: Clock
) -> None:
    app = admin_app(MemorySpendStore(clock), clock, admin_key=admin_key)
    for key in (None, "", "anything"):
        assert (await admin_get(app, key)).status_code == 404


async def test_admin_spend_with_redis_down(redis_server: RedisServer, clock: Clock) -> None:
    store = make_spend_store(settings(redis_url=redis_server.url), clock=clock)
    try:
        app = admin_app(store, clock)
        assert (await admin_get(app, ADMIN_KEY)).status_code == 200
        redis_server.stop()
        response = await admin_get(app, ADMIN_KEY, client="alice")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "limiter_unavailable"
    finally:
        await store.aclose()
