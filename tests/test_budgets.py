"""Cost control through the relay: budgets, response limits and allowed values, on real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from websockets.asyncio.client import connect

from tests.helpers import (
    CLIENT_KEY,
    WAIT,
    closed,
    recv_until,
    settings_for,
    user_text,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
# The client identity of CLIENT_KEY, as the relay names key holders (auth/credentials.py).
CLIENT_KEY_CLIENT = "key:" + hashlib.sha256(CLIENT_KEY.encode()).hexdigest()[:16]


async def one_turn(ws, text: str) -> dict:
    """Say `text`, ask for a response; its response.done (errors before it collected too)."""
    await ws.send(user_text(text))
    await ws.send(json.dumps({"type": "response.create"}))
    return await recv_until(ws, "response.done")


async def test_a_session_s_token_budget_warns_then_ends_it(relay_factory, upstream):
    """Past 80 % of max_tokens_per_session: budget_warning; at 100 %: budget_exhausted, 1008."""
    measure = await relay_factory(settings_for(upstream))
    async with connect(measure.ws_url, additional_headers=AUTH) as ws:
        await recv_until(ws, "session.updated")
        first = (await one_turn(ws, "hello there"))["response"]["usage"]["total_tokens"]
    limit = int(first / 0.85)  # the first turn uses 85 % of it; the second goes past
    tiers = {"default": {"max_tokens_per_session": limit}}
    relay = await relay_factory(settings_for(upstream, tiers=tiers))
    seen: list[dict] = []
    async with connect(relay.ws_url, additional_headers=AUTH) as ws:
        await recv_until(ws, "session.updated")
        await one_turn(ws, "hello there")
        warning = await recv_until(ws, "error", seen)
        assert warning["error"]["code"] == "budget_warning"
        await ws.send(user_text("hello again"))
        await ws.send(json.dumps({"type": "response.create"}))
        exhausted = await recv_until(ws, "error", seen)
        assert exhausted["error"]["code"] == "budget_exhausted"
        assert (await closed(ws))[0] == 1008
    labels = {"tier": "default", "scope": "session_tokens"}
    assert relay.metric("realtime_relay_budget_exhausted_total", labels) == 1


async def test_a_client_over_its_daily_spend_is_refused_on_another_replica(
    upstream, redis_server, relay_process_factory
):
    """Spend is shared through Redis: once a client's day is spent, a second replica refuses
    it at admission with budget_exhausted (1008) and opens nothing upstream."""
    env = {
        "RELAY_REDIS_URL": redis_server.url,
        "RELAY_CLIENT_KEYS": json.dumps({CLIENT_KEY: "default"}),
        "RELAY_TIERS": json.dumps({"default": {"max_cost_usd_per_client_per_day": 1e-9}}),
    }
    a = await relay_process_factory(upstream.url, **env)
    b = await relay_process_factory(upstream.url, **env)
    async with connect(a.ws_url, additional_headers=AUTH) as ws:
        await recv_until(ws, "session.updated")
        await ws.send(user_text("spend something"))
        await ws.send(json.dumps({"type": "response.create"}))
        error = await recv_until(ws, "error")  # its live session ends as well
        assert error["error"]["code"] == "budget_exhausted"
        assert (await closed(ws))[0] == 1008
    opened = len(upstream.connections)
    async with connect(b.ws_url, additional_headers=AUTH) as ws:
        async with asyncio.timeout(WAIT):
            refusal = json.loads(await ws.recv())
        assert refusal["type"] == "error" and refusal["error"]["code"] == "budget_exhausted"
        assert (await closed(ws))[0] == 1008
    assert len(upstream.connections) == opened  # nothing opened upstream for the refusal


async def test_parallel_out_of_band_responses_over_the_cap_are_refused(relay_factory, upstream):
    """max_concurrent_responses counts out-of-band responses too; the session goes on."""
    tiers = {"default": {"max_concurrent_responses": 2}}
    relay = await relay_factory(settings_for(upstream, tiers=tiers))
    oob = json.dumps({"type": "response.create", "response": {"conversation": "none"}})
    async with connect(relay.ws_url, additional_headers=AUTH) as ws:
        await recv_until(ws, "session.updated")
        await ws.send(user_text("one two three"))
        for _ in range(5):
            await ws.send(oob)
        errors = []
        async with asyncio.timeout(WAIT):
            while len(errors) < 3:
                event = json.loads(await ws.recv())
                if event["type"] == "error":
                    errors.append(event["error"]["code"])
        assert errors == ["rate_limited"] * 3
    creates = [e for e in upstream.connections[0].events if e["type"] == "response.create"]
    assert len(creates) == 2


@pytest.mark.parametrize("mode", ["refuse", "ignore"])
async def test_a_value_outside_the_allowed_list_never_reaches_upstream(
    relay_factory, upstream, mode
):
    """A custom voice and an expensive transcription model never reach upstream; the client is
    told as for a locked field (refused, or silently removed where the tier ignores them)."""
    tiers = {"default": {"locked_fields": mode}}
    relay = await relay_factory(settings_for(upstream, tiers=tiers))
    async with connect(relay.ws_url, additional_headers=AUTH) as ws:
        await recv_until(ws, "session.updated")
        for session in (
            {"type": "realtime", "audio": {"output": {"voice": {"id": "voice_custom"}}}},
            {
                "type": "realtime",
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            },
        ):
            await ws.send(json.dumps({"type": "session.update", "session": session}))
            seen: list[dict] = []
            if mode == "refuse":
                error = await recv_until(ws, "error", seen)
                assert error["error"]["code"] == "field_locked"
            else:
                await recv_until(ws, "session.updated", seen)
                assert not [event for event in seen if event["type"] == "error"]
    sent = json.dumps(upstream.connections[0].events)
    assert "voice_custom" not in sent and "gpt-4o-transcribe" not in sent


async def test_a_client_that_leaves_mid_response_still_pays_for_it(relay_factory, upstream):
    """The response in flight is cancelled and what it cost is recorded for the client's day."""
    tiers = {"default": {"max_cost_usd_per_client_per_day": 1000.0}}
    relay = await relay_factory(settings_for(upstream, tiers=tiers))
    async with connect(relay.ws_url, additional_headers=AUTH) as ws:
        await recv_until(ws, "session.updated")
        await ws.send(user_text("a long answer please " * 20))
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_until(ws, "response.output_audio.delta")
    spend = relay.relay.spend

    async def recorded() -> bool:
        return await spend.today(CLIENT_KEY_CLIENT) > 0

    async with asyncio.timeout(WAIT):
        while not await recorded():  # noqa: ASYNC110 - the store has nothing to wait on
            await asyncio.sleep(0.05)
    cancels = [e for e in upstream.connections[0].events if e["type"] == "response.cancel"]
    assert len(cancels) == 1
