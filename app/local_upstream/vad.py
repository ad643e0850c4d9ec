"""An energy voice-activity detector for the local upstream's `server_vad` turn detection.

Simple and deterministic on purpose, so tests can predict its events from a synthetic signal:

- audio is cut into 20 ms windows on the session's input timeline (offset 0 = first appended byte);
- a window is *loud* when its RMS exceeds a level derived from `threshold` (0.0-1.0 maps linearly
  onto -60 ... -10 dBFS RMS, so the default 0.5 is -35 dBFS);
- speech starts after 3 consecutive loud windows (60 ms); `audio_start_ms` is the onset of the first
  loud window minus `prefix_padding_ms` (clamped at 0), as the real server includes the padding;
- speech stops once `silence_duration_ms` of quiet windows follow; `audio_end_ms` is the end of the
  window that completed the silence (the real server also includes the silence in the item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.local_upstream import pcm

WINDOW_MS = 20
START_WINDOWS = 3  # 60 ms of energy before speech counts as started


@dataclass(frozen=True)
class VadEvent:
    """Speech started or stopped at `ms` on the input timeline."""

    kind: Literal["started", "stopped"]
    ms: int


def threshold_rms(threshold: float) -> float:
    """The RMS level (16-bit scale) a window must exceed to be loud."""
    dbfs = -60.0 + 50.0 * min(max(threshold, 0.0), 1.0)
    return 32768 * 10 ** (dbfs / 20)


class EnergyVad:
    """Feeds appended audio through 20 ms windows and reports speech start and stop."""

    def __init__(self) -> None:
        self._fmt = pcm.PCM
        self._level = threshold_rms(0.5)
        self._prefix_ms = 300
        self._silence_ms = 200
        self._pending = bytearray()
        self._pos_ms = 0  # timeline position of the first byte in `_pending`
        self._loud_run = 0
        self._onset_ms = 0
        self._speaking = False
        self._quiet_ms = 0

    @property
    def speaking(self) -> bool:
        """Whether speech has started and not yet stopped."""
        return self._speaking

    def configure(
        self, *, fmt: str, threshold: float, prefix_padding_ms: int, silence_duration_ms: int
    ) -> None:
        """Apply (new) session settings; the timeline position is kept."""
        self._fmt = fmt
        self._level = threshold_rms(threshold)
        self._prefix_ms = prefix_padding_ms
        self._silence_ms = silence_duration_ms

    def reset(self) -> None:
        """Forget any speech in progress (after a manual commit or a clear)."""
        self._loud_run = 0
        self._speaking = False
        self._quiet_ms = 0

    def skip(self, data: bytes) -> None:
        """Advance the timeline over audio that is not analysed (turn detection off)."""
        self.feed(data, analyse=False)

    def feed(self, data: bytes, *, analyse: bool = True) -> list[VadEvent]:
        """Append audio and return the events its complete windows produce, in order."""
        self._pending += data
        window = pcm.BYTES_PER_MS[self._fmt] * WINDOW_MS
        events: list[VadEvent] = []
        while len(self._pending) >= window:
            chunk = bytes(self._pending[:window])
            del self._pending[:window]
            start_ms = self._pos_ms
            self._pos_ms += WINDOW_MS
            if analyse:
                loud = pcm.rms(pcm.to_samples(chunk, self._fmt)) > self._level
                event = self._step(loud, start_ms)
                if event is not None:
                    events.append(event)
        return events

    def _step(self, loud: bool, start_ms: int) -> VadEvent | None:
        if not self._speaking:
            if not loud:
                self._loud_run = 0
                return None
            if self._loud_run == 0:
                self._onset_ms = start_ms
            self._loud_run += 1
            if self._loud_run < START_WINDOWS:
                return None
            self._speaking, self._quiet_ms, self._loud_run = True, 0, 0
            return VadEvent("started", max(0, self._onset_ms - self._prefix_ms))
        if loud:
            self._quiet_ms = 0
            return None
        self._quiet_ms += WINDOW_MS
        if self._quiet_ms < self._silence_ms:
            return None
        self.reset()
        return VadEvent("stopped", start_ms + WINDOW_MS)
