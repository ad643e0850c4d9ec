"""WebRTC calls through the relay: `POST /v1/realtime/calls`, the sideband, the hang-up.

The caller is an aiortc peer (tests/webrtc_tools.py) as a browser is one; the upstream is the
local upstream, a real WebRTC peer with the `oai-events` channel, the `?call_id=` sideband and
hang-ups. The caller's audio and data-channel events go to the upstream directly, as they go to
OpenAI; the relay only holds the sideband.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.audio_tools import spoken_pcm
from tests.helpers import (
    CLIENT_KEY,
    SERVER_INSTRUCTIONS,
    TOOL,
    TOOL_SECRET,
    UPSTREAM_KEY,
    eventually,
    http_tool,
    relay_settings,
    settings_for,
)
from tests.webrtc_tools import Caller

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/sdp"}
WEBRTC = {"transport": "webrtc"}


async def call_through(relay, caller: Caller, headers: dict[str, str] = AUTH) -> httpx.Response:
    """Post the caller's offer to the relay; on 201, give the caller its answer."""
    offer = await caller.offer()
    async with httpx.AsyncClient(base_url=relay.http_url, timeout=20) as http:
        response = await http.post("/v1/realtime/calls", content=offer, headers=headers)
    if response.status_code == 201:
        await caller.answer(response.text)
    return response


def metric(relay, name: str, **labels: str) -> float:
    return relay.metric(name, {"tier": "default", "model": "gpt-realtime-mini", **labels})


async def test_a_call_runs_under_the_relay_s_control(relay_factory, upstream, tmp_path):
    """The call is created with the server's key and session, the caller's speech comes back
    on its remote track with transcripts on its channel, the usage counts under
    transport="webrtc", and the caller's hang-up ends the call and frees its slot."""
    relay = await relay_factory(settings_for(upstream))
    caller = Caller(spoken_pcm(tmp_path / "hello.wav", "hello world"))
    try:
        response = await call_through(relay, caller)
        assert response.status_code == 201, response.text
        assert response.headers["content-type"].startswith("application/sdp")
        call_id = response.headers["location"].rsplit("/", 1)[1]
        assert response.headers["location"] == f"/v1/realtime/calls/{call_id}"
        (call,) = upstream.calls
        assert call.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert call.session["instructions"] == SERVER_INSTRUCTIONS
        assert call.session["tools"] == [TOOL]
        assert call.session["model"] == "gpt-realtime-mini"
        assert CLIENT_KEY not in json.dumps(call.headers)
        await eventually(lambda: len(call.sidebands) == 1)
        assert metric(relay, "realtime_relay_sessions_active", **WEBRTC) == 1

        done = await caller.wait_for("response.done", within=30)
        transcript = await caller.wait_for("conversation.item.input_audio_transcription.completed")
        assert "hello world" in transcript["transcript"].lower()
        await eventually(lambda: caller.loudness() > 500)  # the caller's speech, echoed
        usage = done["response"]["usage"]
        await eventually(
            lambda: (
                metric(relay, "realtime_relay_tokens_total", direction="output", kind="audio")
                == usage["output_token_details"]["audio_tokens"]
            )
        )
        assert metric(relay, "realtime_relay_turn_latency_seconds_count", **WEBRTC) >= 1
        # Priced under the transcription model the call was created with (no session.created).
        heard = transcript["usage"]["input_token_details"]["audio_tokens"]
        labels = {"tier": "default", "model": "gpt-4o-mini-transcribe"}
        audio_in = {**labels, "direction": "input", "kind": "audio"}
        assert relay.metric("realtime_relay_tokens_total", audio_in) == heard > 0
        assert relay.metric("realtime_relay_cost_usd_total", labels) > 0

        async with httpx.AsyncClient(base_url=relay.http_url) as http:
            hung = await http.post(f"/v1/realtime/calls/{call_id}/hangup", headers=AUTH)
        assert hung.status_code == 200
        await eventually(lambda: call.hung_up)
        await eventually(lambda: not relay.relay.calls)
        assert metric(relay, "realtime_relay_sessions_active", **WEBRTC) == 0
        labels = {**WEBRTC, "outcome": "client_closed"}
        assert metric(relay, "realtime_relay_sessions_total", **labels) == 1
    finally:
        await caller.close()


