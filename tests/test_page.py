"""The bundled page in a real browser: Debian's Chromium, a fake microphone, relay and upstream.

The microphone is a WAV of espeak-ng speech made at test time and fed to Chromium's fake capture
device; the local upstream echoes each committed turn back, so what the page plays is known too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import struct
import subprocess
import wave
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soxr
from playwright.async_api import Page, async_playwright
from prometheus_client.parser import text_string_to_metric_families

from app.api.demo import demo_tool
from tests.helpers import relay_settings, scripted_upstream

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_MS = 20_000  # every browser-side wait
RATE = 24_000  # the upstream's PCM16 rate
WINDOW = RATE // 50  # 20 ms envelope windows


# -- the fake microphone -------------------------------------------------------------------------


def speech_wav(
    path: Path, *parts: tuple[str, float], lead: float = 0.5, voice: str | None = None
) -> Path:
    """48 kHz mono 16-bit speech: each (text, seconds of silence after it), after `lead` s, in
    espeak-ng's `voice` (its default if None)."""
    pieces = []
    voice_args = ["-v", voice] if voice else []
    for index, (text, pause) in enumerate(parts):
        raw, piece = path.with_suffix(f".raw{index}.wav"), path.with_suffix(f".{index}.wav")
        speak = ["espeak-ng", *voice_args, "-s", "150", "-w", str(raw), text]
        subprocess.run(speak, check=True)
        convert = ["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(piece)]
        subprocess.run([*convert, "pad", str(lead if index == 0 else 0), str(pause)], check=True)
        pieces.append(str(piece))
    if len(pieces) == 1:
        shutil.copy(pieces[0], path)
    else:
        subprocess.run(["sox", *pieces, str(path)], check=True)
    return path


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as source:
        return source.getnframes() / source.getframerate()


def pcm_at_24k(path: Path) -> np.ndarray:
    with wave.open(str(path)) as source:
        rate = source.getframerate()
        samples = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
    return soxr.resample(samples.astype(np.float32), rate, RATE)


def envelope(samples: np.ndarray) -> np.ndarray:
    """RMS over 20 ms windows."""
    count = len(samples) // WINDOW
    windows = samples[: count * WINDOW].astype(np.float64).reshape(count, WINDOW)
    return np.sqrt((windows**2).mean(axis=1))


def speech_span(env: np.ndarray) -> tuple[int, int]:
    """First and last window louder than -30 dB below the loudest: the speech part."""
    loud = np.flatnonzero(env > env.max() * 10 ** (-30 / 20))
    return int(loud[0]), int(loud[-1]) + 1


def best_correlation(source: np.ndarray, received: np.ndarray) -> float:
    """Pearson r of the source envelope against the received one, at the best lag."""
    assert len(received) >= len(source), "the upstream got less audio than the spoken file"
    return max(
        float(np.corrcoef(source, received[lag : lag + len(source)])[0, 1])
        for lag in range(len(received) - len(source) + 1)
    )


def png(width: int = 48, height: int = 32) -> bytes:
    """A small RGB PNG (a blue-to-orange gradient), written with the standard library."""
    rows = b"".join(
        b"\0" + bytes(c for x in range(width) for c in (5 * x, 80, 255 - 5 * x))
        for _ in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# -- the browser ---------------------------------------------------------------------------------


def chromium_args(wav: Path) -> list[str]:
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        # %noloop: play the file once, then silence (Chromium loops it otherwise).
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]


# Test hooks, run before the page's scripts: `window.sendLog` lists what the page sends on its
# WebSocket (a binary audio frame as its size in bytes, an event as its type) with
# "<speech_started" where that server event arrived, and the playback worklet's "flushed" reply
# comes FLUSH_DELAY_MS late, as from a busy audio thread, so that anything the page sends while it
# waits for it shows in the order.
FLUSH_DELAY_MS = 200
SEND_LOG = """(() => {
    const log = (window.sendLog = []);
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) {
        log.push(typeof data === "string" ? JSON.parse(data).type : data.byteLength);
        return send.call(this, data);
    };
    window.WebSocket = class extends WebSocket {
        constructor(...args) {
            super(...args);
            // Added before the page sets onmessage, so it runs before the page's handler.
            this.addEventListener("message", (event) => {
                if (typeof event.data !== "string") return;
                const type = JSON.parse(event.data).type;
                if (type === "input_audio_buffer.speech_started") log.push("<speech_started");
            });
        }
    };
    const onmessage = Object.getOwnPropertyDescriptor(MessagePort.prototype, "onmessage");
    window.AudioWorkletNode = class extends AudioWorkletNode {
        constructor(ctx, name, options) {
            super(ctx, name, options);
            if (name !== "playback") return;
            const port = this.port;
            const late = (handler) => (event) =>
                event.data.type === "flushed"
                    ? setTimeout(() => handler(event), FLUSH_DELAY_MS)
                    : handler(event);
            Object.defineProperty(port, "onmessage", {
                get: () => onmessage.get.call(port),
                set: (handler) => onmessage.set.call(port, handler && late(handler)),
            });
        }
    };
})();""".replace("FLUSH_DELAY_MS", str(FLUSH_DELAY_MS))


async def open_page(
    playwright, wav: Path, profile: Path, url: str, init_script: str | None = None
) -> Page:
    browser = await playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=chromium_args(wav),
        viewport={"width": 820, "height": 1000},
    )
    if init_script is not None:
        await browser.add_init_script(init_script)
    page = browser.pages[0] if browser.pages else await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url)
    return page


