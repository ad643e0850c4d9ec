"""Usage accounting: split a Realtime `usage` object into kinds, find a model's price, cost it.

Pure functions and one lookup table, no I/O: the metrics (`metrics.py`) and the session core's
budgets price the same usage the same way.

The kinds partition each direction: cached tokens count under their cached kind only, so the
kinds of a direction always add up to the usage's `input_tokens` / `output_tokens`
(REALTIME.md §8.1; a server that reports inconsistent details has the difference put on `text`).
Transcription usage (REALTIME.md §8.2, §14.4) is either tokens, split the same way, or a
duration (`{"type": "duration", "seconds": 1.8}`, whisper-1), priced per minute.
"""

from __future__ import annotations

import math
from typing import Any

from app.config import ModelPrice

Kind = tuple[str, str]  # (direction, kind)

INPUT_KINDS = ("text", "audio", "image", "cached_text", "cached_audio", "cached_image")
OUTPUT_KINDS = ("text", "audio")
ALL_KINDS: tuple[Kind, ...] = tuple(("input", k) for k in INPUT_KINDS) + tuple(
    ("output", k) for k in OUTPUT_KINDS
)
# The `ModelPrice` field (USD per million tokens) of each kind.
_PRICE_FIELDS: dict[Kind, str] = {
    ("input", "text"): "input_text",
    ("input", "audio"): "input_audio",
    ("input", "image"): "input_image",
    ("input", "cached_text"): "cached_text",
    ("input", "cached_audio"): "cached_audio",
    ("input", "cached_image"): "cached_image",
    ("output", "text"): "output_text",
    ("output", "audio"): "output_audio",
}
_MODALITIES = ("text", "audio", "image")


class Pricing:
    """The price of each model: by its exact name, or by an alias naming a priced model.

    Never by prefix: `gpt-realtime-1.5` is a model of its own, not a `gpt-realtime` snapshot,
    so a dated snapshot is priced only where `aliases` maps it to its family.

    Args:
        prices: model name -> price (`Settings.prices`).
        aliases: model name -> the name it is priced as (`Settings.price_aliases`); one step,
            and an alias never overrides an exact price.
    """

    def __init__(self, prices: dict[str, ModelPrice], aliases: dict[str, str]) -> None:
        self.prices = dict(prices)
        self.aliases = dict(aliases)

    def price(self, model: str) -> ModelPrice | None:
        """The price of `model`, or None if it has none (it is then counted as unpriced)."""
        price = self.prices.get(model)
        if price is None and model in self.aliases:
            price = self.prices.get(self.aliases[model])
        return price

    def names(self) -> frozenset[str]:
        """Every model name with a price or an alias (a superset of those `price` prices)."""
        return frozenset(self.prices) | frozenset(self.aliases)


def _int(mapping: Any, key: str) -> int:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _is_duration(usage: Any) -> bool:
    return isinstance(usage, dict) and usage.get("type") == "duration"


def usage_seconds(usage: Any) -> float:
    """The seconds of audio a duration-type transcription usage bills (0.0 for any other)."""
    if not _is_duration(usage):
        return 0.0
    seconds = usage.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return 0.0
    return float(seconds) if math.isfinite(seconds) and seconds > 0 else 0.0


def _spread(total: int, weights: tuple[int, ...]) -> tuple[int, ...]:
    """`total` split in proportion to `weights` (largest remainders), each share within its
    weight when `total <= sum(weights)`; ties go to the earlier weight."""
    whole = sum(weights)
    if not whole:
        return tuple(0 for _ in weights)
    shares = [total * weight // whole for weight in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return tuple(shares)


def _split_input(usage: dict[str, Any]) -> dict[Kind, int]:
    total = _int(usage, "input_tokens")
    details = usage.get("input_token_details")
    # Each modality's tokens, cached ones included, bounded so they never exceed the total;
    # text takes what audio and image leave (a server's text_tokens is not needed).
    audio = min(_int(details, "audio_tokens"), total)
    image = min(_int(details, "image_tokens"), total - audio)
    text = total - audio - image
    cached_details = details.get("cached_tokens_details") if isinstance(details, dict) else None
    if isinstance(cached_details, dict):
        cached = tuple(
            min(_int(cached_details, f"{m}_tokens"), n)
            for m, n in zip(_MODALITIES, (text, audio, image), strict=True)
        )
    else:
        # Only the total is known (the beta SDK type has no breakdown, REALTIME.md §8.1): the
        # cached tokens are a part of the input, taken from each modality in proportion to its
        # tokens, so none is counted both as cached and as fresh.
        cached = _spread(min(_int(details, "cached_tokens"), total), (text, audio, image))
    fresh = (text - cached[0], audio - cached[1], image - cached[2])
    parts = dict(zip((("input", m) for m in _MODALITIES), fresh, strict=True))
    parts.update(zip((("input", f"cached_{m}") for m in _MODALITIES), cached, strict=True))
    return parts


def split_usage(usage: Any) -> dict[Kind, int]:
    """Tokens of a `response.done` (or token-type transcription) usage, by direction and kind.

    Only kinds with tokens appear; a duration-type usage has none (`usage_seconds`).
    """
    if not isinstance(usage, dict) or _is_duration(usage):
        return {}
    parts = _split_input(usage)
    output_total = _int(usage, "output_tokens")
    output_audio = min(_int(usage.get("output_token_details"), "audio_tokens"), output_total)
    parts[("output", "audio")] = output_audio
    parts[("output", "text")] = output_total - output_audio
    return {kind: count for kind, count in parts.items() if count}


def usage_cost(parts: dict[Kind, int], seconds: float, price: ModelPrice) -> float:
    """USD of `parts` (from `split_usage`) and `seconds` (from `usage_seconds`) at `price`."""
    per_million = 0.0
    for kind, count in parts.items():
        per_million += float(getattr(price, _PRICE_FIELDS[kind])) * count
    return per_million / 1_000_000 + price.per_minute * seconds / 60


def usage_totals(usage: Any, price: ModelPrice | None) -> tuple[int, float]:
    """Tokens and USD of one `response.done` usage or one transcription usage.

    Args:
        usage: the `usage` object as the server sent it (anything: a malformed one counts 0).
        price: the model's price (`Pricing.price`); None for an unpriced model.

    Returns:
        (tokens counted, 0 for a duration-type usage; USD, 0.0 when `price` is None).
    """
    parts = split_usage(usage)
    tokens = sum(parts.values())
    if price is None:
        return tokens, 0.0
    return tokens, usage_cost(parts, usage_seconds(usage), price)
