"""Audio helpers for tests: speech from espeak-ng, reference Opus (PyAV) and envelope checks."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import soxr

TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Please relay this sentence to the realtime model, then read back the answer."
)


def opus_packets(pcm: np.ndarray, rate: int, bitrate: int = 32000) -> list[bytes]:
    """Encode int16 mono with PyAV's libopus into raw 20 ms packets, as WebCodecs sends them."""
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format, enc.bit_rate = rate, "mono", "s16", bitrate
    enc.options = {"frame_duration": "20", "application": "voip"}
    enc.open()
    n = enc.frame_size
    assert n == rate // 50
    padded = np.concatenate([pcm, np.zeros(-len(pcm) % n, np.int16)])
    packets: list[bytes] = []
    for i in range(0, len(padded), n):
        frame = av.AudioFrame.from_ndarray(
            padded[None, i : i + n].copy(), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = rate, i
        packets.extend(bytes(p) for p in enc.encode(frame))
    packets.extend(bytes(p) for p in enc.encode(None))
    return packets


def opus_decode(packets: list[bytes]) -> tuple[np.ndarray, list[int]]:
    """Decode raw Opus packets with PyAV (48 kHz); return samples and per-packet sample counts."""
    dec = av.CodecContext.create("libopus", "r")
    dec.layout, dec.format = "mono", "s16"
    chunks: list[np.ndarray] = []
    counts: list[int] = []
    for packet in packets:
        frames = dec.decode(av.Packet(packet))
        counts.append(sum(f.samples for f in frames))
        chunks.extend(f.to_ndarray()[0] for f in frames)
    return np.concatenate(chunks), counts


def envelope(x: np.ndarray, rate: int) -> np.ndarray:
    """RMS over consecutive 20 ms windows."""
    n = rate // 50
    x = x[: len(x) - len(x) % n].astype(np.float64)
    return np.sqrt((x.reshape(-1, n) ** 2).mean(axis=1))


def envelope_r(got: np.ndarray, ref: np.ndarray, rate: int, max_lag_ms: int = 40) -> float:
    """Best Pearson r of 20 ms RMS envelopes over lags (1 ms steps) that absorb codec delay."""
    best = -1.0
    step = rate // 1000
    for lag in range(0, max_lag_ms * step + 1, step):
        a, b = got[lag:], ref
        n = min(len(a), len(b))
        ea, eb = envelope(a[:n], rate), envelope(b[:n], rate)
        best = max(best, float(np.corrcoef(ea, eb)[0, 1]))
    return best


def speech_wav(path: Path, text: str = TEXT) -> tuple[np.ndarray, int]:
    """Speak `text` with espeak-ng into `path`; return the int16 samples and their rate."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is missing: run scripts/bootstrap.sh test (it installs it)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=60)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()


def resample(pcm: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    return soxr.resample(pcm, source_rate, rate, quality="VHQ")


# A voice and pace the local upstream's recognizer (PocketSphinx) hears right: "hello world" in
# espeak-ng's default voice reads as "let oil".
RECOGNIZABLE_VOICE = ("-v", "en-us+m3", "-s", "150")


def spoken_pcm(path: Path, text: str) -> bytes:
    """PCM16 24 kHz mono: 0.3 s of silence, `text` spoken in `RECOGNIZABLE_VOICE`, 1 s of
    silence (the end of a turn for server VAD). `path` receives espeak-ng's WAV."""
    command = ["espeak-ng", *RECOGNIZABLE_VOICE, "-w", str(path), text]
    subprocess.run(command, check=True, timeout=60)
    with wave.open(str(path)) as w:
        samples, rate = np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()
    speech = resample(samples, rate, 24000).astype("<i2").tobytes()
    return bytes(24 * 2 * 300) + speech + bytes(24 * 2 * 1000)
