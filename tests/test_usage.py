"""Usage accounting without sockets: usage objects (REALTIME.md §8, §14.4) in, kinds and USD out."""

from __future__ import annotations

import copy

import pytest

from app.config import DEFAULT_PRICE_ALIASES, DEFAULT_PRICES, ModelPrice, Settings
from app.core.usage import Pricing, split_usage, usage_cost, usage_seconds, usage_totals
from tests.helpers import GA_USAGE

# A GA `response.done` usage with the cached tokens broken down (examples/b_ga_…jsonl).
WITH_DETAILS = GA_USAGE
# The same usage as the beta SDK type has it: the cached total only.
WITHOUT_DETAILS = copy.deepcopy(WITH_DETAILS)
del WITHOUT_DETAILS["input_token_details"]["cached_tokens_details"]
# A beta `response.done` usage with no breakdown, all text (examples/a_beta_…jsonl).
BETA_TEXT = {
    "total_tokens": 268,
    "input_tokens": 254,
    "output_tokens": 14,
    "input_token_details": {"text_tokens": 254, "audio_tokens": 0, "cached_tokens": 192},
    "output_token_details": {"text_tokens": 14, "audio_tokens": 0},
}
# Transcription usage: tokens (gpt-4o-*-transcribe) and duration (whisper-1), REALTIME.md §14.4.
TRANSCRIPTION_TOKENS = {
    "type": "tokens",
    "input_tokens": 31,
    "output_tokens": 9,
    "total_tokens": 40,
    "input_token_details": {"text_tokens": 12, "audio_tokens": 19},
}
DURATION = {"type": "duration", "seconds": 1.8}


def totals(parts: dict[tuple[str, str], int]) -> tuple[int, int]:
    """The input and output sums of a split."""
    inputs = sum(n for (direction, _), n in parts.items() if direction == "input")
    return inputs, sum(parts.values()) - inputs


def test_cached_tokens_with_their_breakdown_count_under_their_cached_kind_only():
    """With `cached_tokens_details`, each cached token counts once, under its cached kind."""
    assert split_usage(WITH_DETAILS) == {
        ("input", "text"): 294 - 256,
        ("input", "audio"): 158 - 128,
        ("input", "cached_text"): 256,
        ("input", "cached_audio"): 128,
        ("output", "text"): 12,
        ("output", "audio"): 34,
    }


def test_cached_tokens_without_their_breakdown_are_not_counted_twice():
    """Without `cached_tokens_details`, the cached total comes out of the modalities' tokens."""
    parts = split_usage(WITHOUT_DETAILS)
    assert totals(parts) == (452, 46)
    cached = parts[("input", "cached_text")] + parts[("input", "cached_audio")]
    assert cached == 384
    assert parts[("input", "text")] + parts[("input", "cached_text")] == 294
    assert parts[("input", "audio")] + parts[("input", "cached_audio")] == 158
    # Spread in proportion to the modalities: 384 x 294/452 = 249.8, 384 x 158/452 = 134.2.
    assert (parts[("input", "cached_text")], parts[("input", "cached_audio")]) == (250, 134)


def test_a_text_only_usage_without_breakdown_has_its_cached_tokens_as_cached_text():
    """The beta shape with all-text input: 192 cached text, 62 fresh text, nothing else."""
    assert split_usage(BETA_TEXT) == {
        ("input", "text"): 62,
        ("input", "cached_text"): 192,
        ("output", "text"): 14,
    }


@pytest.mark.parametrize("with_breakdown", [True, False])
def test_inconsistent_details_still_add_up_to_the_totals(with_breakdown):
    """More cached (or audio) tokens than input (a spec example has it): kinds still sum up."""
    details: dict = {"text_tokens": 100, "audio_tokens": 300, "cached_tokens": 384}
    if with_breakdown:
        details["cached_tokens_details"] = {"text_tokens": 200, "audio_tokens": 184}
    usage = {
        "input_tokens": 127,
        "output_tokens": 5,
        "input_token_details": details,
        "output_token_details": {"audio_tokens": 9},
    }
    parts = split_usage(usage)
    assert totals(parts) == (127, 5)


def test_token_transcription_usage_splits_like_a_response():
    """`type: tokens` transcription usage: its input details, its output as text."""
    assert split_usage(TRANSCRIPTION_TOKENS) == {
        ("input", "text"): 12,
        ("input", "audio"): 19,
        ("output", "text"): 9,
    }
    assert usage_seconds(TRANSCRIPTION_TOKENS) == 0.0


def test_duration_usage_has_seconds_and_no_tokens():
    """`type: duration` usage (whisper-1) counts seconds, never tokens."""
    assert split_usage(DURATION) == {}
    assert usage_seconds(DURATION) == 1.8
    assert usage_seconds({"type": "duration", "seconds": 3}) == 3.0


