"""One GA Realtime session of the local upstream: client events in, server events out.

`RealtimeSession.receive()` takes each client frame, records it, dispatches on `type` through one
table and answers with server events, or with an `error` event (REALTIME.md §10) echoing the
client's `event_id`; the socket stays open. Responses stream in their own tasks (`response.py`);
the session keeps every `ResponseRun` until it finishes, and `aclose()` stops them all.

Not modelled: `idle_timeout_ms` is accepted and echoed but never fires
`input_audio_buffer.timeout_triggered`; `semantic_vad` runs the same energy VAD with the
server_vad defaults; `response.input` is accepted but the answer always uses the conversation;
`session_expired` is never sent.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.local_upstream import pcm
from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.conversation import Conversation, Item, Tokens, audio_tokens, text_tokens
from app.local_upstream.events import ClientEventError, error_event, new_id, server_event
from app.local_upstream.response import ResponseParams, ResponseRun, Send
from app.local_upstream.session_config import (
    DEFAULT_SERVER_VAD,
    apply_update,
    default_session,
    output_format,
    output_modalities,
)
from app.local_upstream.vad import EnergyVad, VadEvent

logger = logging.getLogger(__name__)

MIN_COMMIT_MS = 100  # "Expected at least 100ms of audio" (REALTIME.md §10)
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

Handler = Callable[[dict[str, Any]], Awaitable[None]]


class RealtimeSession:
    """The server side of one GA Realtime WebSocket session."""

    def __init__(
        self,
        *,
        model: str,
        config: LocalUpstreamConfig,
        send: Send,
        abort: Callable[[], None],
        events: list[dict[str, Any]],
        input_audio: bytearray,
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
        self._input_audio = input_audio
        self._buffer = bytearray()  # uncommitted input audio
        self._buffer_start = 0  # timeline offset (bytes) of `_buffer[0]`
        self._vad = EnergyVad()
        self._speech: tuple[str, int] | None = None  # (item id, audio_start_ms) while speaking
        self._active: ResponseRun | None = None  # the default-conversation response
        self._runs: set[ResponseRun] = set()  # every response in flight, out-of-band ones too
        self._cached = Tokens()
        self._responses = 0
        self._tokens_used = 0
        self._configure_vad()
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
        }

    async def start(self) -> None:
        """Announce the session (`session.created`)."""
        await self._send(server_event("session.created", session=copy.deepcopy(self.session)))

    async def receive(self, message: str | bytes) -> None:
        """Handle one client frame."""
        if isinstance(message, bytes):
            await self._send(
                error_event("invalid_event", "Binary frames are not supported; send JSON text.")
            )
            return
        try:
            event = json.loads(message)
        except ValueError:
            await self._send(error_event("invalid_event", "The event is not valid JSON."))
            return
        if not isinstance(event, dict):
            await self._send(error_event("invalid_event", "The event must be a JSON object."))
            return
        self._events.append(event)
        client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        event_type = event.get("type")
        handler = self._handlers.get(event_type) if isinstance(event_type, str) else None
        try:
            if event_type is None:
                raise ClientEventError("invalid_event", "The 'type' field is missing.", "type")
            if handler is None:
                supported = ", ".join(f"'{name}'" for name in self._handlers)
                raise ClientEventError(
                    "invalid_event",
                    f"Invalid value: {event_type!r}. Supported values are: {supported}.",
                    "type",
                )
            await handler(event)
        except ClientEventError as exc:
            await self._send(
                error_event(exc.code, exc.message, param=exc.param, client_event_id=client_id)
            )

    async def aclose(self) -> None:
        """Stop every response task (bounded); nothing more is sent."""
        for run in list(self._runs):
            await run.aclose()

    # -- session ------------------------------------------------------------------------------

    async def _session_update(self, event: dict[str, Any]) -> None:
        self.session = apply_update(self.session, event.get("session"))
        self._configure_vad()
        await self._send(server_event("session.updated", session=copy.deepcopy(self.session)))

    def _turn_detection(self) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self.session["audio"]["input"]["turn_detection"]
        return value

    def _input_format(self) -> str:
        return str(self.session["audio"]["input"]["format"]["type"])

    def _configure_vad(self) -> None:
        vad = self._turn_detection()
        settings = DEFAULT_SERVER_VAD if vad is None or vad["type"] != "server_vad" else vad
        self._vad.configure(
            fmt=self._input_format(),
            threshold=float(settings["threshold"]),
            prefix_padding_ms=int(settings["prefix_padding_ms"]),
            silence_duration_ms=int(settings["silence_duration_ms"]),
        )
        if vad is None:
            self._vad.reset()
            self._speech = None

    # -- input audio --------------------------------------------------------------------------

    async def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientEventError("missing_required_parameter", "Missing 'audio'.", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ClientEventError(
                "invalid_value", "'audio' is not valid base64.", "audio"
            ) from exc
        self._input_audio += data
        self._buffer += data
        turn_detection = self._turn_detection()
        if turn_detection is None:
            self._vad.skip(data)
            return
        for vad_event in self._vad.feed(data):
            await self._on_vad(vad_event, turn_detection)

    async def _on_vad(self, event: VadEvent, turn_detection: dict[str, Any]) -> None:
        bpm = pcm.BYTES_PER_MS[self._input_format()]
        if event.kind == "started":
            item_id = new_id("item")
            start_ms = max(event.ms, -(-self._buffer_start // bpm))
            self._speech = (item_id, start_ms)
            await self._send(
                server_event(
                    "input_audio_buffer.speech_started", audio_start_ms=start_ms, item_id=item_id
                )
            )
            if turn_detection.get("interrupt_response") and self._active is not None:
                await self._active.cancel("turn_detected")
            return
        if self._speech is None:
            return
        item_id, start_ms = self._speech
        self._speech = None
        await self._send(
            server_event(
                "input_audio_buffer.speech_stopped", audio_end_ms=event.ms, item_id=item_id
            )
        )
        await self._commit_audio(item_id, self._take(start_ms * bpm, event.ms * bpm))
        if turn_detection.get("create_response"):
            if self._active is None:
                await self._start_response(self._response_params({}))
            else:
                logger.info("speech stopped during response %s: no new response", self._active.id)

    def _take(self, start: int, end: int) -> bytes:
        """Cut timeline bytes [start, end) out of the buffer, dropping everything before `end`."""
        low = max(0, start - self._buffer_start)
        high = max(low, end - self._buffer_start)
        audio = bytes(self._buffer[low:high])
        del self._buffer[:high]
        self._buffer_start += high
        return audio

    async def _commit(self, event: dict[str, Any]) -> None:
        buffered_ms = len(self._buffer) / pcm.BYTES_PER_MS[self._input_format()]
        if buffered_ms < MIN_COMMIT_MS:
            raise ClientEventError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms "
                f"of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
            )
        item_id = self._speech[0] if self._speech else new_id("item")
        self._speech = None
        self._vad.reset()
        end = self._buffer_start + len(self._buffer)
        await self._commit_audio(item_id, self._take(self._buffer_start, end))

    async def _clear(self, event: dict[str, Any]) -> None:
        self._take(self._buffer_start, self._buffer_start + len(self._buffer))
        self._speech = None
        self._vad.reset()
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
        if self.session["audio"]["input"]["transcription"] is None:
            return
        transcript = f"({item.audio_ms / 1000:.2f} s of speech)"
        item.data["content"][0]["transcript"] = transcript
        ids = {"item_id": item_id, "content_index": 0}
        await self._send(
            server_event(
                "conversation.item.input_audio_transcription.delta", **ids, delta=transcript
            )
        )
        heard, wrote = audio_tokens(item.audio_ms), text_tokens(transcript)
        usage = {
            "type": "tokens",
            "input_tokens": heard,
            "output_tokens": wrote,
            "total_tokens": heard + wrote,
            "input_token_details": {"text_tokens": 0, "audio_tokens": heard},
        }
        await self._send(
            server_event(
                "conversation.item.input_audio_transcription.completed",
                **ids,
                transcript=transcript,
                usage=usage,
            )
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
