"""Every Prometheus metric of the relay, defined once, and the per-session meter that feeds them.

Names follow Prometheus' guide under the `realtime_relay` namespace, in base units. Label values
come from small known sets: tiers and models from the settings, the rest from the vocabularies'
enums (`codes.py`, `errors.py`, `audio.codecs`); anything else is reported as `other`. Session ids,
keys and addresses are never labels. Each app owns its `CollectorRegistry`, so several apps
(tests) can live in one process.

A session's events, bytes and audio are tallied in plain ints and reach `/metrics` through a
custom collector (`TrafficCollector`) at scrape time; everything else is a prometheus-client
metric updated as it happens.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from app.audio.codecs import InputCodec, OutputCodec, UpstreamFormat
from app.audio.wire import ClientAudio
from app.codes import BudgetScope, Outcome, RejectionReason, ToolOutcome, Transport
from app.config import ModelPrice, Settings
from app.core.usage import ALL_KINDS, Pricing, split_usage, usage_cost, usage_seconds
from app.errors import CloseCode, ErrorCode, UpstreamErrorCode

logger = logging.getLogger(__name__)

NAMESPACE: Final = "realtime_relay"
OTHER: Final = "other"


class Direction(StrEnum):
    """The `direction` label of the events, bytes and added-latency metrics."""

    CLIENT_TO_UPSTREAM = "client_to_upstream"
    UPSTREAM_TO_CLIENT = "upstream_to_client"


class AudioDirection(StrEnum):
    """The `direction` label of `realtime_relay_audio_seconds_total`."""

    IN = "in"  # client to upstream
    OUT = "out"


# Label sets, derived from the vocabularies (`codes.py`, `errors.py`, `audio.codecs`).
OUTCOMES: Final = frozenset(outcome.value for outcome in Outcome)
REJECTION_REASONS: Final = frozenset(reason.value for reason in RejectionReason)
# The fields a client most often sends that tiers lock: a bounded label set, others are `other`.
_LOCKED_PATHS: Final = (
    "type", "model", "instructions", "tools", "tool_choice", "tracing", "prompt",
    "truncation", "include", "max_output_tokens", "output_modalities", "audio",
    "audio.input.format", "audio.output.format", "audio.output.voice", "audio.output.speed",
    "audio.input.transcription", "audio.input.transcription.model",
    "audio.input.turn_detection", "audio.input.turn_detection.idle_timeout_ms",
    "audio.input.noise_reduction", "conversation", "metadata",
)  # fmt: skip
IGNORABLE_FIELDS: Final = frozenset(
    f"{event}.{path}" for event in ("session", "response") for path in _LOCKED_PATHS
)
# What a WebRTC client changes and the relay puts back: session paths (`core.watch`).
RESTORABLE_FIELDS: Final = frozenset(_LOCKED_PATHS)
TOOL_OUTCOMES: Final = frozenset(outcome.value for outcome in ToolOutcome)
BUDGET_SCOPES: Final = frozenset(scope.value for scope in BudgetScope)
# The `name` label of the upstream's rate limits (`rate_limits.updated`, REALTIME.md §4.6).
RATE_LIMIT_NAMES: Final = frozenset({"requests", "tokens"})
# Distinct unpriced model names logged, once each, by one RelayMetrics (one per process);
# past it, no more are: model names can come from the upstream.
MAX_UNPRICED_LOGGED: Final = 100
# Error codes with a series of their own: the relay's and the upstream's (REALTIME.md §10).
ERROR_CODES: Final = frozenset(code.value for code in (*ErrorCode, *UpstreamErrorCode))
CLOSE_CODES: Final = frozenset(str(code.value) for code in CloseCode)
AUDIO_CODECS: Final = tuple(dict.fromkeys(codec.value for codec in (*InputCodec, *OutputCodec)))
DIRECTIONS: Final = tuple(direction.value for direction in Direction)
AUDIO_DIRECTIONS: Final = tuple(direction.value for direction in AudioDirection)
# The codec label of the upstream's audio formats (`audio/pcm` and so on, REALTIME.md §11).
_UPSTREAM_CODECS: Final = {
    UpstreamFormat.PCM: InputCodec.PCM16,
    UpstreamFormat.PCMU: InputCodec.G711_ULAW,
    UpstreamFormat.PCMA: InputCodec.G711_ALAW,
}

# Bucket bounds per quantity, in seconds.
ADDED_LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
TURN_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
CONNECT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
TOOL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRANSCODE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)


def _known(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


def _upstream_codec(audio_format: dict[str, Any]) -> str:
    """The codec label of an upstream `audio.*.format` (`{"type": "audio/pcmu"}`)."""
    return _UPSTREAM_CODECS[UpstreamFormat(str(audio_format["type"]).removeprefix("audio/"))].value


class TrafficCollector(Collector):
    """`events_total`, `bytes_total` and `audio_seconds_total`, summed at scrape time.

    Each open session tallies its traffic in plain ints (`SessionMeter`): a counter's `inc` takes
    a lock, too dear per event on the hot path (docs/design.md, "Metrics off the hot path"). A
    scrape reports, per label, the totals of the sessions that
    have ended plus the tallies of those still open; a session's tallies join the totals when it
    closes, so every series only grows. All series exist at 0 from the start.
    """

    def __init__(self) -> None:
        # A scrape may run on another thread (prometheus-client's own servers do): the lock keeps
        # a closing session from being seen twice or not at all. Events never take it.
        self._lock = threading.Lock()
        self._live: set[SessionMeter] = set()
        self._events = dict.fromkeys(DIRECTIONS, 0)
        self._bytes = dict.fromkeys(DIRECTIONS, 0)
        self._audio = {(d, c): 0.0 for d in AUDIO_DIRECTIONS for c in AUDIO_CODECS}
        self._created = time.time()  # as a `Counter` exposes `_created`

    def open(self, meter: SessionMeter) -> None:
        """Report `meter`'s tallies from now on."""
        with self._lock:
            self._live.add(meter)

    def close(self, meter: SessionMeter) -> bool:
        """Fold `meter`'s tallies into the totals; False (and nothing done) if it was not open."""
        with self._lock:
            if meter not in self._live:
                return False
            self._live.remove(meter)
            meter.tally_into(self._events, self._bytes, self._audio)
            return True

    def describe(self) -> Iterable[Metric]:
        """The families, without samples, so the registry refuses a clashing name."""
        return self._families({}, {}, {})

    def collect(self) -> Iterable[Metric]:
        """The families with closed sessions' totals plus open sessions' tallies."""
        with self._lock:
            events, sizes, audio = dict(self._events), dict(self._bytes), dict(self._audio)
            for meter in self._live:
                meter.tally_into(events, sizes, audio)
        return self._families(events, sizes, audio)

    def _families(
        self, events: dict[str, int], sizes: dict[str, int], audio: dict[tuple[str, str], float]
    ) -> list[Metric]:
        event_family = CounterMetricFamily(
            f"{NAMESPACE}_events", "Events relayed.", labels=["direction"]
        )
        bytes_family = CounterMetricFamily(
            f"{NAMESPACE}_bytes", "Frame bytes relayed.", labels=["direction"]
        )
        audio_family = CounterMetricFamily(
            f"{NAMESPACE}_audio_seconds", "Seconds of audio relayed.", labels=["direction", "codec"]
        )
        for direction, count in events.items():
            event_family.add_metric([direction], count, created=self._created)
        for direction, size in sizes.items():
            bytes_family.add_metric([direction], size, created=self._created)
        for labels, seconds in audio.items():
            audio_family.add_metric(labels, seconds, created=self._created)
        return [event_family, bytes_family, audio_family]


