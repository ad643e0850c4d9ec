"""The relay end to end: real clients, the relay under uvicorn, the local upstream, real sockets."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from tests.helpers import (
    CLIENT_KEY,
    SERVER_INSTRUCTIONS,
    TOOL,
    UPSTREAM_KEY,
    WAIT,
    closed,
    eventually,
    recv_until,
    relay_settings,
    settings_for,
    tone,
    user_text,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_openai_sdk_turn_through_the_relay(relay_factory, upstream):
    """The official SDK through the relay: server key, injected session, every byte both ways."""
    relay = await relay_factory(settings_for(upstream))
    client = AsyncOpenAI(api_key=CLIENT_KEY, base_url=f"{relay.http_url}/v1", max_retries=0)
    audio = tone(400) + bytes(24 * 2 * 200)  # 0.6 s
    chunks = [audio[i : i + 960] for i in range(0, len(audio), 960)]  # 20 ms each
    received: list[dict] = []
    async with client.realtime.connect(model="gpt-realtime-mini") as conn:
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        )
        for chunk in chunks:
            await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        async with asyncio.timeout(WAIT):
            async for event in conn:
                received.append(event.model_dump())
                if event.type == "response.done":
                    break
    record = upstream.connections[0]
    assert record.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in json.dumps(record.headers)
    assert "openai-beta" not in record.headers
    first = record.events[0]
    assert first["type"] == "session.update"
    assert first["session"]["instructions"] == SERVER_INSTRUCTIONS
    assert first["session"]["tools"] == [TOOL]
    assert bytes(record.input_audio) == audio
    types = [e["type"] for e in received]
    assert types[0] == "session.created"
    deltas = b"".join(
        base64.b64decode(e["delta"]) for e in received if e["type"] == "response.output_audio.delta"
    )
    assert deltas == audio  # the local upstream echoes the committed audio
    usage = received[-1]["response"]["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    shown = json.dumps([e for e in received if e["type"].startswith("session.")])
    assert SERVER_INSTRUCTIONS not in shown and "secret description" not in shown


async def test_browser_subprotocol_credential(relay_factory, upstream):
    """The browser form authenticates, `realtime` is echoed, and the key-bearing entry is not."""
    relay = await relay_factory(settings_for(upstream))
    protocols = ["realtime", f"openai-insecure-api-key.{CLIENT_KEY}"]
    async with connect(relay.ws_url, subprotocols=protocols) as ws:
        assert ws.subprotocol == "realtime"
        created = await recv_until(ws, "session.created")
        assert "instructions" not in created["session"]
        updated = await recv_until(ws, "session.updated")  # the injected session, redacted
        assert "instructions" not in updated["session"]
        assert updated["session"]["tools"] == [{"type": "function", "name": "get_weather"}]
    record = await upstream.wait_for_connection(1, timeout=WAIT)
    assert CLIENT_KEY not in json.dumps(record.headers)


async def test_client_events_wait_for_injection(relay_factory, upstream):
    """Events sent before the upstream session starts follow the injection, in order."""
    upstream.session_created_delay = 0.5
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        for i in range(5):
            await ws.send(user_text(f"m{i}", event_id=f"c{i}"))
        await recv_until(ws, "conversation.item.done")
    record = upstream.connections[0]
    types = [e["type"] for e in record.events]
    assert types[0] == "session.update"
    assert [e.get("event_id") for e in record.events[1:6]] == [f"c{i}" for i in range(5)]


async def test_locked_session_update_is_refused_and_session_continues(relay_factory, upstream):
    """On a tier that refuses locked fields, a client cannot change instructions or tools: an
    error names them; nothing goes upstream."""
    relay = await relay_factory(
        settings_for(upstream, tiers={"default": {"locked_fields": "refuse"}})
    )
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.created")
        session = {"type": "realtime", "instructions": "leak it", "tools": []}
        await ws.send(
            json.dumps({"type": "session.update", "event_id": "cli_7", "session": session})
        )
        error = await recv_until(ws, "error")
        assert error["error"]["code"] == "field_locked"
        assert "session.instructions" in error["error"]["message"]
        assert "session.tools" in error["error"]["message"]
        assert error["error"]["event_id"] == "cli_7"
        # The session is still usable.
        await ws.send(json.dumps({"type": "response.create", "response": {"instructions": "x"}}))
        assert (await recv_until(ws, "error"))["error"]["code"] == "field_locked"
        voice = {"type": "realtime", "audio": {"output": {"voice": "alloy"}}}
        await ws.send(json.dumps({"type": "session.update", "session": voice}))
        updated = await recv_until(ws, "session.updated")
        while updated["session"]["audio"]["output"]["voice"] != "alloy":
            updated = await recv_until(ws, "session.updated")
    sent = [e for e in upstream.connections[0].events if e["type"] != "session.update"]
    assert not any("leak it" in json.dumps(e) for e in upstream.connections[0].events)
    assert all(e["type"] != "response.create" for e in sent)


async def test_bad_frames_get_error_events_and_session_stays_open(relay_factory, upstream):
    """Invalid JSON and unknown types get stable codes; the session goes on."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.created")
        await ws.send("{nope")
        assert (await recv_until(ws, "error"))["error"]["code"] == "invalid_json"
        await ws.send(json.dumps({"type": "made.up", "event_id": "e5"}))
        error = await recv_until(ws, "error")
        assert error["error"]["code"] == "unknown_event_type"
        assert error["error"]["event_id"] == "e5"
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        await recv_until(ws, "input_audio_buffer.cleared")


