"""One GA Realtime session of the local upstream: client events in, server events out.

`RealtimeSession.receive()` takes each client frame, records it, dispatches on `type` through one
table (`events.dispatch`) and answers with server events, or with an `error` event (REALTIME.md
§10) echoing the client's `event_id`; the socket stays open. Input audio and server VAD live in
`input_audio.py`; with input transcription on, each committed turn is transcribed
(`transcription.py`) before anything else happens, so its events precede the response's.
Responses stream in their own tasks (`response.py`); the session keeps every `ResponseRun` until
it finishes, and `aclose()` stops them all.

The session does no I/O itself (`send` and `abort` are its transport's), so a WebRTC call
(`call.py`) runs one too: its caller's audio comes in through `hear()` instead of appends, its
initial `session` part through `configure()`, and the call adds its own client events
(`handlers`).

Not modelled: `idle_timeout_ms` is accepted and echoed but never fires
`input_audio_buffer.timeout_triggered`; `semantic_vad` runs the same energy VAD with the
server_vad defaults; `response.input` is accepted but the answer always uses the conversation;
`session_expired` is never sent.
"""

from __future__ import annotations

import base64
import binascii
import copy
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from app.local_upstream import pcm
from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.conversation import Conversation, Item, Tokens
from app.local_upstream.events import (
    ClientEventError,
    Handler,
    Send,
    dispatch,
    new_id,
    server_event,
)
from app.local_upstream.input_audio import InputAudio, SpeechStarted, SpeechStopped
from app.local_upstream.response import ResponseParams, ResponseRun
from app.local_upstream.session_config import (
    apply_update,
    default_session,
    output_format,
    output_modalities,
)
from app.local_upstream.transcription import Transcriber

logger = logging.getLogger(__name__)

RATE_LIMIT_REQUESTS = 5000
RATE_LIMIT_TOKENS = 800_000
# The GA `response.create` overrides (REALTIME.md §7.2); beta ones are unknown here.
_RESPONSE_KEYS = set(
    "conversation input instructions tools tool_choice output_modalities audio max_output_tokens "
    "metadata prompt reasoning parallel_tool_calls".split()
)
_PART_TYPES = {
    "system": {"input_text"},
    "user": {"input_text", "input_audio", "input_image"},
    "assistant": {"output_text", "output_audio"},
}