async def stats(page: Page) -> dict:
    return await page.evaluate("JSON.parse(JSON.stringify(window.relayStats))")


async def played_out(page: Page, item_id: str) -> dict:
    """Wait until the page has played all the audio it received for `item_id`."""
    script = """(id) => {
        const item = window.relayStats.items[id];
        return item && item.receivedSamples > 0 && item.playedSamples === item.receivedSamples;
    }"""
    await page.wait_for_function(script, arg=item_id)
    return (await stats(page))["items"][item_id]


def sent_audio(record, item_id: str) -> int:
    """Samples (24 kHz) of assistant audio the upstream sent for `item_id`."""
    return sum(
        len(base64.b64decode(event["delta"])) // 2
        for event in record.sent
        if event["type"] == "response.output_audio.delta" and event["item_id"] == item_id
    )


async def eventually(check):
    """Wait (bounded) until `check()` returns something true, and return it."""
    async with asyncio.timeout(WAIT_MS / 1000):
        while True:
            if result := check():
                return result
            await asyncio.sleep(0.05)


# -- tests ---------------------------------------------------------------------------------------


async def test_conversation(tmp_path, upstream, relay_factory):
    """A spoken turn reaches the upstream intact, its echo is played in full, typed input works."""
    relay = await relay_factory(relay_settings(upstream.url, upstream={"demo": True}))
    wav = speech_wav(tmp_path / "hello.wav", ("Hello relay. This is a test of the web page.", 2.0))
    async with async_playwright() as playwright:
        page = await open_page(playwright, wav, tmp_path / "profile", relay.http_url + "/")
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        await page.get_by_text("local echo upstream — set OPENAI_API_KEY").wait_for()
        await page.get_by_role("button", name="Connect").click()
        answer = page.locator(".turn.assistant").first
        await answer.get_by_text("You said something for").wait_for()
        # The user's turn holds its completed transcript: the local upstream's recognizer is
        # noisy with espeak-ng's default voice, so only that it heard words is checked (not its
        # placeholder, "(1.23 s of speech)").
        heard = await page.locator(".turn.user:not(.streaming) .text").first.inner_text()
        assert re.search(r"[a-z]{2}", heard, re.I) and "s of speech" not in heard, heard
        record = upstream.connections[0]
        item_id = await answer.get_attribute("data-item")
        assert item_id is not None

        # Played: every echoed sample went through the playback worklet, no more, no less (the
        # worklet counts whole source samples and ends each item exactly at its last one).
        played = await played_out(page, item_id)
        assert played["playedSamples"] == sent_audio(record, item_id)
        assert (await stats(page))["underruns"] == 0
        await page.get_by_text("first audio after").wait_for()
        assert (await page.locator("#latency").text_content()).endswith(" ms")
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )

        # The audio the upstream got is the spoken file: same speech length, same envelope.
        source = envelope(pcm_at_24k(wav))
        received = envelope(np.frombuffer(bytes(record.input_audio), dtype="<i2"))
        start, end = speech_span(source)
        got_start, got_end = speech_span(received)
        assert abs((got_end - got_start) - (end - start)) <= 0.1 * (end - start)
        assert best_correlation(source[start:end], received) > 0.8

        # Typed text and an attached image become user items and get an answer.
        await page.get_by_label("Image").set_input_files(
            {"name": "gradient.png", "mimeType": "image/png", "buffer": png()}
        )
        await page.get_by_label("Message").fill("What is in this picture?")
        await page.get_by_role("button", name="Send").click()
        await page.get_by_text("You said: What is in this picture?").wait_for()
        created = await eventually(
            lambda: [e for e in record.events if e["type"] == "conversation.item.create"]
        )
        content = created[0]["item"]["content"]
        assert content[0]["type"] == "input_image"
        assert content[0]["image_url"].startswith("data:image/jpeg;base64,")
        assert content[1] == {"type": "input_text", "text": "What is in this picture?"}
        last = await page.locator(".turn.assistant").last.get_attribute("data-item")
        await played_out(page, last)
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )

        # One spoken turn: the fake microphone played the file once (%noloop), then silence.
        assert record.sent_types().count("input_audio_buffer.speech_started") == 1

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
        assert page.errors == []  # type: ignore[attr-defined]


