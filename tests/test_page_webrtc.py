"""WebRTC calls from a real browser: the bundled page and @openai/agents, through the relay.

Debian's Chromium with a WAV as its fake microphone calls through the relay's
`POST /v1/realtime/calls`; the local upstream answers the call (a real WebRTC peer), echoes each
spoken turn on the call's audio track and writes transcripts on its `oai-events` channel, while
the relay holds the call's sideband.

Chromium offers a loopback candidate only with `--allow-loopback-in-peer-connection`, and the
local upstream's ICE stays on 127.0.0.1. The fake-media flags also turn Chromium's mDNS host
names off, so no `--disable-features` is needed (it would replace Playwright's own list).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from playwright.async_api import BrowserContext, Page, async_playwright
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route

from tests.helpers import (
    CLIENT_KEY,
    SERVER_INSTRUCTIONS,
    START_TIMEOUT,
    eventually,
    loopback_socket,
    relay_settings,
    start_server,
)
from tests.test_page import (
    ARTIFACTS,
    CHROMIUM,
    WAIT_MS,
    chromium_args,
    envelope,
    pcm_at_24k,
    silence_wav,
    speech_span,
    speech_wav,
)

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(120)]

AGENTS = Path(__file__).resolve().parent / "agents"
AGENTS_PAGE = AGENTS / "webrtc.html"
AGENTS_BUNDLE = (
    AGENTS / "node_modules/@openai/agents-realtime/dist/bundle/openai-realtime-agents.umd.js"
)
AGENT_INSTRUCTIONS = "AGENT INSTRUCTIONS: talk like a pirate"
WEBRTC = {"transport": "webrtc"}
# Chromium gathers no 127.0.0.1 candidate without it, and the local upstream listens there only.
LOOPBACK = "--allow-loopback-in-peer-connection"

# Records the page's remote audio: each peer connection's incoming track goes to a MediaRecorder;
# `remoteAudio()` stops it once the track has been quiet for QUIET_MS (the server's
# `output_audio_buffer.stopped` comes as it sends the last packet, before the browser's jitter
# buffer has played it) and returns what it heard, decoded to 24 kHz mono PCM16 (base64).
QUIET_MS = 500
REMOTE_AUDIO = """(() => {
    const recording = (window.recording = { chunks: [], recorder: null, loudAt: 0 });
    window.RTCPeerConnection = class extends RTCPeerConnection {
        constructor(...args) {
            super(...args);
            this.addEventListener("track", (event) => {
                const stream = new MediaStream([event.track]);
                const recorder = new MediaRecorder(stream, { mimeType: "audio/webm;codecs=opus" });
                recorder.ondataavailable = (e) => recording.chunks.push(e.data);
                recorder.start(200);
                recording.recorder = recorder;
                const context = new AudioContext();
                const analyser = new AnalyserNode(context, { fftSize: 1024 });
                context.createMediaStreamSource(stream).connect(analyser);
                const samples = new Float32Array(analyser.fftSize);
                setInterval(() => {
                    analyser.getFloatTimeDomainData(samples);
                    if (samples.some((value) => Math.abs(value) > 0.01)) {
                        recording.loudAt = performance.now();
                    }
                }, 10);
            });
        }
    };
    window.remoteAudio = async () => {
        while (performance.now() - recording.loudAt < QUIET_MS) {
            await new Promise((resolve) => setTimeout(resolve, 50));
        }
        const recorder = recording.recorder;
        if (recorder.state !== "inactive") {
            const stopped = new Promise((resolve) => (recorder.onstop = resolve));
            recorder.stop();
            await stopped;
        }
        const data = await new Blob(recording.chunks).arrayBuffer();
        const context = new OfflineAudioContext(1, 1, 24000);
        const decoded = await context.decodeAudioData(data);
        const samples = decoded.getChannelData(0);
        const pcm = new Int16Array(samples.length);
        for (let i = 0; i < samples.length; i++) {
            pcm[i] = Math.max(-1, Math.min(1, samples[i])) * 0x7fff;
        }
        let text = "";
        const bytes = new Uint8Array(pcm.buffer);
        for (let i = 0; i < bytes.length; i += 0x8000) {
            text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
        }
        return btoa(text);
    };
})();""".replace("QUIET_MS", str(QUIET_MS))


# -- helpers -------------------------------------------------------------------------------------


async def open_browser(playwright, wav: Path, profile: Path) -> BrowserContext:
    return await playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=[*chromium_args(wav), LOOPBACK],
        viewport={"width": 820, "height": 1000},
    )


async def open_page(browser: BrowserContext, url: str, init_script: str | None = None) -> Page:
    if init_script is not None:
        await browser.add_init_script(init_script)
    page = browser.pages[0] if browser.pages else await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url)
    return page


async def metrics(relay) -> list:
    """The relay's samples, as Prometheus scrapes them from `/metrics`."""
    async with httpx.AsyncClient() as client:
        response = await client.get(relay.http_url + "/metrics", timeout=WAIT_MS / 1000)
    response.raise_for_status()
    return [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


async def metric(relay, name: str, **labels: str) -> float:
    """The sum of `name` over the samples carrying `labels` (0 if none)."""
    return sum(
        sample.value
        for sample in await metrics(relay)
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def reaches(relay, value: float, name: str, **labels: str) -> None:
    """Wait (bounded) until the relay's `/metrics` show `value` for `name` with `labels`."""
    async with asyncio.timeout(WAIT_MS / 1000):
        while True:
            if await metric(relay, name, **labels) == value:
                return
            await asyncio.sleep(0.1)


async def state(page: Page, value: str) -> None:
    await page.wait_for_function(
        "(value) => document.querySelector('#status').dataset.state === value", arg=value
    )


async def use_key(page: Page, key: str) -> None:
    """Type the client key; the page asks the relay's options again for it."""
    await page.get_by_label("Client key").fill(key)
    await page.get_by_label("Client key").press("Tab")  # `change`


async def serve(app: Starlette) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    sock = loopback_socket()
    config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off")
    server, task = await start_server(config, sock)
    return server, task, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def agents_origin() -> AsyncIterator[str]:
    """tests/agents/webrtc.html and the agents-js bundle, served from an origin of their own."""

    async def page(request: Request) -> FileResponse:
        return FileResponse(AGENTS_PAGE)

    async def bundle(request: Request) -> FileResponse:
        return FileResponse(AGENTS_BUNDLE, media_type="text/javascript")

    if not AGENTS_BUNDLE.is_file():
        pytest.fail(f"missing {AGENTS_BUNDLE}: run `npm ci --prefix tests/agents`", pytrace=False)
    app = Starlette(routes=[Route("/", page), Route("/" + AGENTS_BUNDLE.name, bundle)])
    server, task, origin = await serve(app)
    yield origin
    server.should_exit = True
    async with asyncio.timeout(START_TIMEOUT):
        await task


def assert_echo(source: np.ndarray, heard: np.ndarray) -> None:
    """`heard` holds the speech of `source`: as long (within 15 %), with the same envelope.

    The browser's jitter buffer may stretch or squeeze what it plays a little when packets come
    in bursts, so the envelopes are compared over their speech spans, brought to one length.
    """
    source_envelope, heard_envelope = envelope(source), envelope(heard)
    start, end = speech_span(source_envelope)
    got_start, got_end = speech_span(heard_envelope)
    got, want = got_end - got_start, end - start
    assert abs(got - want) <= 0.15 * want, (got, want)
    span = heard_envelope[got_start:got_end]
    stretched = np.interp(np.linspace(0, got - 1, want), np.arange(got), span)
    correlation = float(np.corrcoef(source_envelope[start:end], stretched)[0, 1])
    assert correlation > 0.8, correlation


# -- the page ------------------------------------------------------------------------------------


async def test_conversation_over_webrtc(tmp_path, upstream, relay_factory):
    """Over WebRTC the spoken turn comes back on the page's remote track, both transcripts show,
    and the relay counts the call, its usage and its hang-up under transport="webrtc"."""
    settings = relay_settings(upstream.url, client_keys={CLIENT_KEY: "default"}, anonymous_tier="")
    relay = await relay_factory(settings)
    # A voice and rate the local upstream's recognizer (PocketSphinx) hears exactly.
    wav = speech_wav(tmp_path / "hello.wav", ("hello world", 2.0), lead=1.5, voice="en-us+m3")
    async with async_playwright() as playwright:
        browser = await open_browser(playwright, wav, tmp_path / "profile")
        page = await open_page(browser, relay.http_url + "/", REMOTE_AUDIO)
        await use_key(page, CLIENT_KEY)  # no anonymous use: the call must carry the key
        await page.get_by_role("radio", name="WebRTC").check()  # offered once the key is in
        assert await page.get_by_label("Compressed audio (Opus)").is_hidden()
        model = await page.locator("#model").input_value()
        await page.get_by_role("button", name="Connect").click()
        await state(page, "listening")
        await reaches(relay, 1, "realtime_relay_sessions_active", **WEBRTC)

        # Both transcripts, from the data channel, in the conversation.
        user = page.locator(".turn.user:not(.streaming)")
        await user.get_by_text(re.compile("hello world", re.I)).wait_for()
        answer = page.locator(".turn.assistant:not(.streaming) .text")
        await answer.filter(has_text=re.compile(r"\w")).first.wait_for()
        await page.get_by_text("first audio after").wait_for()
        await state(page, "listening")  # output_audio_buffer.stopped

        # The echo on the remote track is the spoken file: same speech length, same envelope.
        heard = np.frombuffer(base64.b64decode(await page.evaluate("remoteAudio()")), "<i2")
        assert_echo(pcm_at_24k(wav), heard)

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "page-webrtc.png"), full_page=True)

        # Hanging up ends the call on the relay, which counts it, its usage and frees its slot.
        await page.get_by_role("button", name="Disconnect").click()
        await state(page, "idle")
        closed = {**WEBRTC, "outcome": "client_closed"}
        await reaches(relay, 1, "realtime_relay_sessions_total", **closed)
        assert await metric(relay, "realtime_relay_sessions_active", **WEBRTC) == 0
        assert await metric(relay, "realtime_relay_tokens_total", model=model) > 0
        (call,) = upstream.calls
        await eventually(lambda: call.hung_up)  # by the relay, before the page's peer left
        assert page.errors == []  # type: ignore[attr-defined]
        await browser.close()


