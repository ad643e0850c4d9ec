"""Speech recognition for the local upstream's input transcription: CMU PocketSphinx, optional.

`transcribe(audio, fmt)` returns the words PocketSphinx hears in one committed turn, lower case
and separated by single spaces ("" when it hears none), or `None` when it cannot run: the
`pocketsphinx` package is missing (it comes with the `demo` and `dev` extras; one warning is
logged), the decoder failed, `MAX_WAITING` decodes already wait, or the words took longer than
`TIMEOUT_S`. Callers then fall back to a placeholder transcript.

- One `Decoder` for the whole process, with the en-us model its wheel ships, created at first use
  (a fraction of a second) and used only on one worker thread: decodes never block the event loop,
  run one at a time and finish in the order they were asked for.
- Input in any GA format (REALTIME.md §11) becomes 16 kHz mono PCM16, the model's rate; only the
  first `MAX_SECONDS` of a turn are decoded, so one decode costs a bounded few seconds.
- Before decoding, quiet audio at either end is cut off (keeping `MARGIN_MS`), and a faint noise
  floor is added. PocketSphinx takes the logarithm of each frame's energy, and digital silence
  (exact zeros: espeak-ng's and the tests' padding, never a real microphone) derails its search.
  On a dozen espeak-ng sentences in three voices, sent through the 24 kHz path with silence
  around them, this cut the word error rate about in half. The noise is seeded: the same audio
  always gives the same words.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import soxr

from app.local_upstream import pcm

logger = logging.getLogger(__name__)

RATE = 16000  # the en-us model's sample rate
MAX_SECONDS = 30
MAX_WAITING = 16  # decodes queued or running, across sessions, before falling back
TIMEOUT_S = 30.0  # from asking to words, queueing included; 30 s of speech decode in about 8 s
FRAME_MS = 10
QUIET_DBFS = -50.0  # a frame below this RMS level counts as silence when trimming
MARGIN_MS = 100
NOISE_DBFS = -60.0  # RMS of the added noise floor
NOISE_SEED = 0


class Recognizer:
    """A PocketSphinx decoder behind a single worker thread.

    Args:
        max_waiting: How many decodes may be queued or running at once; `transcribe` returns
            `None` beyond that rather than make a session wait behind everyone else's speech.
        timeout: Seconds `transcribe` waits for words before it returns `None`.
    """

    def __init__(self, max_waiting: int = MAX_WAITING, timeout: float = TIMEOUT_S) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-upstream-asr")
        self._max_waiting = max_waiting
        self._timeout = timeout
        self._waiting = 0
        # Touched only on the worker thread, so no lock.
        self._decoder: Any = None
        self._unavailable = False

    async def transcribe(self, audio: bytes, fmt: str) -> str | None:
        """The words heard in `audio` (format `fmt`), "" for none, `None` if they cannot be."""
        if self._waiting >= self._max_waiting:
            logger.info(
                "local upstream: %d decodes waiting; transcript not recognized", self._waiting
            )
            return None
        self._waiting += 1
        try:
            # Cancelling this await drops a decode that has not started yet; one that has
            # started runs to its end (bounded by MAX_SECONDS) and its words are dropped.
            async with asyncio.timeout(self._timeout):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._executor, self._decode, audio, fmt)
        except TimeoutError:
            logger.warning(
                "local upstream: no words within %.0f s; transcript not recognized", self._timeout
            )
            return None
        finally:
            self._waiting -= 1

    def _load(self) -> Any:
        if self._decoder is None and not self._unavailable:
            try:
                # By name: an optional extra, and one without type hints.
                pocketsphinx = importlib.import_module("pocketsphinx")
            except ImportError:
                self._unavailable = True
                logger.warning(
                    "local upstream: pocketsphinx is not installed (the demo extra); "
                    "input transcripts are placeholders"
                )
                return None
            try:
                self._decoder = pocketsphinx.Decoder(samprate=RATE, loglevel="FATAL")
            except (RuntimeError, OSError, ValueError):
                self._unavailable = True
                logger.warning("local upstream: PocketSphinx did not start", exc_info=True)
        return self._decoder

    def _decode(self, audio: bytes, fmt: str) -> str | None:
        decoder = self._load()
        if decoder is None:
            return None
        samples = _speech_only(to_16k(audio, fmt))
        if samples is None:
            return ""
        try:
            decoder.start_utt()
            try:
                decoder.process_raw(_with_noise_floor(samples).tobytes(), full_utt=True)
            finally:
                decoder.end_utt()
        except RuntimeError:
            logger.warning("local upstream: PocketSphinx failed on a turn", exc_info=True)
            return None
        hypothesis = decoder.hyp()
        return " ".join(str(hypothesis.hypstr).split()) if hypothesis is not None else ""


def to_16k(audio: bytes, fmt: str) -> np.ndarray[Any, np.dtype[np.int16]]:
    """The first `MAX_SECONDS` of `audio` (a GA format) as 16 kHz mono 16-bit samples."""
    audio = audio[: MAX_SECONDS * 1000 * pcm.BYTES_PER_MS[fmt]]
    if fmt == pcm.PCM:
        samples = np.frombuffer(audio, dtype="<i2", count=len(audio) // 2).astype(np.int16)
    else:
        samples = np.frombuffer(pcm.to_samples(audio, fmt), dtype=np.int16)
    resampled: np.ndarray[Any, np.dtype[np.int16]] = soxr.resample(
        samples, pcm.SAMPLE_RATE[fmt], RATE
    )
    return resampled


def _speech_only(
    samples: np.ndarray[Any, np.dtype[np.int16]],
) -> np.ndarray[Any, np.dtype[np.int16]] | None:
    """`samples` from the first to the last loud frame, plus margins; `None` if none is loud."""
    size = RATE * FRAME_MS // 1000
    count = len(samples) // size
    frames = samples[: count * size].astype(np.float64).reshape(count, size)
    levels = np.sqrt((frames**2).mean(axis=1))
    loud = np.flatnonzero(levels > 32768 * 10 ** (QUIET_DBFS / 20))
    if len(loud) == 0:
        return None
    margin = RATE * MARGIN_MS // 1000
    start = max(0, int(loud[0]) * size - margin)
    end = min(len(samples), (int(loud[-1]) + 1) * size + margin)
    return samples[start:end]


def _with_noise_floor(
    samples: np.ndarray[Any, np.dtype[np.int16]],
) -> np.ndarray[Any, np.dtype[np.int16]]:
    noise = np.random.default_rng(NOISE_SEED).normal(
        0.0, 32768 * 10 ** (NOISE_DBFS / 20), len(samples)
    )
    return np.clip(samples + noise, -32768, 32767).astype(np.int16)


_SHARED = Recognizer()


async def transcribe(audio: bytes, fmt: str) -> str | None:
    """Recognize one turn on the process's shared `Recognizer` (see `Recognizer.transcribe`)."""
    return await _SHARED.transcribe(audio, fmt)