def types(events: list[dict]) -> list[str]:
    return [str(event["type"]) for event in events]


async def test_barge_in(tmp_path, upstream_factory, relay_factory):
    """Speaking over the answer stops it and truncates the item to the milliseconds played."""
    upstream = await upstream_factory(realtime_pacing=True)
    relay = await relay_factory(relay_settings(upstream.url))
    wav = speech_wav(
        tmp_path / "barge.wav",
        ("Please tell me a long story about the sea and the ships.", 1.6),
        ("Stop, stop. That is enough, thank you.", 1.5),
    )
    async with async_playwright() as playwright:
        url = relay.http_url + "/"
        page = await open_page(playwright, wav, tmp_path / "profile", url, init_script=SEND_LOG)
        await page.get_by_role("button", name="Connect").click()
        spoken_until = asyncio.get_running_loop().time() + wav_seconds(wav)
        interrupted = page.locator(".turn.assistant.interrupted")
        await interrupted.wait_for()
        record = upstream.connections[0]
        truncate = await eventually(
            lambda: next(
                (e for e in record.events if e["type"] == "conversation.item.truncate"), None
            )
        )
        page_side = (await stats(page))["truncates"][0]
        end_ms = truncate["audio_end_ms"]
        assert isinstance(end_ms, int)
        assert truncate["content_index"] == 0 and truncate["item_id"] == page_side["item_id"]
        assert 0 < end_ms <= page_side["received_ms"]
        assert end_ms <= sent_audio(record, truncate["item_id"]) * 1000 // RATE
        assert page_side["played_ms"] - 1 < end_ms <= page_side["played_ms"]
        # It was a real interruption: the upstream cancelled that answer for the new turn.
        done = await eventually(
            lambda: [
                e["response"]
                for e in record.sent
                if e["type"] == "response.done"
                and any(item["id"] == truncate["item_id"] for item in e["response"]["output"])
            ]
        )
        assert done[0]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        # It names the item that was playing: the first answer, which the page had started.
        assert truncate["item_id"] == await interrupted.get_attribute("data-item")
        assert truncate["item_id"] == next(
            e["item"]["id"] for e in record.sent if e["type"] == "response.output_item.added"
        )

        # The truncate went out first: the page sent nothing between hearing the barge-in (the
        # last speech_started before it) and the truncate, though the new speech kept coming
        # while the player answered late (FLUSH_DELAY_MS).
        log = await page.evaluate("window.sendLog")
        sent_at = log.index("conversation.item.truncate")
        barge_in = max(i for i, kind in enumerate(log[:sent_at]) if kind == "<speech_started")
        assert sent_at == barge_in + 1, log[barge_in : barge_in + 5]
        # And so it reached the upstream: the relay forwards the page's audio in order (frames
        # merged into appends, resampled to 24 kHz), so the upstream had no more audio before
        # the truncate than the page had sent (PCM16 frames after a type byte) before the barge-in.
        frames = [kind for kind in log[:barge_in] if isinstance(kind, int)]
        page_ms = sum(size - 1 for size in frames) / 2 / (await stats(page))["contextRate"] * 1000
        at = types(record.events).index("conversation.item.truncate")
        upstream_ms = sum(
            len(base64.b64decode(e["audio"])) // 2
            for e in record.events[:at]
            if e["type"] == "input_audio_buffer.append"
        ) / (RATE / 1000)
        assert 0 < upstream_ms <= page_ms + 1
        # The truncate named its item before the next item began: the upstream truncated it
        # before it committed the new speech as the next user item.
        committed = await eventually(
            lambda: [
                i
                for i, kind in enumerate(record.sent_types())
                if kind == "input_audio_buffer.committed"
            ][1:]
        )
        assert record.sent_types().index("conversation.item.truncated") < committed[0]

        # Playback stopped at once and stays stopped: late audio of that item is dropped.
        played = (await stats(page))["items"][truncate["item_id"]]["playedSamples"]
        assert played <= (end_ms + 1) * RATE // 1000 + WINDOW
        await asyncio.sleep(0.5)
        assert (await stats(page))["items"][truncate["item_id"]]["playedSamples"] == played
        await eventually(lambda: "conversation.item.truncated" in record.sent_types())

        # Typed input over an answer (a tone, 0.5 s per 20 characters, once the spoken turns are
        # over): the truncate goes out before the new user item and its response.create, which
        # the page sends at once, without waiting for the player.
        await asyncio.sleep(max(0.0, spoken_until - asyncio.get_running_loop().time()))
        await eventually(
            lambda: (
                (kinds := record.sent_types()).count("response.done")
                == kinds.count("input_audio_buffer.committed")
            )
        )
        long = "Tell me everything about the sea, the ships and the sailors, from the very start."
        await page.get_by_label("Message").fill(long)
        await page.get_by_role("button", name="Send").click()
        answer = page.locator(".turn.assistant", has_text=f"You said: {long}")
        await answer.wait_for()
        item_id = await answer.get_attribute("data-item")
        script = "(id) => (window.relayStats.items[id]?.playedSamples ?? 0) > 0"
        await page.wait_for_function(script, arg=item_id)
        await page.get_by_label("Message").fill("That is enough, thanks.")
        await page.get_by_role("button", name="Send").click()
        await page.get_by_text("You said: That is enough, thanks.").wait_for()
        client = types(record.events)
        at = len(client) - 1 - client[::-1].index("conversation.item.truncate")
        assert record.events[at]["item_id"] == item_id
        assert [kind for kind in client[at:] if kind != "input_audio_buffer.append"] == [
            "conversation.item.truncate",
            "conversation.item.create",
            "response.create",
        ]
        assert not [e for e in record.sent if e["type"] == "error"]
        assert page.errors == []  # type: ignore[attr-defined]


