"""Binary audio through the relay: PCM at any rate, Opus both ways, G.711, and bad audio."""

from __future__ import annotations

import asyncio
import base64
import ctypes.util
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from app.audio import codecs
from app.audio.codecs import alaw_encode
from tests.audio_tools import envelope_r, opus_decode, opus_packets, resample
from tests.helpers import relay_settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

WAIT = 10.0
PTT = {"type": "session.update", "session": {"type": "realtime",
       "audio": {"input": {"turn_detection": None}}}}  # fmt: skip


async def events_until(ws, event_type: str) -> tuple[list[dict], list[bytes]]:
    """Receive until an event of `event_type`; return the JSON events and the binary frames."""
    events: list[dict] = []
    frames: list[bytes] = []
    async with asyncio.timeout(WAIT):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                frames.append(message)
                continue
            events.append(json.loads(message))
            if events[-1]["type"] == event_type:
                return events, frames


async def open_session(relay, query: str = ""):
    ws = await connect(f"{relay.ws_url}?{query}", max_size=None)
    await events_until(ws, "session.created")
    return ws


async def received_audio(upstream, size: int) -> bytes:
    """The upstream's input audio, once `size` bytes have arrived."""
    record = await upstream.wait_for_connection(1, timeout=WAIT)
    async with asyncio.timeout(WAIT):
        while True:
            if len(record.input_audio) >= size:
                return bytes(record.input_audio)
            await asyncio.sleep(0.02)


async def open_push_to_talk(relay, query: str = ""):
    """A session with server VAD off: the test commits and asks for answers itself."""
    ws = await open_session(relay, query)
    await ws.send(json.dumps(PTT))
    await events_until(ws, "session.updated")
    return ws


def frames_of(pcm: np.ndarray, samples: int) -> list[bytes]:
    data = pcm.astype("<i2").tobytes()
    step = samples * 2
    return [b"\x01" + data[i : i + step] for i in range(0, len(data), step)]


@pytest.fixture
async def relay(relay_factory, upstream):
    return await relay_factory(relay_settings(upstream.url))


async def test_opus_input_reaches_upstream_as_pcm24k(relay, upstream, speech):
    """Opus packets from a real encoder arrive upstream as PCM16 24 kHz matching the speech."""
    source = speech(48000)
    ws = await open_session(relay, "input_codec=opus&input_rate=48000")
    for packet in opus_packets(source, 48000):
        await ws.send(b"\x01" + packet)
    expected = len(speech(24000)) * 2
    got = np.frombuffer(await received_audio(upstream, int(expected * 0.95)), "<i2")
    await ws.close()
    assert abs(len(got) * 2 - expected) / expected < 0.05
    assert envelope_r(got, speech(24000), 24000) > 0.9


