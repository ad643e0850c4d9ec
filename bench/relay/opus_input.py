"""The Opus packets the load generators send (encoded once, before the runs) and their bitrate."""

from __future__ import annotations

import shutil
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

from bench.relay.wire import ROOT

OPUS_RATE = 48_000
OPUS_BITRATE = 32_000
SPEECH = (
    "The quick brown fox jumps over the lazy dog. "
    "Please relay this sentence to the realtime model, then read back the answer."
)


def speech_pcm(tmp: Path) -> tuple[Any, str]:
    """A few seconds of speech as int16 48 kHz: espeak-ng if installed, else a voiced signal."""
    import numpy as np

    if shutil.which("espeak-ng") is not None:
        path = tmp / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-w", str(path), SPEECH], check=True, timeout=60, capture_output=True
        )
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        if rate != OPUS_RATE:
            import soxr

            pcm = soxr.resample(pcm, rate, OPUS_RATE).astype(np.int16)
        return pcm, f"espeak-ng speech, {len(pcm) / OPUS_RATE:.1f} s"
    # A 120 Hz harmonic voice with 4 Hz syllables and a pause every 1.5 s.
    t = np.arange(6 * OPUS_RATE) / OPUS_RATE
    voice = sum(np.sin(2 * np.pi * 120 * h * t) / h for h in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, 1) * (t % 1.5 < 1.2)
    pcm = (6000 * voice * envelope).astype(np.int16)
    return pcm, "synthetic voiced signal (espeak-ng not installed), 6.0 s"


def opus_packets(pcm: Any) -> list[bytes]:
    """Raw 20 ms Opus packets of int16 48 kHz mono at 32 kbps, as WebCodecs' AudioEncoder makes."""
    if str(ROOT) not in sys.path:  # the tests' reference encoder, when run from elsewhere
        sys.path.insert(0, str(ROOT))
    from tests.audio_tools import opus_packets as encode

    return encode(pcm, OPUS_RATE, OPUS_BITRATE)


def write_packets(path: Path, packets: list[bytes]) -> None:
    """Packets as a file the load generators read: each one after its 2-byte big-endian size."""
    path.write_bytes(b"".join(len(p).to_bytes(2, "big") + p for p in packets))


def read_packets(path: Path) -> list[bytes]:
    data, packets, i = path.read_bytes(), [], 0
    while i < len(data):
        size = int.from_bytes(data[i : i + 2], "big")
        packets.append(data[i + 2 : i + 2 + size])
        i += 2 + size
    return packets


def kbps(total_bytes: int, packets: int) -> float | None:
    """Mean bitrate of `packets` 20 ms packets holding `total_bytes` bytes."""
    return total_bytes * 8 / (packets * 0.02) / 1000 if packets else None