async def test_push_to_talk_and_typed_interruption_over_webrtc(tmp_path, upstream, relay_factory):
    """Push-to-talk over WebRTC clears, commits and asks for the answer on the data channel;
    typing over an answer that is playing clears the server's output buffer first."""
    relay = await relay_factory(relay_settings(upstream.url))
    # 2.5 s of lead-in: time to connect and press the key before the words start.
    wav = speech_wav(tmp_path / "ptt.wav", ("good morning everyone", 1.0), lead=2.5)
    async with async_playwright() as playwright:
        browser = await open_browser(playwright, wav, tmp_path / "profile")
        page = await open_page(browser, relay.http_url + "/")
        await page.get_by_role("radio", name="WebRTC").check()
        await page.get_by_label("Push-to-talk").check()
        await page.get_by_role("button", name="Connect").click()
        await state(page, "listening")
        await page.keyboard.down("Space")
        await page.wait_for_function("document.querySelector('#ptt').ariaPressed === 'true'")
        await asyncio.sleep(4.5)  # the rest of the lead-in, the words and a little silence
        await page.keyboard.up("Space")
        await page.locator(".turn.assistant").get_by_text("You said something for").wait_for()
        # The recognizer (PocketSphinx) does not always get this sentence exactly over this
        # path: only that it heard words is checked.
        heard = await page.locator(".turn.user:not(.streaming) .text").first.inner_text()
        assert re.search(r"[a-z]{2}", heard, re.I) and "s of speech" not in heard, heard
        await state(page, "listening")
        (call,) = upstream.calls
        assert types(call.events) == [
            "session.update",  # turn detection off
            "input_audio_buffer.clear",
            "input_audio_buffer.commit",
            "response.create",
        ]
        assert "input_audio_buffer.speech_started" not in call.sent_types()  # VAD was off

        # A long answer (the local upstream speaks 0.5 s per 20 characters), typed over.
        long = "Tell me everything about the sea, the ships and the sailors, from the very start."
        await page.get_by_label("Message").fill(long)
        await page.get_by_role("button", name="Send").click()
        await state(page, "speaking")
        await page.get_by_label("Message").fill("That is enough, thanks.")
        await page.get_by_role("button", name="Send").click()
        await page.get_by_text("You said: That is enough, thanks.").wait_for()
        interrupted = page.locator(".turn.assistant.interrupted")
        await interrupted.get_by_text(f"You said: {long}").wait_for()
        sent = types(call.events)[4:]
        # A response.cancel only if the first answer was still being written.
        assert [kind for kind in sent if kind != "response.cancel"] == [
            "conversation.item.create",
            "response.create",
            "output_audio_buffer.clear",
            "conversation.item.create",
            "response.create",
        ]
        assert "output_audio_buffer.cleared" in call.sent_types()
        await state(page, "listening")
        assert page.errors == []  # type: ignore[attr-defined]
        await browser.close()


