"""The client wire format beyond Realtime JSON: codec negotiation and binary audio frames.

Text frames are Realtime JSON events both ways. Binary frames carry audio behind a one-byte type:

    0x01  client -> relay   one input frame: PCM16 LE mono at `input_rate`, one raw Opus packet,
                            or G.711 bytes, per `input_codec`
    0x02  relay -> client   one output frame: PCM16 LE 24 kHz mono, one 20 ms Opus packet, or
                            G.711 bytes, per `output_codec`

The codecs are declared with query parameters at connect (`/ws?input_codec=opus&input_rate=48000
&output_codec=opus&output_bitrate=32000`). With the default `output_codec=json` the relay sends
plain Realtime events, so unmodified SDKs work. With a binary output codec, each
`response.output_audio.delta` arrives as the JSON event with `delta` emptied and a `relay_audio`
object (`codec`, `samples` at 24 kHz (or 8 kHz for G.711), `frames`), followed by its frames.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from app.audio.codecs import (
    FRAME_SAMPLES,
    AudioError,
    Decoder,
    Encoder,
    OpusUnavailableError,
    OutputCodec,
    make_decoder,
    make_encoder,
)
from app.errors import InvalidAudioError

AUDIO_IN: Final = 0x01
AUDIO_OUT: Final = 0x02
OUTPUT_CODECS: Final = ("json", "pcm16", "opus", "g711_ulaw", "g711_alaw")
_G711_FORMATS: Final = {"g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
_DEFAULT_RATES: Final = {"pcm16": 24_000, "opus": 48_000, "g711_ulaw": 8_000, "g711_alaw": 8_000}
_PCM24K: Final = {"type": "audio/pcm", "rate": 24000}
_AUDIO_OUT: Final = bytes((AUDIO_OUT,))


@dataclass(frozen=True, slots=True)
class AudioOptions:
    """The codecs a client declared at connect."""

    input_codec: str = "pcm16"
    input_rate: int = 24_000
    output_codec: str = "json"
    output_bitrate: int = 32_000
    g711_passthrough: bool = True  # server settings from here on, not the client's to choose
    opus_complexity: int = 2

    @property
    def input_format(self) -> dict[str, Any]:
        """The upstream's `audio.input.format`: G.711 may pass through, all else is PCM 24 kHz."""
        fmt = _G711_FORMATS.get(self.input_codec) if self.g711_passthrough else None
        return {"type": fmt} if fmt else _PCM24K

    @property
    def output_format(self) -> dict[str, Any]:
        """The upstream's `audio.output.format`: G.711 out is always the upstream's own bytes."""
        fmt = _G711_FORMATS.get(self.output_codec)
        return {"type": fmt} if fmt else _PCM24K


def audio_options(
    query: Mapping[str, Sequence[str]], g711_passthrough: bool = True, opus_complexity: int = 2
) -> AudioOptions:
    """Read the codec parameters of a connect URL.

    Raises:
        InvalidAudioError: an unknown codec or a rate or bitrate that is not a number.
    """

    def one(name: str, default: str) -> str:
        return query.get(name, [default])[0]

    input_codec = one("input_codec", "pcm16")
    output_codec = one("output_codec", "json")
    if input_codec not in _DEFAULT_RATES:
        raise InvalidAudioError(f"unknown input_codec {input_codec[:32]!r}", param="input_codec")
    if output_codec not in OUTPUT_CODECS:
        raise InvalidAudioError(f"unknown output_codec {output_codec[:32]!r}", param="output_codec")
    try:
        rate = int(one("input_rate", str(_DEFAULT_RATES[input_codec])))
        bitrate = int(one("output_bitrate", "32000"))
    except ValueError:
        raise InvalidAudioError("input_rate and output_bitrate are integers") from None
    return AudioOptions(input_codec, rate, output_codec, bitrate, g711_passthrough, opus_complexity)