async def test_changed_instructions_are_restored_then_the_call_is_hung_up(relay_factory, upstream):
    """A client that changes the server's instructions over its data channel gets them back at
    once; the third change hangs the call up."""
    relay = await relay_factory(settings_for(upstream))
    caller = Caller()
    try:
        assert (await call_through(relay, caller)).status_code == 201
        await caller.opened.wait()
        (call,) = upstream.calls
        await eventually(lambda: len(call.sidebands) == 1)
        pirate = {"type": "session.update", "session": {"type": "realtime", "instructions": "arr"}}
        for attempt in (1, 2):
            caller.send(pirate)
            restored = await caller.wait_for("session.updated", count=2 * attempt)
            changed = await caller.wait_for("session.updated", count=2 * attempt - 1)
            assert changed["session"]["instructions"] == "arr"
            assert restored["session"]["instructions"] == SERVER_INSTRUCTIONS
        caller.send(pirate)
        await eventually(lambda: call.hung_up)
        await eventually(lambda: not relay.relay.calls)
        restored = relay.metric("realtime_relay_fields_restored_total", {"field": "instructions"})
        assert restored == 3
        labels = {**WEBRTC, "outcome": "field_locked"}
        assert metric(relay, "realtime_relay_sessions_total", **labels) == 1
    finally:
        await caller.close()


async def test_a_call_past_its_length_is_hung_up_and_its_slot_returns(relay_factory, upstream):
    tiers = {"default": {"max_session_seconds": 1.0, "max_sessions": 1}}
    relay = await relay_factory(settings_for(upstream, tiers=tiers))
    first, second = Caller(), Caller()
    try:
        assert (await call_through(relay, first)).status_code == 201
        refused = await call_through(relay, second)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "session_limit_reached"
        await eventually(lambda: upstream.calls[0].hung_up)
        await eventually(lambda: not relay.relay.calls)
        labels = {**WEBRTC, "outcome": "expired"}
        assert metric(relay, "realtime_relay_sessions_total", **labels) == 1
        third = Caller()
        try:
            assert (await call_through(relay, third)).status_code == 201
        finally:
            await third.close()
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(
    ("headers", "tiers", "status", "code"),
    [
        ({"Content-Type": "application/sdp"}, None, 401, "unauthorized"),
        ({**AUTH, "Authorization": "Bearer wrong-key"}, None, 401, "unauthorized"),
        ({**AUTH, "Origin": "https://evil.example"}, None, 403, "origin_not_allowed"),
        (AUTH, {"default": {"webrtc": False}}, 403, "unsupported_protocol"),
        (AUTH, {"default": {"max_sessions": 0}}, 429, "session_limit_reached"),
        ({**AUTH, "Content-Type": "text/plain"}, None, 415, "invalid_request"),
    ],
)
async def test_a_refused_call_opens_nothing_upstream(
    relay_factory, upstream, headers, tiers, status, code
):
    overrides = {"tiers": tiers} if tiers else {}
    relay = await relay_factory(settings_for(upstream, anonymous_tier="", **overrides))
    caller = Caller()
    try:
        response = await call_through(relay, caller, headers)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
    finally:
        await caller.close()
    assert upstream.calls == [] and upstream.connections == []


async def test_a_session_part_is_judged_as_a_session_update(relay_factory, upstream):
    """The multipart form: the tier's choices pass (the voice), its locks hold (instructions)."""
    relay = await relay_factory(settings_for(upstream))
    caller = Caller()
    session = {"type": "realtime", "instructions": "arr", "audio": {"output": {"voice": "ash"}}}
    try:
        files = {
            "sdp": (None, await caller.offer(), "application/sdp"),
            "session": (None, json.dumps(session), "application/json"),
        }
        async with httpx.AsyncClient(base_url=relay.http_url, timeout=20) as http:
            response = await http.post(
                "/v1/realtime/calls", files=files, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
            )
        assert response.status_code == 201, response.text
        (call,) = upstream.calls
        assert call.session["instructions"] == SERVER_INSTRUCTIONS
        assert call.session["audio"]["output"]["voice"] == "ash"
        field = "session.instructions"
        assert relay.metric("realtime_relay_fields_ignored_total", {"field": field}) == 1
    finally:
        await caller.close()
    await asyncio.sleep(0)


