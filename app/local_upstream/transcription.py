"""Input audio transcription of committed turns: the words, their events and their usage.

After a commit, a session with `audio.input.transcription` set hands the turn to its
`Transcriber`, which sends `conversation.item.input_audio_transcription.delta` (one per word) and
then `...completed` with the transcript and usage (REALTIME.md §14.3, §14.4):

- the words come from PocketSphinx (`asr.py`); with `LocalUpstreamConfig.asr` off, PocketSphinx
  missing or busy, or no words heard, the transcript is the placeholder "(1.23 s of speech)"
  instead, in one delta;
- usage is `{"type": "duration", "seconds": ...}` for `whisper-1`, which is billed by duration,
  and the tokens form for every other model: the audio's tokens in, the transcript's out;
- `language`, `prompt` and `include`'s logprobs are accepted and ignored: the recognizer is
  English, and no event carries `logprobs`.

`run()` transcribes at once, for a conversation session, which sends the events before any
response starts. `submit()` transcribes in the background, for a transcription session, which goes
on reading audio meanwhile; its turns' events still come out in commit order. A turn is never
reported as `...failed`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from websockets.exceptions import ConnectionClosed

from app.local_upstream import asr, pcm
from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.conversation import audio_tokens, text_tokens
from app.local_upstream.events import Send, server_event

logger = logging.getLogger(__name__)

DURATION_BILLED = frozenset({"whisper-1"})  # usage {"type": "duration"} (REALTIME.md §14.4)
CLOSE_TIMEOUT_S = 5.0


def placeholder(audio_ms: int) -> str:
    """The transcript of a turn whose words are not recognized."""
    return f"({audio_ms / 1000:.2f} s of speech)"


def usage(model: Any, audio_ms: int, transcript: str) -> dict[str, Any]:
    """The `usage` of a `...completed` event for `model`."""
    if model in DURATION_BILLED:
        return {"type": "duration", "seconds": audio_ms / 1000}
    heard, wrote = audio_tokens(audio_ms), text_tokens(transcript)
    return {
        "type": "tokens",
        "input_tokens": heard,
        "output_tokens": wrote,
        "total_tokens": heard + wrote,
        "input_token_details": {"text_tokens": 0, "audio_tokens": heard},
    }


class Transcriber:
    """Transcribes one session's committed turns and sends their events."""

    def __init__(self, send: Send, knobs: LocalUpstreamConfig) -> None:
        self._send = send
        self._knobs = knobs
        self._last: asyncio.Task[None] | None = None  # the turn submitted most recently
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, item_id: str, audio: bytes, fmt: str, transcription: dict[str, Any]) -> str:
        """Transcribe a turn and send its events now; return the transcript."""
        audio_ms = len(audio) // pcm.BYTES_PER_MS[fmt]
        words = await asr.transcribe(audio, fmt) if self._knobs.asr else None
        if words:
            deltas = [word if i == 0 else f" {word}" for i, word in enumerate(words.split(" "))]
        else:
            deltas = [placeholder(audio_ms)]
        transcript = "".join(deltas)
        ids = {"item_id": item_id, "content_index": 0}
        for delta in deltas:
            await self._send(
                server_event(
                    "conversation.item.input_audio_transcription.delta", **ids, delta=delta
                )
            )
        await self._send(
            server_event(
                "conversation.item.input_audio_transcription.completed",
                **ids,
                transcript=transcript,
                usage=usage(transcription.get("model"), audio_ms, transcript),
            )
        )
        return transcript

    def submit(self, item_id: str, audio: bytes, fmt: str, transcription: dict[str, Any]) -> None:
        """Transcribe a turn in the background, after the turns submitted before it."""
        task = asyncio.create_task(
            self._after(self._last, item_id, audio, fmt, dict(transcription)),
            name=f"local-upstream-transcribe-{item_id}",
        )
        self._last = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Connection gone: stop every background transcription (bounded wait)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_TIMEOUT_S)

    async def _after(
        self,
        previous: asyncio.Task[None] | None,
        item_id: str,
        audio: bytes,
        fmt: str,
        transcription: dict[str, Any],
    ) -> None:
        try:
            if previous is not None:
                await asyncio.wait({previous})  # its outcome does not matter here
            await self.run(item_id, audio, fmt, transcription)
        except ConnectionClosed:
            logger.debug("transcription of %s: connection closed", item_id)
        except Exception:
            # The boundary of a background task: log once, never leak an exception.
            logger.exception("transcription of %s failed", item_id)
