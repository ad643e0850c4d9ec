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
from app.config import DEFAULT_PRICES, Settings
from app.metrics import AUDIO_CODECS, AUDIO_DIRECTIONS, DIRECTIONS, RelayMetrics, SessionMeter
from tests.helpers import UPSTREAM_KEY, eventually, relay_settings

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
    assert value(during, "realtime_relay_sessions_active", tier="default", model=MODEL) == 1

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
    assert value(after, "realtime_relay_sessions_active", tier="default", model=MODEL) == 0
    assert (
        value(after, "realtime_relay_sessions_total", tier="default", model=MODEL,
              outcome="client_closed") == 1
    )  # fmt: skip
    assert (
        value(after, "realtime_relay_turn_latency_seconds_count", tier="default", model=MODEL) == 2
    )
    assert value(after, "realtime_relay_upstream_connect_seconds_count") == 1
    assert value(after, "realtime_relay_session_duration_seconds_count") == 1
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
                     reason=reason) == 1, reason  # fmt: skip
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
    labels = {"tier": "default", "model": metrics.model_label(MODEL)}
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
                  reason="other") == 1  # fmt: skip