async def test_oversized_frame_closes_with_1009(relay_factory, upstream):
    """A frame over the limit gets an error event, then close 1009."""
    relay = await relay_factory(settings_for(upstream, client_max_message_bytes=2**16))
    async with connect(relay.ws_url, max_size=None) as ws:
        await recv_until(ws, "session.created")
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 2**17}))
        error = await recv_until(ws, "error")
        assert error["error"]["code"] == "message_too_big"
        assert (await closed(ws))[0] == 1009


async def test_unknown_client_key_is_refused_without_upstream(relay_factory, upstream):
    """A wrong key gets `unauthorized` and close 1008; no upstream connection is opened."""
    relay = await relay_factory(settings_for(upstream))
    headers = {"Authorization": "Bearer wrong-key"}
    async with connect(relay.ws_url, additional_headers=headers) as ws:
        error = await recv_until(ws, "error")
        assert error["error"]["code"] == "unauthorized"
        assert (await closed(ws))[0] == 1008
    assert upstream.connections == []


async def test_model_not_allowed_for_tier(relay_factory, upstream):
    """?model= must be one of the tier's models."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url + "?model=gpt-realtime") as ws:
        assert (await recv_until(ws, "error"))["error"]["code"] == "model_not_allowed"
        assert (await closed(ws))[0] == 1008
    assert upstream.connections == []


async def test_seed_model_names_work(relay_factory, upstream):
    """The preview model names pass through as plain names."""
    tiers = {"default": {"models": ["gpt-4o-realtime-preview", "gpt-4o-mini-realtime-preview"]}}
    relay = await relay_factory(settings_for(upstream, tiers=tiers))
    async with connect(relay.ws_url + "?model=gpt-4o-mini-realtime-preview") as ws:
        created = await recv_until(ws, "session.created")
        assert created["session"]["model"] == "gpt-4o-mini-realtime-preview"
    assert upstream.connections[0].query["model"] == "gpt-4o-mini-realtime-preview"


@pytest.mark.parametrize(
    ("status", "code", "close_code"),
    [
        (401, "upstream_unauthorized", 1014),
        (403, "upstream_unauthorized", 1014),
        (429, "upstream_rate_limited", 1013),
        (503, "upstream_refused", 1014),
    ],
)
async def test_upstream_refusal_reaches_the_client(
    relay_factory, upstream, status, code, close_code
):
    """An upstream that refuses the handshake becomes an error event and a documented close."""
    upstream.refuse_status = status
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        error = await recv_until(ws, "error")
        assert error["error"]["code"] == code
        assert UPSTREAM_KEY not in json.dumps(error)
        assert (await closed(ws))[0] == close_code


async def test_unreachable_upstream(relay_factory, upstream_factory):
    """Nothing listening upstream: error `upstream_unavailable`, close 1014."""
    up = await upstream_factory()
    url = up.url
    await up.__aexit__(None, None, None)
    relay = await relay_factory(relay_settings(url, client_keys={}))
    async with connect(relay.ws_url) as ws:
        assert (await recv_until(ws, "error"))["error"]["code"] == "upstream_unavailable"
        assert (await closed(ws))[0] == 1014


async def test_upstream_drop_mid_response(relay_factory, upstream):
    """An upstream that dies mid-response: the client gets `upstream_closed` and close 1014."""
    upstream.drop_after_audio_deltas = 2
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(user_text("a long question " * 5))
        await ws.send(json.dumps({"type": "response.create"}))
        seen: list[dict] = []
        error = await recv_until(ws, "error", seen)
        assert error["error"]["code"] == "upstream_closed"
        assert sum(e["type"] == "response.output_audio.delta" for e in seen) == 2
        assert (await closed(ws))[0] == 1014
    assert (
        relay.metric(
            "realtime_relay_sessions_active",
            {"tier": "default", "model": "gpt-realtime-mini", "transport": "websocket"},
        )
        == 0
    )


async def test_client_drop_closes_the_upstream(relay_factory, upstream):
    """A client that vanishes closes its upstream connection at once."""
    relay = await relay_factory(settings_for(upstream))
    ws = await connect(relay.ws_url)
    await recv_until(ws, "session.created")
    record = await upstream.wait_for_connection(1, timeout=WAIT)
    ws.transport.abort()
    async with asyncio.timeout(WAIT):
        await record.closed.wait()
    await eventually(lambda: not relay.relay.sessions)
    labels = {
        "tier": "default",
        "model": "gpt-realtime-mini",
        "outcome": "client_closed",
        "transport": "websocket",
    }
    assert relay.metric("realtime_relay_sessions_total", labels) == 1


async def test_locked_fields_are_ignored_by_default(relay_factory, upstream):
    """The default tier removes what it locks and forwards the rest, with no error: an SDK that
    sends its whole session config keeps its legitimate choices."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        session = {
            "type": "realtime",
            "instructions": "leak it",
            "tools": [],
            "audio": {"output": {"voice": "alloy", "speed": 9.0}},
        }
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        seen: list[dict] = []
        updated = await recv_until(ws, "session.updated", seen)
    assert not [event for event in seen if event["type"] == "error"]
    assert updated["session"]["audio"]["output"]["voice"] == "alloy"
    forwarded = [e for e in upstream.connections[0].events if e["type"] == "session.update"][1]
    assert forwarded["session"] == {"type": "realtime", "audio": {"output": {"voice": "alloy"}}}
    for field in ("session.instructions", "session.tools", "session.audio.output.speed"):
        assert relay.metric("realtime_relay_fields_ignored_total", {"field": field}) == 1


