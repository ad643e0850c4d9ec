"""Every Prometheus metric of the relay, defined once, and the per-session meter that feeds them.

Names follow Prometheus' guide under the `realtime_relay` namespace, in base units. Label values
come from small known sets (tiers and models from the settings, fixed outcome/reason/code sets);
anything else is reported as `other`. Session ids, keys and addresses are never labels.
Each app owns its `CollectorRegistry`, so several apps (tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.audio.wire import ClientAudio
from app.config import Settings
from app.core.usage import ALL_KINDS, Kind, per_token_prices, price_lookup, split_usage

OTHER: Final = "other"

OUTCOMES: Final = frozenset(
    {
        "completed",
        "client_closed",
        "client_timeout",
        "limit",
        "upstream_error",
        "expired",
        "idle",
        "refused",
        "shutdown",
        "error",
    }
)
REJECTION_REASONS: Final = frozenset(
    {"unauthorized", "origin", "model", "limit", "limiter", "upstream", "protocol", "shutdown"}
)
# Error codes with a series of their own: the relay's (errors.py), the server's (REALTIME.md §10).
ERROR_CODES: Final = frozenset(
    {
        "invalid_json",
        "invalid_event",
        "unknown_event_type",
        "field_locked",
        "invalid_audio",
        "message_too_big",
        "unauthorized",
        "origin_not_allowed",
        "model_not_allowed",
        "unsupported_protocol",
        "session_limit_reached",
        "limiter_unavailable",
        "upstream_unavailable",
        "upstream_unauthorized",
        "upstream_rate_limited",
        "upstream_refused",
        "relay_error",
        "session_expired",
        "session_idle",
        "upstream_closed",
        "upstream_timeout",
        "client_timeout",
        "server_shutting_down",
        "conversation_already_has_active_response",
        "response_cancel_not_active",
        "input_audio_buffer_commit_empty",
        "unknown_parameter",
        "missing_required_parameter",
        "invalid_type",
        "invalid_value",
        "server_error",
        "rate_limit_exceeded",
    }
)
CLOSE_CODES: Final = frozenset({"1000", "1001", "1006", "1008", "1009", "1011", "1012", "1013"})
AUDIO_CODECS: Final = ("pcm16", "g711_ulaw", "g711_alaw", "opus")
_UPSTREAM_CODECS: Final = {
    "audio/pcm": "pcm16",
    "audio/pcmu": "g711_ulaw",
    "audio/pcma": "g711_alaw",
}
DIRECTIONS: Final = ("client_to_upstream", "upstream_to_client")

# Bucket bounds per quantity, in seconds.
ADDED_LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
TURN_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
CONNECT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
TRANSCODE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)


def _known(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


class RelayMetrics:
    """The relay's metrics in one registry, with their expected series created at zero."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tiers = frozenset(settings.tiers)
        models = {settings.session.model, *settings.prices}
        for tier in settings.tiers.values():
            models.update(tier.models)
        if settings.session.transcription:
            models.add(str(settings.session.transcription.get("model", "")))
        self.models = frozenset(models)
        self.prices = settings.prices
        ns, reg = "realtime_relay", self.registry

        self.sessions_active = Gauge(
            "sessions_active", "Sessions open now.", ["tier", "model"], namespace=ns, registry=reg
        )
        self.sessions = Counter(
            "sessions", "Sessions ended, by outcome.", ["tier", "model", "outcome"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.rejections = Counter(
            "session_rejections", "Sessions refused before they started.", ["tier", "reason"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.tokens = Counter(
            "tokens", "Tokens reported by the upstream's usage, by direction and kind.",
            ["tier", "model", "direction", "kind"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.cost = Counter(
            "cost_usd", "Cost of the tokens at the configured prices.", ["tier", "model"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.unpriced_tokens = Counter(
            "unpriced_tokens", "Tokens of models with no configured price.", ["tier", "model"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.turn_latency = Histogram(
            "turn_latency_seconds",
            "End of user speech (speech_stopped or commit) to the first response audio sent.",
            ["tier", "model"], buckets=TURN_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.first_audio = Histogram(
            "first_audio_seconds", "A client response.create to the first response audio sent.",
            ["tier", "model"], buckets=TURN_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.upstream_connect = Histogram(
            "upstream_connect_seconds", "Time to open the upstream WebSocket.",
            buckets=CONNECT_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.added_latency = Histogram(
            "added_latency_seconds", "Time an event spends inside the relay.", ["direction"],
            buckets=ADDED_LATENCY_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.session_duration = Histogram(
            "session_duration_seconds", "Length of sessions that reached the upstream.",
            buckets=DURATION_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.events = Counter(
            "events", "Events relayed.", ["direction"], namespace=ns, registry=reg
        )
        self.bytes = Counter(
            "bytes", "Frame bytes relayed.", ["direction"], namespace=ns, registry=reg
        )
        self.audio_seconds = Counter(
            "audio_seconds", "Seconds of audio relayed.", ["direction", "codec"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.errors = Counter(
            "errors", "Error events sent to clients, by source and code.", ["source", "code"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.upstream_closes = Counter(
            "upstream_closes", "Upstream connections that ended, by close code.", ["code"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.transcode = Histogram(
            "transcode_seconds", "Time to transcode one audio frame.", ["operation"],
            buckets=TRANSCODE_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self._usage: dict[tuple[str, str], tuple[dict[Kind, Counter], dict[Kind, float] | None]]
        self._usage = {}
        self.live: set[SessionMeter] = set()  # open sessions, whose tallies a scrape flushes
        self._create_series()

    def flush(self) -> None:
        """Bring the counters up to date with what open sessions have tallied."""
        for meter in list(self.live):
            meter.flush()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format, for `/metrics`."""
        self.flush()
        return generate_latest(self.registry)

    def _create_series(self) -> None:
        for tier in self.tiers:
            for reason in REJECTION_REASONS:
                self.rejections.labels(tier, reason)
        for direction in DIRECTIONS:
            self.events.labels(direction)
            self.bytes.labels(direction)
            self.added_latency.labels(direction)
        for direction in ("in", "out"):
            for codec in AUDIO_CODECS:
                self.audio_seconds.labels(direction, codec)

    def tier_label(self, tier: str) -> str:
        return _known(tier, self.tiers)

    def model_label(self, model: str) -> str:
        return _known(model, self.models)

    def reject(self, tier: str, reason: str) -> None:
        """Count a session refused before it reached the upstream."""
        self.rejections.labels(self.tier_label(tier), _known(reason, REJECTION_REASONS)).inc()

    def error(self, source: str, code: str) -> None:
        self.errors.labels(source, _known(code, ERROR_CODES)).inc()

    def upstream_closed(self, code: int | None) -> None:
        self.upstream_closes.labels(_known(str(code), CLOSE_CODES)).inc()

    def usage_counters(
        self, tier: str, model: str
    ) -> tuple[dict[Kind, Counter], dict[Kind, float] | None]:
        """The token counters of (`tier`, `model`) and the model's USD per token, built once."""
        key = (tier, model)
        cached = self._usage.get(key)
        if cached is None:
            counters = {kind: self.tokens.labels(tier, model, *kind) for kind in ALL_KINDS}
            price = price_lookup(self.prices, model)
            cached = self._usage[key] = (counters, per_token_prices(price) if price else None)
        return cached

    def session(
        self, tier: str, model: str, bytes_per_second: tuple[int, int], audio: ClientAudio
    ) -> SessionMeter:
        """A meter for a new session; `bytes_per_second` of the upstream input and output audio."""
        tier, model = self.tier_label(tier), self.model_label(model)
        return SessionMeter(self, tier, model, bytes_per_second, audio)


class SessionMeter:
    """One session's metric children, bound once at connect; called for every event.

    Timing anchors are stamped on arrival at the relay (events carry no timestamps, REALTIME.md
    §1.1): the end of user speech is the receipt of `input_audio_buffer.speech_stopped` (the server
    sends it `silence_duration_ms` after the speech ended) or of a client commit.
    """

    __slots__ = (
        "_metrics", "tier", "model", "_events_in", "_events_out", "_bytes_in", "_bytes_out",
        "_latency_in", "_latency_out", "_audio_in", "_audio_out", "_turn", "_first_audio",
        "_speech_end", "_response_requested", "_input_bytes_per_second", "_tokens", "_cost",
        "_prices", "_started", "_output_bytes_per_second",
        "_transcription_model", "_decoder", "_samples_in", "_binary_in", "_decode", "_encode",
        "_decoder_rate", "last_activity",
        "_n_in", "_bytes_in_tally", "_audio_in_tally", "_n_out", "_bytes_out_tally",
        "_audio_out_tally",
    )  # fmt: skip

    def __init__(
        self,
        metrics: RelayMetrics,
        tier: str,
        model: str,
        bytes_per_second: tuple[int, int],
        audio: ClientAudio,
    ) -> None:
        self._metrics = metrics
        self.tier, self.model = tier, model
        self._events_in = metrics.events.labels(DIRECTIONS[0])
        self._events_out = metrics.events.labels(DIRECTIONS[1])
        self._bytes_in = metrics.bytes.labels(DIRECTIONS[0])
        self._bytes_out = metrics.bytes.labels(DIRECTIONS[1])
        self._latency_in = metrics.added_latency.labels(DIRECTIONS[0])
        self._latency_out = metrics.added_latency.labels(DIRECTIONS[1])
        options = audio.options
        upstream_in = _UPSTREAM_CODECS[options.input_format["type"]]
        upstream_out = _UPSTREAM_CODECS[options.output_format["type"]]
        client_out = upstream_out if options.output_codec == "json" else options.output_codec
        self._audio_in = metrics.audio_seconds.labels("in", upstream_in)
        self._binary_in = metrics.audio_seconds.labels("in", options.input_codec)
        self._audio_out = metrics.audio_seconds.labels("out", client_out)
        self._decoder = audio.decoder
        self._decoder_rate = 24_000 if options.input_format["type"] == "audio/pcm" else 8_000
        self._samples_in = 0
        self._decode = metrics.transcode.labels("decode_" + options.input_codec)
        self._encode = metrics.transcode.labels("encode_" + options.output_codec)
        self._turn = metrics.turn_latency.labels(tier, model)
        self._first_audio = metrics.first_audio.labels(tier, model)
        self._input_bytes_per_second, self._output_bytes_per_second = bytes_per_second
        self._transcription_model = OTHER
        self._speech_end: float | None = None
        self._response_requested: float | None = None
        self._tokens, self._prices = metrics.usage_counters(tier, model)
        self._cost = metrics.cost.labels(tier, model)
        self._started = time.monotonic()
        # perf_counter of the last sign of conversation: a client event other than audio, or
        # speech detected upstream. The session's idle timeout reads it.
        self.last_activity = time.perf_counter()
        # Events, bytes and base64 audio characters are tallied here and added to their counters
        # at each scrape and at the end (`flush`): a counter's `inc` takes a lock, and three per
        # event were about 1 us of the relay's 22 us per event (bench/relay_bench.py, N=200).
        self._n_in = self._bytes_in_tally = self._audio_in_tally = 0
        self._n_out = self._bytes_out_tally = self._audio_out_tally = 0
        metrics.sessions_active.labels(tier, model).inc()
        metrics.live.add(self)

    def client_event(self, event_type: str, event: dict[str, Any], size: int, start: float) -> None:
        """Count a client event forwarded upstream; `start` is its `perf_counter` arrival."""
        self._n_in += 1
        self._bytes_in_tally += size
        if event_type == "input_audio_buffer.append":
            audio = event.get("audio")
            if isinstance(audio, str):
                self._audio_in_tally += len(audio)
        else:
            self.last_activity = start
            if event_type == "input_audio_buffer.commit":
                self._speech_end = start
            elif event_type == "response.create":
                self._response_requested = start
        self._latency_in.observe(time.perf_counter() - start)

    def client_audio(self, size: int, start: float, decoded: float) -> None:
        """Count a binary audio frame; `decoded` is the `perf_counter` when its decoding ended."""
        self._n_in += 1
        self._bytes_in_tally += size
        self._decode.observe(decoded - start)
        samples = self._decoder.samples
        self._binary_in.inc((samples - self._samples_in) / self._decoder_rate)
        self._samples_in = samples
        self._latency_in.observe(time.perf_counter() - start)

    def transcoded(self, seconds: float) -> None:
        """Time spent encoding one output delta for the client."""
        self._encode.observe(seconds)

    def upstream_event(
        self, event_type: str, event: dict[str, Any] | None, text: str, start: float
    ) -> None:
        """Count an upstream event sent to the client; `start` is its `perf_counter` arrival."""
        now = time.perf_counter()
        self._n_out += 1
        self._bytes_out_tally += len(text)
        if event_type == "response.output_audio.delta":
            self._audio_out_tally += _b64_field_len(text, '"delta"')
            if self._speech_end is not None:
                self._turn.observe(now - self._speech_end)
                self._speech_end = None
            if self._response_requested is not None:
                self._first_audio.observe(now - self._response_requested)
                self._response_requested = None
        elif event_type == "input_audio_buffer.speech_stopped":
            self._speech_end = start
        elif event_type == "input_audio_buffer.speech_started":
            self.last_activity = start
        elif event is not None:
            self._parsed_event(event_type, event)
        self._latency_out.observe(now - start)

    def _parsed_event(self, event_type: str, event: dict[str, Any]) -> None:
        if event_type == "response.done":
            response = event.get("response")
            if isinstance(response, dict):
                self.count_usage(response.get("usage"), self.model, self._tokens, self._prices)
            self._speech_end = self._response_requested = None
        elif event_type == "conversation.item.input_audio_transcription.completed":
            usage = event.get("usage")
            if isinstance(usage, dict) and usage.get("type") == "tokens":
                self.count_transcription(usage)
        elif event_type in ("session.created", "session.updated"):
            self._transcription_model = _transcription_model(event) or self._transcription_model
        elif event_type == "error":
            error = event.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            self._metrics.error("upstream", code if isinstance(code, str) else OTHER)

    def count_usage(
        self,
        usage: Any,
        model: str,
        counters: dict[Kind, Counter],
        prices: dict[Kind, float] | None,
    ) -> None:
        """Add a usage object's tokens (and their cost) to the counters of `model`."""
        parts = split_usage(usage)
        for kind, count in parts.items():
            counters[kind].inc(count)
        if prices is None:
            if parts:
                self._metrics.unpriced_tokens.labels(self.tier, model).inc(sum(parts.values()))
            return
        cost = sum(prices[kind] * count for kind, count in parts.items())
        if cost:
            self._metrics.cost.labels(self.tier, model).inc(cost)

    def count_transcription(self, usage: dict[str, Any]) -> None:
        """Transcription runs on its own model and is counted under that model's label."""
        model = self._metrics.model_label(self._transcription_model)
        counters, prices = self._metrics.usage_counters(self.tier, model)
        self.count_usage(usage, model, counters, prices)

    def flush(self) -> None:
        """Add the tallied events, bytes and audio to their counters."""
        if self._n_in:
            self._events_in.inc(self._n_in)
            self._bytes_in.inc(self._bytes_in_tally)
            if self._audio_in_tally:
                self._audio_in.inc(self._audio_in_tally * 3 / 4 / self._input_bytes_per_second)
            self._n_in = self._bytes_in_tally = self._audio_in_tally = 0
        if self._n_out:
            self._events_out.inc(self._n_out)
            self._bytes_out.inc(self._bytes_out_tally)
            if self._audio_out_tally:
                seconds = self._audio_out_tally * 3 / 4 / self._output_bytes_per_second
                self._audio_out.inc(seconds)
            self._n_out = self._bytes_out_tally = self._audio_out_tally = 0

    def close(self, outcome: str) -> None:
        """Record the end of the session."""
        self.flush()
        metrics = self._metrics
        metrics.live.discard(self)
        metrics.sessions_active.labels(self.tier, self.model).dec()
        metrics.sessions.labels(self.tier, self.model, _known(outcome, OUTCOMES)).inc()
        metrics.session_duration.observe(time.monotonic() - self._started)


def _transcription_model(event: dict[str, Any]) -> str | None:
    session = event.get("session")
    try:
        model = session["audio"]["input"]["transcription"]["model"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    return model if isinstance(model, str) else None


def _b64_field_len(text: str, key: str) -> int:
    """Length of the string value of `key` in a JSON text, found without parsing it."""
    at = text.find(key)
    if at < 0:
        return 0
    opening = text.find('"', at + len(key))
    closing = text.find('"', opening + 1)
    return max(closing - opening - 1, 0)
