"""Admission end to end: session limits in Redis across relay replicas, auth, origin, timeouts."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
import redis.asyncio as redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import relay_settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

WAIT = 10.0
TIERS = {"default": {"max_sessions": 2}}


async def first_event(ws) -> dict:
    async with asyncio.timeout(WAIT):
        return json.loads(await ws.recv())


async def close_code(ws) -> int | None:
    async with asyncio.timeout(WAIT):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            return ws.close_code


async def admitted(url: str, **kwargs) -> tuple[bool, str]:
    """Open a session; True if the relay started it, else the refusal's error code."""
    ws = await connect(url, **kwargs)
    event = await first_event(ws)
    if event["type"] == "session.created":
        return True, ws  # type: ignore[return-value]
    await close_code(ws)
    return False, event["error"]["code"]


async def test_two_replicas_share_one_cap_and_a_killed_one_frees_its_slots(
    upstream, redis_server, relay_process_factory
):
    """One cap across two relay processes; SIGKILL one and its slots return within the TTL."""
    env = {
        "RELAY_REDIS_URL": redis_server.url,
        "RELAY_TIERS": json.dumps(TIERS),
        "RELAY_LEASE_TTL_SECONDS": "2",
    }
    a = await relay_process_factory(upstream.url, **env)
    b = await relay_process_factory(upstream.url, **env)
    held = [await connect(a.ws_url) for _ in range(2)]
    for ws in held:
        assert (await first_event(ws))["type"] == "session.created"
    async with connect(b.ws_url) as refused:
        error = await first_event(refused)
        assert error["error"]["code"] == "session_limit_reached"
        assert error["error"]["param"] == "tier"
        assert await close_code(refused) == 1008
    assert len(upstream.connections) == 2  # the refused session opened nothing upstream
    a.process.send_signal(signal.SIGKILL)
    await a.exit_code()
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    async with asyncio.timeout(WAIT):
        while True:
            ok, session = await admitted(b.ws_url)
            if ok:
                break
            assert session == "session_limit_reached"
            await asyncio.sleep(0.2)
    freed_after = loop.time() - killed_at
    await session.close()  # type: ignore[attr-defined]
    assert freed_after < 2 + 1.5  # the TTL, plus a renewal's slack


async def test_fifty_attempts_against_a_cap_of_ten_admit_exactly_ten(
    upstream, redis_server, relay_process_factory
):
    """Concurrent admissions race through Lua on Redis: exactly the cap gets in."""
    env = {"RELAY_REDIS_URL": redis_server.url, "RELAY_TIERS": '{"default": {"max_sessions": 10}}'}
    replicas = [await relay_process_factory(upstream.url, **env) for _ in range(2)]
    attempts = [admitted(replicas[i % 2].ws_url) for i in range(50)]
    results = await asyncio.gather(*attempts)
    winners = [ws for ok, ws in results if ok]
    refusals = [code for ok, code in results if not ok]
    assert len(winners) == 10
    assert set(refusals) == {"session_limit_reached"}
    for ws in winners:
        await ws.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("fail_open", "expected"), [(False, "limiter_unavailable"), (True, None)])
async def test_redis_down_at_admission(relay_factory, upstream, redis_server, fail_open, expected):
    """Redis unreachable: refuse with `limiter_unavailable` (1013), or admit when failing open."""
    settings = relay_settings(
        upstream.url, redis_url=redis_server.url, tiers=TIERS, limits_fail_open=fail_open
    )
    relay = await relay_factory(settings)
    redis_server.stop()
    async with connect(relay.ws_url) as ws:
        event = await first_event(ws)
        if expected is None:
            assert event["type"] == "session.created"
        else:
            assert event["error"]["code"] == expected
            assert await close_code(ws) == 1013
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{relay.http_url}/readyz")).status_code == 503


async def test_redis_lost_mid_session_keeps_the_session_and_renews_after(
    relay_factory, upstream, redis_server
):
    """Live sessions survive a Redis outage; once Redis is back (empty) the lease is retaken."""
    settings = relay_settings(
        upstream.url, redis_url=redis_server.url, tiers=TIERS, lease_ttl_seconds=1.5
    )
    relay = await relay_factory(settings)
    async with connect(relay.ws_url) as ws:
        assert (await first_event(ws))["type"] == "session.created"
        redis_server.stop()
        await asyncio.sleep(1.2)  # two renewals fail meanwhile
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        async with asyncio.timeout(WAIT):
            while (json.loads(await ws.recv()))["type"] != "input_audio_buffer.cleared":
                pass
        redis_server.restart()
        client = redis.Redis.from_url(redis_server.url)
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    if keys := await client.keys("*tier:default*"):
                        break
                    await asyncio.sleep(0.1)
            key = keys[0]
            assert await client.zcard(key) == 1
        finally:
            await client.aclose()


