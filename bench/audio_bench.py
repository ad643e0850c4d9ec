"""Benchmark of app.audio.codecs: codec throughput, per-frame latency and sessions per core.

Run: ``python bench/audio_bench.py`` (about 30 s). Throughput is seconds of audio processed per CPU
second (``time.process_time``), on espeak-ng speech. PyAV's own Opus path is measured alongside as
the alternative that app.audio.codecs's ctypes binding to the system libopus was chosen over. PyAV
(FFmpeg, with its own libopus) is the reference codec here and in the tests only: it is in the dev
extra, not a dependency of the relay. The wheel's libopus may be a newer release than the
system's that the relay uses.
"""

from __future__ import annotations

import base64
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

try:
    import av
except ImportError:
    sys.exit("PyAV is needed for the reference codecs: pip install -e '.[dev]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.audio import codecs as audio

MIN_CPU_SECONDS = 1.0
TEXT = (
    "The quick brown fox jumps over the lazy dog. This relay carries audio between browsers and "
    "the realtime model, and it has to be fast enough for a hundred talking sessions per core."
)


def speech(rate: int, repeat: int = 4) -> np.ndarray:
    """espeak-ng speech at ``rate`` Hz, int16, repeated to a longer clip."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is needed: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(path), TEXT], check=True, timeout=60)
        with wave.open(str(path)) as w:
            source = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            source_rate = w.getframerate()
    return np.tile(soxr.resample(source, source_rate, rate, quality="VHQ"), repeat)


def throughput(run: Callable[[], object], audio_seconds: float) -> float:
    """Audio seconds per CPU second, repeating ``run`` until it used MIN_CPU_SECONDS of CPU."""
    run()  # Warm up (imports, caches, first-call costs).
    done, start = 0, time.process_time()
    while (used := time.process_time() - start) < MIN_CPU_SECONDS:
        run()
        done += 1
    return done * audio_seconds / used


def percentiles_us(samples_ns: list[int]) -> tuple[float, float]:
    """p50 and p99 of nanosecond timings, in microseconds."""
    q = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return q[49] / 1000, q[98] / 1000


def pyav_opus_packets(
    pcm: np.ndarray, rate: int, bitrate: int = 32000, level: int = 10
) -> list[bytes]:
    """Encode with PyAV's libopus into raw 20 ms packets, as a browser's WebCodecs would send."""
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format, enc.bit_rate = rate, "mono", "s16", bitrate
    enc.options = {"frame_duration": "20", "application": "voip", "compression_level": str(level)}
    enc.open()
    n = enc.frame_size
    packets: list[bytes] = []
    for i in range(0, len(pcm) - n + 1, n):
        frame = av.AudioFrame.from_ndarray(pcm[None, i : i + n].copy(), format="s16", layout="mono")
        frame.sample_rate, frame.pts = rate, i
        packets.extend(bytes(p) for p in enc.encode(frame))
    return packets


def row(name: str, value: float, unit: str = "x realtime") -> None:
    print(f"  {name:<52} {value:>9.0f} {unit}")


def main() -> None:
    if not audio.opus_available():
        sys.exit("libopus is needed: apt-get install libopus0")
    print(f"python {platform.python_version()}, PyAV {av.__version__}, soxr {soxr.__version__}")
    print(f"codecs use {audio.opus_version()}; CPU: {platform.processor() or platform.machine()}")
    pcm = {rate: speech(rate) for rate in (8000, 16000, 24000, 48000)}
    seconds = len(pcm[24000]) / 24000
    pcm24_bytes = pcm[24000].astype("<i2").tobytes()
    packets = {rate: pyav_opus_packets(pcm[rate], rate) for rate in (24000, 48000)}
    ulaw = audio.ulaw_encode(pcm[8000].astype("<i2").tobytes())
    print(f"clip: {seconds:.1f} s of speech; throughput = audio seconds per CPU second\n")

    def decode_all(codec: str, rate: int, frames: list[bytes]) -> Callable[[], object]:
        def run() -> object:
            decoder = audio.make_decoder(codec, rate)
            return [decoder.decode(f) for f in frames]

        return run

    def encode_all(complexity: int) -> Callable[[], object]:
        deltas = [pcm24_bytes[i : i + 4800] for i in range(0, len(pcm24_bytes), 4800)]  # 100 ms

        def run() -> object:
            encoder = audio.make_encoder("opus", 32000, complexity)
            return [encoder.encode(d) for d in deltas] + [encoder.flush()]

        return run

    def pyav_decode(frames: list[bytes]) -> Callable[[], object]:
        def run() -> object:
            dec = av.CodecContext.create("libopus", "r")
            dec.layout, dec.format = "mono", "s16"  # libopus via FFmpeg always outputs 48 kHz.
            rs = soxr.ResampleStream(48000, 24000, 1, dtype="int16")
            return [
                rs.resample_chunk(fr.to_ndarray()[0]).tobytes()
                for f in frames
                for fr in dec.decode(av.Packet(f))
            ]

        return run

    def chunks(rate: int, ms: int = 20) -> list[bytes]:
        data, n = pcm[rate].astype("<i2").tobytes(), rate * ms // 1000 * 2
        return [data[i : i + n] for i in range(0, len(data), n)]

    print("Opus decode (client -> upstream PCM16 24 kHz, 20 ms packets)")
    dec48 = throughput(decode_all("opus", 48000, packets[48000]), seconds)
    row("app.audio.codecs (ctypes libopus, native 24 kHz), 48k packets", dec48)
    row(
        "app.audio.codecs (ctypes libopus, native 24 kHz), 24k packets",
        throughput(decode_all("opus", 24000, packets[24000]), seconds),
    )
    row(
        "PyAV libopus (48 kHz out) + soxr 48->24, 48k packets",
        pyav48 := throughput(pyav_decode(packets[48000]), seconds),
    )

    print("Opus encode (upstream 24 kHz -> client), 32 kbps, 100 ms deltas -> 20 ms packets")
    enc = {c: throughput(encode_all(c), seconds) for c in (2, 5, 10)}
    row("app.audio.codecs complexity 2 (the relay's setting)", enc[2])
    row("app.audio.codecs complexity 5 (make_encoder's default)", enc[5])
    row("app.audio.codecs complexity 10", enc[10])
    pyav5 = throughput(lambda: pyav_opus_packets(pcm[24000], 24000, 32000, 5), seconds)
    row("PyAV libopus complexity 5 (AudioFrame per packet)", pyav5)

    print("PCM16 resampling (soxr ResampleStream HQ, 20 ms chunks)")
    row("48 kHz -> 24 kHz", throughput(decode_all("pcm16", 48000, chunks(48000)), seconds))
    row("16 kHz -> 24 kHz", throughput(decode_all("pcm16", 16000, chunks(16000)), seconds))

    print("G.711 (20 ms frames)")
    ulaw20 = [ulaw[i : i + 160] for i in range(0, len(ulaw), 160)]
    row(
        "µ-law 8 kHz -> PCM16 24 kHz (LUT + soxr)",
        throughput(decode_all("g711_ulaw", 8000, ulaw20), seconds),
    )
    row(
        "µ-law decode only, numpy LUT",
        throughput(lambda: [audio.ulaw_decode(f) for f in ulaw20], seconds),
    )

    def pyav_ulaw() -> object:
        ctx = av.CodecContext.create("pcm_mulaw", "r")
        ctx.sample_rate, ctx.layout = 8000, "mono"
        return [fr.to_ndarray() for f in ulaw20 for fr in ctx.decode(av.Packet(f))]

    row("µ-law decode only, PyAV pcm_mulaw", throughput(pyav_ulaw, seconds))
    pcm8_20 = chunks(8000)
    row(
        "µ-law encode, numpy LUT",
        throughput(lambda: [audio.ulaw_encode(f) for f in pcm8_20], seconds),
    )

    print("Per-20 ms-frame wall time (perf_counter), microseconds")
    decoder = audio.make_decoder("opus", 48000)
    encoder = audio.make_encoder("opus")
    frames20 = [pcm24_bytes[i : i + 960] for i in range(0, len(pcm24_bytes) - 959, 960)]
    dec_ns, enc_ns, glue_ns = [], [], []
    for _ in range(3):
        for packet, frame in zip(packets[48000], frames20, strict=False):
            t0 = time.perf_counter_ns()
            decoded = decoder.decode(packet)
            t1 = time.perf_counter_ns()
            (out,) = encoder.encode(frame)
            t2 = time.perf_counter_ns()
            # What the relay adds around them: base64 of the append, and of the delta it reads.
            base64.b64encode(decoded)
            base64.b64decode(base64.b64encode(frame))
            t3 = time.perf_counter_ns()
            dec_ns.append(t1 - t0)
            enc_ns.append(t2 - t1)
            glue_ns.append(t3 - t2)
    for name, ns in (
        ("Opus decode 48k packet -> PCM 24k", dec_ns),
        ("Opus encode 20 ms (complexity 5)", enc_ns),
        ("base64 glue (both directions)", glue_ns),
    ):
        p50, p99 = percentiles_us(ns)
        print(f"  {name:<52} p50 {p50:7.1f}   p99 {p99:7.1f}")

    # A talking session decodes 1 s and encodes 1 s of audio per second.
    print("Concurrent talking sessions per core, Opus both ways (codec work only)")
    row("app.audio.codecs, complexity 2 (the relay's)", 1 / (1 / dec48 + 1 / enc[2]), "sessions")
    row("app.audio.codecs, complexity 5", 1 / (1 / dec48 + 1 / enc[5]), "sessions")
    row("app.audio.codecs, complexity 10", 1 / (1 / dec48 + 1 / enc[10]), "sessions")
    row("PyAV CodecContext path, complexity 5", 1 / (1 / pyav48 + 1 / pyav5), "sessions")


if __name__ == "__main__":
    main()
