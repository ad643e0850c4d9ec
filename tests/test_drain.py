"""Graceful drain on SIGTERM, with the relay as a real subprocess (`python -m app`)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
import redis.asyncio as redis
from websockets.asyncio.client import connect

from tests.helpers import until_closed

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

DRAIN_SECONDS = 2.0
WAIT = 10.0


async def leases(redis_server) -> int:
    """Session leases held in the tier's cap."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        return sum([await client.zcard(key) for key in await client.keys("*tier:default*")])
    finally:
        await client.aclose()


async def next_event(ws) -> dict:
    async with asyncio.timeout(WAIT):
        return json.loads(await ws.recv())


async def test_sigterm_drains_then_closes_with_1012(upstream, relay_process_factory, redis_server):
    """SIGTERM: readiness fails, new sessions are refused, live ones warned then closed 1012,
    and their leases are given back."""
    relay = await relay_process_factory(
        upstream.url,
        RELAY_DRAIN_SECONDS=str(DRAIN_SECONDS),
        RELAY_REDIS_URL=redis_server.url,
        RELAY_TIERS='{"default": {"max_sessions": 5}}',
    )
    process, port = relay.process, relay.port
    url = f"ws://127.0.0.1:{port}/ws"
    live = [await connect(url) for _ in range(2)]
    for ws in live:
        assert (await next_event(ws))["type"] == "session.created"
    assert await leases(redis_server) == 2
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        warnings = [await next_event(ws) for ws in live]  # session.updated may come first
        for i, warning in enumerate(warnings):
            while warning["type"] != "error":
                warning = await next_event(live[i])
            assert warning["error"]["code"] == "server_shutting_down"
        assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 503
    async with connect(url) as late:
        refused = await next_event(late)
        assert refused["error"]["code"] == "server_shutting_down"
        await until_closed(late)
        assert late.close_code == 1012
    for ws in live:
        await until_closed(ws)
        assert ws.close_code == 1012
    closed_after = time.monotonic() - signalled
    assert DRAIN_SECONDS * 0.9 <= closed_after < DRAIN_SECONDS + 5
    assert await relay.exit_code() == 0
    assert all(record.closed.is_set() for record in upstream.connections)
    assert await leases(redis_server) == 0  # released, not left to expire


async def test_sessions_that_end_during_the_drain_let_it_finish_early(
    upstream, relay_process_factory
):
    """With no live session left, the relay exits without waiting out the window."""
    relay = await relay_process_factory(upstream.url, RELAY_DRAIN_SECONDS="30")
    process, port = relay.process, relay.port
    ws = await connect(f"ws://127.0.0.1:{port}/ws")
    assert (await next_event(ws))["type"] == "session.created"
    process.send_signal(signal.SIGTERM)
    await ws.close()
    started = time.monotonic()
    assert await relay.exit_code() == 0
    assert time.monotonic() - started < 10