async def test_refused(tmp_path, upstream, relay_factory):
    """A relay that refuses anonymous clients: the page says why, in plain words."""
    relay = await relay_factory(relay_settings(upstream.url, anonymous_tier=""))
    wav = speech_wav(tmp_path / "short.wav", ("Hello.", 0.5))
    async with async_playwright() as playwright:
        page = await open_page(playwright, wav, tmp_path / "profile", relay.http_url + "/")
        # Even before connecting, the options endpoint says the same.
        await page.get_by_role("alert").get_by_text("did not accept the key").wait_for()
        await page.get_by_role("button", name="Connect").click()
        status = page.locator("#status")
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'refused'"
        )
        assert "did not accept the key" in await status.text_content()
        assert await page.get_by_role("alert").is_visible()
        assert await page.get_by_role("button", name="Connect").is_enabled()
    assert not upstream.connections  # refused before any upstream connection


async def test_push_to_talk_over_opus(tmp_path, upstream, relay_factory):
    """Push-to-talk with the space bar, Opus both ways: commit, response.create, answer played."""
    relay = await relay_factory(relay_settings(upstream.url))
    # 2.5 s of lead-in: time to connect and press the key before the sentence starts.
    wav = speech_wav(
        tmp_path / "ptt.wav", ("Push to talk works with compressed audio.", 1.0), lead=2.5
    )
    async with async_playwright() as playwright:
        page = await open_page(playwright, wav, tmp_path / "profile", relay.http_url + "/")
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        await page.get_by_label("Push-to-talk").check()
        await page.get_by_label("Compressed audio (Opus)").check()
        await page.get_by_role("button", name="Connect").click()
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )
        record = upstream.connections[0]
        updates = await eventually(
            lambda: [e for e in record.events if e["type"] == "session.update"][1:]
        )  # the first is the relay's own
        update = updates[0]
        assert update["session"]["audio"]["input"]["turn_detection"] is None
        # Focus is still on the (Disconnect) button: space must talk, not click it.
        await page.keyboard.down("Space")
        await page.wait_for_function("document.querySelector('#ptt').ariaPressed === 'true'")
        await asyncio.sleep(6.0)  # the rest of the lead-in, the sentence and a little silence
        await page.keyboard.up("Space")
        await page.locator(".turn.assistant").get_by_text("You said something for").wait_for()
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )

        page_stats = await stats(page)
        assert (page_stats["inputCodec"], page_stats["outputCodec"]) == ("opus", "opus")
        types = [e["type"] for e in record.events]
        assert types.index("input_audio_buffer.commit") < types.index("response.create")
        assert "input_audio_buffer.speech_started" not in record.sent_types()  # VAD was off
        # Played: the decoded Opus stream is the echo plus the encoder's padding of the last
        # 20 ms packet, so it may exceed what the upstream sent by less than one packet.
        item_id = await page.locator(".turn.assistant").first.get_attribute("data-item")
        played = page_stats["items"][item_id]["playedSamples"]
        assert 0 <= played - sent_audio(record, item_id) < RATE // 50
        assert page_stats["underruns"] == 0

        source = envelope(pcm_at_24k(wav))
        received = envelope(np.frombuffer(bytes(record.input_audio), dtype="<i2"))
        start, end = speech_span(source)
        got_start, got_end = speech_span(received)
        assert abs((got_end - got_start) - (end - start)) <= 0.1 * (end - start)
        assert best_correlation(source[start:end], received) > 0.8
        assert page.errors == []  # type: ignore[attr-defined]