@pytest.mark.parametrize(
    "usage",
    [None, [], "x", {}, {"type": "duration"}, {"type": "duration", "seconds": -1},
     {"type": "duration", "seconds": True}, {"type": "duration", "seconds": "2"},
     {"input_tokens": "9"}, {"input_tokens": True, "output_tokens": -4}],
)  # fmt: skip
def test_malformed_usage_counts_nothing(usage):
    """A usage the relay cannot read counts no tokens, no seconds and no cost."""
    assert split_usage(usage) == {}
    assert usage_seconds(usage) == 0.0
    assert usage_totals(usage, DEFAULT_PRICES["gpt-realtime"]) == (0, 0.0)


def test_usage_totals_of_a_response_price_each_kind():
    """Tokens are the input plus output tokens; USD is each kind at its per-million price."""
    price = DEFAULT_PRICES["gpt-realtime"]
    tokens, usd = usage_totals(WITH_DETAILS, price)
    assert tokens == 498
    expected = (38 * 4.0 + 30 * 32.0 + 256 * 0.4 + 128 * 0.4 + 12 * 16.0 + 34 * 64.0) / 1e6
    assert usd == pytest.approx(expected)
    assert usage_totals(WITHOUT_DETAILS, price)[0] == 498


def test_usage_totals_of_transcriptions():
    """Token transcription usage is priced per token, duration usage per minute."""
    tokens, usd = usage_totals(TRANSCRIPTION_TOKENS, DEFAULT_PRICES["gpt-4o-mini-transcribe"])
    assert tokens == 40
    assert usd == pytest.approx((12 * 1.25 + 19 * 3.0 + 9 * 5.0) / 1e6)
    assert usage_totals(DURATION, DEFAULT_PRICES["whisper-1"]) == (0, pytest.approx(0.00018))
    # A token-priced model reporting a duration has no per-minute price: it costs nothing.
    assert usage_totals(DURATION, DEFAULT_PRICES["gpt-4o-transcribe"]) == (0, 0.0)


def test_usage_totals_of_an_unpriced_model_count_tokens_at_no_cost():
    """With no price, the tokens still count (for token budgets) and the USD is 0.0."""
    assert usage_totals(WITH_DETAILS, None) == (498, 0.0)
    assert usage_totals(DURATION, None) == (0, 0.0)


def test_usage_cost_adds_tokens_and_minutes():
    """`usage_cost` prices kinds per million tokens and seconds per minute."""
    price = ModelPrice(input_audio=10.0, per_minute=0.6)
    assert usage_cost({("input", "audio"): 100_000}, 30.0, price) == pytest.approx(1.0 + 0.3)


def test_pricing_matches_exact_names_and_aliases_never_prefixes():
    """Dated snapshots are priced through aliases; `gpt-realtime-1.5` is not `gpt-realtime`."""
    pricing = Pricing(DEFAULT_PRICES, DEFAULT_PRICE_ALIASES)
    assert pricing.price("gpt-realtime") is DEFAULT_PRICES["gpt-realtime"]
    assert pricing.price("gpt-realtime-2025-08-28") is DEFAULT_PRICES["gpt-realtime"]
    assert pricing.price("gpt-realtime-mini-2025-12-15") is DEFAULT_PRICES["gpt-realtime-mini"]
    assert (
        pricing.price("gpt-4o-realtime-preview-2024-12-17")
        is (DEFAULT_PRICES["gpt-4o-realtime-preview"])
    )
    assert pricing.price("whisper-1") is DEFAULT_PRICES["whisper-1"]
    for unknown in (
        "gpt-realtime-1.5",
        "gpt-realtime-whisper",
        "gpt-realtime-2",
        "gpt-realtime-2099-01-01",
        "gpt-4o-realtime-preview-2024-10-01",
        "GPT-REALTIME",
        "",
    ):
        assert pricing.price(unknown) is None, unknown


def test_an_exact_price_wins_over_an_alias_and_an_alias_to_nothing_prices_nothing():
    """Aliases take one step, to a priced name, and never override an exact price."""
    own = ModelPrice(input_text=1.0)
    pricing = Pricing(
        {"a": ModelPrice(input_text=2.0), "b": own},
        {"b": "a", "c": "b", "d": "missing"},
    )
    assert pricing.price("b") is own
    assert pricing.price("c") is own
    assert pricing.price("d") is None
    assert pricing.names() == frozenset({"a", "b", "c", "d"})


def test_every_default_alias_names_a_priced_family():
    """Each default alias points at a model of DEFAULT_PRICES, and is a dated name of it."""
    for snapshot, family in DEFAULT_PRICE_ALIASES.items():
        assert family in DEFAULT_PRICES
        assert snapshot.startswith(family + "-20")


def test_settings_take_aliases_from_keyword_arguments():
    """`price_aliases` defaults to the snapshots and can be replaced."""
    assert Settings(openai_api_key="x").price_aliases == DEFAULT_PRICE_ALIASES
    settings = Settings(openai_api_key="x", price_aliases={"my-deployment": "gpt-realtime"})
    pricing = Pricing(settings.prices, settings.price_aliases)
    assert pricing.price("my-deployment") == DEFAULT_PRICES["gpt-realtime"]
    assert pricing.price("gpt-realtime-2025-08-28") is None  # replaced, not merged
