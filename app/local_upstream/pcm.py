"""Audio helpers for the local upstream: G.711 codecs, 8 <-> 24 kHz resampling, RMS and tones.

Everything works on `bytes` in one of the three GA formats (REALTIME.md §11): `audio/pcm` (16-bit
little-endian, 24 kHz, mono), `audio/pcmu` and `audio/pcma` (G.711, 8 kHz). The code is pure Python
on purpose: the fake upstream must not depend on the relay's own codecs (`app/audio/codecs.py`),
which it is used to test. Quality is "good enough for a test double", not for listening.
"""

from __future__ import annotations

import math
import sys
from array import array

PCM = "audio/pcm"
PCMU = "audio/pcmu"
PCMA = "audio/pcma"
FORMATS = (PCM, PCMU, PCMA)

# Bytes per millisecond and sample rate of each format (REALTIME.md §11).
BYTES_PER_MS = {PCM: 48, PCMU: 8, PCMA: 8}
SAMPLE_RATE = {PCM: 24000, PCMU: 8000, PCMA: 8000}


def _ulaw_to_linear(byte: int) -> int:
    u = ~byte & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - t if u & 0x80 else t - 0x84


def _alaw_to_linear(byte: int) -> int:
    a = byte ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


def _search(value: int, ends: tuple[int, ...]) -> int:
    for segment, end in enumerate(ends):
        if value <= end:
            return segment
    return len(ends)


_ULAW_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_ALAW_ENDS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _linear_to_ulaw(sample: int) -> int:
    # Sun's reference g711.c, on 14-bit magnitudes.
    value = sample >> 2
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 0x21
    segment = _search(value, _ULAW_ENDS)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


def _linear_to_alaw(sample: int) -> int:
    # Sun's reference g711.c, on 13-bit magnitudes.
    value = sample >> 3
    mask = 0xD5
    if value < 0:
        value, mask = -value - 1, 0x55
    segment = _search(value, _ALAW_ENDS)
    if segment >= 8:
        return 0x7F ^ mask
    shift = 1 if segment < 2 else segment
    return ((segment << 4) | ((value >> shift) & 0x0F)) ^ mask


_DECODE = {
    PCMU: [_ulaw_to_linear(b) for b in range(256)],
    PCMA: [_alaw_to_linear(b) for b in range(256)],
}
_ENCODE = {PCMU: _linear_to_ulaw, PCMA: _linear_to_alaw}


def to_samples(data: bytes, fmt: str) -> array[int]:
    """Decode `data` in format `fmt` to signed 16-bit samples at the format's own rate."""
    if fmt in _DECODE:
        table = _DECODE[fmt]
        return array("h", (table[b] for b in data))
    samples = array("h", data[: len(data) - len(data) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def from_samples(samples: array[int], fmt: str) -> bytes:
    """Encode signed 16-bit samples (at the format's own rate) to format `fmt`."""
    if fmt in _ENCODE:
        encode = _ENCODE[fmt]
        return bytes(encode(s) for s in samples)
    out = array("h", samples)
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


def convert(data: bytes, src: str, dst: str) -> bytes:
    """Convert audio between two GA formats; same format is returned unchanged."""
    if src == dst:
        return bytes(data)
    samples = to_samples(data, src)
    src_rate, dst_rate = SAMPLE_RATE[src], SAMPLE_RATE[dst]
    if src_rate < dst_rate:  # 8 -> 24 kHz: sample-and-hold, crude but enough for a fake
        samples = array("h", (s for s in samples for _ in range(3)))
    elif src_rate > dst_rate:  # 24 -> 8 kHz: average each group of three
        samples = array("h", (sum(samples[i : i + 3]) // 3 for i in range(0, len(samples) - 2, 3)))
    return from_samples(samples, dst)


def rms(samples: array[int]) -> float:
    """Root mean square of a block of 16-bit samples (0.0 for an empty block)."""
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def tone(freq_hz: float, duration_ms: int, *, dbfs: float = -12.0, fmt: str = PCM) -> bytes:
    """A sine tone of `duration_ms` with peak level `dbfs`, encoded in `fmt`."""
    rate = SAMPLE_RATE[fmt]
    amplitude = 32767 * 10 ** (dbfs / 20)
    count = rate * duration_ms // 1000
    samples = array(
        "h", (round(amplitude * math.sin(2 * math.pi * freq_hz * i / rate)) for i in range(count))
    )
    return from_samples(samples, fmt)