def silence_wav(path: Path, seconds: float = 1.0) -> Path:
    """48 kHz mono 16-bit silence: a microphone that never starts a turn."""
    with wave.open(str(path), "wb") as sink:
        sink.setnchannels(1)
        sink.setsampwidth(2)
        sink.setframerate(48_000)
        sink.writeframes(b"\0\0" * int(48_000 * seconds))
    return path


# Every text the page's tool lines showed, in order (the "looking up" line lasts a moment only).
TOOL_LINES = """(() => {
    const texts = (window.toolTexts = []);
    const record = () => {
        for (const line of document.querySelectorAll(".turn.tool .text")) {
            if (!texts.includes(line.textContent)) texts.push(line.textContent);
        }
    };
    document.addEventListener("DOMContentLoaded", () => {
        const options = { childList: true, subtree: true, characterData: true };
        new MutationObserver(record).observe(document.body, options);
    });
})();"""


@pytest.mark.parametrize("show", [True, False], ids=["shown", "hidden"])
async def test_server_tool_activity(tmp_path, upstream, relay_factory, show):
    """A tier showing tool calls: the page shows the lookup and its result; otherwise nothing."""
    # The demo's get_time tool, served by a second relay in demo mode (its own route).
    tool_host = await relay_factory(relay_settings(upstream.url, upstream={"demo": True}))
    tiers = {"default": {"show_tool_calls": show}}
    tool = demo_tool(tool_host.http_url)
    relay = await relay_factory(relay_settings(upstream.url, tools=[tool], tiers=tiers))
    wav = silence_wav(tmp_path / "silence.wav")
    async with async_playwright() as playwright:
        page = await open_page(
            playwright, wav, tmp_path / "profile", relay.http_url + "/", TOOL_LINES
        )
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        await page.get_by_role("button", name="Connect").click()
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )
        await page.get_by_label("Message").fill("Please get time in Paris.")
        await page.get_by_role("button", name="Send").click()
        answer = page.locator(".turn.assistant").get_by_text("The tool returned:")
        await answer.wait_for()
        said = await answer.text_content()
        assert '"city":"Paris"' in said.replace(" ", ""), said
        texts = await page.evaluate("window.toolTexts")
        lines = page.locator(".turn.tool")
        if show:
            assert await lines.count() == 1
            final = await lines.first.text_content()
            assert re.fullmatch(
                r'get_time → \{"city":"Paris","time":"\d\d:\d\d","timezone":"Europe/Paris"\}',
                final.strip(),
            ), final
            assert "looking up get_time(city: Paris)…" in texts, texts
            # The line comes before the answer, in the transcript's order.
            order = await page.evaluate(
                "[...document.querySelectorAll('#transcript > li')].map((li) => li.classList[1])"
            )
            assert order.index("tool") < order.index("assistant"), order
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "page-tools.png"), full_page=True)
        else:
            assert await lines.count() == 0
            assert texts == []
        assert page.errors == []  # type: ignore[attr-defined]


