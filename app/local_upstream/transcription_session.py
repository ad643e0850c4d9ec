"""One GA transcription-only session of the local upstream (`?intent=transcription`).

It transcribes input audio and never answers (REALTIME.md §14; OpenAI's guide,
https://developers.openai.com/api/docs/guides/realtime-transcription): `session.update` (of type
`"transcription"`) and `input_audio_buffer.append`, `.commit` and `.clear` are the only client
events; any other type gets an `error` (`invalid_event`, param `type`), as an unknown type does.
Server VAD or a commit sends `input_audio_buffer.committed` and, with a transcription model set,
the turn's transcription events (`transcription.py`), in the background and in commit order;
`create_response` and `interrupt_response` are accepted and ignored. Whether the real server also
sends `conversation.item.added`/`.done` here is unverified, so this one does not, and it keeps no
conversation, only the last committed item's id for `previous_item_id`.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.events import Handler, Send, dispatch, new_id, server_event
from app.local_upstream.input_audio import InputAudio, SpeechStarted
from app.local_upstream.session_config import apply_update, default_transcription_session
from app.local_upstream.transcription import Transcriber


class TranscriptionSession:
    """The server side of one GA transcription session."""

    def __init__(
        self,
        *,
        config: LocalUpstreamConfig,
        send: Send,
        events: list[dict[str, Any]],
        input_audio: bytearray,
    ) -> None:
        self.session = default_transcription_session(session_id=new_id("sess"), now=time.time())
        self._send = send
        self._events = events
        self._input = InputAudio(input_audio)
        self._transcriber = Transcriber(send, config)
        self._last_item: str | None = None
        self._configure_input()
        self._handlers: dict[str, Handler] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
        }

    async def start(self) -> None:
        """Announce the session (`session.created`)."""
        await self._send(server_event("session.created", session=copy.deepcopy(self.session)))

    async def receive(self, message: str | bytes) -> None:
        """Handle one client frame."""
        await dispatch(message, self._handlers, record=self._events, send=self._send)

    async def aclose(self) -> None:
        """Stop the transcriptions still running (bounded); nothing more is sent."""
        await self._transcriber.aclose()

    def _configure_input(self) -> None:
        audio_in = self.session["audio"]["input"]
        self._input.configure(str(audio_in["format"]["type"]), audio_in["turn_detection"])

    async def _session_update(self, event: dict[str, Any]) -> None:
        self.session = apply_update(self.session, event.get("session"))
        self._configure_input()
        await self._send(server_event("session.updated", session=copy.deepcopy(self.session)))

    async def _append(self, event: dict[str, Any]) -> None:
        for speech in self._input.append(event):
            if isinstance(speech, SpeechStarted):
                await self._send(
                    server_event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=speech.audio_start_ms,
                        item_id=speech.item_id,
                    )
                )
                continue
            await self._send(
                server_event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=speech.audio_end_ms,
                    item_id=speech.item_id,
                )
            )
            await self._committed(speech.item_id, speech.audio)

    async def _commit(self, event: dict[str, Any]) -> None:
        await self._committed(*self._input.commit())

    async def _clear(self, event: dict[str, Any]) -> None:
        self._input.clear()
        await self._send(server_event("input_audio_buffer.cleared"))

    async def _committed(self, item_id: str, audio: bytes) -> None:
        previous, self._last_item = self._last_item, item_id
        await self._send(
            server_event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        )
        transcription = self.session["audio"]["input"]["transcription"]
        if transcription is not None:
            self._transcriber.submit(item_id, audio, self._input.fmt, transcription)