def types(events: list[dict]) -> list[str]:
    return [str(event["type"]) for event in events]


async def test_refused_call_says_why(tmp_path, upstream, relay_factory):
    """A call the relay refuses (here: no free slot) is shown as /ws refusals are."""
    tiers = {"default": {"max_sessions": 0}}
    relay = await relay_factory(relay_settings(upstream.url, tiers=tiers))
    wav = silence_wav(tmp_path / "silence.wav")
    async with async_playwright() as playwright:
        browser = await open_browser(playwright, wav, tmp_path / "profile")
        page = await open_page(browser, relay.http_url + "/")
        await page.get_by_role("radio", name="WebRTC").check()
        await page.get_by_role("button", name="Connect").click()
        await state(page, "refused")
        assert "Too many conversations" in await page.locator("#status").text_content()
        await page.get_by_role("alert").get_by_text("Too many conversations").wait_for()
        assert await page.get_by_role("button", name="Connect").is_enabled()
        assert page.errors == []  # type: ignore[attr-defined]
        await browser.close()
    assert not upstream.calls and not upstream.connections


@pytest.mark.parametrize("webrtc", [True, False], ids=["offered", "not-offered"])
async def test_webrtc_offered_only_where_allowed(tmp_path, upstream, relay_factory, webrtc):
    """The WebRTC choice shows only for tiers that allow calls, and never for Captions."""
    tiers = {"default": {"webrtc": webrtc}}
    relay = await relay_factory(relay_settings(upstream.url, tiers=tiers))
    wav = silence_wav(tmp_path / "silence.wav")
    async with async_playwright() as playwright:
        browser = await open_browser(playwright, wav, tmp_path / "profile")
        page = await open_page(browser, relay.http_url + "/")
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        choice = page.get_by_role("radio", name="WebRTC")
        opus = page.get_by_label("Compressed audio (Opus)")
        if webrtc:
            await choice.check()
            assert await opus.is_hidden()
            await page.get_by_role("radio", name="Captions").check()
            assert await choice.is_hidden() and await opus.is_visible()
        else:
            assert await page.locator("#transport").is_hidden()
            assert await opus.is_visible()
        assert page.errors == []  # type: ignore[attr-defined]
        await browser.close()


