"""A session's input audio buffer: appends, commits, clears and server VAD turns.

Shared by both kinds of session (`session.py`, `transcription.py`); it sends nothing. `append`
returns the speech events its audio completed, each `SpeechStopped` carrying its turn's audio cut
out of the buffer, and the session turns them into server events. Offsets are on the session's
input timeline: milliseconds since the first appended byte.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from app.local_upstream import pcm
from app.local_upstream.events import ClientEventError, new_id
from app.local_upstream.session_config import DEFAULT_SERVER_VAD
from app.local_upstream.vad import EnergyVad

MIN_COMMIT_MS = 100  # "Expected at least 100ms of audio" (REALTIME.md §10)
# Uncommitted audio kept at most (about 5.8 minutes of 24 kHz PCM16); older audio is dropped. A
# WebRTC call's caller sends audio all the time, silence included, and the buffer only empties
# at a commit.
MAX_BUFFER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class SpeechStarted:
    """VAD heard speech start: `input_audio_buffer.speech_started`."""

    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    """VAD heard speech stop: `speech_stopped`, then the turn's `audio` is committed."""

    item_id: str
    audio_end_ms: int
    audio: bytes


class InputAudio:
    """Uncommitted input audio, its timeline and the energy VAD that cuts it into turns.

    Args:
        recorded: Receives every appended byte, decoded (the connection record's copy); `None`
            records nothing.
    """

    def __init__(self, recorded: bytearray | None) -> None:
        self._recorded = recorded
        self._buffer = bytearray()  # uncommitted input audio
        self._buffer_start = 0  # timeline offset (bytes) of `_buffer[0]`
        self._vad = EnergyVad()
        self._detecting = True
        self._speech: tuple[str, int] | None = None  # (item id, audio_start_ms) while speaking
        self.fmt = pcm.PCM

    def configure(self, fmt: str, turn_detection: dict[str, Any] | None) -> None:
        """Apply the session's input format and turn detection (`None`: VAD off)."""
        settings = turn_detection or DEFAULT_SERVER_VAD
        if settings["type"] != "server_vad":  # semantic_vad: the same VAD, server_vad defaults
            settings = DEFAULT_SERVER_VAD
        self.fmt = fmt
        self._detecting = turn_detection is not None
        self._vad.configure(
            fmt=fmt,
            threshold=float(settings["threshold"]),
            prefix_padding_ms=int(settings["prefix_padding_ms"]),
            silence_duration_ms=int(settings["silence_duration_ms"]),
        )
        if turn_detection is None:
            self._vad.reset()
            self._speech = None

    def append(self, event: dict[str, Any]) -> list[SpeechStarted | SpeechStopped]:
        """Take an `input_audio_buffer.append` event; return the speech events it completed."""
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientEventError("missing_required_parameter", "Missing 'audio'.", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ClientEventError(
                "invalid_value", "'audio' is not valid base64.", "audio"
            ) from exc
        return self.feed(data)

    def feed(self, data: bytes) -> list[SpeechStarted | SpeechStopped]:
        """Take audio in the input format; return the speech events it completed."""
        if self._recorded is not None:
            self._recorded += data
        self._buffer += data
        excess = len(self._buffer) - MAX_BUFFER_BYTES
        if excess > 0:
            excess += excess % 2  # whole 16-bit samples
            del self._buffer[:excess]
            self._buffer_start += excess
        if not self._detecting:
            self._vad.skip(data)
            return []
        bpm = pcm.BYTES_PER_MS[self.fmt]
        events: list[SpeechStarted | SpeechStopped] = []
        for vad_event in self._vad.feed(data):
            if vad_event.kind == "started":
                start_ms = max(vad_event.ms, -(-self._buffer_start // bpm))
                self._speech = (new_id("item"), start_ms)
                events.append(SpeechStarted(self._speech[0], start_ms))
            elif self._speech is not None:
                item_id, start_ms = self._speech
                self._speech = None
                audio_bytes = self._take(start_ms * bpm, vad_event.ms * bpm)
                events.append(SpeechStopped(item_id, vad_event.ms, audio_bytes))
        return events

    def commit(self) -> tuple[str, bytes]:
        """Take everything buffered for `input_audio_buffer.commit`: (item id, audio)."""
        buffered_ms = len(self._buffer) / pcm.BYTES_PER_MS[self.fmt]
        if buffered_ms < MIN_COMMIT_MS:
            raise ClientEventError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms "
                f"of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
            )
        item_id = self._speech[0] if self._speech else new_id("item")
        self._speech = None
        self._vad.reset()
        return item_id, self._take(self._buffer_start, self._buffer_start + len(self._buffer))

    def clear(self) -> None:
        """Drop everything buffered (`input_audio_buffer.clear`)."""
        self._take(self._buffer_start, self._buffer_start + len(self._buffer))
        self._speech = None
        self._vad.reset()

    def _take(self, start: int, end: int) -> bytes:
        """Cut timeline bytes [start, end) out of the buffer, dropping everything before `end`."""
        low = max(0, start - self._buffer_start)
        high = max(low, end - self._buffer_start)
        audio = bytes(self._buffer[low:high])
        del self._buffer[:high]
        self._buffer_start += high
        return audio