# The relay's default transcription model (`RELAY_SESSION__TRANSCRIPTION`, app/config.py).
TRANSCRIBE_MODEL = "gpt-4o-mini-transcribe"


async def transcription_tokens(relay) -> float:
    """Tokens the relay's /metrics counts for the transcription model, all kinds together."""
    async with httpx.AsyncClient() as client:
        response = await client.get(relay.http_url + "/metrics", timeout=WAIT_MS / 1000)
    response.raise_for_status()
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "realtime_relay_tokens_total"
        and sample.labels.get("model") == TRANSCRIBE_MODEL
    )


async def test_captions(tmp_path, upstream, relay_factory):
    """Captions mode shows what the microphone said, and the relay counts the transcription."""
    relay = await relay_factory(relay_settings(upstream.url))
    # A voice and rate the local upstream's recognizer (PocketSphinx) hears exactly.
    wav = speech_wav(tmp_path / "captions.wav", ("hello world", 1.5), voice="en-us+m3")
    async with async_playwright() as playwright:
        page = await open_page(playwright, wav, tmp_path / "profile", relay.http_url + "/")
        captions = page.get_by_role("radio", name="Captions")
        await captions.check()  # waits for the relay's options to offer it
        # A transcription session: no model, no voice, no conversation, no answers.
        assert await page.locator("#model").is_hidden()
        assert await page.locator("#voice").is_hidden()
        assert await page.locator("#transcript").is_hidden()
        panel = page.locator("#captions")
        assert await panel.get_attribute("aria-live") == "polite"
        await page.get_by_role("button", name="Connect").click()

        # The turn's line grows with the deltas, then holds the completed transcript.
        line = panel.locator(".caption:not(.streaming)", has_text=re.compile("hello world", re.I))
        await line.wait_for()
        assert re.search(r"\bhello world\b", await line.inner_text(), re.I)
        assert await panel.locator(".caption.failed").count() == 0
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )

        # The upstream got the page's audio and nothing else: no answer was asked for or given.
        record = upstream.connections[0]
        assert not [e for e in record.events if e["type"].startswith("response.")]
        assert not [e for e in record.sent if e["type"].startswith("response.")]
        assert record.input_audio
        page_stats = await stats(page)
        assert page_stats["outputCodec"] is None and page_stats["samplesReceived"] == 0

        # The relay counted the transcription's usage under the transcription model.
        async with asyncio.timeout(WAIT_MS / 1000):
            while True:
                if await transcription_tokens(relay) > 0:
                    break
                await asyncio.sleep(0.05)

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "page-captions.png"), full_page=True)
        assert page.errors == []  # type: ignore[attr-defined]


# Every text each captions line showed, in order, by item id.
CAPTION_TEXTS = """(() => {
    const texts = (window.captionTexts = {});
    const record = () => {
        for (const line of document.querySelectorAll("#captions .caption")) {
            const seen = (texts[line.dataset.item] ??= []);
            const text = line.querySelector(".text").textContent;
            if (seen.at(-1) !== text) seen.push(text);
        }
    };
    document.addEventListener("DOMContentLoaded", () => {
        const options = { childList: true, subtree: true, characterData: true };
        new MutationObserver(record).observe(document.body, options);
    });
})();"""


async def two_turns(ws) -> None:
    """Once the page's audio flows: a turn whose transcription fails, then one that completes."""
    await ws.recv()  # the first input_audio_buffer.append
    turns = [
        ("item_fail", ["good"], None),
        ("item_ok", ["good", " morning"], "Good morning."),
    ]
    for item_id, deltas, transcript in turns:
        ids: dict[str, Any] = {"item_id": item_id, "content_index": 0}
        events: list[dict[str, Any]] = [
            {"type": "input_audio_buffer.speech_started", "item_id": item_id}
        ]
        events += [
            {"type": "conversation.item.input_audio_transcription.delta", **ids, "delta": d}
            for d in deltas
        ]
        events += [
            {"type": "input_audio_buffer.speech_stopped", "item_id": item_id},
            {"type": "input_audio_buffer.committed", "item_id": item_id},
        ]
        if transcript is None:
            error = {"type": "server_error", "code": None, "message": "The audio was unclear."}
            failed = "conversation.item.input_audio_transcription.failed"
            events.append({"type": failed, **ids, "error": error})
        else:
            completed = "conversation.item.input_audio_transcription.completed"
            events.append({"type": completed, **ids, "transcript": transcript})
        for event in events:
            await ws.send(json.dumps(event))
    await ws.wait_closed()


