"""What ops see: exact /metrics values after scripted sessions, probes, and logs without secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import struct
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.audio.wire import AudioOptions, ClientAudio
from app.codes import BudgetScope
from app.config import DEFAULT_PRICES, Settings
from app.core.usage import usage_totals
from app.metrics import AUDIO_CODECS, AUDIO_DIRECTIONS, DIRECTIONS, RelayMetrics, SessionMeter
from tests.helpers import GA_USAGE, UPSTREAM_KEY, eventually, relay_settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

WAIT = 10.0
CLIENT_KEY = "metrics-client-key-0123456789"
MODEL = "gpt-realtime-mini"


def tone(ms: int, amplitude: float = 8000.0) -> bytes:
    count = 24 * ms
    return struct.pack(
        f"<{count}h",
        *(int(amplitude * math.sin(2 * math.pi * 300 * i / 24000)) for i in range(count)),
    )


async def scrape(relay) -> dict[tuple[str, tuple], float]:
    """GET /metrics over HTTP and index every sample by name and labels."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{relay.http_url}/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def expected_kinds(usage: dict) -> dict[tuple[str, str], int]:
    """The documented partition of a usage object (cached tokens under their cached kind only)."""
    details = usage["input_token_details"]
    cached = details["cached_tokens_details"]
    parts = {
        ("input", "cached_text"): cached["text_tokens"],
        ("input", "cached_audio"): cached["audio_tokens"],
        ("input", "cached_image"): cached["image_tokens"],
        ("input", "text"): details["text_tokens"] - cached["text_tokens"],
        ("input", "audio"): details["audio_tokens"] - cached["audio_tokens"],
        ("input", "image"): details["image_tokens"] - cached["image_tokens"],
        ("output", "text"): usage["output_token_details"]["text_tokens"],
        ("output", "audio"): usage["output_token_details"]["audio_tokens"],
    }
    assert sum(v for (d, _), v in parts.items() if d == "input") == usage["input_tokens"]
    assert sum(v for (d, _), v in parts.items() if d == "output") == usage["output_tokens"]
    return parts