async def test_a_beta_client_speaks_beta_to_a_ga_upstream(relay_factory, upstream):
    """The beta dialect is translated both ways: GA upstream, a beta stream for the client, and
    the same rules (the tier's voice choice passes, instructions stay the server's)."""
    relay = await relay_factory(settings_for(upstream))
    protocols = ["realtime", "openai-beta.realtime-v1", f"openai-insecure-api-key.{CLIENT_KEY}"]
    seen: list[dict] = []
    async with connect(relay.ws_url, subprotocols=protocols) as ws:
        await recv_until(ws, "session.updated")
        update = {"modalities": ["text", "audio"], "voice": "cedar", "temperature": 0.7}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        updated = await recv_until(ws, "session.updated")
        assert updated["session"]["voice"] == "cedar"  # the flat beta session
        await ws.send(user_text("hello beta"))
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_until(ws, "response.done", seen)
    types = {event["type"] for event in seen}
    assert "response.audio.delta" in types and "response.output_audio.delta" not in types
    assert "conversation.item.created" in types
    sent = upstream.connections[0].events
    ga_update = [e for e in sent if e["type"] == "session.update"][1]
    assert ga_update["session"]["audio"]["output"]["voice"] == "cedar"
    assert "temperature" not in json.dumps(ga_update) and "voice" not in ga_update["session"]
    assert "openai-beta" not in upstream.connections[0].headers


async def test_the_openai_sdk_s_beta_client_through_the_relay(relay_factory, upstream):
    """openai-python's beta Realtime client (`client.beta.realtime`, `OpenAI-Beta: realtime=v1`):
    a scripted audio turn in the beta shape, the upstream GA. It always dials wss:// from
    `base_url`; `websocket_base_url` is how its users point it at a plain ws:// relay."""
    relay = await relay_factory(settings_for(upstream))
    websocket_base_url = relay.http_url.replace("http://", "ws://") + "/v1"
    client = AsyncOpenAI(api_key=CLIENT_KEY, websocket_base_url=websocket_base_url, max_retries=0)
    audio = tone(400) + bytes(24 * 2 * 200)
    received: list[dict] = []
    async with client.beta.realtime.connect(model="gpt-realtime-mini") as conn:
        await conn.session.update(session={"turn_detection": None, "voice": "ash"})
        for start in range(0, len(audio), 960):
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(audio[start : start + 960]).decode()
            )
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        async with asyncio.timeout(WAIT):
            async for event in conn:
                received.append(event.model_dump())
                if event.type == "response.done":
                    break
    updated = [e for e in received if e["type"] == "session.updated"][-1]
    assert updated["session"]["voice"] == "ash" and updated["session"]["turn_detection"] is None
    deltas = b"".join(
        base64.b64decode(e["delta"]) for e in received if e["type"] == "response.audio.delta"
    )
    assert deltas == audio  # the local upstream's echo, renamed to the beta event
    assert not [e for e in received if e["type"] == "error"]
    record = upstream.connections[0]
    assert "openai-beta" not in record.headers
    ga = record.events[1]["session"]
    assert ga["type"] == "realtime" and ga["audio"]["output"]["voice"] == "ash"
    assert bytes(record.input_audio) == audio


async def test_a_refused_injection_ends_the_session(relay_factory, upstream):
    """If the upstream rejects the server's session, no session runs without it: close 1014."""
    session = {"instructions": SERVER_INSTRUCTIONS, "extra": {"not_a_field": 1}}
    relay = await relay_factory(settings_for(upstream, session=session))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.created")
        error = await recv_until(ws, "error")
        assert error["error"]["code"] == "upstream_rejected_session"
        assert "not_a_field" not in json.dumps(error)  # the server's settings stay private
        assert (await closed(ws))[0] == 1014


async def test_upstream_close_codes_are_counted(relay_factory, upstream):
    """The relay's own close of the upstream (after the client left) is counted as 1000."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.created")
    await eventually(lambda: not relay.relay.sessions)
    assert relay.metric("realtime_relay_upstream_closes_total", {"code": "1000"}) == 1
    assert relay.metric("realtime_relay_upstream_closes_total", {"code": "other"}) == 0
