"""Tests for app.audio.codecs: real codecs on synthetic speech; the only stand-in is a libopus
search that finds nothing, for a server without libopus."""

from __future__ import annotations

import ctypes.util
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from app.audio import codecs
from app.audio.codecs import (
    FRAME_SAMPLES,
    AudioError,
    OpusUnavailableError,
    alaw_decode,
    alaw_encode,
    make_decoder,
    make_encoder,
    opus_available,
    opus_version,
    ulaw_decode,
    ulaw_encode,
)
from tests.audio_tools import envelope_r, opus_decode, opus_packets

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_libopus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as on a server without libopus: a fresh loader whose search finds nothing."""
    monkeypatch.setattr(codecs, "_LIBOPUS", codecs._LibOpus(names=("libopus-absent.so.0",)))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)


def _uneven_chunks(data: bytes, sample_bytes: int = 2) -> Iterator[bytes]:
    """Split bytes into whole samples of varied sizes: 1 sample, odd counts, 100 ms and more."""
    sizes = [1, 7, 333, 2400, 97, 4801, 1024, 13]
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)] * sample_bytes
        yield data[i : i + n]
        i, k = i + n, k + 1


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, err = ref.astype(np.float64), got.astype(np.float64) - ref.astype(np.float64)
    return float(10 * np.log10((ref64**2).sum() / (err**2).sum()))


@pytest.mark.parametrize("rate", [48000, 24000])
def test_opus_packets_decode_to_pcm24k(speech, rate):
    """Real Opus packets decode to 24 kHz PCM16 with the source's duration and envelope."""
    source = speech(rate)
    packets = opus_packets(source, rate)
    decoder = make_decoder("opus", rate, "pcm")
    out = b"".join(decoder.decode(p) for p in packets) + decoder.flush()
    pcm = np.frombuffer(out, "<i2")
    assert decoder.samples == len(pcm)
    assert abs(len(pcm) / 24000 - len(source) / rate) < 0.05 * len(source) / rate
    assert envelope_r(pcm, speech(24000), 24000) > 0.9


@pytest.mark.parametrize("rate", [48000, 16000, 24000])
def test_pcm_in_uneven_chunks_resamples_to_24k(speech, rate):
    """PCM16 fed in uneven chunks comes out at 24 kHz like a one-shot resample, exact in length."""
    source = speech(rate)
    decoder = make_decoder("pcm16", rate)
    out = b"".join(decoder.decode(c) for c in _uneven_chunks(source.tobytes())) + decoder.flush()
    pcm = np.frombuffer(out, "<i2")
    reference = soxr.resample(source, rate, 24000)
    assert abs(len(pcm) - len(source) * 24000 / rate) <= 4
    n = min(len(pcm), len(reference))
    assert np.corrcoef(pcm[:n].astype(float), reference[:n].astype(float))[0, 1] > 0.99
    assert envelope_r(pcm, reference, 24000, max_lag_ms=0) > 0.99


def test_opus_encoder_round_trips(speech):
    """Upstream deltas of any length become 20 ms Opus packets that decode back to the speech."""
    source = speech(24000)
    encoder = make_encoder("opus")
    packets: list[bytes] = []
    for chunk in _uneven_chunks(source.tobytes()):
        packets.extend(encoder.encode(chunk))
        assert encoder.pending < FRAME_SAMPLES
    packets.extend(encoder.flush())
    assert encoder.pending == 0
    assert encoder.samples == len(packets) * FRAME_SAMPLES
    assert 0 <= encoder.samples - len(source) < FRAME_SAMPLES
    decoded, counts = opus_decode(packets)
    assert set(counts[1:]) == {960}  # 20 ms at 48 kHz each (the first may lose pre-skip).
    pcm24 = soxr.resample(decoded, 48000, 24000)
    assert envelope_r(pcm24, source, 24000) > 0.9
    # Our own decoder reads our packets too.
    decoder = make_decoder("opus", 24000)
    ours = np.frombuffer(b"".join(decoder.decode(p) for p in packets), "<i2")
    assert len(ours) == encoder.samples
    assert envelope_r(ours, source, 24000) > 0.9


def test_opus_encoder_buffers_tail_and_resets():
    """A 110 ms delta yields five packets and keeps 10 ms; flush pads it; reset drops it."""
    encoder = make_encoder("opus", bitrate=24000, complexity=10)
    tone = (np.sin(np.arange(2640) * 2 * np.pi * 440 / 24000) * 8000).astype("<i2")
    assert len(encoder.encode(tone.tobytes())) == 5
    assert encoder.pending == 240
    assert len(encoder.flush()) == 1
    assert (encoder.pending, encoder.samples) == (0, 6 * FRAME_SAMPLES)
    assert encoder.flush() == []
    assert encoder.encode(tone[:300].tobytes()) == []
    encoder.reset()
    assert encoder.pending == 0
    assert encoder.flush() == []


