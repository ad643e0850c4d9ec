"""The bundled page in Firefox: Debian's Firefox ESR driven over WebDriver BiDi.

Playwright cannot drive a stock Firefox and there is no geckodriver, so a small Node script
(tests/firefox/page_smoke.mjs, puppeteer-core) drives it: push-to-talk with Firefox's fake
microphone (a 1 kHz tone) for a known time, against a relay and the local echo upstream. The
AudioContext runs at the device's rate, never 24 kHz (Firefox cannot open a 24 kHz context on a
48 kHz device): the tone must still reach the upstream as 1 kHz at 24 kHz, and the echo must be
played in full through the playback worklet's resampler.

Needs `firefox-esr` (apt) and `npm ci --prefix tests/firefox`; `scripts/bootstrap.sh test`
installs both.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import relay_settings, run_node_driver

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.node, pytest.mark.timeout(120)]

FIREFOX = os.environ.get("FIREFOX", "/usr/bin/firefox-esr")
DRIVER_DIR = Path(__file__).resolve().parent / "firefox"
SCRIPT = DRIVER_DIR / "page_smoke.mjs"
DRIVER_TIMEOUT = 60.0  # seconds for the whole browser run (it takes ~6 s)
RATE = 24_000  # the upstream's PCM16 rate
HOLD_MS = 1500  # how long the talk button is held
TONE_HZ = 1000  # Firefox's fake microphone (media.navigator.audio.fake_frequency)
INSTALL = (
    "run `scripts/bootstrap.sh test` "
    "(or: apt-get install firefox-esr && npm ci --prefix tests/firefox)"
)


def driver_command(url: str, device_rate: int | None) -> list[str]:
    """The node command line, or a failure that says what to install."""
    node = shutil.which("node")
    missing = []
    if not (os.path.isfile(FIREFOX) and os.access(FIREFOX, os.X_OK)):
        missing.append(f"Firefox ESR ({FIREFOX})")
    if node is None:
        missing.append("Node.js (node)")
    if not (DRIVER_DIR / "node_modules" / "puppeteer-core" / "package.json").is_file():
        missing.append(f"puppeteer-core ({DRIVER_DIR / 'node_modules'})")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {INSTALL}", pytrace=False)
    command = [str(node), str(SCRIPT), url, f"--hold-ms={HOLD_MS}"]
    if device_rate is not None:
        command.append(f"--device-rate={device_rate}")
    return command


async def run_driver(command: list[str]) -> dict:
    """Run the Node driver (and the Firefox it starts), bounded; its JSON summary."""
    return await run_node_driver(command, DRIVER_TIMEOUT)


def sent_audio(record, item_id: str) -> int:
    """Samples (24 kHz) of assistant audio the upstream sent for `item_id`."""
    return sum(
        len(base64.b64decode(event["delta"])) // 2
        for event in record.sent
        if event["type"] == "response.output_audio.delta" and event["item_id"] == item_id
    )


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency (Hz) of `samples` (Hann window, parabolic peak interpolation)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    spectrum[0] = 0.0
    k = int(np.argmax(spectrum))
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(samples)


@pytest.mark.parametrize("device_rate", [None, 48_000], ids=["default-rate", "48kHz-device"])
async def test_push_to_talk_in_firefox(upstream, relay_factory, device_rate):
    """Push-to-talk in Firefox: the held tone reaches the upstream at 24 kHz, the echo is played."""
    relay = await relay_factory(relay_settings(upstream.url))
    seen = await run_driver(driver_command(relay.http_url + "/", device_rate))
    stats = seen["stats"]

    # The page ran a context at the device's rate and ended the turn back in "Listening".
    assert seen["browserVersion"].startswith("firefox/"), seen["browserVersion"]
    assert seen["state"] == "listening" and seen["status"] == "Listening", seen
    assert seen["error"] == ""
    rate = seen["contextRate"]
    assert rate != RATE and rate in (44_100, 48_000), rate
    if device_rate is not None:
        assert rate == device_rate
    assert (stats["inputCodec"], stats["outputCodec"]) == ("pcm16", "pcm16")
    page_errors = [line for line in seen["console"] if line.startswith(("error", "pageerror"))]
    assert page_errors == []

    # The upstream: push-to-talk set up, then one committed turn and a response asked for.
    assert len(upstream.connections) == 1
    record = upstream.connections[0]
    types = [event["type"] for event in record.events]
    # (The first session.update is the relay's own defaults, with server VAD.)
    ptt = [
        index
        for index, event in enumerate(record.events)
        if event["type"] == "session.update"
        and "turn_detection" in (audio_input := event["session"].get("audio", {}).get("input", {}))
        and audio_input["turn_detection"] is None
    ]
    assert ptt, [event for event in record.events if event["type"] == "session.update"]
    assert ptt[0] < types.index("input_audio_buffer.commit")
    assert types.count("input_audio_buffer.commit") == 1
    assert types.index("input_audio_buffer.commit") < types.index("response.create")
    assert "input_audio_buffer.speech_started" not in record.sent_types()  # VAD was off

    # What it heard: about the held time of loud 1 kHz tone, at 24 kHz.
    audio = np.frombuffer(bytes(record.input_audio), dtype="<i2").astype(np.float64) / 32768
    seconds = len(audio) / RATE
    assert abs(seconds * 1000 - seen["heldMs"]) <= 0.25 * seen["heldMs"], (seconds, seen["heldMs"])
    # The page sent that much at its own rate: the relay resampled from the declared rate.
    page_samples = (stats["bytesSent"] - stats["framesSent"]) // 2  # minus one type byte a frame
    assert abs(page_samples / rate - seconds) <= 0.01 * seconds, (page_samples, rate, seconds)
    rms = float(np.sqrt(np.mean(audio**2)))
    # Firefox's fake tone is a sine of amplitude 0.1: RMS 0.0707 (-23 dBFS), not scaled, not silent.
    assert 0.06 < rms < 0.08, rms
    # Still 1 kHz: a rate mixed up on the way would move it (44.1 kHz taken as 48 kHz: 919 Hz).
    assert abs(peak_frequency(audio, RATE) - TONE_HZ) < 0.01 * TONE_HZ

    # What it answered, and the page played: every echoed sample, nothing dropped.
    assert len(seen["assistant"]) == 1
    item_id = seen["assistant"][0]["item"]
    sent = sent_audio(record, item_id)
    assert sent > 0.75 * seconds * RATE
    assert stats["items"][item_id] == {"receivedSamples": sent, "playedSamples": sent}
    assert abs(stats["samplesPlayed"] - sent) <= RATE // 50, (stats["samplesPlayed"], sent)
    assert stats["samplesReceived"] == sent
    assert stats["underruns"] == 0 and stats["droppedFrames"] == 0
    said = re.fullmatch(r"You said something for (\d+\.\d) seconds\.", seen["assistant"][0]["text"])
    assert said and abs(float(said[1]) - seconds) <= 0.051, seen["assistant"]
    assert seen["user"] and seen["user"][0]["text"].endswith("s of speech)")
