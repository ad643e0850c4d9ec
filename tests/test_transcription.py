"""Transcription-only sessions (`/ws?intent=transcription`, live captions) through the relay.

Real clients (websockets, the official openai-python SDK) against the relay under uvicorn and the
local upstream, whose recognizer (PocketSphinx) transcribes espeak-ng speech.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from tests.audio_tools import spoken_pcm
from tests.helpers import (
    CLIENT_KEY,
    SERVER_INSTRUCTIONS,
    WAIT,
    closed,
    recv_until,
    settings_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

PHRASE = "hello world"
TRANSCRIBER = "gpt-4o-mini-transcribe"  # RELAY_SESSION__TRANSCRIPTION's default model
KEYED = ["realtime", f"openai-insecure-api-key.{CLIENT_KEY}"]
CHUNK = 4800  # 100 ms of PCM16 at 24 kHz


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """`PHRASE` spoken, as PCM16 24 kHz with silence around it."""
    return spoken_pcm(tmp_path_factory.mktemp("speech") / "phrase.wav", PHRASE)


async def send_audio(ws, audio: bytes) -> None:
    for start in range(0, len(audio), CHUNK):
        chunk = base64.b64encode(audio[start : start + CHUNK]).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))


async def test_a_transcription_session_captions_speech(relay_factory, upstream, spoken):
    """Audio in, the spoken words out, usage counted under the transcription model; the
    upstream gets `?intent=transcription` and the server's transcription session, nothing of
    its conversation."""
    relay = await relay_factory(settings_for(upstream))
    seen: list[dict] = []
    async with connect(relay.ws_url + "?intent=transcription", subprotocols=KEYED) as ws:
        created = await recv_until(ws, "session.created", seen)
        updated = await recv_until(ws, "session.updated", seen)
        await send_audio(ws, spoken)
        completed = await recv_until(
            ws, "conversation.item.input_audio_transcription.completed", seen
        )
    assert created["session"]["type"] == updated["session"]["type"] == "transcription"
    assert updated["session"]["audio"]["input"]["transcription"]["model"] == TRANSCRIBER
    assert PHRASE in completed["transcript"].lower()
    deltas = [e["delta"] for e in seen if e["type"].endswith("input_audio_transcription.delta")]
    assert PHRASE in "".join(deltas).lower()
    assert not [e for e in seen if e["type"].startswith("response.") or e["type"] == "error"]
    record = upstream.connections[0]
    assert record.query == {"intent": "transcription"}
    injected = record.events[0]["session"]
    assert injected["type"] == "transcription"
    assert injected["audio"]["input"]["transcription"] == {"model": TRANSCRIBER}
    assert "create_response" not in injected["audio"]["input"]["turn_detection"]
    assert SERVER_INSTRUCTIONS not in json.dumps(record.events)
    assert not {"instructions", "tools", "output_modalities"} & injected.keys()
    labels = {"tier": "default", "model": TRANSCRIBER}
    heard = relay.metric("realtime_relay_tokens_total", {**labels, "direction": "input",
                                                         "kind": "audio"})  # fmt: skip
    assert heard == completed["usage"]["input_token_details"]["audio_tokens"] > 0
    assert relay.metric("realtime_relay_cost_usd_total", labels) > 0
    async with httpx.AsyncClient() as http:
        scraped = (await http.get(f"{relay.http_url}/metrics")).text
    assert f'model="{TRANSCRIBER}"' in scraped


async def test_the_openai_sdk_opens_a_transcription_session(relay_factory, upstream, spoken):
    """openai-python's GA client (no model, `intent=transcription` as its query): the tier's
    choices pass (the language), the transcription model stays the server's."""
    relay = await relay_factory(settings_for(upstream))
    client = AsyncOpenAI(api_key=CLIENT_KEY, base_url=f"{relay.http_url}/v1", max_retries=0)
    transcription = {"model": "whisper-1", "language": "en"}
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(
            session={"type": "transcription", "audio": {"input": {"transcription": transcription}}}
        )
        updates = []  # the injected session's, then this update's
        async with asyncio.timeout(WAIT):
            async for event in conn:
                if event.type == "session.updated":
                    updates.append(event)
                if event.type == "session.updated" and len(updates) == 2:
                    for start in range(0, len(spoken), CHUNK):
                        audio = base64.b64encode(spoken[start : start + CHUNK]).decode()
                        await conn.input_audio_buffer.append(audio=audio)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    break
    assert PHRASE in event.transcript.lower()
    chosen = updates[1].session.audio.input.transcription
    assert (chosen.model, chosen.language) == (TRANSCRIBER, "en")
    forwarded = upstream.connections[0].events[1]["session"]
    assert forwarded["audio"]["input"]["transcription"] == {"language": "en"}
    field = "session.audio.input.transcription.model"
    assert relay.metric("realtime_relay_fields_ignored_total", {"field": field}) == 1