class RealtimeSession:
    """The server side of one GA Realtime session: a WebSocket, or a WebRTC call (`call.py`)."""

    def __init__(
        self,
        *,
        model: str,
        config: LocalUpstreamConfig,
        send: Send,
        abort: Callable[[], None],
        events: list[dict[str, Any]],
        input_audio: bytearray | None,
        handlers: Mapping[str, Handler] | None = None,
    ) -> None:
        self.session = default_session(
            session_id=new_id("sess"),
            model=model,
            instructions=config.instructions,
            now=time.time(),
        )
        self.conversation = Conversation()
        self.conversation.id = new_id("conv")
        self._config = config
        self._send = send
        self._abort = abort
        self._events = events
        self._input = InputAudio(input_audio)
        self._transcriber = Transcriber(send, config)
        self._active: ResponseRun | None = None  # the default-conversation response
        self._runs: set[ResponseRun] = set()  # every response in flight, out-of-band ones too
        self._cached = Tokens()
        self._responses = 0
        self._tokens_used = 0
        self._configure_input()
        self._handlers: dict[str, Handler] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.retrieve": self._item_retrieve,
            "conversation.item.delete": self._item_delete,
            "conversation.item.truncate": self._item_truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            **(handlers or {}),
        }

    async def start(self) -> None:
        """Announce the session (`session.created`)."""
        await self._send(server_event("session.created", session=copy.deepcopy(self.session)))

    async def receive(
        self, message: str | bytes, events: list[dict[str, Any]] | None = None
    ) -> None:
        """Handle one client frame, recorded in `events` (default: the session's list)."""
        record = self._events if events is None else events
        await dispatch(message, self._handlers, record=record, send=self._send)

    def configure(self, update: Any) -> None:
        """Apply a session object as `session.update` would, but announce nothing: a WebRTC
        call's initial `session` part. Raises `ClientEventError` and changes nothing if invalid."""
        self.session = apply_update(self.session, update)
        self._configure_input()

    async def hear(self, audio: bytes) -> None:
        """Take a WebRTC caller's audio (PCM16, 24 kHz, mono), as appends would bring it."""
        await self._speech(self._input.feed(pcm.convert(audio, pcm.PCM, self._input_format())))

    async def aclose(self) -> None:
        """Stop every response task (bounded); nothing more is sent."""
        for run in list(self._runs):
            await run.aclose()
        await self._transcriber.aclose()

    # -- session ------------------------------------------------------------------------------

    async def _session_update(self, event: dict[str, Any]) -> None:
        self.configure(event.get("session"))
        await self._send(server_event("session.updated", session=copy.deepcopy(self.session)))

    def _turn_detection(self) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self.session["audio"]["input"]["turn_detection"]
        return value

    def _input_format(self) -> str:
        return str(self.session["audio"]["input"]["format"]["type"])

    def _configure_input(self) -> None:
        self._input.configure(self._input_format(), self._turn_detection())

    # -- input audio --------------------------------------------------------------------------

    async def _append(self, event: dict[str, Any]) -> None:
        await self._speech(self._input.append(event))

    async def _speech(self, found: list[SpeechStarted | SpeechStopped]) -> None:
        """Send the speech events VAD found, commit each finished turn and answer it."""
        turn_detection = self._turn_detection() or {}
        for speech in found:
            if isinstance(speech, SpeechStarted):
                await self._send(
                    server_event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=speech.audio_start_ms,
                        item_id=speech.item_id,
                    )
                )
                if turn_detection.get("interrupt_response") and self._active is not None:
                    await self._active.cancel("turn_detected")
                continue
            await self._send(
                server_event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=speech.audio_end_ms,
                    item_id=speech.item_id,
                )
            )
            await self._commit_audio(speech.item_id, speech.audio)
            if turn_detection.get("create_response"):
                if self._active is None:
                    await self._start_response(self._response_params({}))
                else:
                    logger.info(
                        "speech stopped during response %s: no new response", self._active.id
                    )

    async def _commit(self, event: dict[str, Any]) -> None:
        await self._commit_audio(*self._input.commit())

    async def _clear(self, event: dict[str, Any]) -> None:
        self._input.clear()
        await self._send(server_event("input_audio_buffer.cleared"))

    async def _commit_audio(self, item_id: str, audio: bytes) -> None:
        item = Item(
            data={
                "id": item_id,
                "type": "message",
                "object": "realtime.item",
                "status": "completed",
                "role": "user",
                "content": [{"type": "input_audio", "transcript": None}],
            },
            audio=bytearray(audio),
            audio_format=self._input_format(),
        )
        previous = self.conversation.insert(item)
        await self._send(
            server_event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        )
        await self._announce(item, previous)
        transcription = self.session["audio"]["input"]["transcription"]
        if transcription is not None:
            item.data["content"][0]["transcript"] = await self._transcriber.run(
                item_id, audio, item.audio_format, transcription
            )

    async def _announce(self, item: Item, previous: str | None) -> None:
        for event_type in ("conversation.item.added", "conversation.item.done"):
            await self._send(
                server_event(event_type, previous_item_id=previous, item=item.public())
            )

    # -- conversation items -------------------------------------------------------------------

    async def _item_create(self, event: dict[str, Any]) -> None:
        item = self._parse_item(event.get("item"))
        previous_id = event.get("previous_item_id")
        if previous_id is not None and previous_id != "root":
            if self.conversation.find(previous_id) is None:
                raise ClientEventError(
                    "invalid_value",
                    f"Previous item with id {previous_id!r} not found.",
                    "previous_item_id",
                )
        previous = self.conversation.insert(item, previous_id, at_root=previous_id == "root")
        await self._announce(item, previous)

    def _parse_item(self, raw: Any) -> Item:
        if not isinstance(raw, dict):
            raise ClientEventError("missing_required_parameter", "Missing 'item'.", "item")
        item_id = raw.get("id") or new_id("item")
        if not isinstance(item_id, str) or self.conversation.find(item_id) is not None:
            raise ClientEventError("invalid_value", f"Invalid item id {item_id!r}.", "item.id")
        kind = raw.get("type")
        data: dict[str, Any] = {"id": item_id, "type": kind, "object": "realtime.item"}
        data["status"] = "completed"
        if kind == "function_call_output":
            for key in ("call_id", "output"):
                if not isinstance(raw.get(key), str):
                    name = f"item.{key}"
                    raise ClientEventError("missing_required_parameter", f"Missing '{name}'.", name)
            return Item(data=data | {"call_id": raw["call_id"], "output": raw["output"]})
        if kind == "function_call":
            fields = {k: raw.get(k) for k in ("name", "call_id", "arguments")}
            if not all(isinstance(v, str) for v in fields.values()):
                message = "Function calls need name, call_id and arguments."
                raise ClientEventError("missing_required_parameter", message, "item")
            return Item(data=data | fields)
        if kind != "message":
            raise ClientEventError("invalid_value", f"Invalid item type {kind!r}.", "item.type")
        role = raw.get("role")
        if role not in _PART_TYPES:
            raise ClientEventError("invalid_value", f"Invalid role {role!r}.", "item.role")
        content = raw.get("content")
        if not isinstance(content, list):
            raise ClientEventError("invalid_type", "'item.content' must be a list.", "item.content")
        item = Item(data=data | {"role": role, "content": []}, audio_format=self._input_format())
        for index, part in enumerate(content):
            param = f"item.content[{index}].type"
            if not isinstance(part, dict) or part.get("type") not in _PART_TYPES[role]:
                raise ClientEventError("invalid_value", f"Invalid content part for {role}.", param)
            part = dict(part)
            if isinstance(part.get("audio"), str):
                try:
                    item.audio += base64.b64decode(part.pop("audio"), validate=True)
                except (binascii.Error, ValueError) as exc:
                    name = f"item.content[{index}].audio"
                    raise ClientEventError("invalid_value", "Invalid base64.", name) from exc
            if part["type"] in ("input_audio", "output_audio"):
                part.setdefault("transcript", None)
            item.data["content"].append(part)
        return item

    def _existing(self, event: dict[str, Any]) -> Item:
        item = self.conversation.find(event.get("item_id"))
        if item is None:
            raise ClientEventError(
                "invalid_value", f"Item with item_id not found: {event.get('item_id')!r}", "item_id"
            )
        return item

    async def _item_retrieve(self, event: dict[str, Any]) -> None:
        item = self._existing(event)
        await self._send(server_event("conversation.item.retrieved", item=item.with_audio()))

    async def _item_delete(self, event: dict[str, Any]) -> None:
        item = self._existing(event)
        self.conversation.delete(item.id)
        await self._send(server_event("conversation.item.deleted", item_id=item.id))

    async def _item_truncate(self, event: dict[str, Any]) -> None:
        item = self._existing(event)
        index, end_ms = event.get("content_index", 0), event.get("audio_end_ms")
        parts = item.data.get("content", [])
        if (
            item.data.get("role") != "assistant"
            or not isinstance(index, int)
            or not 0 <= index < len(parts)
            or parts[index].get("type") != "output_audio"
        ):
            raise ClientEventError(
                "invalid_value", "Only model output audio messages can be truncated.", "item_id"
            )
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise ClientEventError(
                "invalid_value", "audio_end_ms must be a non-negative integer.", "audio_end_ms"
            )
        if end_ms > item.audio_ms:
            raise ClientEventError(
                "invalid_value",
                f"Audio content of {item.audio_ms}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
            )
        del item.audio[end_ms * pcm.BYTES_PER_MS[item.audio_format] :]
        parts[index]["transcript"] = ""  # unheard text leaves the context (REALTIME.md §12.4)
        await self._send(
            server_event(
                "conversation.item.truncated",
                item_id=item.id,
                content_index=index,
                audio_end_ms=end_ms,
            )
        )

    # -- responses ----------------------------------------------------------------------------

    async def _response_create(self, event: dict[str, Any]) -> None:
        params = self._response_params(event.get("response") or {})
        if params.conversation and self._active is not None:
            raise ClientEventError(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress: "
                f"{self._active.id}. Wait until the response is finished before creating a new "
                "one.",
            )
        await self._start_response(params)

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        response_id = event.get("response_id")
        run = (
            next((r for r in self._runs if r.id == response_id), None)
            if response_id
            else self._active
        )
        if run is None:
            raise ClientEventError(
                "response_cancel_not_active", "Cancellation failed: no active response found"
            )
        await run.cancel("client_cancelled")

    def _response_params(self, overrides: Any) -> ResponseParams:
        if not isinstance(overrides, dict):
            raise ClientEventError("invalid_type", "'response' must be an object.", "response")
        for key in overrides:
            if key not in _RESPONSE_KEYS:
                param = f"response.{key}"
                raise ClientEventError("unknown_parameter", f"Unknown parameter: '{param}'.", param)
        conversation = overrides.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise ClientEventError(
                "invalid_value", "conversation must be 'auto' or 'none'.", "response.conversation"
            )
        session = self.session
        audio = overrides.get("audio") or {}
        out = audio.get("output") or {} if isinstance(audio, dict) else {}
        if not isinstance(out, dict):
            raise ClientEventError("invalid_type", "Invalid 'response.audio'.", "response.audio")
        fmt = session["audio"]["output"]["format"]
        if "format" in out:
            fmt = output_format(out["format"], "response.audio.output.format")
        instructions = overrides.get("instructions", session["instructions"])
        tools = overrides.get("tools", session["tools"])
        if not isinstance(instructions, str) or not isinstance(tools, list):
            raise ClientEventError("invalid_type", "Invalid instructions or tools.", "response")
        return ResponseParams(
            conversation=conversation == "auto",
            output_modalities=output_modalities(
                overrides.get("output_modalities", session["output_modalities"]),
                "response.output_modalities",
            ),
            output_format=fmt,
            voice=out.get("voice", session["audio"]["output"]["voice"]),
            instructions=instructions,
            tools=[t for t in tools if isinstance(t, dict)],
            tool_choice=overrides.get("tool_choice", session["tool_choice"]),
            max_output_tokens=overrides.get("max_output_tokens", session["max_output_tokens"]),
            metadata=overrides.get("metadata"),
        )

    async def _start_response(self, params: ResponseParams) -> None:
        context = self.conversation.context_tokens(params.instructions, params.tools)
        self._responses += 1
        rate_limits = [
            {
                "name": "requests",
                "limit": RATE_LIMIT_REQUESTS,
                "remaining": max(0, RATE_LIMIT_REQUESTS - self._responses),
                "reset_seconds": 0.012,
            },
            {
                "name": "tokens",
                "limit": RATE_LIMIT_TOKENS,
                "remaining": max(0, RATE_LIMIT_TOKENS - self._tokens_used - context.total),
                "reset_seconds": 0.375,
            },
        ]
        run = ResponseRun(
            params=params,
            conversation=self.conversation,
            send=self._send,
            knobs=self._config,
            abort=self._abort,
            input=context,
            cached=self._cached.cap(context),
            rate_limits=rate_limits,
            on_finish=self._finished,
        )
        self._runs.add(run)
        if params.conversation:
            self._active = run
        try:
            await run.begin()
        except BaseException:
            self._finished(run)
            raise
        run.start()

    def _finished(self, run: ResponseRun) -> None:
        self._runs.discard(run)
        if self._active is run:
            self._active = None
        # The next response finds this one's context in the prompt cache.
        self._cached = run.input
        self._tokens_used += run.input.total + run.output_tokens.total