class ClientAudio:
    """One session's binary audio: a decoder for client frames, an encoder for deltas.

    Built once at connect; `AudioError`s from the codecs become `InvalidAudioError`s here,
    including Opus asked for on a server without libopus (`OpusUnavailableError`), which names
    the parameter to change.
    """

    def __init__(self, options: AudioOptions) -> None:
        self.options = options
        target = options.input_format["type"]
        param = "input_codec"
        try:
            self.decoder: Decoder = make_decoder(options.input_codec, options.input_rate, target)
            param = "output_codec"
            self.encoder: Encoder | None = (
                make_encoder(options.output_codec, options.output_bitrate, options.opus_complexity)
                if options.output_codec in ("pcm16", "opus")
                else None
            )
        except OpusUnavailableError as exc:
            raise InvalidAudioError(str(exc), param=param) from None
        except AudioError as exc:
            raise InvalidAudioError(str(exc)) from None
        self.binary_output = options.output_codec != "json"
        self._relay_audio = {"codec": options.output_codec, "samples": 0, "frames": 0}

    def append_event(self, frame: bytes) -> str | None:
        """The `input_audio_buffer.append` text for a client binary frame (None: nothing yet).

        Raises:
            InvalidAudioError: an unknown frame type or audio that cannot be decoded; the
                decoder's state is unchanged, so nothing buffered before is lost.
        """
        if not frame or frame[0] != AUDIO_IN:
            kind = f"0x{frame[0]:02x}" if frame else "empty"
            raise InvalidAudioError(f"unknown binary frame type {kind}; audio frames start 0x01")
        try:
            audio = self.decoder.decode(frame[1:])
        except AudioError as exc:
            raise InvalidAudioError(str(exc)) from None
        return _append(audio)

    def flush_event(self) -> str | None:
        """Before a client commit: the audio the resampler still holds, as an append (or None).

        Resampling holds a few tens of ms; without this the end of a push-to-talk turn would be
        cut off.
        """
        try:
            audio = self.decoder.flush()
        except AudioError:
            return None
        return _append(audio)

    def delta_frames(self, text: str) -> tuple[str, Iterator[bytes]] | None:
        """Split a `response.output_audio.delta` into its JSON (audio removed) and binary frames.

        The frames are encoded as they are taken, one 20 ms Opus packet at a time, so the relay
        can send each at once and let client audio in between (an encode of 100 ms at once held
        the event loop ~0.7 ms).

        Returns:
            None for a delta that is not one: not a JSON object, its `delta` not a base64
            string, or PCM16 of an odd length. Its audio cannot be sent as the client's codec,
            and its base64 is what the client asked not to get.
        """
        try:
            event = json.loads(text)
            pcm = base64.b64decode(event["delta"], validate=True)
        except (ValueError, TypeError, KeyError, RecursionError):  # binascii.Error is a ValueError
            return None
        if self.encoder is None:  # G.711: the upstream's bytes as they are
            frames = [_AUDIO_OUT + pcm] if pcm else []
            return self._described(event, len(pcm), len(frames)), iter(frames)
        if len(pcm) % 2:
            return None
        if self.encoder.codec is OutputCodec.OPUS:
            count = (self.encoder.pending + len(pcm) // 2) // FRAME_SAMPLES
            samples = count * FRAME_SAMPLES
        else:
            count, samples = (1 if pcm else 0), len(pcm) // 2
        return self._described(event, samples, count), self._encoded(self.encoder, pcm)

    @staticmethod
    def _encoded(encoder: Encoder, pcm: bytes) -> Iterator[bytes]:
        step = FRAME_SAMPLES * 2 if encoder.codec is OutputCodec.OPUS else len(pcm)
        for at in range(0, len(pcm), step):
            for packet in encoder.encode(pcm[at : at + step]):
                yield _AUDIO_OUT + packet

    def end_of_audio(self) -> list[bytes]:
        """At `response.output_audio.done`: the encoder's padded tail, as frames."""
        if self.encoder is None:
            return []
        return [_AUDIO_OUT + packet for packet in self.encoder.flush()]

    def interrupted(self) -> None:
        """At the end of a response: drop any tail that was not flushed."""
        if self.encoder is not None:
            self.encoder.reset()

    def _described(self, event: dict[str, Any], samples: int, frames: int) -> str:
        event["delta"] = ""
        event["relay_audio"] = {**self._relay_audio, "samples": samples, "frames": frames}
        return json.dumps(event, separators=(",", ":"))


def _append(audio: bytes) -> str | None:
    if not audio:
        return None
    encoded = base64.b64encode(audio).decode("ascii")
    return '{"type":"input_audio_buffer.append","audio":"' + encoded + '"}'
