"""One streamed response of the local upstream: an echo of the user's last turn, or a tool call.

Event order follows REALTIME.md §12.1 and examples b, c and d: `response.created`,
`rate_limits.updated`, `response.output_item.added`, `conversation.item.added`,
`response.content_part.added`, interleaved transcript and audio deltas, the `*.done` events,
`conversation.item.done`, `response.output_item.done`, `response.done`. Out-of-band responses
(`conversation: "none"`) skip the `conversation.item.*` events and leave the conversation alone.

What it says:
- after user audio: that audio again, converted to the output format, and the transcript
  "You said something for N.N seconds.";
- after user text or a function-call output: a 440 Hz tone of 0.5 s per 20 transcript characters,
  and a transcript quoting the text;
- a `function_call` item instead when a function tool's name (or the name with spaces for
  underscores) appears in the user's last text, or `tool_choice` forces one. Its arguments fit
  the tool's `parameters` schema, filled from that text (`arguments.build_arguments`), and
  stream in up to three `response.function_call_arguments.delta` events;
- after a `function_call_output`: "The tool returned: <output>", so a test can see the tool's
  output reach the model.

Cancellation is cooperative: `cancel()` sets a reason, the stream stops before its next delta and
ends with status `cancelled` (item `incomplete`), and `cancel()` returns once `response.done` is
out. `aclose()` (connection gone) cancels the task and sends nothing more.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from app.local_upstream import pcm
from app.local_upstream.arguments import build_arguments
from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.conversation import (
    Conversation,
    Item,
    Tokens,
    audio_tokens,
    text_tokens,
)
from app.local_upstream.events import Send, new_id, server_event

logger = logging.getLogger(__name__)

TONE_HZ = 440.0
TONE_MS_PER_20_CHARS = 500
TRANSCRIPT_PIECES = 3
ARGUMENT_PIECES = 3  # deltas per tool call's arguments, as a model streams a few tokens each
ARGUMENT_PIECE_MIN_CHARS = 4  # so "{}" stays one delta
CLOSE_TIMEOUT_S = 5.0


@dataclass
class ResponseParams:
    """The effective settings of one response: the session's, with `response.create` overrides."""

    conversation: bool  # False for `conversation: "none"` (out of band)
    output_modalities: list[str]
    output_format: dict[str, Any]
    voice: Any
    instructions: str
    tools: list[dict[str, Any]]
    tool_choice: Any
    max_output_tokens: Any
    metadata: Any = None


class _AbortedError(Exception):
    """The `drop_after_audio_deltas` knob cut the connection."""


