"""Token accounting: split a Realtime `usage` object into kinds, and price it.

The kinds partition each direction: cached tokens count under their cached kind only, so the
kinds of a direction always add up to the usage's `input_tokens` / `output_tokens`
(REALTIME.md §8.1; a server that reports inconsistent details has the difference put on `text`).
"""

from __future__ import annotations

from typing import Any

from app.config import ModelPrice

Kind = tuple[str, str]  # (direction, kind)

INPUT_KINDS = ("text", "audio", "image", "cached_text", "cached_audio", "cached_image")
OUTPUT_KINDS = ("text", "audio")
ALL_KINDS: tuple[Kind, ...] = tuple(("input", k) for k in INPUT_KINDS) + tuple(
    ("output", k) for k in OUTPUT_KINDS
)


def _int(mapping: Any, key: str) -> int:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, int) and value > 0 else 0


def split_usage(usage: Any) -> dict[Kind, int]:
    """Tokens of a `response.done` (or token-type transcription) usage, by direction and kind."""
    if not isinstance(usage, dict):
        return {}
    details = usage.get("input_token_details")
    cached = details.get("cached_tokens_details") if isinstance(details, dict) else None
    parts: dict[Kind, int] = {}
    cached_text, cached_audio = _int(cached, "text_tokens"), _int(cached, "audio_tokens")
    cached_image = _int(cached, "image_tokens")
    if cached is None:  # only the total is known: the cached tokens were text
        cached_text = _int(details, "cached_tokens")
    audio = max(_int(details, "audio_tokens") - cached_audio, 0)
    image = max(_int(details, "image_tokens") - cached_image, 0)
    input_total = _int(usage, "input_tokens")
    known = cached_text + cached_audio + cached_image + audio + image
    parts[("input", "text")] = max(input_total - known, 0)
    parts[("input", "audio")] = audio
    parts[("input", "image")] = image
    parts[("input", "cached_text")] = cached_text
    parts[("input", "cached_audio")] = cached_audio
    parts[("input", "cached_image")] = cached_image
    output_total = _int(usage, "output_tokens")
    output_audio = min(_int(usage.get("output_token_details"), "audio_tokens"), output_total)
    parts[("output", "audio")] = output_audio
    parts[("output", "text")] = output_total - output_audio
    return {kind: count for kind, count in parts.items() if count}


def price_lookup(prices: dict[str, ModelPrice], model: str) -> ModelPrice | None:
    """The price of `model`, matching dated snapshots to their family by longest prefix."""
    best = None
    for name in prices:
        if (model == name or model.startswith(name + "-")) and (
            best is None or len(name) > len(best)
        ):
            best = name
    return prices[best] if best is not None else None


def per_token_prices(price: ModelPrice) -> dict[Kind, float]:
    """USD per token for each kind, from a per-million price entry."""
    per_million = {
        ("input", "text"): price.input_text,
        ("input", "audio"): price.input_audio,
        ("input", "image"): price.input_image,
        ("input", "cached_text"): price.cached_text,
        ("input", "cached_audio"): price.cached_audio,
        ("input", "cached_image"): price.cached_image,
        ("output", "text"): price.output_text,
        ("output", "audio"): price.output_audio,
    }
    return {kind: usd / 1_000_000 for kind, usd in per_million.items()}