async def test_captions_failed_turn(tmp_path, relay_factory):
    """A captions line grows with its deltas; a failed turn stays, marked as not transcribed."""
    async with scripted_upstream(two_turns) as url:
        relay = await relay_factory(relay_settings(url))
        wav = silence_wav(tmp_path / "silence.wav")
        async with async_playwright() as playwright:
            url = relay.http_url + "/"
            page = await open_page(playwright, wav, tmp_path / "profile", url, CAPTION_TEXTS)
            await page.get_by_role("radio", name="Captions").check()
            await page.get_by_role("button", name="Connect").click()
            panel = page.locator("#captions")
            done = panel.locator('.caption[data-item="item_ok"]:not(.streaming)')
            await done.get_by_text("Good morning.").wait_for()
            failed = panel.locator('.caption[data-item="item_fail"]')
            assert await failed.get_attribute("class") == "caption failed"
            said = await failed.inner_text()
            assert "good" in said and "Not transcribed: The audio was unclear." in said, said
            order = await panel.locator(".caption").evaluate_all(
                "(lines) => lines.map((line) => line.dataset.item)"
            )
            assert order == ["item_fail", "item_ok"]
            texts = await page.evaluate("window.captionTexts")
            assert texts["item_ok"] == ["…", "good", "good morning", "Good morning."], texts
            await page.wait_for_function(
                "document.querySelector('#status').dataset.state === 'listening'"
            )
            assert page.errors == []  # type: ignore[attr-defined]


async def test_captions_not_offered(tmp_path, upstream, relay_factory):
    """A tier without transcription sessions: the page offers conversation only."""
    tiers = {"default": {"transcription_sessions": False}}
    relay = await relay_factory(relay_settings(upstream.url, tiers=tiers))
    wav = silence_wav(tmp_path / "silence.wav")
    async with async_playwright() as playwright:
        page = await open_page(playwright, wav, tmp_path / "profile", relay.http_url + "/")
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        captions = page.locator('input[name="kind"][value="captions"]')
        assert await captions.count() == 1 and await captions.is_hidden()
        assert await page.locator("#transcript").is_visible()
        assert await page.locator("#captions").is_hidden()
        assert page.errors == []  # type: ignore[attr-defined]


async def test_captions_push_to_talk(tmp_path, upstream, relay_factory):
    """Captions on a push-to-talk tier: the space bar holds the turn, its commit gets the words."""
    relay = await relay_factory(relay_settings(upstream.url, session={"turn_detection": None}))
    # 2.5 s of lead-in: time to connect and press the key before the words start.
    voice = "en-us+m1"  # which the local upstream's recognizer hears exactly on this sentence
    wav = speech_wav(tmp_path / "ptt.wav", ("good morning everyone", 1.0), lead=2.5, voice=voice)
    async with async_playwright() as playwright:
        page = await open_page(playwright, wav, tmp_path / "profile", relay.http_url + "/")
        await page.get_by_role("radio", name="Captions").check()
        assert await page.get_by_label("Push-to-talk").is_checked()
        await page.get_by_role("button", name="Connect").click()
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )
        await page.keyboard.down("Space")
        await page.wait_for_function("document.querySelector('#ptt').ariaPressed === 'true'")
        await asyncio.sleep(5.0)  # the rest of the lead-in, the words and a little silence
        await page.keyboard.up("Space")
        line = page.locator("#captions .caption:not(.streaming)")
        await line.get_by_text(re.compile("good morning everyone", re.I)).wait_for()
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state === 'listening'"
        )
        record = upstream.connections[0]
        client = [kind for kind in types(record.events) if kind != "input_audio_buffer.append"]
        # The relay's own session.update, then the page's turn: cleared, held, committed.
        assert client == ["session.update", "input_audio_buffer.clear", "input_audio_buffer.commit"]
        assert "input_audio_buffer.speech_started" not in record.sent_types()  # VAD was off
        assert page.errors == []  # type: ignore[attr-defined]