async def test_a_transcription_session_is_no_conversation(relay_factory, upstream):
    """No responses, no items, and the session stays a transcription session."""
    tiers = {"default": {"locked_fields": "refuse"}, "lenient": {}}
    keys = {CLIENT_KEY: "default", "lenient-key-0123456789": "lenient"}
    relay = await relay_factory(settings_for(upstream, tiers=tiers, client_keys=keys))
    realtime = {"type": "realtime", "instructions": "be a pirate"}
    async with connect(relay.ws_url + "?intent=transcription", subprotocols=KEYED) as ws:
        await recv_until(ws, "session.updated")
        await ws.send(json.dumps({"type": "response.create", "event_id": "r1"}))
        refused = (await recv_until(ws, "error"))["error"]
        assert (refused["code"], refused["param"], refused["event_id"]) == (
            "invalid_event",
            "type",
            "r1",
        )
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {}}))
        assert (await recv_until(ws, "error"))["error"]["code"] == "invalid_event"
        await ws.send(json.dumps({"type": "session.update", "session": realtime}))
        locked = (await recv_until(ws, "error"))["error"]
        assert (locked["code"], locked["param"]) == ("field_locked", "session.type")
    lenient = ["realtime", "openai-insecure-api-key.lenient-key-0123456789"]
    async with connect(relay.ws_url + "?intent=transcription", subprotocols=lenient) as ws:
        await recv_until(ws, "session.updated")
        await ws.send(json.dumps({"type": "session.update", "session": realtime}))
        updated = await recv_until(ws, "session.updated")
        assert updated["session"]["type"] == "transcription"
    first, second = upstream.connections
    assert [e["type"] for e in first.events] == ["session.update"]  # the injected one only
    assert second.events[1]["session"] == {"type": "transcription"}


@pytest.mark.parametrize(
    ("query", "tiers", "code"),
    [
        ("?intent=transcription", {"default": {"transcription_sessions": False}},
         "model_not_allowed"),
        ("?intent=translation", {"default": {}}, "unsupported_protocol"),
        ("?intent=transcription&model=gpt-realtime-mini", {"default": {}},
         "unsupported_protocol"),
    ],
)  # fmt: skip
async def test_who_may_transcribe(relay_factory, upstream, query, tiers, code):
    """A refused transcription session is an `error` and a 1008 close; nothing opens upstream."""
    relay = await relay_factory(settings_for(upstream, tiers=tiers))
    async with connect(relay.ws_url + query, subprotocols=KEYED) as ws:
        error = await recv_until(ws, "error")
        assert error["error"]["code"] == code
        assert (await closed(ws))[0] == 1008
    assert upstream.connections == []


async def test_a_transcription_token(relay_factory, upstream):
    """An `ek_` token minted for a transcription session opens one and nothing else; one minted
    for a realtime model opens no transcription session."""
    relay = await relay_factory(settings_for(upstream, token_secret="t" * 40))
    async with httpx.AsyncClient(base_url=relay.http_url) as http:
        minted = await http.post(
            "/v1/realtime/client_secrets",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            json={"session": {"type": "transcription"}},
        )
        assert minted.status_code == 200, minted.text
        assert minted.json()["session"] == {"type": "transcription"}
        realtime = await http.post(
            "/v1/realtime/client_secrets",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            json={"session": {"type": "realtime", "model": "gpt-realtime-mini"}},
        )
    token = ["realtime", f"openai-insecure-api-key.{minted.json()['value']}"]
    async with connect(relay.ws_url + "?intent=transcription", subprotocols=token) as ws:
        assert (await recv_until(ws, "session.updated"))["session"]["type"] == "transcription"
    async with connect(relay.ws_url, subprotocols=token) as ws:
        assert (await recv_until(ws, "error"))["error"]["code"] == "model_not_allowed"
    bound = ["realtime", f"openai-insecure-api-key.{realtime.json()['value']}"]
    async with connect(relay.ws_url + "?intent=transcription", subprotocols=bound) as ws:
        assert (await recv_until(ws, "error"))["error"]["code"] == "model_not_allowed"
    assert len(upstream.connections) == 1


async def test_a_beta_transcription_client(relay_factory, upstream, spoken):
    """A beta-era captioning app: `transcription_session.update` in, `transcription_session.*`
    out, GA upstream."""
    relay = await relay_factory(settings_for(upstream))
    protocols = [*KEYED, "openai-beta.realtime-v1"]
    seen: list[dict] = []
    async with connect(relay.ws_url + "?intent=transcription", subprotocols=protocols) as ws:
        await recv_until(ws, "transcription_session.updated", seen)
        update = {"input_audio_transcription": {"model": TRANSCRIBER, "language": "en"}}
        await ws.send(json.dumps({"type": "transcription_session.update", "session": update}))
        updated = await recv_until(ws, "transcription_session.updated", seen)
        assert updated["session"]["input_audio_transcription"]["language"] == "en"
        await send_audio(ws, spoken)
        completed = await recv_until(
            ws, "conversation.item.input_audio_transcription.completed", seen
        )
    assert seen[0]["type"] == "transcription_session.created"
    assert PHRASE in completed["transcript"].lower()
    record = upstream.connections[0]
    assert "openai-beta" not in record.headers
    ga = record.events[1]
    assert ga["type"] == "session.update" and ga["session"]["type"] == "transcription"
    assert ga["session"]["audio"]["input"]["transcription"]["language"] == "en"