def test_pcm16_output_passes_through():
    """PCM16 output returns each delta unchanged and counts its samples."""
    encoder = make_encoder("pcm16")
    delta = bytes(range(256)) * 10
    assert encoder.encode(delta) == [delta]
    assert encoder.encode(b"") == []
    assert (encoder.samples, encoder.flush()) == (1280, [])


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_g711_decode_matches_ffmpeg(law):
    """Our G.711 expansion tables equal FFmpeg's pcm_mulaw/pcm_alaw decoders for all 256 codes."""
    codes = bytes(range(256))
    ctx = av.CodecContext.create(f"pcm_{'mu' if law == 'ulaw' else 'a'}law", "r")
    ctx.sample_rate, ctx.layout = 8000, "mono"
    frames = ctx.decode(av.Packet(codes))
    theirs = np.concatenate([f.to_ndarray()[0] for f in frames]).astype("<i2").tobytes()
    ours = ulaw_decode(codes) if law == "ulaw" else alaw_decode(codes)
    assert ours == theirs


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_g711_round_trip_is_within_quantisation(speech, law):
    """G.711 encode+decode of speech keeps SNR > 30 dB and each error within half a step."""
    encode, decode = (ulaw_encode, ulaw_decode) if law == "ulaw" else (alaw_encode, alaw_decode)
    source = speech(8000).astype("<i2")
    got = np.frombuffer(decode(encode(source.tobytes())), "<i2")
    assert _snr_db(source, got) > 30
    # Every int16 maps to its nearest reconstruction value (the decision levels of G.711).
    ramp = np.arange(-32768, 32768, dtype=np.int32).astype("<i2")
    back = np.frombuffer(decode(encode(ramp.tobytes())), "<i2").astype(np.int32)
    levels = np.unique(np.frombuffer(decode(bytes(range(256))), "<i2")).astype(np.int32)
    nearest = np.abs(ramp.astype(np.int32)[:, None] - levels[None, :]).min(axis=1)
    assert np.array_equal(np.abs(back - ramp), nearest)


@pytest.mark.parametrize(("codec", "law"), [("g711_ulaw", "ulaw"), ("g711_alaw", "alaw")])
def test_g711_input_converts_to_pcm24k(speech, codec, law):
    """G.711 8 kHz input becomes PCM16 24 kHz with the right duration and content."""
    source = speech(8000).astype("<i2")
    wire = (ulaw_encode if law == "ulaw" else alaw_encode)(source.tobytes())
    decoder = make_decoder(codec, 8000, "pcm")
    out = b"".join(decoder.decode(c) for c in _uneven_chunks(wire, 1)) + decoder.flush()
    pcm = np.frombuffer(out, "<i2")
    assert abs(len(pcm) - 3 * len(source)) <= 4
    reference = soxr.resample(source, 8000, 24000)  # Same band: 8 kHz audio holds up to 4 kHz.
    n = min(len(pcm), len(reference))
    assert np.corrcoef(pcm[:n].astype(float), reference[:n].astype(float))[0, 1] > 0.99


def test_g711_passthrough_and_transcoding(speech):
    """G.711 passes through to a matching upstream, transcodes µ-law to A-law, and PCM to µ-law."""
    source = speech(8000).astype("<i2")
    ulaw = ulaw_encode(source.tobytes())
    assert make_decoder("g711_ulaw", 8000, "audio/pcmu").decode(ulaw) is ulaw  # GA name too.
    alaw = make_decoder("g711_ulaw", 8000, "pcma").decode(ulaw)
    assert len(alaw) == len(ulaw)
    assert _snr_db(source, np.frombuffer(alaw_decode(alaw), "<i2")) > 25
    to_ulaw = make_decoder("pcm16", 24000, "pcmu")
    pcm24 = speech(24000).astype("<i2").tobytes()
    out = b"".join(to_ulaw.decode(c) for c in _uneven_chunks(pcm24)) + to_ulaw.flush()
    assert abs(len(out) - len(source)) <= 4
    got = np.frombuffer(ulaw_decode(out), "<i2")
    n = min(len(got), len(source))
    assert np.corrcoef(got[:n].astype(float), source[:n].astype(float))[0, 1] > 0.99


def test_opus_to_g711_upstream(speech):
    """Opus input decodes straight to 8 kHz G.711 when the upstream session uses audio/pcmu."""
    source = speech(48000)
    decoder = make_decoder("opus", 48000, "pcmu")
    out = b"".join(decoder.decode(p) for p in opus_packets(source, 48000))
    pcm8 = np.frombuffer(ulaw_decode(out), "<i2")
    assert abs(len(pcm8) / 8000 - len(source) / 48000) < 0.05 * len(source) / 48000
    assert envelope_r(pcm8, speech(8000), 8000) > 0.9