@pytest.mark.parametrize("rate", [48000, 16000, 8000])
async def test_pcm_at_any_rate_arrives_at_24k(relay, upstream, speech, rate):
    """PCM16 binary frames at 8-48 kHz are resampled to 24 kHz of the right duration."""
    ws = await open_session(relay, f"input_codec=pcm16&input_rate={rate}")
    for frame in frames_of(speech(rate), rate // 50):
        await ws.send(frame)
    expected = len(speech(24000)) * 2
    held = 2 * 24 * 50  # the resampler holds up to ~45 ms until a commit flushes it
    got = np.frombuffer(await received_audio(upstream, expected - held), "<i2")
    await ws.close()
    assert expected - held <= len(got) * 2 <= expected
    assert envelope_r(got, speech(24000), 24000) > 0.95


async def test_commit_flushes_the_resampler(relay, upstream, speech):
    """Push-to-talk: a commit sends what the resampler holds first, so no tail is cut off."""
    ws = await open_push_to_talk(relay, "input_codec=pcm16&input_rate=8000")
    for frame in frames_of(speech(8000), 160):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    await events_until(ws, "input_audio_buffer.committed")
    await ws.close()
    got = len(upstream.connections[0].input_audio) // 2
    assert abs(got - len(speech(8000)) * 3) <= 4


async def test_opus_output_decodes_to_the_upstream_audio(relay, upstream, speech):
    """With output_codec=opus, deltas come as 20 ms Opus frames matching the upstream's PCM."""
    ws = await open_push_to_talk(relay, "output_codec=opus&output_bitrate=32000")
    for frame in frames_of(speech(24000), 480):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    await ws.send(json.dumps({"type": "response.create"}))
    events, frames = await events_until(ws, "response.done")
    await ws.close()
    deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
    assert deltas and all(e["delta"] == "" and e["relay_audio"]["codec"] == "opus" for e in deltas)
    assert all(frame[0] == 0x02 for frame in frames)
    assert sum(e["relay_audio"]["frames"] for e in deltas) + 1 >= len(frames) >= len(deltas)
    sent = b"".join(
        base64.b64decode(e["delta"])
        for e in upstream.connections[0].sent
        if e["type"] == "response.output_audio.delta"
    )
    upstream_pcm = np.frombuffer(sent, "<i2")
    decoded, _ = opus_decode([frame[1:] for frame in frames])
    assert abs(len(decoded) / 2 - len(upstream_pcm)) < 480 * 2  # 48 kHz out vs 24 kHz in
    assert envelope_r(resample(decoded, 48000, 24000), upstream_pcm, 24000) > 0.9
    # 32 kbps is about a twelfth of PCM16 24 kHz.
    assert sum(len(f) for f in frames) < len(sent) / 8


async def test_g711_passes_through_both_ways(relay, upstream, speech):
    """G.711 µ-law in and out: the upstream session uses audio/pcmu and bytes pass unchanged."""
    ws = await open_push_to_talk(relay, "input_codec=g711_ulaw&output_codec=g711_ulaw")
    ulaw = bytes(range(256)) * 40  # 1.28 s of every code
    for i in range(0, len(ulaw), 160):
        await ws.send(b"\x01" + ulaw[i : i + 160])
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    await ws.send(json.dumps({"type": "response.create"}))
    events, frames = await events_until(ws, "response.done")
    await ws.close()
    record = upstream.connections[0]
    injected = record.events[0]["session"]["audio"]
    assert injected["input"]["format"] == {"type": "audio/pcmu"}
    assert injected["output"]["format"] == {"type": "audio/pcmu"}
    assert bytes(record.input_audio) == ulaw
    assert b"".join(frame[1:] for frame in frames) == ulaw  # the echo, unchanged


async def test_g711_input_converts_for_a_pcm_session(relay_factory, upstream, speech):
    """Without G.711 passthrough, A-law input reaches a PCM upstream session as 24 kHz PCM16."""
    settings = relay_settings(upstream.url, session={"g711_passthrough": False})
    relay = await relay_factory(settings)
    pcm8k = speech(8000)
    ws = await open_session(relay, "input_codec=g711_alaw")
    alaw = alaw_encode(pcm8k.astype("<i2").tobytes())
    for i in range(0, len(alaw), 160):
        await ws.send(b"\x01" + alaw[i : i + 160])
    expected = len(pcm8k) * 3 * 2
    got = np.frombuffer(await received_audio(upstream, expected - 2 * 24 * 50), "<i2")
    await ws.close()
    assert envelope_r(got, speech(24000), 24000) > 0.95


@pytest.mark.parametrize(
    ("query", "frame"),
    [
        ("input_codec=pcm16", b"\x01" + bytes(3)),  # odd length
        ("input_codec=pcm16", b"\x07" + bytes(960)),  # unknown type byte
        ("input_codec=pcm16", b""),  # empty frame
        ("input_codec=opus&input_rate=48000", b"\x01"),  # empty Opus packet
        ("input_codec=opus&input_rate=48000", b"\x01\xff\xff\xff"),  # malformed Opus packet
    ],
)
async def test_bad_audio_is_refused_and_nothing_is_lost(relay, upstream, speech, query, frame):
    """Bad audio gets `invalid_audio`; audio before and after it all reaches the upstream."""
    ws = await open_session(relay, query)
    if "opus" in query:
        good = [b"\x01" + p for p in opus_packets(speech(48000)[:48000], 48000)]
    else:
        good = frames_of(speech(24000)[:24000], 480)
    half = len(good) // 2
    for f in good[:half]:
        await ws.send(f)
    await ws.send(frame)
    events, _ = await events_until(ws, "error")
    assert events[-1]["error"]["code"] == "invalid_audio"
    for f in good[half:]:
        await ws.send(f)
    got = await received_audio(upstream, 2 * 24000 - 2 * 480)
    await ws.close()
    if "opus" not in query:
        assert got == b"".join(f[1:] for f in good)


async def test_bad_codec_parameters_fall_back_to_defaults(relay, upstream):
    """An out-of-range rate is reported as `invalid_audio` and the session goes on."""
    async with connect(f"{relay.ws_url}?input_codec=pcm16&input_rate=96000") as ws:
        events, _ = await events_until(ws, "error")
        assert events[-1]["error"]["code"] == "invalid_audio"
        await events_until(ws, "session.created")
        await ws.send(b"\x01" + bytes(960))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        await events_until(ws, "input_audio_buffer.cleared")
    assert len(upstream.connections[0].input_audio) == 960


@pytest.fixture
def no_libopus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay as on a server without libopus: a fresh loader whose search finds nothing."""
    monkeypatch.setattr(codecs, "_LIBOPUS", codecs._LibOpus(names=("libopus-absent.so.0",)))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)


@pytest.mark.parametrize(
    ("query", "param"),
    [("input_codec=opus&input_rate=48000", "input_codec"), ("output_codec=opus", "output_codec")],
)
async def test_opus_without_libopus_is_refused_and_the_session_goes_on(
    relay, upstream, no_libopus, query, param
):
    """No libopus: asking for Opus gets `invalid_audio` naming the parameter; PCM16 goes on."""
    async with connect(f"{relay.ws_url}?{query}") as ws:
        events, _ = await events_until(ws, "error")
        error = events[-1]["error"]
        assert (error["code"], error["param"]) == ("invalid_audio", param)
        assert "Opus is not available" in error["message"]
        await events_until(ws, "session.created")
        await ws.send(b"\x01" + bytes(960))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        await events_until(ws, "input_audio_buffer.cleared")
    assert len(upstream.connections[0].input_audio) == 960