class RelayMetrics:
    """The relay's metrics in one registry, with their expected series created at zero."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tiers = frozenset(settings.tiers)
        self.pricing = Pricing(settings.prices, settings.price_aliases)
        # Every priced or aliased name is a label, so a model's label prices it as its name does.
        models = {settings.session.model, *self.pricing.names()}
        for tier in settings.tiers.values():
            models.update(tier.models)
        if settings.session.transcription:
            models.add(str(settings.session.transcription.get("model", "")))
        self.models = frozenset(models)
        ns, reg = NAMESPACE, self.registry

        self.sessions_active = Gauge(
            "sessions_active", "Sessions open now.", ["tier", "model", "transport"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.sessions = Counter(
            "sessions", "Sessions ended, by outcome.", ["tier", "model", "outcome", "transport"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.rejections = Counter(
            "session_rejections", "Sessions refused before they started.",
            ["tier", "reason", "transport"], namespace=ns, registry=reg,
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
        self.transcription_seconds = Counter(
            "transcription_seconds", "Seconds of audio billed by duration (transcription usage).",
            ["tier", "model"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.budgets_exhausted = Counter(
            "budget_exhausted", "Sessions ended, or refused, for an exhausted budget, by scope.",
            ["tier", "scope"], namespace=ns, registry=reg,
        )  # fmt: skip
        # No series until the upstream reports one: a 0 would read as a limit reached.
        self.rate_limit_remaining = Gauge(
            "upstream_rate_limit_remaining",
            "Requests or tokens the upstream account has left, as last reported by any session.",
            ["name"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.turn_latency = Histogram(
            "turn_latency_seconds",
            "End of user speech (speech_stopped or commit) to the first response audio sent "
            "(WebRTC: to the upstream's output_audio_buffer.started, seen on the sideband).",
            ["tier", "model", "transport"], buckets=TURN_BUCKETS, namespace=ns, registry=reg,
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
            ["transport"], buckets=DURATION_BUCKETS, namespace=ns, registry=reg,
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
        self.fields_ignored = Counter(
            "fields_ignored", "Fields removed from client events: the tier locks them.",
            ["field"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.fields_restored = Counter(
            "fields_restored",
            "Locked fields a WebRTC client changed over its data channel, put back by the relay.",
            ["field"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.tool_calls = Counter(
            "tool_calls", "Server tool calls the relay ran, by tool and outcome.",
            ["tool", "outcome"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.tool_seconds = Histogram(
            "tool_seconds", "Time a server tool call took.", ["tool"],
            buckets=TOOL_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        # Tool labels: the names RELAY_TOOLS gives, and those MCP servers list (`known_tools`).
        self.tools = frozenset(tool.name for tool in settings.tools if tool.name is not None)
        self._usage: dict[tuple[str, str], ModelUsage] = {}
        self._unpriced_logged: set[str] = set()
        self.traffic = TrafficCollector()
        reg.register(self.traffic)
        self._create_series()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format, for `/metrics`."""
        return generate_latest(self.registry)

    def _create_series(self) -> None:
        for tier in self.tiers:
            for reason in REJECTION_REASONS:
                for transport in Transport:
                    self.rejections.labels(tier, reason, transport)
            for scope in BUDGET_SCOPES:
                self.budgets_exhausted.labels(tier, scope)
        for direction in DIRECTIONS:
            self.added_latency.labels(direction)
        for transport in Transport:
            self.session_duration.labels(transport)
        self.known_tools(())

    def tier_label(self, tier: str) -> str:
        return _known(tier, self.tiers)

    def model_label(self, model: str) -> str:
        return _known(model, self.models)

    def reject(self, tier: str, reason: str, transport: Transport = Transport.WEBSOCKET) -> None:
        """Count a session refused before it reached the upstream."""
        reason = _known(reason, REJECTION_REASONS)
        self.rejections.labels(self.tier_label(tier), reason, transport).inc()

    def error(self, source: str, code: str) -> None:
        """Count an `error` event sent to a client; `source` is `relay` or `upstream`."""
        self.errors.labels(source, _known(code, ERROR_CODES)).inc()

    def relay_error(self, code: str) -> None:
        """Count an `error` event the relay itself sent."""
        self.error("relay", code)

    def field_ignored(self, path: str) -> None:
        """Count a field removed from a client event (`path` like `session.instructions`)."""
        self.fields_ignored.labels(_known(path, IGNORABLE_FIELDS)).inc()

    def field_restored(self, path: str) -> None:
        """Count a field a WebRTC client changed and the relay put back (`instructions`...)."""
        self.fields_restored.labels(_known(path, RESTORABLE_FIELDS)).inc()

    def known_tools(self, names: Iterable[str]) -> None:
        """Give the server tools (those MCP servers listed included) series of their own."""
        self.tools = self.tools | frozenset(names)
        for name in self.tools:
            self.tool_seconds.labels(name)
            for outcome in ToolOutcome:
                self.tool_calls.labels(name, outcome)

    def tool_call(self, tool: str, outcome: str, seconds: float) -> None:
        """Count a server tool call that ended with `outcome` after `seconds`."""
        label = _known(tool, self.tools)
        self.tool_calls.labels(label, _known(outcome, TOOL_OUTCOMES)).inc()
        self.tool_seconds.labels(label).observe(seconds)

    def upstream_closed(self, code: int | None) -> None:
        self.upstream_closes.labels(_known(str(code), CLOSE_CODES)).inc()

    def budget_exhausted(self, tier: str, scope: str) -> None:
        """Count a session ended or refused because a budget (`codes.BudgetScope`) ran out."""
        self.budgets_exhausted.labels(self.tier_label(tier), _known(scope, BUDGET_SCOPES)).inc()

    def rate_limits(self, entries: Any) -> None:
        """Set the remaining-quota gauges from a `rate_limits.updated` event's `rate_limits`.

        Each entry is `{"name": "requests" | "tokens", "limit", "remaining", "reset_seconds"}`
        (REALTIME.md §4.6); other names are reported as `other`, malformed entries skipped.
        """
        if not isinstance(entries, list):
            return
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            name, remaining = entry.get("name"), entry.get("remaining")
            if isinstance(remaining, bool) or not isinstance(remaining, int | float):
                continue
            if not math.isfinite(remaining):
                continue
            label = _known(name, RATE_LIMIT_NAMES) if isinstance(name, str) else OTHER
            self.rate_limit_remaining.labels(label).set(remaining)

    def model_usage(self, tier: str, model: str) -> ModelUsage:
        """The usage metrics of (`tier`, `model`) and the model's price, built once per label."""
        key = (self.tier_label(tier), self.model_label(model))
        usage = self._usage.get(key)
        if usage is None:
            usage = self._usage[key] = ModelUsage(self, *key)
        return usage

    def unpriced(self, model: str) -> None:
        """Log, once per model name, that `model` has usage but no price."""
        if model in self._unpriced_logged or len(self._unpriced_logged) >= MAX_UNPRICED_LOGGED:
            return
        self._unpriced_logged.add(model)
        logger.warning(
            "model %r has no price (RELAY_PRICES, RELAY_PRICE_ALIASES): its usage is counted "
            "in %s_unpriced_tokens_total, not in the cost",
            model[:100], NAMESPACE,
        )  # fmt: skip

    def session(
        self,
        tier: str,
        model: str,
        bytes_per_second: tuple[int, int],
        audio: ClientAudio,
        transport: Transport = Transport.WEBSOCKET,
    ) -> SessionMeter:
        """A meter for a new session; `bytes_per_second` of the upstream input and output audio."""
        return SessionMeter(self, tier, model, bytes_per_second, audio, transport)