@pytest.mark.parametrize("frame", [b"\x01", b"\x01\x02\x03"], ids=["one-byte", "three-bytes"])
def test_odd_length_pcm_is_refused(frame):
    """PCM16 frames of odd length raise AudioError, for input and for output."""
    with pytest.raises(AudioError, match="odd length"):
        make_decoder("pcm16", 16000).decode(frame)
    with pytest.raises(AudioError, match="odd length"):
        make_encoder("opus").encode(frame)
    with pytest.raises(AudioError):
        ulaw_encode(frame)


@pytest.mark.parametrize(
    "packet",
    [b"", b"\x03", b"\x03\x00", b"\xff\xff", b"\x00" * 1400],
    ids=["empty", "code3-no-count", "code3-zero-frames", "too-long", "oversized-frame"],
)
def test_invalid_opus_packet_is_refused(packet):
    """Structurally invalid Opus packets raise AudioError instead of decoding noise."""
    with pytest.raises(AudioError, match="Opus"):
        make_decoder("opus", 48000).decode(packet)


@pytest.mark.parametrize(
    ("codec", "rate"),
    [("pcm16", 4000), ("pcm16", 96000), ("opus", 44100), ("g711_ulaw", 16000), ("mp3", 24000)],
)
def test_unsupported_input_is_refused_at_connect(codec, rate):
    """Rates outside 8000–48000 Hz, odd Opus/G.711 rates and unknown codecs raise AudioError."""
    with pytest.raises(AudioError):
        make_decoder(codec, rate)


@pytest.mark.parametrize(
    "kwargs",
    [{"codec": "aac"}, {"codec": "opus", "bitrate": 1000}, {"codec": "opus", "complexity": 11}],
)
def test_unsupported_output_is_refused(kwargs):
    """Unknown output codecs and out-of-range Opus settings raise AudioError."""
    with pytest.raises(AudioError):
        make_encoder(**kwargs)


def test_bad_opus_packet_leaves_decoder_state_intact(speech):
    """After a bad packet, later good packets decode bit-exactly as if it had never arrived."""
    packets = opus_packets(speech(48000)[:48000], 48000)
    clean, hit = make_decoder("opus", 48000), make_decoder("opus", 48000)
    expected = [clean.decode(p) for p in packets]
    got = []
    for i, packet in enumerate(packets):
        if i % 10 == 5:
            with pytest.raises(AudioError):
                hit.decode(b"\x03\x00")
        got.append(hit.decode(packet))
    assert got == expected
    assert any(np.frombuffer(b"".join(got), "<i2") != 0)


def test_libopus_is_loaded_by_the_first_opus_codec_not_at_import():
    """Importing the codecs (and using PCM and G.711) maps no libopus; the first Opus codec does."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps (Linux) to see which libraries a process loaded")
    script = """
import sys

def libopus_loaded():
    with open("/proc/self/maps") as maps:
        return any("libopus" in line for line in maps)

import app.audio.codecs as codecs
codecs.make_decoder("pcm16", 48000).decode(bytes(960))
codecs.make_decoder("g711_ulaw", 8000).decode(bytes(160))
codecs.make_encoder("pcm16").encode(bytes(960))
print(libopus_loaded(), "av" in sys.modules)
codecs.make_encoder("opus").encode(bytes(960))
print(libopus_loaded(), "av" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False False", "True False"]


def test_opus_uses_the_system_libopus():
    """Opus codecs run on the system libopus, found by its soname."""
    assert opus_available()
    assert opus_version().startswith("libopus ")


def test_without_libopus_opus_is_refused_and_the_rest_works(no_libopus, caplog):
    """No libopus: Opus codecs raise an `AudioError` (logged once); PCM16 and G.711 still work."""
    caplog.set_level(logging.WARNING, logger=codecs.__name__)
    assert not opus_available()
    for _ in range(2):
        with pytest.raises(OpusUnavailableError, match="Opus is not available") as refused:
            make_decoder("opus", 48000)
        assert isinstance(refused.value, AudioError)
        with pytest.raises(OpusUnavailableError):
            make_encoder("opus")
    with pytest.raises(OpusUnavailableError):
        opus_version()
    (warning,) = [r.getMessage() for r in caplog.records if "libopus" in r.getMessage()]
    assert "libopus0" in warning
    assert make_decoder("pcm16", 24000).decode(bytes(960)) == bytes(960)
    assert make_decoder("g711_ulaw", 8000, "pcmu").decode(b"\xff" * 160) == b"\xff" * 160
    assert make_encoder("pcm16").encode(bytes(960)) == [bytes(960)]