async def test_per_client_cap(relay_factory, upstream):
    """`max_sessions_per_client` counts one client's sessions, not the tier's."""
    tiers = {"default": {"max_sessions_per_client": 1}}
    keys = {"key-one-0123456789": "default", "key-two-0123456789": "default"}
    relay = await relay_factory(relay_settings(upstream.url, tiers=tiers, client_keys=keys))

    def auth(key: str) -> dict:
        return {"additional_headers": {"Authorization": f"Bearer {key}"}}

    ok, first = await admitted(relay.ws_url, **auth("key-one-0123456789"))
    assert ok
    assert await admitted(relay.ws_url, **auth("key-one-0123456789")) == (
        False,
        "session_limit_reached",
    )
    ok, other = await admitted(relay.ws_url, **auth("key-two-0123456789"))
    assert ok
    for ws in (first, other):
        await ws.close()  # type: ignore[attr-defined]


async def test_model_cap_is_shared_by_tiers(relay_factory, upstream):
    """`RELAY_MODEL_LIMITS` caps a model across every tier."""
    tiers = {"a": {}, "b": {}}
    keys = {"key-a-0123456789": "a", "key-b-0123456789": "b"}
    settings = relay_settings(
        upstream.url, tiers=tiers, client_keys=keys, model_limits={"gpt-realtime-mini": 1}
    )
    relay = await relay_factory(settings)
    ok, first = await admitted(
        relay.ws_url, additional_headers={"Authorization": "Bearer key-a-0123456789"}
    )
    assert ok
    refused = await admitted(
        relay.ws_url, additional_headers={"Authorization": "Bearer key-b-0123456789"}
    )
    assert refused == (False, "session_limit_reached")
    await first.close()  # type: ignore[attr-defined]


async def test_origin_not_allowed(relay_factory, upstream):
    """A browser page from another origin cannot open a session (no upstream connection)."""
    settings = relay_settings(upstream.url, allowed_origins=["https://app.example"])
    relay = await relay_factory(settings)
    async with connect(relay.ws_url, origin="https://evil.example") as ws:
        assert (await first_event(ws))["error"]["code"] == "origin_not_allowed"
        assert await close_code(ws) == 1008
    async with connect(relay.ws_url, origin="https://app.example") as ws:
        assert (await first_event(ws))["type"] == "session.created"
    own = f"http://127.0.0.1:{relay.port}"
    async with connect(relay.ws_url, origin=own) as ws:
        assert (await first_event(ws))["type"] == "session.created"
    assert len(upstream.connections) == 2


async def test_minted_token_opens_a_session(relay_factory, upstream):
    """A client key mints an `ek_` token; the browser form of that token gets the key's tier."""
    tiers = {"default": {}, "gold": {"models": ["gpt-realtime"]}}
    settings = relay_settings(
        upstream.url,
        tiers=tiers,
        client_keys={"gold-key-0123456789": "gold"},
        token_secret="s" * 32,
    )
    relay = await relay_factory(settings)
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{relay.http_url}/v1/realtime/client_secrets",
            headers={"Authorization": "Bearer gold-key-0123456789"},
            json={"expires_after": {"anchor": "created_at", "seconds": 60}},
        )
    assert response.status_code == 200
    token = response.json()["value"]
    assert token.startswith("ek_")
    protocols = ["realtime", f"openai-insecure-api-key.{token}"]
    async with connect(relay.ws_url + "?model=gpt-realtime", subprotocols=protocols) as ws:
        assert (await first_event(ws))["type"] == "session.created"
    assert upstream.connections[0].query["model"] == "gpt-realtime"
    tampered = ["realtime", f"openai-insecure-api-key.{token[:-2]}xx"]
    async with connect(relay.ws_url, subprotocols=tampered) as ws:
        assert (await first_event(ws))["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("tier", "code"),
    [
        ({"idle_timeout_seconds": 0.5}, "session_idle"),
        ({"max_session_seconds": 0.8}, "session_expired"),
    ],
)
async def test_relay_ends_idle_and_overlong_sessions(relay_factory, upstream, tier, code):
    """Idle or overlong sessions get an error event naming why, then a normal close."""
    relay = await relay_factory(relay_settings(upstream.url, tiers={"default": tier}))
    async with connect(relay.ws_url) as ws:
        seen = []
        async with asyncio.timeout(WAIT):
            try:
                while True:
                    seen.append(json.loads(await ws.recv()))
            except ConnectionClosed:
                pass
        assert seen[-1]["type"] == "error" and seen[-1]["error"]["code"] == code
        assert ws.close_code == 1000
    outcome = "idle" if code == "session_idle" else "expired"
    labels = {
        "tier": "default",
        "model": "gpt-realtime-mini",
        "outcome": outcome,
        "transport": "websocket",
    }
    assert relay.metric("realtime_relay_sessions_total", labels) == 1


async def test_anonymous_clients_do_not_share_a_client_cap(relay_factory, upstream):
    """Anonymous clients have no identity to count: the per-client cap leaves them alone."""
    tiers = {"default": {"max_sessions_per_client": 1, "max_sessions": 5}}
    relay = await relay_factory(relay_settings(upstream.url, tiers=tiers))
    first = await admitted(relay.ws_url)
    second = await admitted(relay.ws_url)
    assert first[0] and second[0]
    for _, ws in (first, second):
        await ws.close()  # type: ignore[attr-defined]