class ModelUsage:
    """The usage metric children of one (tier, model) label pair, and the model's price.

    `count` adds one usage object: its tokens by kind, the seconds of a duration-type
    transcription usage, and their cost, or, for a model with no price, its tokens to
    `unpriced_tokens_total` (and a log line, once per model).
    """

    __slots__ = ("_metrics", "tier", "model", "price", "_tokens", "_cost")

    def __init__(self, metrics: RelayMetrics, tier: str, model: str) -> None:
        self._metrics = metrics
        self.tier, self.model = tier, model
        # A label is a priced or aliased name, or `other` (never priced): priced as the name.
        self.price: ModelPrice | None = metrics.pricing.price(model)
        self._tokens = {kind: metrics.tokens.labels(tier, model, *kind) for kind in ALL_KINDS}
        self._cost = metrics.cost.labels(tier, model)

    def count(self, usage: Any, name: str) -> None:
        """Add a `response.done` or transcription usage of model `name` (this label's model)."""
        parts = split_usage(usage)
        seconds = usage_seconds(usage)
        if not parts and not seconds:
            return
        for kind, count in parts.items():
            self._tokens[kind].inc(count)
        metrics = self._metrics
        if seconds:
            metrics.transcription_seconds.labels(self.tier, self.model).inc(seconds)
        if self.price is None:
            if parts:
                metrics.unpriced_tokens.labels(self.tier, self.model).inc(sum(parts.values()))
            metrics.unpriced(name)
            return
        cost = usage_cost(parts, seconds, self.price)
        if cost:
            self._cost.inc(cost)