# -- @openai/agents ------------------------------------------------------------------------------


async def mint(relay, model: str) -> str:
    """An `ek_` token for the client key (agents-js in a browser takes no other key)."""
    body = {"session": {"type": "realtime", "model": model}}
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with httpx.AsyncClient(base_url=relay.http_url, timeout=WAIT_MS / 1000) as http:
        response = await http.post("/v1/realtime/client_secrets", json=body, headers=headers)
    response.raise_for_status()
    token = response.json()["value"]
    assert token.startswith("ek_")
    return token


async def test_agents_webrtc_completes_a_turn(tmp_path, upstream, relay_factory, agents_origin):
    """@openai/agents' OpenAIRealtimeWebRTC, on a page of another origin, calls through the
    relay (CORS preflight, `Location` exposed) and completes a spoken turn; the agent's own
    instructions do not stay in effect and the call counts under transport="webrtc"."""
    settings = relay_settings(
        upstream.url,
        client_keys={CLIENT_KEY: "default"},
        anonymous_tier="",
        allowed_origins=[agents_origin],
        session={"instructions": SERVER_INSTRUCTIONS},
    )
    relay = await relay_factory(settings)
    model = settings.tier_models("default")[0]
    token = await mint(relay, model)
    wav = speech_wav(tmp_path / "agent.wav", ("hello world", 2.0), lead=1.5, voice="en-us+m3")
    async with async_playwright() as playwright:
        browser = await open_browser(playwright, wav, tmp_path / "profile")
        page = await open_page(browser, agents_origin + "/")
        arguments = {
            "calls": relay.http_url + "/v1/realtime/calls",
            "apiKey": token,
            "model": model,
            "instructions": AGENT_INSTRUCTIONS,
        }
        await page.evaluate("(arguments) => runAgent(arguments)", arguments)
        result = await page.evaluate("window.result")
        assert result["status"] == "connected", result
        # The call id came from the relay's `Location`, which a cross-origin page reads only
        # when the relay exposes it.
        (call,) = upstream.calls
        assert result["callId"] and result["callId"] in relay.relay.calls
        await reaches(relay, 1, "realtime_relay_sessions_active", **WEBRTC)

        # A spoken turn: the user's words and the agent's answer in the agent's history.
        await page.wait_for_function("window.result.turns >= 1")
        result = await page.evaluate("window.result")
        assert result["errors"] == [], result["errors"]
        history = result["history"]
        said = [item["text"] for item in history if item.get("role") == "user"]
        assert any(re.search("hello world", text, re.I) for text in said), history
        assert [item for item in history if item.get("role") == "assistant" and item["text"]]

        # The relay put the server's instructions back over its sideband: the agent's own
        # were in effect only until then.
        restored = {"field": "instructions"}
        assert await metric(relay, "realtime_relay_fields_restored_total", **restored) >= 1
        assert call.session["instructions"] == SERVER_INSTRUCTIONS
        updates = result["updates"]
        assert AGENT_INSTRUCTIONS in updates and updates[-1] == SERVER_INSTRUCTIONS, updates

        # agents-js hangs up by closing its peer connection, which the relay need not notice
        # (OpenAI keeps the sideband open): the app's backend hangs up on the relay instead.
        hangup = f"/v1/realtime/calls/{result['callId']}/hangup"
        async with httpx.AsyncClient(base_url=relay.http_url, timeout=WAIT_MS / 1000) as http:
            response = await http.post(hangup, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        await reaches(relay, 1, "realtime_relay_sessions_total", **WEBRTC)
        assert await metric(relay, "realtime_relay_sessions_active", **WEBRTC) == 0
        await eventually(lambda: call.hung_up)
        await page.wait_for_function("window.agentSession.transport.status === 'disconnected'")
        assert page.errors == []  # type: ignore[attr-defined]
        await browser.close()