async def test_a_server_tool_runs_over_the_sideband(relay_factory, upstream, tool_server):
    """The model's call of a server tool on a WebRTC call runs on the relay, with the server's
    credential, and the model answers with its output; the relay's events went on the sideband."""
    relay = await relay_factory(settings_for(upstream, tools=[http_tool(tool_server)]))
    caller = Caller()
    try:
        assert (await call_through(relay, caller)).status_code == 201
        await caller.opened.wait()
        (call,) = upstream.calls
        await eventually(lambda: len(call.sidebands) == 1)
        content = [{"type": "input_text", "text": "get time in Paris, please"}]
        caller.send({"type": "conversation.item.create",
                     "item": {"type": "message", "role": "user", "content": content}})  # fmt: skip
        caller.send({"type": "response.create"})
        answer = await caller.wait_for("response.done", count=2)
    finally:
        await caller.close()
    ((headers, body),) = tool_server.calls
    assert headers["authorization"] == TOOL_SECRET
    assert body["name"] == "get_time" and body["arguments"] == {"city": "Paris"}
    assert "10:42" in json.dumps(answer["response"]["output"])
    labels = {"tool": "get_time", "outcome": "ok"}
    assert relay.metric("realtime_relay_tool_calls_total", labels) == 1


async def test_azure_s_ga_form(relay_factory, upstream):
    """On Azure the call is created at /openai/v1/realtime/calls with the `api-key` header, and
    the sideband attached at /openai/v1/realtime?call_id=."""
    base = upstream.url.removesuffix("/v1/realtime")
    settings = relay_settings(base, client_keys={CLIENT_KEY: "default"}, upstream={"kind": "azure"})
    relay = await relay_factory(settings)
    caller = Caller()
    try:
        assert (await call_through(relay, caller)).status_code == 201
        (call,) = upstream.calls
        await eventually(lambda: len(call.sidebands) == 1)
    finally:
        await caller.close()
    assert call.path == "/openai/v1/realtime/calls"
    assert call.headers["api-key"] == UPSTREAM_KEY and "authorization" not in call.headers
    sideband = call.sidebands[0]
    assert sideband.path == "/openai/v1/realtime" and sideband.query == {"call_id": call.id}


async def test_a_drain_hangs_up_the_calls(relay_factory, upstream):
    """Shutting down, the relay refuses new calls (503) and hangs up the live ones."""
    relay = await relay_factory(settings_for(upstream))
    caller, late = Caller(), Caller()
    try:
        assert (await call_through(relay, caller)).status_code == 201
        (call,) = upstream.calls
        await relay.relay.drain(0.1)
        assert call.hung_up and not relay.relay.calls
        refused = await call_through(relay, late)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_shutting_down"
    finally:
        await caller.close()
        await late.close()
    labels = {**WEBRTC, "outcome": "shutdown"}
    assert metric(relay, "realtime_relay_sessions_total", **labels) == 1


async def test_a_bad_form_is_refused_before_anything_opens(relay_factory, upstream, tool_server):
    """A malformed form, a form with no length, and client tools named like a server tool get
    OpenAI-shaped 4xx errors; nothing opens upstream."""
    tier = {"default": {"client_may_set": ["tools"]}}
    settings = settings_for(upstream, tools=[http_tool(tool_server)], tiers=tier)
    relay = await relay_factory(settings)
    key = {"Authorization": f"Bearer {CLIENT_KEY}"}
    forged = {"type": "realtime", "tools": [{"type": "function", "name": "get_time"}]}
    files = {
        "sdp": (None, "v=0\r\n", "application/sdp"),
        "session": (None, json.dumps(forged), "application/json"),
    }
    broken = {**key, "Content-Type": "multipart/form-data"}  # no boundary

    async def chunked() -> Any:
        yield b"--x\r\n"

    async with httpx.AsyncClient(base_url=relay.http_url) as http:
        named = await http.post("/v1/realtime/calls", files=files, headers=key)
        malformed = await http.post("/v1/realtime/calls", content=b"x", headers=broken)
        unbounded = await http.post("/v1/realtime/calls", content=chunked(), headers=broken)
    assert (named.status_code, named.json()["error"]["param"]) == (400, "session.tools")
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_request"
    assert unbounded.status_code == 411
    assert upstream.calls == []