class SessionMeter:
    """One session's metric children, bound once at connect; called for every event.

    Timing anchors are stamped on arrival at the relay (events carry no timestamps, REALTIME.md
    §1.1): the end of user speech is the receipt of `input_audio_buffer.speech_stopped` (the server
    sends it `silence_duration_ms` after the speech ended) or of a client commit.
    """

    __slots__ = (
        "_metrics", "tier", "model", "_latency_in", "_latency_out", "_turn", "_first_audio",
        "_speech_end", "_response_requested", "_input_bytes_per_second", "_usage",
        "_model_name", "_started", "_output_bytes_per_second",
        "_transcription_model", "_decoder", "_decode", "_encode", "_decoder_rate",
        "_audio_in_key", "_binary_in_key", "_audio_out_key", "transport",
        "_n_in", "_bytes_in_tally", "_audio_in_tally", "_samples_in", "_n_out",
        "_bytes_out_tally", "_audio_out_tally",
    )  # fmt: skip

    def __init__(
        self,
        metrics: RelayMetrics,
        tier: str,
        model: str,
        bytes_per_second: tuple[int, int],
        audio: ClientAudio,
        transport: Transport = Transport.WEBSOCKET,
    ) -> None:
        self._metrics = metrics
        self.transport = transport
        # `tier` and `model` as labels; the model's own name for the unpriced-model log.
        self.tier, self.model = metrics.tier_label(tier), metrics.model_label(model)
        self._model_name = model
        tier, model = self.tier, self.model
        self._latency_in = metrics.added_latency.labels(Direction.CLIENT_TO_UPSTREAM)
        self._latency_out = metrics.added_latency.labels(Direction.UPSTREAM_TO_CLIENT)
        options = audio.options
        upstream_in = _upstream_codec(options.input_format)
        upstream_out = _upstream_codec(options.output_format)
        client_out = upstream_out if options.output_codec == "json" else options.output_codec
        # The `audio_seconds_total` labels of base64 input audio, of binary input frames (by the
        # client's codec) and of output audio as the client receives it.
        self._audio_in_key = (AudioDirection.IN.value, upstream_in)
        self._binary_in_key = (AudioDirection.IN.value, _known(options.input_codec, AUDIO_CODECS))
        self._audio_out_key = (AudioDirection.OUT.value, _known(client_out, AUDIO_CODECS))
        self._decoder = audio.decoder
        self._decoder_rate = 24_000 if options.input_format["type"] == "audio/pcm" else 8_000
        self._decode = metrics.transcode.labels("decode_" + options.input_codec)
        self._encode = metrics.transcode.labels("encode_" + options.output_codec)
        self._turn = metrics.turn_latency.labels(tier, model, transport)
        self._first_audio = metrics.first_audio.labels(tier, model)
        self._input_bytes_per_second, self._output_bytes_per_second = bytes_per_second
        self._transcription_model = OTHER
        self._speech_end: float | None = None
        self._response_requested: float | None = None
        self._usage = metrics.model_usage(tier, model)
        self._started = time.monotonic()
        # Events, bytes, base64 audio characters and decoded samples are tallied in plain ints;
        # `TrafficCollector` reads them at each scrape and folds them into its totals at `close`.
        self._n_in = self._bytes_in_tally = self._audio_in_tally = self._samples_in = 0
        self._n_out = self._bytes_out_tally = self._audio_out_tally = 0
        metrics.sessions_active.labels(tier, model, transport).inc()
        metrics.traffic.open(self)

    def client_event(self, event_type: str, event: dict[str, Any], size: int, start: float) -> None:
        """Count a client event forwarded upstream; `start` is its `perf_counter` arrival."""
        self._n_in += 1
        self._bytes_in_tally += size
        if event_type == "input_audio_buffer.append":
            audio = event.get("audio")
            if isinstance(audio, str):
                self._audio_in_tally += len(audio)
        elif event_type == "input_audio_buffer.commit":
            self._speech_end = start
        elif event_type == "response.create":
            self._response_requested = start
        self._latency_in.observe(time.perf_counter() - start)

    def client_audio(self, size: int, start: float, decoded: float) -> None:
        """Count a binary audio frame; `decoded` is the `perf_counter` when its decoding ended."""
        self._n_in += 1
        self._bytes_in_tally += size
        self._decode.observe(decoded - start)
        self._samples_in = self._decoder.samples
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
        elif event is not None:
            self._parsed_event(event_type, event)
        elif event_type == "output_audio_buffer.started":  # WebRTC: its audio is RTP
            if self._speech_end is not None:
                self._turn.observe(now - self._speech_end)
                self._speech_end = None
        self._latency_out.observe(now - start)

    def _parsed_event(self, event_type: str, event: dict[str, Any]) -> None:
        if event_type == "response.done":
            response = event.get("response")
            if isinstance(response, dict):
                self._usage.count(response.get("usage"), self._model_name)
            self._speech_end = self._response_requested = None
        elif event_type == "conversation.item.input_audio_transcription.completed":
            self.count_transcription(event.get("usage"))
        elif event_type == "rate_limits.updated":
            self._metrics.rate_limits(event.get("rate_limits"))
        elif event_type in ("session.created", "session.updated"):
            self._transcription_model = _transcription_model(event) or self._transcription_model
        elif event_type == "error":
            error = event.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            self._metrics.error("upstream", code if isinstance(code, str) else OTHER)

    def note_session(self, session: dict[str, Any]) -> None:
        """The session in place without a `session.created` (a WebRTC call's, as created)."""
        self._transcription_model = (
            _transcription_model({"session": session}) or self._transcription_model
        )

    def count_transcription(self, usage: Any) -> None:
        """Transcription usage (tokens or duration) runs on its own model, counted under it."""
        model = self._transcription_model
        self._metrics.model_usage(self.tier, model).count(usage, model)

    def tally_into(
        self, events: dict[str, int], sizes: dict[str, int], audio: dict[tuple[str, str], float]
    ) -> None:
        """Add this session's tallies to per-label sums (`TrafficCollector`'s)."""
        inbound, outbound = Direction.CLIENT_TO_UPSTREAM.value, Direction.UPSTREAM_TO_CLIENT.value
        events[inbound] = events.get(inbound, 0) + self._n_in
        events[outbound] = events.get(outbound, 0) + self._n_out
        sizes[inbound] = sizes.get(inbound, 0) + self._bytes_in_tally
        sizes[outbound] = sizes.get(outbound, 0) + self._bytes_out_tally
        # Base64 carries 3 bytes in 4 characters.
        for key, seconds in (
            (self._audio_in_key, self._audio_in_tally * 3 / 4 / self._input_bytes_per_second),
            (self._binary_in_key, self._samples_in / self._decoder_rate),
            (self._audio_out_key, self._audio_out_tally * 3 / 4 / self._output_bytes_per_second),
        ):
            if seconds:
                audio[key] = audio.get(key, 0.0) + seconds

    def close(self, outcome: str) -> None:
        """Record the end of the session; its tallies join the closed sessions' totals.

        A second call does nothing, so the session is counted once.
        """
        metrics = self._metrics
        if not metrics.traffic.close(self):
            return
        transport = self.transport
        metrics.sessions_active.labels(self.tier, self.model, transport).dec()
        metrics.sessions.labels(self.tier, self.model, _known(outcome, OUTCOMES), transport).inc()
        metrics.session_duration.labels(transport).observe(time.monotonic() - self._started)


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
