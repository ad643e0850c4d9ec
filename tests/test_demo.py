"""The demo's server tool: `get_time` on `POST /v1/relay/demo/time`, set up by `--demo`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from app.__main__ import with_demo_tool
from app.api.demo import DEMO_TIME_PATH, local_time
from app.config import Settings
from tests.audio_tools import spoken_pcm
from tests.helpers import START_TIMEOUT, WAIT, relay_settings, user_text
from tests.webrtc_tools import Caller

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

NOON_UTC = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)  # winter: Paris UTC+1, Tokyo UTC+9


def test_the_tool_tells_the_time_in_known_cities():
    """Known cities get their local time and zone, however the model wrote the arguments."""
    paris = {"city": "Paris", "time": "13:00", "timezone": "Europe/Paris"}
    assert local_time('{"city": "Paris"}', NOON_UTC) == paris
    assert local_time({"city": "paris, France"}, NOON_UTC) == paris
    assert local_time({"city": "New  York"}, NOON_UTC)["time"] == "07:00"
    assert local_time({"city": "Tokyo"}, NOON_UTC)["time"] == "21:00"


@pytest.mark.parametrize(
    "arguments", ['{"city": "Atlantis"}', "{}", '{"city": 3}', "not json", "[]"]
)
def test_the_tool_answers_an_error_object_otherwise(arguments):
    """Unknown cities and bad arguments get `{"error": ...}` naming what it knows."""
    answer = local_time(arguments, NOON_UTC)
    assert list(answer) == ["error"]


async def test_the_route_is_served_in_demo_mode_only(upstream, relay_factory):
    """The relay serves the tool's route when its upstream is the demo's, and not otherwise."""
    call = {
        "name": "get_time",
        "arguments": '{"city": "Sydney"}',
        "call_id": "call_1",
        "session_id": "s",
        "tier": "default",
        "client": None,
    }
    demo = await relay_factory(relay_settings(upstream.url, upstream={"demo": True}))
    plain = await relay_factory(relay_settings(upstream.url))
    async with httpx.AsyncClient(timeout=WAIT) as client:
        answer = await client.post(demo.http_url + DEMO_TIME_PATH, json=call)
        assert answer.status_code == 200
        body = answer.json()
        assert (body["city"], body["timezone"]) == ("Sydney", "Australia/Sydney")
        assert re.fullmatch(r"\d\d:\d\d", body["time"])
        unknown = await client.post(
            demo.http_url + DEMO_TIME_PATH, json={**call, "arguments": '{"city": "Gotham"}'}
        )
        assert unknown.status_code == 200 and "Gotham" in unknown.json()["error"]
        bad = await client.post(demo.http_url + DEMO_TIME_PATH, content=b"{")
        assert bad.status_code == 400
        assert (await client.post(plain.http_url + DEMO_TIME_PATH, json=call)).status_code != 200


def _demo_settings(**options: Any) -> Settings:
    return Settings(openai_api_key="demo-no-key", **options)


def test_demo_settings_add_the_tool_and_show_tool_calls():
    """`--demo` adds `get_time` (pointing at the relay itself) and a tier that shows tool calls."""
    overrides = {"openai_api_key": "demo-no-key", "port": 8123}
    settings = with_demo_tool(_demo_settings(port=8123), **overrides)
    [tool] = settings.tools
    assert tool.name == "get_time" and tool.http is not None
    assert tool.http.url == "http://127.0.0.1:8123" + DEMO_TIME_PATH
    assert tool.parameters["required"] == ["city"]
    assert settings.tiers["default"].show_tool_calls
    assert settings.tiers["default"].tools is None  # every tier gets it


@pytest.mark.parametrize(
    ("host", "base"),
    [
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
    ],
)
def test_demo_tool_reaches_the_relay_where_it_listens(host, base):
    """A relay listening on every address calls itself on loopback."""
    settings = with_demo_tool(_demo_settings(host=host), openai_api_key="x", host=host)
    assert settings.tools[0].http is not None
    assert settings.tools[0].http.url == base + DEMO_TIME_PATH


def test_demo_settings_keep_what_the_user_configured():
    """The user's RELAY_TOOLS win (even `[]`); the user's RELAY_TIERS are left as they are."""
    no_tools = _demo_settings(tools=[])
    assert with_demo_tool(no_tools, openai_api_key="x", tools=[]) is no_tools
    tiers = {"default": {"max_sessions": 3}}
    settings = with_demo_tool(_demo_settings(tiers=tiers), openai_api_key="x", tiers=tiers)
    assert [tool.name for tool in settings.tools] == ["get_time"]
    assert not settings.tiers["default"].show_tool_calls
    assert settings.tiers["default"].max_sessions == 3
    ephemeral = _demo_settings(port=0)
    assert with_demo_tool(ephemeral, openai_api_key="x", port=0) is ephemeral


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_make_run_demo_shows_a_tool_round_trip():
    """`realtime-relay --demo` with no key: "get time in Paris" runs the tool and says the time."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OPENAI_"))}
    env.update({"RELAY_PORT": str(port), "RELAY_LOG_LEVEL": "WARNING", "RELAY_DRAIN_SECONDS": "0"})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "--demo", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient() as client, asyncio.timeout(START_TIMEOUT):
            while True:
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None, "the demo relay exited at start-up"
                await asyncio.sleep(0.05)
        seen = []
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
            await ws.send(user_text("Please get time in Paris."))
            await ws.send(json.dumps({"type": "response.create"}))
            async with asyncio.timeout(WAIT * 2):
                while True:
                    event = json.loads(await ws.recv())
                    seen.append(event)
                    if event["type"] == "response.output_audio_transcript.done":
                        break
    finally:
        process.terminate()
        async with asyncio.timeout(START_TIMEOUT):
            _, stderr = await process.communicate()
    log = stderr.decode(errors="replace")
    assert "get time in Paris" in log  # the banner tells the user what to type
    transcript = seen[-1]["transcript"]
    assert transcript.startswith("The tool returned:"), transcript
    output = json.loads(transcript.removeprefix("The tool returned:").strip())
    assert (output["city"], output["timezone"]) == ("Paris", "Europe/Paris")
    assert re.fullmatch(r"\d\d:\d\d", output["time"])
    # The demo tier shows the call, so the page can say "looking up get_time(city: Paris)".
    calls = [
        event["item"]
        for event in seen
        if event["type"] == "response.output_item.done"
        and event["item"].get("type") == "function_call"
    ]
    assert [(call["name"], json.loads(call["arguments"])) for call in calls] == [
        ("get_time", {"city": "Paris"})
    ]
    assert f"127.0.0.1:{port}" not in json.dumps(seen)  # the tool's address stays server-side


