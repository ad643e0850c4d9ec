"""The local upstream's conversation: ordered items with their audio, and token counting.

Token counts are invented but deterministic and internally consistent (REALTIME.md §8): text costs
`ceil(chars / 4)` tokens, audio 10 tokens per second (`ceil(ms / 100)`), an image 85 tokens.
"""

from __future__ import annotations

import base64
import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

from app.local_upstream import pcm

IMAGE_TOKENS = 85


def text_tokens(text: str) -> int:
    """Tokens for a piece of text: one per four characters, rounded up."""
    return math.ceil(len(text) / 4)


def audio_tokens(ms: int) -> int:
    """Tokens for audio: ten per second, rounded up."""
    return math.ceil(ms / 100)


@dataclass(frozen=True)
class Tokens:
    """Token counts by kind."""

    text: int = 0
    audio: int = 0
    image: int = 0

    @property
    def total(self) -> int:
        return self.text + self.audio + self.image

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.text + other.text, self.audio + other.audio, self.image + other.image)

    def cap(self, other: Tokens) -> Tokens:
        """The per-kind minimum, so a cached count never exceeds the input it is part of."""
        return Tokens(
            min(self.text, other.text), min(self.audio, other.audio), min(self.image, other.image)
        )


@dataclass
class Item:
    """A conversation item: `data` is what the server shows (never audio); `audio` its bytes."""

    data: dict[str, Any]
    audio: bytearray = field(default_factory=bytearray)
    audio_format: str = pcm.PCM

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def audio_ms(self) -> int:
        return len(self.audio) // pcm.BYTES_PER_MS[self.audio_format]

    def public(self) -> dict[str, Any]:
        """A copy safe to put in an event (later changes to the item do not leak into it)."""
        return copy.deepcopy(self.data)

    def with_audio(self) -> dict[str, Any]:
        """The item as `conversation.item.retrieved` shows it, audio included as base64."""
        data = self.public()
        for part in data.get("content", []):
            if part.get("type") in ("input_audio", "output_audio") and self.audio:
                part["audio"] = base64.b64encode(self.audio).decode("ascii")
        return data

    def tokens(self) -> Tokens:
        """What this item costs as input context."""
        kind = self.data.get("type")
        if kind == "function_call":
            return Tokens(text=text_tokens(self.data["name"] + self.data["arguments"]))
        if kind == "function_call_output":
            return Tokens(text=text_tokens(self.data["output"]))
        total = Tokens()
        for part in self.data.get("content", []):
            part_type = part.get("type")
            if part_type in ("input_text", "output_text", "text"):
                total += Tokens(text=text_tokens(part.get("text") or ""))
            elif part_type in ("input_audio", "output_audio", "audio"):
                total += Tokens(audio=audio_tokens(self.audio_ms))
            elif part_type == "input_image":
                total += Tokens(image=IMAGE_TOKENS)
        return total


class Conversation:
    """The default conversation: items in order, addressed by id."""

    def __init__(self) -> None:
        self.id = ""
        self.items: list[Item] = []

    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def find(self, item_id: Any) -> Item | None:
        return next((item for item in self.items if item.id == item_id), None)

    def insert(
        self, item: Item, previous_item_id: str | None = None, *, at_root: bool = False
    ) -> str | None:
        """Insert after `previous_item_id` (else last, or first); return the actual predecessor."""
        if at_root:
            self.items.insert(0, item)
            return None
        if previous_item_id is None:
            previous = self.last_id()
            self.items.append(item)
            return previous
        index = next(i for i, it in enumerate(self.items) if it.id == previous_item_id)
        self.items.insert(index + 1, item)
        return previous_item_id

    def delete(self, item_id: str) -> bool:
        item = self.find(item_id)
        if item is None:
            return False
        self.items.remove(item)
        return True

    def context_tokens(self, instructions: str, tools: list[dict[str, Any]]) -> Tokens:
        """Input tokens for a response: instructions, tool definitions and every item."""
        total = Tokens(
            text=text_tokens(instructions) + (text_tokens(json.dumps(tools)) if tools else 0)
        )
        for item in self.items:
            total += item.tokens()
        return total

    def last_input(self) -> Item | None:
        """The most recent user message or function-call output: what a response answers."""
        for item in reversed(self.items):
            data = item.data
            if data.get("type") == "function_call_output" or (
                data.get("type") == "message" and data.get("role") == "user"
            ):
                return item
        return None
