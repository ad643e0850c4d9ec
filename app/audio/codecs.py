"""Audio codecs and resampling over bytes for the relay: no I/O, no asyncio.

Upstream speaks PCM16 24 kHz mono little-endian, or G.711 µ-law/A-law 8 kHz (REALTIME.md §11).
Clients declare their codecs at connect. One :class:`Decoder` (client → upstream) and one
:class:`Encoder` (upstream → client) are built per session and carry state across frames: the
resampler is a streaming ``soxr.ResampleStream`` so chunk boundaries cause no clicks, and the Opus
encoder keeps the tail shorter than one 20 ms packet for the next delta.

Opus goes through the system's libopus (Debian: ``libopus0``) via ctypes, not through PyAV's
``CodecContext``. PyAV's libopus decoder always outputs 48 kHz, which then needs a resampler;
libopus decodes natively at 24 kHz (or 8 kHz) and the ctypes path skips PyAV's per-packet
``Packet``/``AudioFrame`` objects (``bench/audio_bench.py`` compares the two). PyAV (with its
bundled FFmpeg) stays a test and benchmark dependency only. libopus is loaded when the first
Opus codec is built, not at import, so the relay starts and serves PCM and G.711 without it; a
session that asks for Opus then gets :class:`OpusUnavailableError`, an :class:`AudioError`.

G.711 uses numpy lookup tables: a 256-entry decode table and a 65536-entry encode table mapping
each int16 to the code whose reconstruction value is nearest (what G.711's decision levels do).

Every failure caused by client audio raises :class:`AudioError` before any state changes, so the
relay can answer with an ``invalid_audio`` error event and keep the session.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from enum import StrEnum
from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

__all__ = [
    "FRAME_SAMPLES",
    "UPSTREAM_RATE",
    "AudioError",
    "Decoder",
    "Encoder",
    "InputCodec",
    "OpusUnavailableError",
    "OutputCodec",
    "UpstreamFormat",
    "alaw_decode",
    "alaw_encode",
    "make_decoder",
    "make_encoder",
    "opus_available",
    "opus_version",
    "ulaw_decode",
    "ulaw_encode",
]

UPSTREAM_RATE: Final = 24_000
"""Sample rate of upstream PCM16 (``audio/pcm``), in Hz."""
G711_RATE: Final = 8_000
MIN_RATE: Final = 8_000
MAX_RATE: Final = 48_000
OPUS_RATES: Final = frozenset({8_000, 12_000, 16_000, 24_000, 48_000})
FRAME_SAMPLES: Final = UPSTREAM_RATE // 50
"""Samples in one 20 ms Opus packet produced by :class:`Encoder` (at 24 kHz)."""
RESAMPLE_QUALITY: Final = "HQ"

_MAX_OPUS_PACKET: Final = 1275 * 3 + 7  # RFC 6716 §3.2.5: longest legal code-3 packet, 120 ms.
_MAX_OPUS_MS: Final = 120

Int16Array = npt.NDArray[np.int16]

logger = logging.getLogger(__name__)


class AudioError(ValueError):
    """Client audio that cannot be decoded; the message is safe to show the client.

    The relay turns it into an ``error`` event with code ``invalid_audio`` and keeps the session.
    Raised before any codec or resampler state changes, so audio buffered earlier is not lost.
    """


class OpusUnavailableError(AudioError):
    """Opus was asked for and libopus is not installed on this server.

    An :class:`AudioError` like any other unsupported codec: the relay refuses the session's
    codecs with ``invalid_audio`` and goes on with the defaults (PCM16 in, JSON out).
    """


class InputCodec(StrEnum):
    """Codec a client declares for the audio it sends."""

    PCM16 = "pcm16"
    OPUS = "opus"
    G711_ULAW = "g711_ulaw"
    G711_ALAW = "g711_alaw"


class OutputCodec(StrEnum):
    """Codec a client asks for the audio it receives."""

    PCM16 = "pcm16"
    OPUS = "opus"


class UpstreamFormat(StrEnum):
    """Upstream session audio format: GA ``audio/pcm`` (24 kHz), ``audio/pcmu``, ``audio/pcma``."""

    PCM = "pcm"
    PCMU = "pcmu"
    PCMA = "pcma"


# --- G.711 -------------------------------------------------------------------------------------


def _ulaw_table() -> Int16Array:
    # ITU-T G.711 µ-law expansion, as in the reference g711.c: codes are stored inverted.
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_table() -> Int16Array:
    # ITU-T G.711 A-law expansion: even bits are inverted (XOR 0x55).
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    m = (a & 0x0F) << 4
    high = (m + 0x108) << np.maximum(seg - 1, 0)
    t = np.where(seg == 0, m + 8, np.where(seg == 1, m + 0x108, high))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _encode_table(decode: Int16Array) -> npt.NDArray[np.uint8]:
    """Map every int16 (indexed by its uint16 bit pattern) to the nearest code."""
    # On ties prefer the positive code (sign bit set in both laws): µ-law's two zeros give 0xFF,
    # and 0, halfway between A-law's ±8, gives 0xD5 (+8), as G.711 encoders do.
    order = np.lexsort((-(np.arange(256) & 0x80), decode))
    values = decode[order].astype(np.int32)
    codes = order.astype(np.uint8)
    keep = np.concatenate(([True], np.diff(values) != 0))
    values, codes = values[keep], codes[keep]
    pcm = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32)
    mid = (values[:-1] + values[1:]) / 2
    return codes[np.searchsorted(mid, pcm, side="right")]


_ULAW_DEC: Final = _ulaw_table()
_ALAW_DEC: Final = _alaw_table()
_ULAW_ENC: Final = _encode_table(_ULAW_DEC)
_ALAW_ENC: Final = _encode_table(_ALAW_DEC)


def ulaw_decode(data: bytes) -> bytes:
    """Decode G.711 µ-law bytes to PCM16 little-endian at the same rate."""
    return _ULAW_DEC[np.frombuffer(data, np.uint8)].astype("<i2", copy=False).tobytes()


def alaw_decode(data: bytes) -> bytes:
    """Decode G.711 A-law bytes to PCM16 little-endian at the same rate."""
    return _ALAW_DEC[np.frombuffer(data, np.uint8)].astype("<i2", copy=False).tobytes()


def ulaw_encode(pcm: bytes) -> bytes:
    """Encode PCM16 little-endian to G.711 µ-law, one byte per sample.

    Raises:
        AudioError: If ``pcm`` has an odd number of bytes.
    """
    return _ULAW_ENC[_pcm_array(pcm).view(np.uint16)].tobytes()


def alaw_encode(pcm: bytes) -> bytes:
    """Encode PCM16 little-endian to G.711 A-law, one byte per sample.

    Raises:
        AudioError: If ``pcm`` has an odd number of bytes.
    """
    return _ALAW_ENC[_pcm_array(pcm).view(np.uint16)].tobytes()


def _pcm_array(pcm: bytes) -> Int16Array:
    if len(pcm) % 2:
        raise AudioError(f"PCM16 frame has an odd length ({len(pcm)} bytes)")
    return np.frombuffer(pcm, "<i2")


# --- libopus via ctypes --------------------------------------------------------------------------

_OPUS_APPLICATION_VOIP: Final = 2048
_OPUS_SET_BITRATE: Final = 4002
_OPUS_SET_COMPLEXITY: Final = 4010
_OPUS_RESET_STATE: Final = 4028
_OPUS_SET_SIGNAL: Final = 4024
_OPUS_SIGNAL_VOICE: Final = 3001


# Names the dynamic loader finds on its own search path (Linux, macOS, Windows), tried before
# ctypes.util.find_library, which on Linux runs `ldconfig -p` in a subprocess.
_LIBOPUS_NAMES: Final = ("libopus.so.0", "libopus.0.dylib", "opus.dll")


def _bind_opus(lib: ctypes.CDLL) -> ctypes.CDLL:
    c_int, c_int32, ptr = ctypes.c_int, ctypes.c_int32, ctypes.c_void_p
    lib.opus_get_version_string.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes, lib.opus_strerror.restype = [c_int], ctypes.c_char_p
    lib.opus_decoder_get_size.argtypes = [c_int]
    lib.opus_decoder_init.argtypes = [ptr, c_int32, c_int]
    lib.opus_decode.argtypes = [ptr, ctypes.c_char_p, c_int32, ptr, c_int, c_int]
    lib.opus_encoder_get_size.argtypes = [c_int]
    lib.opus_encoder_init.argtypes = [ptr, c_int32, c_int, c_int]
    lib.opus_encode.argtypes = [ptr, ctypes.c_char_p, c_int, ptr, c_int32]
    # The ctl functions are variadic: declare only the fixed arguments so ctypes passes the rest
    # with the variadic convention (it differs from fixed arguments on macOS arm64).
    lib.opus_encoder_ctl.argtypes = [ptr, c_int]
    return lib


class _LibOpus:
    """The system libopus, loaded by the first Opus codec built and kept for the process.

    A failed load is remembered too, so sessions asking for Opus on a server without libopus are
    refused without searching again (and the warning is logged once).
    """

    __slots__ = ("_lib", "_missing", "_names")

    def __init__(self, names: tuple[str, ...] = _LIBOPUS_NAMES) -> None:
        self._names = names
        self._lib: ctypes.CDLL | None = None
        self._missing = False

    def get(self) -> ctypes.CDLL:
        """Return the loaded library.

        Raises:
            OpusUnavailableError: If libopus is not installed.
        """
        if self._lib is not None:
            return self._lib
        if not self._missing:
            self._lib = self._load()
            if self._lib is not None:
                return self._lib
            self._missing = True
            logger.warning(
                "libopus not found (Debian: apt-get install libopus0): sessions that ask for "
                "Opus are refused with invalid_audio"
            )
        raise OpusUnavailableError("Opus is not available on this server; use pcm16")

    def _load(self) -> ctypes.CDLL | None:
        for name in self._candidates():
            try:
                lib = ctypes.CDLL(name)
                lib.opus_decoder_get_size  # noqa: B018 -- probe: a foreign library lacks it
            except (OSError, AttributeError):
                continue
            return _bind_opus(lib)
        return None

    def _candidates(self) -> Iterator[str]:
        yield from self._names
        found = ctypes.util.find_library("opus")  # e.g. Homebrew's, off dlopen's default path
        if found is not None:
            yield found


_LIBOPUS: Final = _LibOpus()


def opus_available() -> bool:
    """Whether Opus codecs can be built here (loads libopus on first call)."""
    try:
        _LIBOPUS.get()
    except OpusUnavailableError:
        return False
    return True


def opus_version() -> str:
    """Return the libopus version string in use, e.g. ``"libopus 1.3.1"``.

    Raises:
        OpusUnavailableError: If libopus is not installed.
    """
    version: bytes = _LIBOPUS.get().opus_get_version_string()
    return version.decode()


def _opus_error(lib: ctypes.CDLL, code: int) -> str:
    message: bytes = lib.opus_strerror(code)
    return message.decode()


class _OpusDecoder:
    """libopus decoder state in a Python-owned buffer (nothing to free)."""

    __slots__ = ("_lib", "_max", "_out", "_state")

    def __init__(self, rate: int) -> None:
        self._lib = lib = _LIBOPUS.get()
        # create_string_buffer memory is malloc-aligned, as libopus' own opus_decoder_create's is.
        self._state = ctypes.create_string_buffer(lib.opus_decoder_get_size(1))
        err = lib.opus_decoder_init(self._state, rate, 1)
        if err:
            raise RuntimeError(f"opus_decoder_init: {_opus_error(lib, err)}")
        self._max = rate * _MAX_OPUS_MS // 1000
        self._out = ctypes.create_string_buffer(self._max * 2)

    def decode(self, packet: bytes) -> bytes:
        # An empty packet would ask libopus for loss concealment, not decode anything.
        if not packet or len(packet) > _MAX_OPUS_PACKET:
            raise AudioError(f"invalid Opus packet ({len(packet)} bytes)")
        # libopus parses the whole packet before touching the state, so a bad packet leaves the
        # decoder as it was and the next good packet decodes exactly as if it never came.
        n = self._lib.opus_decode(self._state, packet, len(packet), self._out, self._max, 0)
        if n < 0:
            raise AudioError(f"invalid Opus packet: {_opus_error(self._lib, n)}")
        return ctypes.string_at(self._out, n * 2)


class _OpusEncoder:
    __slots__ = ("_lib", "_out", "_state")

    def __init__(self, bitrate: int, complexity: int) -> None:
        self._lib = lib = _LIBOPUS.get()
        self._state = ctypes.create_string_buffer(lib.opus_encoder_get_size(1))
        err = lib.opus_encoder_init(self._state, UPSTREAM_RATE, 1, _OPUS_APPLICATION_VOIP)
        for request, value in (
            (_OPUS_SET_BITRATE, bitrate),
            (_OPUS_SET_COMPLEXITY, complexity),
            (_OPUS_SET_SIGNAL, _OPUS_SIGNAL_VOICE),
        ):
            err = err or lib.opus_encoder_ctl(self._state, request, ctypes.c_int32(value))
        if err:
            raise ValueError(f"Opus encoder settings refused: {_opus_error(lib, err)}")
        self._out = ctypes.create_string_buffer(_MAX_OPUS_PACKET)

    def encode(self, frame: bytes) -> bytes:
        n = self._lib.opus_encode(self._state, frame, FRAME_SAMPLES, self._out, _MAX_OPUS_PACKET)
        if n < 0:
            raise RuntimeError(f"opus_encode: {_opus_error(self._lib, n)}")
        return ctypes.string_at(self._out, n)

    def reset(self) -> None:
        self._lib.opus_encoder_ctl(self._state, _OPUS_RESET_STATE)


# --- sessions ------------------------------------------------------------------------------------


def _target_rate(target: UpstreamFormat) -> int:
    return UPSTREAM_RATE if target is UpstreamFormat.PCM else G711_RATE


class Decoder:
    """Per-session stream from a client's input codec to the upstream audio format.

    Build it with :func:`make_decoder`. Not thread-safe; one per session.

    Attributes:
        codec: The client's input codec.
        rate: The client's sample rate in Hz.
        target: The upstream format produced by :meth:`decode`.
        samples: Samples produced so far, at the target rate (24 kHz or 8 kHz).
    """

    __slots__ = (
        "_enc",
        "_opus",
        "_passthrough",
        "_resampler",
        "codec",
        "rate",
        "samples",
        "target",
    )

    def __init__(self, codec: InputCodec, rate: int, target: UpstreamFormat) -> None:
        self.codec, self.rate, self.target = codec, rate, target
        self.samples = 0
        out_rate = _target_rate(target)
        # Opus decodes natively at the target rate, so only PCM and G.711 need resampling.
        in_rate = out_rate if codec is InputCodec.OPUS else rate
        self._opus = _OpusDecoder(out_rate) if codec is InputCodec.OPUS else None
        self._resampler = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=RESAMPLE_QUALITY)
        )
        self._passthrough = (codec, target) in {
            (InputCodec.G711_ULAW, UpstreamFormat.PCMU),
            (InputCodec.G711_ALAW, UpstreamFormat.PCMA),
        }
        self._enc = {
            UpstreamFormat.PCMU: _ULAW_ENC,
            UpstreamFormat.PCMA: _ALAW_ENC,
        }.get(target)

    def decode(self, frame: bytes) -> bytes:
        """Convert one client frame to upstream audio.

        Args:
            frame: PCM16 little-endian bytes at the declared rate, one raw Opus packet, or G.711
                bytes, per the session's input codec.

        Returns:
            Upstream audio: PCM16 24 kHz little-endian mono, or G.711 8 kHz bytes. May be shorter
            or longer than the input's duration (the resampler holds a few ms) or empty.

        Raises:
            AudioError: If the frame cannot be decoded; the decoder state is left unchanged.
        """
        if self._passthrough:
            self.samples += len(frame)
            return frame
        codec = self.codec
        if codec is InputCodec.PCM16:
            pcm = _pcm_array(frame)
            if self._resampler is None and self._enc is None:
                self.samples += len(pcm)
                return frame
        elif self._opus is not None:
            decoded = self._opus.decode(frame)
            if self._enc is None:  # Decoded at the target rate already.
                self.samples += len(decoded) // 2
                return decoded
            pcm = np.frombuffer(decoded, "<i2")
        elif codec is InputCodec.G711_ULAW:
            pcm = _ULAW_DEC[np.frombuffer(frame, np.uint8)]
        else:
            pcm = _ALAW_DEC[np.frombuffer(frame, np.uint8)]
        return self._emit(pcm)

    def flush(self) -> bytes:
        """Return the audio the resampler still holds, at the end of the client's stream.

        The decoder can be reused afterwards; the resampler starts over.
        """
        if self._resampler is None:
            return b""
        out = self._emit(np.zeros(0, np.int16), last=True)
        self._resampler.clear()
        return out

    def _emit(self, pcm: Int16Array, last: bool = False) -> bytes:
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm, last=last)
        self.samples += len(pcm)
        if self._enc is not None:
            return self._enc[pcm.view(np.uint16)].tobytes()
        return pcm.astype("<i2", copy=False).tobytes()


def make_decoder(
    codec: InputCodec | str, rate: int, target: UpstreamFormat | str = UpstreamFormat.PCM
) -> Decoder:
    """Build the per-session input decoder, once at connect.

    Args:
        codec: The client's input codec (``pcm16``, ``opus``, ``g711_ulaw``, ``g711_alaw``).
        rate: The client's sample rate in Hz: 8000–48000 for ``pcm16``; the WebCodecs encoder's
            rate for ``opus`` (8000, 12000, 16000, 24000 or 48000; Opus packets decode at any
            rate, so it is only checked); 8000 for G.711.
        target: The upstream session's input format: ``pcm`` (24 kHz), ``pcmu`` or ``pcma``; the
            GA names ``audio/pcm``, ``audio/pcmu`` and ``audio/pcma`` are accepted too.

    Returns:
        A :class:`Decoder` whose ``decode`` yields audio in the target format.

    Raises:
        AudioError: If the codec, rate or target is not supported.
        OpusUnavailableError: If ``codec`` is ``opus`` and libopus is not installed.
    """
    try:
        codec = InputCodec(codec)
        target = UpstreamFormat(str(target).removeprefix("audio/"))
    except ValueError:
        raise AudioError(
            f"unsupported audio codec or format: {codec!s:.32}/{target!s:.32}"
        ) from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is outside {MIN_RATE}–{MAX_RATE} Hz")
    if codec is InputCodec.OPUS and rate not in OPUS_RATES:
        raise AudioError(f"Opus sample rate must be one of {sorted(OPUS_RATES)}, not {rate}")
    if codec in (InputCodec.G711_ULAW, InputCodec.G711_ALAW) and rate != G711_RATE:
        raise AudioError(f"G.711 audio is {G711_RATE} Hz, not {rate}")
    return Decoder(codec, rate, target)


class Encoder:
    """Per-session stream from upstream PCM16 24 kHz to the client's output codec.

    Build it with :func:`make_encoder`. For Opus, each :meth:`encode` call returns whole 20 ms
    packets and keeps the remainder (< 20 ms) for the next call; :meth:`flush` pads and emits it at
    the end of a response. For PCM16 the audio passes through unchanged.

    Attributes:
        codec: The client's output codec.
        samples: 24 kHz samples sent so far in returned chunks or packets, padding included. The
            relay can derive what the listener may have heard (``audio_end_ms``) from it.
    """

    __slots__ = ("_opus", "_tail", "codec", "samples")

    def __init__(self, codec: OutputCodec, bitrate: int, complexity: int) -> None:
        self.codec = codec
        self.samples = 0
        self._tail = b""
        self._opus = _OpusEncoder(bitrate, complexity) if codec is OutputCodec.OPUS else None

    @property
    def pending(self) -> int:
        """24 kHz samples buffered for the next packet (always < ``FRAME_SAMPLES``)."""
        return len(self._tail) // 2

    def encode(self, pcm24k: bytes) -> list[bytes]:
        """Encode upstream audio (one ``response.output_audio.delta``, decoded from base64).

        Args:
            pcm24k: PCM16 24 kHz little-endian mono, any length.

        Returns:
            Opus packets of 20 ms each (possibly none), or ``[pcm24k]`` for PCM16 output.

        Raises:
            AudioError: If ``pcm24k`` has an odd number of bytes.
        """
        if len(pcm24k) % 2:
            raise AudioError(f"PCM16 frame has an odd length ({len(pcm24k)} bytes)")
        if self._opus is None:
            self.samples += len(pcm24k) // 2
            return [pcm24k] if pcm24k else []
        data = self._tail + pcm24k if self._tail else pcm24k
        step = FRAME_SAMPLES * 2
        end = len(data) - len(data) % step
        encode = self._opus.encode
        packets = [encode(data[i : i + step]) for i in range(0, end, step)]
        self._tail = data[end:]
        self.samples += end // 2
        return packets

    def flush(self) -> list[bytes]:
        """Pad the buffered tail with silence to 20 ms and return it as a packet (if any)."""
        if not self._tail or self._opus is None:
            return []
        return self.encode(b"\0" * (FRAME_SAMPLES * 2 - len(self._tail)))

    def reset(self) -> None:
        """Drop the buffered tail and the encoder's history, on interruption (barge-in)."""
        self._tail = b""
        if self._opus is not None:
            self._opus.reset()


def make_encoder(codec: OutputCodec | str, bitrate: int = 32_000, complexity: int = 5) -> Encoder:
    """Build the per-session output encoder, once at connect.

    Args:
        codec: The client's output codec, ``opus`` or ``pcm16``.
        bitrate: Opus bitrate in bits/s, 6000–510000.
        complexity: Opus encoder complexity, 0–10 (``bench/audio_bench.py`` compares them).

    Returns:
        An :class:`Encoder`.

    Raises:
        AudioError: If the codec or a setting is not supported.
        OpusUnavailableError: If ``codec`` is ``opus`` and libopus is not installed.
    """
    try:
        codec = OutputCodec(codec)
    except ValueError:
        raise AudioError(f"unsupported output codec: {codec!s:.32}") from None
    if not 6_000 <= bitrate <= 510_000:
        raise AudioError(f"Opus bitrate {bitrate} is outside 6000–510000 bits/s")
    if not 0 <= complexity <= 10:
        raise AudioError(f"Opus complexity {complexity} is outside 0–10")
    return Encoder(codec, bitrate, complexity)