async def test_make_run_demo_takes_a_webrtc_call(tmp_path):
    """`realtime-relay --demo`: a WebRTC call through the relay to the local upstream, which
    hears the caller and answers on the call's audio track."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OPENAI_"))}
    env.update({"RELAY_PORT": str(port), "RELAY_LOG_LEVEL": "WARNING", "RELAY_DRAIN_SECONDS": "0"})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "--demo", env=env, stderr=asyncio.subprocess.PIPE
    )
    caller = Caller(spoken_pcm(tmp_path / "hello.wav", "hello world"))
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert process.returncode is None, "the demo relay exited at start-up"
                    await asyncio.sleep(0.05)
            headers = {"Content-Type": "application/sdp"}
            offer = await client.post(
                "/v1/realtime/calls", content=await caller.offer(), headers=headers
            )
            assert offer.status_code == 201, offer.text
            await caller.answer(offer.text)
            transcript = await caller.wait_for(
                "conversation.item.input_audio_transcription.completed"
            )
            await caller.wait_for("output_audio_buffer.stopped", within=WAIT * 2)
            hangup = await client.post(f"{offer.headers['location']}/hangup")
            assert hangup.status_code == 200
    finally:
        await caller.close()
        process.terminate()
        async with asyncio.timeout(START_TIMEOUT):
            await process.communicate()
    assert "hello world" in transcript["transcript"].lower()
    assert caller.loudness() > 500  # the echo, heard on the remote track