@dataclass(eq=False)  # identity semantics: runs live in a set
class ResponseRun:
    """A response in flight. Build it, `await begin()`, then `start()` the streaming task."""

    params: ResponseParams
    conversation: Conversation
    send: Send
    knobs: LocalUpstreamConfig
    abort: Callable[[], None]
    input: Tokens  # context tokens, counted when the response was created
    cached: Tokens
    rate_limits: list[dict[str, Any]]
    on_finish: Callable[[ResponseRun], None]
    id: str = field(default_factory=lambda: new_id("resp"))
    task: asyncio.Task[None] | None = None
    output_tokens: Tokens = Tokens()
    _cancel_reason: str | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _output: list[dict[str, Any]] = field(default_factory=list)
    _audio_deltas: int = 0

    async def begin(self) -> None:
        """Send `response.created` and `rate_limits.updated` before the caller reads on."""
        await self.send(server_event("response.created", response=self._object("in_progress")))
        await self.send(server_event("rate_limits.updated", rate_limits=self.rate_limits))

    def start(self) -> None:
        """Stream the rest in a task; the session keeps this object (and so the task)."""
        self.task = asyncio.create_task(self._run(), name=f"local-upstream-{self.id}")

    async def cancel(self, reason: str) -> None:
        """Stop before the next delta and wait (bounded) for `response.done`."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self._wake.set()
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=CLOSE_TIMEOUT_S)

    async def aclose(self) -> None:
        """Connection gone: stop at once, send nothing more (bounded wait)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=CLOSE_TIMEOUT_S)

    async def _run(self) -> None:
        try:
            if self._cancel_reason is None:
                tool = self._function_to_call()
                if tool is None:
                    await self._stream_message()
                else:
                    await self._stream_function_call(tool)
            usage = self._usage()
            await self.send(server_event("response.done", response=self._object(usage=usage)))
        except _AbortedError:
            logger.info("response %s: connection aborted by drop_after_audio_deltas", self.id)
        except ConnectionClosed:
            logger.debug("response %s: connection closed while streaming", self.id)
        except Exception:
            # The session boundary for the streaming task: log once, never leak an exception.
            logger.exception("response %s failed", self.id)
        finally:
            self.on_finish(self)

    def _object(
        self, status: str | None = None, usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        reason = self._cancel_reason
        if status is None:
            status = "cancelled" if reason else "completed"
        details = {"type": "cancelled", "reason": reason} if status == "cancelled" else None
        params = self.params
        return {
            "object": "realtime.response",
            "id": self.id,
            "conversation_id": self.conversation.id if params.conversation else None,
            "output_modalities": params.output_modalities,
            "max_output_tokens": params.max_output_tokens,
            "audio": {"output": {"format": params.output_format, "voice": params.voice}},
            "metadata": params.metadata,
            "status": status,
            "status_details": details,
            "output": list(self._output),
            "usage": usage,
        }

    def _usage(self) -> dict[str, Any]:
        inp, cached, out = self.input, self.cached, self.output_tokens
        return {
            "total_tokens": inp.total + out.total,
            "input_tokens": inp.total,
            "output_tokens": out.total,
            "input_token_details": {
                "text_tokens": inp.text,
                "audio_tokens": inp.audio,
                "image_tokens": inp.image,
                "cached_tokens": cached.total,
                "cached_tokens_details": {
                    "text_tokens": cached.text,
                    "audio_tokens": cached.audio,
                    "image_tokens": cached.image,
                },
            },
            "output_token_details": {"text_tokens": out.text, "audio_tokens": out.audio},
        }

    def _function_to_call(self) -> dict[str, Any] | None:
        """The function tool this response calls, if any."""
        functions: list[dict[str, Any]] = [
            t
            for t in self.params.tools
            if t.get("type") == "function" and isinstance(t.get("name"), str)
        ]
        choice = self.params.tool_choice
        source = self.conversation.last_input()
        if not functions or choice == "none" or source is None or source.data["type"] != "message":
            return None
        if isinstance(choice, dict):
            return next((t for t in functions if t["name"] == choice.get("name")), None)
        if choice == "required":
            return functions[0]
        text = _text_of(source).lower()
        for tool in functions:
            name = str(tool["name"]).lower()
            if name in text or name.replace("_", " ") in text:
                return tool
        return None

    async def _open_item(self, item: Item) -> str | None:
        """Announce a new output item; returns the item before it in the conversation."""
        previous = None
        await self.send(
            server_event(
                "response.output_item.added",
                response_id=self.id,
                output_index=0,
                item=item.public(),
            )
        )
        if self.params.conversation:
            previous = self.conversation.insert(item)
            await self.send(
                server_event(
                    "conversation.item.added", previous_item_id=previous, item=item.public()
                )
            )
        return previous

    async def _close_item(self, item: Item, previous: str | None) -> None:
        item.data["status"] = "incomplete" if self._cancel_reason else "completed"
        if self.params.conversation:
            await self.send(
                server_event(
                    "conversation.item.done", previous_item_id=previous, item=item.public()
                )
            )
        await self.send(
            server_event(
                "response.output_item.done", response_id=self.id, output_index=0, item=item.public()
            )
        )
        self._output.append(item.public())

    async def _stream_function_call(self, tool: dict[str, Any]) -> None:
        name = str(tool["name"])
        source = self.conversation.last_input()
        text = _text_of(source) if source is not None else ""
        arguments = json.dumps(
            build_arguments(tool.get("parameters"), text, tool_name=name),
            ensure_ascii=False,
            separators=(",", ":"),
        )
        item = Item(
            data={
                "id": new_id("item"),
                "type": "function_call",
                "object": "realtime.item",
                "status": "in_progress",
                "name": name,
                "call_id": new_id("call"),
                "arguments": "",
            }
        )
        previous = await self._open_item(item)
        ids = {
            "response_id": self.id,
            "item_id": item.id,
            "output_index": 0,
            "call_id": item.data["call_id"],
        }
        sent = ""
        for piece in _pieces(arguments, ARGUMENT_PIECES, ARGUMENT_PIECE_MIN_CHARS):
            if self._cancel_reason is not None:
                break
            await self.send(
                server_event("response.function_call_arguments.delta", **ids, delta=piece)
            )
            sent += piece
            item.data["arguments"] = sent
            await asyncio.sleep(0)  # let the receive loop (a cancel) run between deltas
        if self._cancel_reason is None:
            await self.send(
                server_event(
                    "response.function_call_arguments.done", **ids, name=name, arguments=sent
                )
            )
        self.output_tokens = Tokens(text=text_tokens(name + item.data["arguments"]))
        await self._close_item(item, previous)

    async def _stream_message(self) -> None:
        fmt = str(self.params.output_format["type"])
        audio_mode = self.params.output_modalities == ["audio"]
        item = Item(
            data={
                "id": new_id("item"),
                "type": "message",
                "object": "realtime.item",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            },
            audio_format=fmt,
        )
        previous = await self._open_item(item)
        ids = {"response_id": self.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        empty: dict[str, Any] = (
            {"type": "audio", "transcript": ""} if audio_mode else {"type": "text", "text": ""}
        )
        await self.send(server_event("response.content_part.added", **ids, part=empty))
        transcript, audio = self._compose(fmt, with_audio=audio_mode)
        chunk = max(1, self.knobs.audio_delta_ms) * pcm.BYTES_PER_MS[fmt]
        chunks = [audio[i : i + chunk] for i in range(0, len(audio), chunk)]
        steps = _interleave(_split(transcript, TRANSCRIPT_PIECES), chunks)
        said = ""
        started = asyncio.get_running_loop().time()
        for payload in steps:
            if self._cancel_reason is not None:
                break
            if isinstance(payload, str):
                said += payload
                event_type = (
                    "response.output_audio_transcript.delta"
                    if audio_mode
                    else "response.output_text.delta"
                )
                await self.send(server_event(event_type, **ids, delta=payload))
                continue
            await self._send_audio(ids, payload, item)
            await self._pace(started, item.audio_ms)
        if audio_mode:
            part = {"type": "audio", "transcript": said}
            item.data["content"] = [{"type": "output_audio", "transcript": said}]
            await self.send(server_event("response.output_audio.done", **ids))
            await self.send(
                server_event("response.output_audio_transcript.done", **ids, transcript=said)
            )
        else:
            part = {"type": "text", "text": said}
            item.data["content"] = [{"type": "output_text", "text": said}]
            await self.send(server_event("response.output_text.done", **ids, text=said))
        await self.send(server_event("response.content_part.done", **ids, part=part))
        self.output_tokens = Tokens(text=text_tokens(said), audio=audio_tokens(item.audio_ms))
        await self._close_item(item, previous)

    async def _send_audio(self, ids: dict[str, Any], chunk: bytes, item: Item) -> None:
        self._maybe_drop()
        delta = base64.b64encode(chunk).decode("ascii")
        await self.send(server_event("response.output_audio.delta", **ids, delta=delta))
        item.audio += chunk
        self._audio_deltas += 1
        self._maybe_drop()

    def _maybe_drop(self) -> None:
        limit = self.knobs.drop_after_audio_deltas
        if limit is not None and self._audio_deltas >= limit:
            self.abort()
            raise _AbortedError

    async def _pace(self, started: float, sent_ms: int) -> None:
        if not self.knobs.realtime_pacing:
            await asyncio.sleep(0)  # let the receive loop (appends, cancels) run between deltas
            return
        delay = started + sent_ms / 1000 - asyncio.get_running_loop().time()
        if delay > 0:
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()  # a cancel cuts the wait short
            except TimeoutError:
                pass

    def _compose(self, fmt: str, *, with_audio: bool) -> tuple[str, bytes]:
        source = self.conversation.last_input()
        if source is not None and source.data["type"] == "message" and source.audio:
            transcript = f"You said something for {source.audio_ms / 1000:.1f} seconds."
            audio = pcm.convert(bytes(source.audio), source.audio_format, fmt)
            return transcript, audio if with_audio else b""
        if source is None:
            transcript = "Hello from the local upstream."
        elif source.data["type"] == "function_call_output":
            transcript = f"The tool returned: {source.data['output']}"
        else:
            transcript = f"You said: {_text_of(source)}"
        if not with_audio:
            return transcript, b""
        duration = TONE_MS_PER_20_CHARS * max(1, -(-len(transcript) // 20))
        return transcript, pcm.tone(TONE_HZ, duration, fmt=fmt)


def _text_of(item: Item) -> str:
    parts = item.data.get("content", [])
    return " ".join(p.get("text") or "" for p in parts if p.get("type") == "input_text")


def _pieces(text: str, pieces: int, min_chars: int) -> list[str]:
    """Cut `text` into at most `pieces` consecutive slices of at least `min_chars` (bar one)."""
    size = max(min_chars, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)] or [text]


def _split(text: str, pieces: int) -> list[str]:
    """Split `text` at word boundaries into at most `pieces` deltas that join back to it."""
    words = text.split(" ")
    size = max(1, -(-len(words) // pieces))
    groups = [words[i : i + size] for i in range(0, len(words), size)]
    return [("" if i == 0 else " ") + " ".join(g) for i, g in enumerate(groups)]


def _interleave(texts: list[str], chunks: list[bytes]) -> list[str | bytes]:
    """Spread transcript deltas evenly over the audio deltas, the first text before any audio."""
    steps: list[str | bytes] = []
    next_text = 0
    for index, chunk in enumerate(chunks):
        while next_text < len(texts) and next_text * len(chunks) // len(texts) <= index:
            steps.append(texts[next_text])
            next_text += 1
        steps.append(chunk)
    steps.extend(texts[next_text:])
    return steps