async def voice_turns(ws, turns: int) -> list[dict]:
    """Speak `turns` times with server VAD; return every event the client saw."""
    seen: list[dict] = []
    audio = bytes(24 * 2 * 200) + tone(600) + bytes(24 * 2 * 900)
    for _ in range(turns):
        for i in range(0, len(audio), 960):
            chunk = base64.b64encode(audio[i : i + 960]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        async with asyncio.timeout(WAIT):
            while True:
                seen.append(json.loads(await ws.recv()))
                if seen[-1]["type"] == "response.done":
                    break
    return seen


async def test_tokens_cost_sessions_and_latency_are_exact(relay_factory, upstream, caplog):
    """After two voice turns: tokens equal the usage sums, cost matches, histograms counted."""
    caplog.set_level(logging.DEBUG)
    settings = relay_settings(upstream.url, client_keys={CLIENT_KEY: "default"})
    relay = await relay_factory(settings)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    # The test's own client logs its headers at DEBUG; only the relay's logs are checked.
    own = logging.getLogger("tests.client")
    async with connect(relay.ws_url, additional_headers=headers, logger=own) as ws:
        seen = await voice_turns(ws, 2)
        during = await scrape(relay)
    usages = [e["response"]["usage"] for e in seen if e["type"] == "response.done"]
    transcriptions = [
        e["usage"]
        for e in seen
        if e["type"] == "conversation.item.input_audio_transcription.completed"
    ]
    assert len(usages) == 2 and len(transcriptions) == 2
    assert value(during, "realtime_relay_sessions_active", tier="default", model=MODEL,
                 transport="websocket") == 1  # fmt: skip

    async with asyncio.timeout(WAIT):
        while True:
            if not relay.relay.sessions:
                break
            await asyncio.sleep(0.02)
    after = await scrape(relay)
    totals: dict[tuple[str, str], int] = {}
    for usage in usages:
        for kind, count in expected_kinds(usage).items():
            totals[kind] = totals.get(kind, 0) + count
    cost = 0.0
    price = DEFAULT_PRICES[MODEL].model_dump()
    for (direction, kind), count in totals.items():
        got = value(
            after, "realtime_relay_tokens_total", tier="default", model=MODEL,
            direction=direction, kind=kind,
        )  # fmt: skip
        assert got == count, (direction, kind)
        key = f"{direction}_{kind}" if not kind.startswith("cached") else kind
        cost += price[key] * count / 1e6
    assert value(after, "realtime_relay_cost_usd_total", tier="default", model=MODEL) == (
        pytest.approx(cost)
    )
    transcribe = "gpt-4o-mini-transcribe"
    audio_in = sum(u["input_token_details"]["audio_tokens"] for u in transcriptions)
    assert value(
        after, "realtime_relay_tokens_total", tier="default", model=transcribe,
        direction="input", kind="audio",
    ) == audio_in  # fmt: skip
    websocket = {"tier": "default", "model": MODEL, "transport": "websocket"}
    assert value(after, "realtime_relay_sessions_active", **websocket) == 0
    assert value(after, "realtime_relay_sessions_total", **websocket, outcome="client_closed") == 1
    assert value(after, "realtime_relay_turn_latency_seconds_count", **websocket) == 2
    assert value(after, "realtime_relay_upstream_connect_seconds_count") == 1
    # `rate_limits.updated` is parsed (PARSED_UPSTREAM_TYPES): the gauges show the last one.
    updates = [e for e in upstream.connections[0].sent if e["type"] == "rate_limits.updated"]
    assert len(updates) == 2
    for limit in updates[-1]["rate_limits"]:
        labels = (("name", limit["name"]),)
        remaining = after[("realtime_relay_upstream_rate_limit_remaining", labels)]
        assert remaining == limit["remaining"]
    assert value(after, "realtime_relay_session_duration_seconds_count", transport="websocket") == 1
    appends = sum(1 for _ in range(0, (24 * 2 * 1700), 960)) * 2
    assert value(after, "realtime_relay_events_total", direction="client_to_upstream") == appends
    assert value(after, "realtime_relay_added_latency_seconds_count",
                 direction="client_to_upstream") == appends  # fmt: skip
    deltas = sum(e["type"] == "response.output_audio.delta" for e in seen)
    assert deltas > 0
    audio_out = value(after, "realtime_relay_audio_seconds_total", direction="out", codec="pcm16")
    sent = sum(
        len(base64.b64decode(e["delta"]))
        for e in upstream.connections[0].sent
        if e["type"] == "response.output_audio.delta"
    )
    assert audio_out == pytest.approx(sent / 48000)
    metrics_text = json.dumps({str(k): v for k, v in after.items()})
    for secret in (UPSTREAM_KEY, CLIENT_KEY):
        assert secret not in metrics_text
        leaks = [
            r.name
            for r in caplog.records
            if r.name != own.name and secret in r.getMessage() + str(r.__dict__)
        ]
        assert not leaks, (secret, leaks)


async def test_refusals_are_counted_by_reason(relay_factory, upstream):
    """Each refusal adds one to its reason; nothing else moves."""
    tiers = {"default": {"max_sessions": 0}}
    relay = await relay_factory(relay_settings(upstream.url, tiers=tiers))
    attempts = [
        ({"additional_headers": {"Authorization": "Bearer nope"}}, "", "unauthorized"),
        ({}, "?model=not-a-model", "model"),
        ({}, "", "limit"),
        ({"origin": "https://elsewhere.example"}, "", "origin"),
    ]
    for kwargs, query, _ in attempts:
        async with connect(relay.ws_url + query, **kwargs) as ws:
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(WAIT):
                    while True:
                        await ws.recv()
    samples = await scrape(relay)
    for _, _, reason in attempts:
        tier = "-" if reason in ("unauthorized", "origin") else "default"
        tier = "other" if tier == "-" else tier
        assert value(samples, "realtime_relay_session_rejections_total", tier=tier,
                     reason=reason, transport="websocket") == 1, reason  # fmt: skip
    assert upstream.connections == []


async def test_health_and_readiness(relay_factory, upstream):
    """/healthz answers while alive; /readyz reports ready with the embedded limiter."""
    relay = await relay_factory(relay_settings(upstream.url))
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{relay.http_url}/healthz")).json() == {"status": "ok"}
        ready = await http.get(f"{relay.http_url}/readyz")
    assert ready.status_code == 200


async def test_json_logs_carry_the_session_and_no_secrets(upstream, relay_process_factory):
    """RELAY_LOG_FORMAT=json: one JSON object per line, with the session id, no keys."""
    relay = await relay_process_factory(
        upstream.url,
        capture_logs=True,
        RELAY_LOG_FORMAT="json",
        RELAY_LOG_LEVEL="INFO",
        RELAY_CLIENT_KEYS=json.dumps({CLIENT_KEY: "default"}),
        RELAY_DRAIN_SECONDS="0",
    )
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with connect(relay.ws_url, additional_headers=headers) as ws:
        await voice_turns(ws, 1)
    async with connect(relay.ws_url, additional_headers={"Authorization": "Bearer wrong"}) as ws:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(WAIT):
                while True:
                    await ws.recv()
    relay.process.terminate()
    assert await relay.exit_code() == 0
    assert relay.process.stderr is not None
    lines = (await relay.process.stderr.read()).decode().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    sessions = {r["session"] for r in records if "session" in r}
    assert len(sessions) == 2  # the session and the refused one, each with its own id
    messages = " ".join(r["message"] for r in records)
    assert "refused: unauthorized" in messages and "session closed" in messages
    for secret in (UPSTREAM_KEY, CLIENT_KEY):
        assert secret not in "\n".join(lines)


async def test_a_scrape_mid_session_counts_its_events_so_far(relay_factory, upstream):
    """Events, bytes and audio of a live session are on `/metrics` at the next scrape."""
    relay = await relay_factory(relay_settings(upstream.url))
    chunk = base64.b64encode(tone(20)).decode()
    append = json.dumps({"type": "input_audio_buffer.append", "audio": chunk})
    async with connect(relay.ws_url) as ws:
        while json.loads(await ws.recv())["type"] != "session.updated":
            pass
        before = await scrape(relay)
        for _ in range(25):
            await ws.send(append)
        record = upstream.connections[0]
        await eventually(lambda: len(record.input_audio) == 25 * 960)
        after = await scrape(relay)
    events = "realtime_relay_events_total"
    up = {"direction": "client_to_upstream"}
    assert value(after, events, **up) - value(before, events, **up) == 25
    audio = "realtime_relay_audio_seconds_total"
    assert value(after, audio, direction="in", codec="pcm16") - value(
        before, audio, direction="in", codec="pcm16"
    ) == pytest.approx(0.5)


# Per-session traffic through the scrape-time collector, on real RelayMetrics with no sockets.

TRAFFIC = ("realtime_relay_events_total", "realtime_relay_bytes_total")
IN, OUT = DIRECTIONS
PCM_100MS = bytes(4800)  # PCM16 24 kHz: 48000 bytes a second


def new_metrics() -> RelayMetrics:
    return RelayMetrics(Settings(openai_api_key="x"))


def new_meter(metrics: RelayMetrics, options: AudioOptions | None = None) -> SessionMeter:
    audio = ClientAudio(options or AudioOptions())
    rates = (8_000 if audio.options.input_format["type"] != "audio/pcm" else 48_000, 48_000)
    return metrics.session("default", MODEL, rates, audio)


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def send_append(meter: SessionMeter) -> int:
    """A client append of 100 ms of audio; returns its size."""
    event = {"type": "input_audio_buffer.append", "audio": base64.b64encode(PCM_100MS).decode()}
    text = json.dumps(event)
    meter.client_event(event["type"], event, len(text), time.perf_counter())
    return len(text)


def send_delta(meter: SessionMeter) -> int:
    """An upstream delta of 100 ms of audio; returns its size."""
    delta = base64.b64encode(PCM_100MS).decode()
    text = json.dumps({"type": "response.output_audio.delta", "delta": delta})
    meter.upstream_event("response.output_audio.delta", None, text, time.perf_counter())
    return len(text)


def traffic(metrics: RelayMetrics) -> dict[str, float | None]:
    """The events, bytes and PCM16 audio seconds a scrape reports, by direction."""
    found: dict[str, float | None] = {}
    for name in TRAFFIC:
        for direction in DIRECTIONS:
            found[f"{name}:{direction}"] = sample(metrics, name, direction=direction)
    for direction in AUDIO_DIRECTIONS:
        found[f"audio:{direction}"] = sample(
            metrics, "realtime_relay_audio_seconds_total", direction=direction, codec="pcm16"
        )
    return found


def test_traffic_series_exist_at_zero_from_start_up():
    """Events, bytes and audio seconds are exposed at 0, with `_created`, before any session."""
    metrics = new_metrics()
    families = {f.name: f for f in metrics.registry.collect()}
    expected = set()
    for name in ("realtime_relay_events", "realtime_relay_bytes"):
        assert families[name].type == "counter"
        for direction in DIRECTIONS:
            expected |= {(name + "_total", (("direction", direction),))}
            expected |= {(name + "_created", (("direction", direction),))}
    for direction in AUDIO_DIRECTIONS:
        for codec in AUDIO_CODECS:
            labels = (("codec", codec), ("direction", direction))
            expected |= {("realtime_relay_audio_seconds_total", labels)}
            expected |= {("realtime_relay_audio_seconds_created", labels)}
    names = ("realtime_relay_events", "realtime_relay_bytes", "realtime_relay_audio_seconds")
    seen = {
        (s.name, tuple(sorted(s.labels.items()))) for name in names for s in families[name].samples
    }
    assert seen == expected
    values = [
        s.value for name in names for s in families[name].samples if s.name.endswith("_total")
    ]
    assert values and all(v == 0 for v in values)


def test_a_scrape_shows_a_live_sessions_tallies_without_double_counting():
    """A scrape mid-session reports its tallies; a second scrape reports the same, not twice."""
    metrics = new_metrics()
    meter = new_meter(metrics)
    sizes_in = sum(send_append(meter) for _ in range(3))
    sizes_out = sum(send_delta(meter) for _ in range(2))
    expected = {
        f"realtime_relay_events_total:{IN}": 3,
        f"realtime_relay_events_total:{OUT}": 2,
        f"realtime_relay_bytes_total:{IN}": sizes_in,
        f"realtime_relay_bytes_total:{OUT}": sizes_out,
        "audio:in": pytest.approx(0.3),
        "audio:out": pytest.approx(0.2),
    }
    assert traffic(metrics) == expected
    assert traffic(metrics) == expected  # a scrape does not add the tallies again
    text = metrics.exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    events = {s.labels["direction"]: s.value for s in families["realtime_relay_events"].samples}
    assert (events[IN], events[OUT]) == (3, 2)

    send_append(meter)
    assert sample(metrics, "realtime_relay_events_total", direction=IN) == 4
    assert sample(metrics, "realtime_relay_events_total", direction=OUT) == 2


def test_a_closed_sessions_tallies_remain_and_add_to_the_next():
    """Closing folds a session's tallies into the totals once; later sessions add to them."""
    metrics = new_metrics()
    first = new_meter(metrics)
    size = send_append(first)
    send_delta(first)
    first.close("client_closed")
    after_close = traffic(metrics)
    assert after_close[f"realtime_relay_events_total:{IN}"] == 1
    assert after_close[f"realtime_relay_bytes_total:{IN}"] == size
    assert after_close["audio:out"] == pytest.approx(0.1)
    first.close("client_closed")  # a second close counts nothing again
    assert traffic(metrics) == after_close

    second = new_meter(metrics)
    send_append(second)
    send_append(second)
    assert sample(metrics, "realtime_relay_events_total", direction=IN) == 3
    second.close("not-an-outcome")
    assert sample(metrics, "realtime_relay_events_total", direction=IN) == 3
    assert sample(metrics, "realtime_relay_audio_seconds_total", direction="in", codec="pcm16") == (
        pytest.approx(0.3)
    )
    sessions = "realtime_relay_sessions_total"
    labels = {"tier": "default", "model": metrics.model_label(MODEL), "transport": "websocket"}
    assert metrics.registry.get_sample_value(sessions, {**labels, "outcome": "other"}) == 1
    assert metrics.registry.get_sample_value(sessions, {**labels, "outcome": "client_closed"}) == 1
    assert sample(metrics, "realtime_relay_sessions_active", **labels) == 0


def test_binary_audio_counts_under_the_clients_codec():
    """Binary G.711 frames add their seconds under the client's codec at the next scrape."""
    metrics = new_metrics()
    audio = ClientAudio(AudioOptions(input_codec="g711_ulaw", input_rate=8_000))
    meter = metrics.session("default", MODEL, (8_000, 48_000), audio)
    frame = b"\x01" + bytes(800)  # 100 ms at 8 kHz
    for _ in range(10):
        start = time.perf_counter()
        audio.append_event(frame)
        meter.client_audio(len(frame), start, time.perf_counter())
    seconds = "realtime_relay_audio_seconds_total"
    assert sample(metrics, seconds, direction="in", codec="g711_ulaw") == pytest.approx(1.0)
    assert sample(metrics, "realtime_relay_events_total", direction=IN) == 10
    meter.close("completed")
    assert sample(metrics, seconds, direction="in", codec="g711_ulaw") == pytest.approx(1.0)


def test_unknown_label_values_are_other():
    """Codes, close codes and reasons outside the enums are counted as `other`."""
    metrics = new_metrics()
    metrics.error("upstream", "some_new_code")
    metrics.relay_error("field_locked")
    metrics.relay_error("made_up")
    metrics.upstream_closed(4000)
    metrics.upstream_closed(1006)
    metrics.reject("default", "because")
    errors = "realtime_relay_errors_total"
    assert sample(metrics, errors, source="upstream", code="other") == 1
    assert sample(metrics, errors, source="relay", code="field_locked") == 1
    assert sample(metrics, errors, source="relay", code="other") == 1
    assert sample(metrics, "realtime_relay_upstream_closes_total", code="other") == 1
    assert sample(metrics, "realtime_relay_upstream_closes_total", code="1006") == 1
    assert sample(metrics, "realtime_relay_session_rejections_total", tier="default",
                  reason="other", transport="websocket") == 1  # fmt: skip


# Usage accounting, on real RelayMetrics and SessionMeter objects with no sockets. The usage
# shapes are those of REALTIME.md §8 and §14.4 (and shared/protocol/examples).

USAGE = GA_USAGE


def upstream(meter: SessionMeter, event: dict) -> None:
    """An upstream event the relay parsed, sent to the client."""
    meter.upstream_event(event["type"], event, json.dumps(event), time.perf_counter())


def response_done(meter: SessionMeter, usage: dict) -> None:
    upstream(meter, {"type": "response.done", "response": {"status": "completed", "usage": usage}})


def transcribed(meter: SessionMeter, model: str, usage: dict) -> None:
    """The session's transcription model is `model`; one transcription with `usage` arrives."""
    session = {"audio": {"input": {"transcription": {"model": model}}}}
    upstream(meter, {"type": "session.updated", "session": session})
    upstream(meter, {
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": "item_1", "content_index": 0, "transcript": "Hello.", "usage": usage,
    })  # fmt: skip


def tokens(metrics: RelayMetrics, model: str, direction: str, kind: str) -> float | None:
    return sample(
        metrics, "realtime_relay_tokens_total", tier="default", model=model,
        direction=direction, kind=kind,
    )  # fmt: skip


def cost(metrics: RelayMetrics, model: str) -> float | None:
    return sample(metrics, "realtime_relay_cost_usd_total", tier="default", model=model)


def unpriced(metrics: RelayMetrics, model: str) -> float | None:
    return sample(metrics, "realtime_relay_unpriced_tokens_total", tier="default", model=model)


def tier_metrics(*models: str) -> RelayMetrics:
    return RelayMetrics(Settings(openai_api_key="x", tiers={"default": {"models": list(models)}}))


def test_response_usage_with_cached_details_counts_each_kind_once():
    """A `response.done` usage with `cached_tokens_details`: kinds exact, cost at list price."""
    metrics = new_metrics()
    meter = new_meter(metrics)
    response_done(meter, USAGE)
    expected = expected_kinds(USAGE)
    for (direction, kind), count in expected.items():
        assert (tokens(metrics, MODEL, direction, kind) or 0) == count, (direction, kind)
    assert cost(metrics, MODEL) == pytest.approx(usage_totals(USAGE, DEFAULT_PRICES[MODEL])[1])
    assert unpriced(metrics, MODEL) is None


def test_response_usage_without_cached_details_does_not_count_cached_tokens_twice():
    """Without `cached_tokens_details` the kinds still add up to input_tokens / output_tokens."""
    metrics = new_metrics()
    meter = new_meter(metrics)
    usage = json.loads(json.dumps(USAGE))
    del usage["input_token_details"]["cached_tokens_details"]
    response_done(meter, usage)
    response_done(meter, usage)
    inputs = sum(tokens(metrics, MODEL, "input", kind) or 0 for kind in (
        "text", "audio", "image", "cached_text", "cached_audio", "cached_image",
    ))  # fmt: skip
    outputs = sum(tokens(metrics, MODEL, "output", kind) or 0 for kind in ("text", "audio"))
    assert (inputs, outputs) == (2 * 452, 2 * 46)
    cached = sum(tokens(metrics, MODEL, "input", k) or 0 for k in ("cached_text", "cached_audio"))
    assert cached == 2 * 384
    assert cost(metrics, MODEL) == pytest.approx(2 * usage_totals(usage, DEFAULT_PRICES[MODEL])[1])


def test_duration_transcription_usage_counts_seconds_and_their_cost():
    """whisper-1 `{"type": "duration", "seconds": N}`: seconds counted, priced per minute."""
    metrics = new_metrics()
    meter = new_meter(metrics)
    transcribed(meter, "whisper-1", {"type": "duration", "seconds": 1.8})
    transcribed(meter, "whisper-1", {"type": "duration", "seconds": 58.2})
    seconds = "realtime_relay_transcription_seconds_total"
    assert sample(metrics, seconds, tier="default", model="whisper-1") == pytest.approx(60.0)
    assert cost(metrics, "whisper-1") == pytest.approx(0.006)
    assert tokens(metrics, "whisper-1", "input", "audio") == 0
    assert unpriced(metrics, "whisper-1") is None
    assert cost(metrics, MODEL) == 0  # the session's own model is not charged for it


def test_token_transcription_usage_counts_under_the_transcription_model():
    """`type: tokens` transcription usage: tokens and cost under its own model, no seconds."""
    metrics = new_metrics()
    meter = new_meter(metrics)
    usage = {
        "type": "tokens", "input_tokens": 31, "output_tokens": 9, "total_tokens": 40,
        "input_token_details": {"text_tokens": 12, "audio_tokens": 19},
    }  # fmt: skip
    transcribed(meter, "gpt-4o-mini-transcribe", usage)
    model = "gpt-4o-mini-transcribe"
    assert tokens(metrics, model, "input", "audio") == 19
    assert tokens(metrics, model, "input", "text") == 12
    assert tokens(metrics, model, "output", "text") == 9
    assert cost(metrics, model) == pytest.approx((12 * 1.25 + 19 * 3.0 + 9 * 5.0) / 1e6)
    seconds = "realtime_relay_transcription_seconds_total"
    assert sample(metrics, seconds, tier="default", model=model) is None


def test_dated_snapshots_are_priced_through_aliases_under_their_own_label():
    """gpt-realtime-2025-08-28 costs what gpt-realtime does, counted under its own name."""
    snapshot = "gpt-realtime-2025-08-28"
    metrics = tier_metrics(snapshot)
    meter = metrics.session("default", snapshot, (48_000, 48_000), ClientAudio(AudioOptions()))
    response_done(meter, USAGE)
    assert cost(metrics, snapshot) == pytest.approx(
        usage_totals(USAGE, DEFAULT_PRICES["gpt-realtime"])[1]
    )
    assert tokens(metrics, snapshot, "output", "audio") == 34
    assert unpriced(metrics, snapshot) is None


@pytest.mark.parametrize("model", ["gpt-realtime-1.5", "gpt-realtime-whisper", "gpt-realtime-2"])
def test_a_new_model_is_never_priced_by_prefix(model, caplog):
    """A model named like a priced one but not listed is unpriced, and logged once."""
    caplog.set_level(logging.WARNING, logger="app.metrics")
    metrics = tier_metrics(model)
    meter = metrics.session("default", model, (48_000, 48_000), ClientAudio(AudioOptions()))
    response_done(meter, USAGE)
    response_done(meter, USAGE)
    assert unpriced(metrics, model) == 2 * 498
    assert cost(metrics, model) in (None, 0)
    assert tokens(metrics, model, "input", "cached_text") == 2 * 256
    logged = [r for r in caplog.records if r.name == "app.metrics" and model in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING


def test_unpriced_models_are_logged_once_each_across_sessions(caplog):
    """Each unpriced model is logged once, whatever the sessions; priced ones never are."""
    caplog.set_level(logging.WARNING, logger="app.metrics")
    metrics = tier_metrics(MODEL, "gpt-realtime-1.5")
    audio = AudioOptions()
    for _ in range(3):
        meter = metrics.session("default", "gpt-realtime-1.5", (48_000, 48_000), ClientAudio(audio))
        response_done(meter, USAGE)
        transcribed(meter, "gpt-live-transcribe", {"type": "duration", "seconds": 2.0})
        transcribed(meter, "whisper-1", {"type": "duration", "seconds": 2.0})
        meter.close("completed")
        response_done(new_meter(metrics), USAGE)
    messages = [r.getMessage() for r in caplog.records if r.name == "app.metrics"]
    assert len(messages) == 2
    assert "'gpt-realtime-1.5'" in messages[0] and "'gpt-live-transcribe'" in messages[1]
    assert unpriced(metrics, "gpt-realtime-1.5") == 3 * 498
    # Not a label (not configured): counted as `other`, its seconds too, at no cost.
    seconds = "realtime_relay_transcription_seconds_total"
    assert sample(metrics, seconds, tier="default", model="other") == pytest.approx(6.0)
    assert sample(metrics, seconds, tier="default", model="whisper-1") == pytest.approx(6.0)
    assert cost(metrics, "other") in (None, 0)


def remaining(metrics: RelayMetrics, name: str) -> float | None:
    gauge = "realtime_relay_upstream_rate_limit_remaining"
    return metrics.registry.get_sample_value(gauge, {"name": name})


def test_rate_limits_updated_sets_the_remaining_gauges():
    """`rate_limits.updated` sets one gauge per name; other names are `other`, the last wins."""
    metrics = new_metrics()
    meter = new_meter(metrics)
    assert remaining(metrics, "requests") is None  # no series before a report
    for left in (4999, 4998):
        upstream(meter, {"type": "rate_limits.updated", "rate_limits": [
            {"name": "requests", "limit": 5000, "remaining": left, "reset_seconds": 0.012},
            {"name": "tokens", "limit": 800000, "remaining": 790912, "reset_seconds": 0.375},
            {"name": "images", "limit": 10, "remaining": 3, "reset_seconds": 1.0},
            {"name": "tokens", "remaining": "lots"},
            {"remaining": True},
            "junk",
        ]})  # fmt: skip
    assert remaining(metrics, "requests") == 4998
    assert remaining(metrics, "tokens") == 790912
    assert remaining(metrics, "other") == 3
    upstream(meter, {"type": "rate_limits.updated", "rate_limits": "not a list"})
    assert remaining(metrics, "requests") == 4998


def test_budget_exhaustion_is_counted_by_tier_and_scope():
    """Every tier and scope starts at 0; unknown tiers and scopes are `other`."""
    metrics = RelayMetrics(Settings(openai_api_key="x", tiers={"default": {}, "pro": {}}))
    name = "realtime_relay_budget_exhausted_total"
    for tier in ("default", "pro"):
        for scope in BudgetScope:
            assert sample(metrics, name, tier=tier, scope=scope.value) == 0
    metrics.budget_exhausted("pro", BudgetScope.SESSION_COST)
    metrics.budget_exhausted("pro", "client_day")
    metrics.budget_exhausted("nobody", "session_tokens")
    metrics.budget_exhausted("default", "made_up")
    assert sample(metrics, name, tier="pro", scope="session_cost") == 1
    assert sample(metrics, name, tier="pro", scope="client_day") == 1
    assert sample(metrics, name, tier="other", scope="session_tokens") == 1
    assert sample(metrics, name, tier="default", scope="other") == 1
    assert sample(metrics, name, tier="default", scope="session_tokens") == 0
