"""The local upstream speaks the GA Realtime protocol that every relay test relies on."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

# jsonschema, the reference validator, comes with the dev extra (kubernetes-validate needs it).
import jsonschema  # type: ignore[import-untyped]
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.local_upstream import LocalUpstream
from app.local_upstream.arguments import build_arguments
from app.local_upstream.pcm import PCMU, tone
from tests.helpers import append_audio, events_until, recv_event, send_event

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

KEY = "sk-local-test"
MODEL = "gpt-realtime"
TIMEOUT = 5.0
BPM = 48  # bytes per millisecond of 24 kHz PCM16


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def upstream() -> AsyncIterator[LocalUpstream]:
    async with LocalUpstream(api_key=KEY) as up:
        yield up


def _connect(up: LocalUpstream, **headers: str) -> Any:
    headers = {"Authorization": f"Bearer {KEY}"} | headers
    return connect(f"{up.url}?model={MODEL}", additional_headers=headers, max_size=None)


async def _session_update(ws: ClientConnection, **session: Any) -> dict[str, Any]:
    await send_event(ws, "session.update", session={"type": "realtime", **session})
    event = await recv_event(ws)
    assert event["type"] == "session.updated", event
    return event


async def _user_text(ws: ClientConnection, text: str) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await send_event(ws, "conversation.item.create", item=item)
    assert [e["type"] for e in await events_until(ws, "conversation.item.done")] == [
        "conversation.item.added",
        "conversation.item.done",
    ]


def _audio_of(events: list[dict[str, Any]]) -> bytes:
    deltas = [e["delta"] for e in events if e["type"] == "response.output_audio.delta"]
    return b"".join(base64.b64decode(d) for d in deltas)


def _assert_usage(usage: dict[str, Any]) -> None:
    details = usage["input_token_details"]
    out = usage["output_token_details"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    kinds = ("text_tokens", "audio_tokens", "image_tokens")
    assert usage["input_tokens"] == sum(details[k] for k in kinds)
    assert usage["output_tokens"] == out["text_tokens"] + out["audio_tokens"]
    cached = details["cached_tokens_details"]
    assert details["cached_tokens"] == sum(cached[k] for k in kinds)
    assert all(cached[k] <= details[k] for k in kinds)


async def test_wrong_key_is_refused_with_401(upstream: LocalUpstream) -> None:
    """A wrong or missing key gets HTTP 401 with an invalid_api_key JSON body."""
    for headers in ({"Authorization": "Bearer sk-wrong"}, {"Authorization": ""}):
        with pytest.raises(InvalidStatus) as info:
            async with asyncio.timeout(TIMEOUT), _connect(upstream, **headers):
                pass
        assert info.value.response.status_code == 401
        body = json.loads(info.value.response.body)
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["type"] == "invalid_request_error"
        assert KEY not in info.value.response.body.decode()
    record = await upstream.wait_for_connection(2, timeout=TIMEOUT)
    assert record.status == 401 and record.closed.is_set()


async def test_handshake_forms_and_refusals(upstream: LocalUpstream) -> None:
    """Azure GA accepts api-key, refuses api-version; model is required; refuse_status wins."""
    azure = f"{upstream.azure_url}?model={MODEL}"
    async with asyncio.timeout(TIMEOUT), connect(azure, additional_headers={"api-key": KEY}) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
    record = upstream.connections[-1]
    assert record.path == "/openai/v1/realtime" and record.headers["api-key"] == KEY
    cases = [
        (f"{azure}&api-version=2025-04-01-preview", {"api-key": KEY}, 401),
        (upstream.url, {"Authorization": f"Bearer {KEY}"}, 400),
        (f"{upstream.url.replace('/v1/', '/v2/')}?model=x", {}, 404),
    ]
    for url, headers, status in cases:
        with pytest.raises(InvalidStatus) as info:
            async with asyncio.timeout(TIMEOUT), connect(url, additional_headers=headers):
                pass
        assert info.value.response.status_code == status
    upstream.refuse_status = 429
    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(TIMEOUT), _connect(upstream):
            pass
    assert info.value.response.status_code == 429
    assert json.loads(info.value.response.body)["error"]["code"] == "rate_limit_exceeded"
    upstream.refuse_status = None
    async with asyncio.timeout(TIMEOUT), _connect(upstream) as ws:
        assert (await recv_event(ws))["type"] == "session.created"


async def test_session_created_is_a_full_ga_session(upstream: LocalUpstream) -> None:
    """session.created carries the full GA session with example b's defaults."""
    async with _connect(upstream) as ws:
        event = await recv_event(ws)
    assert event["type"] == "session.created" and event["event_id"].startswith("event_")
    session = event["session"]
    assert session["id"].startswith("sess_")
    assert session["type"] == "realtime" and session["object"] == "realtime.session"
    assert session["model"] == MODEL and session["output_modalities"] == ["audio"]
    assert session["max_output_tokens"] == "inf" and session["tool_choice"] == "auto"
    assert session["tools"] == [] and session["tracing"] is None and session["prompt"] is None
    assert session["truncation"] == "auto" and session["include"] is None
    assert isinstance(session["instructions"], str) and isinstance(session["expires_at"], int)
    assert session["audio"] == {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": None,
            "noise_reduction": None,
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 200,
                "idle_timeout_ms": None,
                "create_response": True,
                "interrupt_response": True,
            },
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0},
    }
    record = upstream.connections[0]
    assert record.headers["authorization"] == f"Bearer {KEY}" and record.query == {"model": MODEL}


async def test_session_update_merges_and_refuses_beta_fields(upstream: LocalUpstream) -> None:
    """session.update deep-merges; beta fields and a missing type are refused with errors."""
    async with _connect(upstream) as ws:
        await recv_event(ws)
        audio = {
            "input": {
                "transcription": {"model": "gpt-4o-mini-transcribe"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
            },
            "output": {"voice": "cedar"},
        }
        session = (await _session_update(ws, instructions="Be brief.", audio=audio))["session"]
        assert session["instructions"] == "Be brief."
        assert session["audio"]["output"] == {
            "format": {"type": "audio/pcm", "rate": 24000},
            "voice": "cedar",
            "speed": 1.0,
        }
        assert session["audio"]["input"]["transcription"] == {
            "model": "gpt-4o-mini-transcribe",
            "language": None,
            "prompt": None,
        }
        vad = session["audio"]["input"]["turn_detection"]
        assert vad["silence_duration_ms"] == 500 and vad["prefix_padding_ms"] == 300

        for field, value in [
            ("input_audio_format", "pcm16"),
            ("voice", "alloy"),
            ("temperature", 0.8),
        ]:
            await send_event(
                ws, "session.update", event_id="cli_1", session={"type": "realtime", field: value}
            )
            error = (await recv_event(ws))["error"]
            assert error["code"] == "unknown_parameter" and error["param"] == f"session.{field}"
            assert error["event_id"] == "cli_1"
        await send_event(ws, "session.update", event_id="cli_2", session={"instructions": "x"})
        error = (await recv_event(ws))["error"]
        assert (error["code"], error["param"]) == ("missing_required_parameter", "session.type")

        session = (await _session_update(ws, audio={"input": {"turn_detection": None}}))["session"]
        assert session["audio"]["input"]["turn_detection"] is None
        assert session["instructions"] == "Be brief."  # the refused updates changed nothing


async def test_vad_turn_echoes_the_speech(upstream: LocalUpstream) -> None:
    """Silence, 1 s of tone, silence: VAD events, a commit and a response echoing the speech."""
    speech = tone(300, 1000, dbfs=-12)
    signal = bytes(1000 * BPM) + speech + bytes(1000 * BPM)
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await append_audio(ws, signal)
        events = await events_until(ws, "response.done")
    types = [e["type"] for e in events]
    assert types[:10] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "rate_limits.updated",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert types[-6:] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "conversation.item.done",
        "response.output_item.done",
        "response.done",
    ]
    started, stopped, committed = events[0], events[1], events[2]
    # Onset at 1000 ms minus 300 ms prefix padding; stop after 200 ms of silence.
    assert started["audio_start_ms"] == 700 and stopped["audio_end_ms"] == 2200
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert committed["previous_item_id"] is None
    user_item = events[4]["item"]
    assert user_item["role"] == "user"
    assert user_item["content"] == [{"type": "input_audio", "transcript": None}]

    echoed = _audio_of(events)
    assert echoed == signal[700 * BPM : 2200 * BPM]
    assert speech in echoed
    deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
    assert len(deltas) == 15  # 1500 ms in 100 ms deltas

    done = events[-1]["response"]
    assert done["status"] == "completed" and done["id"].startswith("resp_")
    transcript = done["output"][0]["content"][0]["transcript"]
    assert transcript == "You said something for 1.5 seconds."
    text_deltas = [
        e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"
    ]
    assert "".join(text_deltas) == transcript and len(text_deltas) > 1
    usage = done["usage"]
    _assert_usage(usage)
    assert usage["input_token_details"]["audio_tokens"] == 15
    assert usage["output_token_details"]["audio_tokens"] == 15

    record = upstream.connections[0]
    await asyncio.wait_for(record.closed.wait(), TIMEOUT)
    assert record.input_audio == signal and record.close_code == 1000
    assert all(e["type"] == "input_audio_buffer.append" for e in record.events)


async def test_transcription_and_cached_tokens(upstream: LocalUpstream) -> None:
    """With transcription on, the user item is transcribed; a second turn reports cached tokens."""
    signal = bytes(200 * BPM) + tone(300, 500) + bytes(400 * BPM)
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _session_update(ws, audio={"input": {"transcription": {"model": "whisper-1"}}})
        await append_audio(ws, signal)
        first = await events_until(ws, "response.done")
        completed = next(
            e for e in first if e["type"] == "conversation.item.input_audio_transcription.completed"
        )
        assert completed["transcript"]  # whatever the recognizer makes of a tone
        assert completed["usage"] == {"type": "duration", "seconds": 0.9}  # whisper-1: seconds
        await append_audio(ws, signal)
        second = (await events_until(ws, "response.done"))[-1]["response"]["usage"]
    _assert_usage(second)
    first_usage = first[-1]["response"]["usage"]
    assert second["input_token_details"]["cached_tokens"] == first_usage["input_tokens"]


async def test_manual_commit_then_response_create(upstream: LocalUpstream) -> None:
    """Push-to-talk: a short commit is refused, a long one commits without a response."""
    audio = tone(300, 300)
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _session_update(ws, audio={"input": {"turn_detection": None}})
        await append_audio(ws, audio[: 50 * BPM])
        await send_event(ws, "input_audio_buffer.commit", event_id="cli_c1")
        error = (await recv_event(ws))["error"]
        assert error["code"] == "input_audio_buffer_commit_empty" and error["event_id"] == "cli_c1"
        await append_audio(ws, audio[50 * BPM :])
        await send_event(ws, "input_audio_buffer.commit")
        events = [await recv_event(ws) for _ in range(3)]
        assert [e["type"] for e in events] == [
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
        ]
        await send_event(ws, "input_audio_buffer.clear")
        assert (await recv_event(ws))["type"] == "input_audio_buffer.cleared"
        await send_event(ws, "response.create")
        response = await events_until(ws, "response.done")
    assert response[0]["type"] == "response.created"
    assert response[0]["response"]["usage"] is None
    assert _audio_of(response) == audio
    _assert_usage(response[-1]["response"]["usage"])


async def test_cancel_and_single_active_response(upstream: LocalUpstream) -> None:
    """A second response.create is refused; cancel ends the response; a second cancel errors."""
    upstream.realtime_pacing = True  # keep the response streaming while the test acts
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _user_text(ws, "Tell me a very long story about a lighthouse keeper, please.")
        await send_event(ws, "response.create")
        created = (await events_until(ws, "response.created"))[-1]["response"]
        await send_event(ws, "response.create", event_id="cli_r2")
        error = (await events_until(ws, "error"))[-1]["error"]
        assert error["code"] == "conversation_already_has_active_response"
        assert created["id"] in error["message"] and error["event_id"] == "cli_r2"
        await send_event(ws, "response.cancel")
        events = await events_until(ws, "response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert done["output"][0]["status"] == "incomplete"
        _assert_usage(done["usage"])
        await send_event(ws, "response.cancel", event_id="cli_c2")
        error = (await recv_event(ws))["error"]
    assert error["code"] == "response_cancel_not_active" and error["event_id"] == "cli_c2"


async def test_speech_interrupts_the_response(upstream: LocalUpstream) -> None:
    """Speech during a response cancels it with reason turn_detected."""
    upstream.realtime_pacing = True
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _user_text(ws, "Talk for a while about the sea and the ships on it, at length.")
        await send_event(ws, "response.create")
        await events_until(ws, "response.output_audio.delta")
        await append_audio(ws, bytes(100 * BPM) + tone(300, 300))
        events = await events_until(ws, "response.done")
    types = [e["type"] for e in events]
    assert types.index("input_audio_buffer.speech_started") < types.index("response.done")
    done = events[-1]["response"]
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}


async def test_truncate_assistant_audio(upstream: LocalUpstream) -> None:
    """Truncation needs an assistant audio item and an audio_end_ms within its length."""
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _user_text(ws, "Hello there")
        user_id = upstream.connections[0].sent[-1]["item"]["id"]
        await send_event(ws, "response.create")
        events = await events_until(ws, "response.done")
        item_id = events[-1]["response"]["output"][0]["id"]
        audio_ms = len(_audio_of(events)) // BPM
        for target, end_ms in [(item_id, audio_ms + 1), (item_id, 1.5), (user_id, 0), ("nope", 0)]:
            await send_event(
                ws,
                "conversation.item.truncate",
                item_id=target,
                content_index=0,
                audio_end_ms=end_ms,
            )
            error = (await recv_event(ws))["error"]
            assert error["code"] == "invalid_value", error
        await send_event(
            ws, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=200
        )
        truncated = await recv_event(ws)
        assert truncated == {
            "type": "conversation.item.truncated",
            "event_id": truncated["event_id"],
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 200,
        }
        await send_event(ws, "conversation.item.retrieve", item_id=item_id)
        item = (await recv_event(ws))["item"]
    assert len(base64.b64decode(item["content"][0]["audio"])) == 200 * BPM


async def test_function_call_round_trip(upstream: LocalUpstream) -> None:
    """A tool named in the user's text is called; its output is spoken in the next response."""
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _session_update(ws, tools=[tool])
        await _user_text(ws, "Please use get_weather for Paris.")
        await send_event(ws, "response.create")
        events = await events_until(ws, "response.done")
        assert [e["type"] for e in events] == [
            "response.created",
            "rate_limits.updated",
            "response.output_item.added",
            "conversation.item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "conversation.item.done",
            "response.output_item.done",
            "response.done",
        ]
        call = events[-1]["response"]["output"][0]
        assert call["type"] == "function_call" and call["name"] == "get_weather"
        assert call["call_id"].startswith("call_") and call["arguments"] == "{}"
        assert events[5]["arguments"] == "{}" and events[5]["call_id"] == call["call_id"]
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "18 C"}
        await send_event(ws, "conversation.item.create", item=output)
        added = (await events_until(ws, "conversation.item.done"))[0]
        assert added["previous_item_id"] == call["id"]
        await send_event(ws, "response.create")
        answer = (await events_until(ws, "response.done"))[-1]["response"]
    assert answer["output"][0]["content"][0]["transcript"] == "The tool returned: 18 C"


def _object(required: bool = True, **properties: Any) -> dict[str, Any]:
    """An object schema with these properties, all required unless said otherwise."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(properties)
    return schema


STRING: dict[str, Any] = {"type": "string"}
UNIT = {"type": "string", "enum": ["celsius", "fahrenheit"]}
DAYS = {"type": "integer", "minimum": 1, "maximum": 7}
WEATHER = _object(city=STRING, unit=UNIT, days=DAYS)


@pytest.mark.parametrize(
    ("parameters", "text", "expected"),
    [
        (_object(city=STRING), "what time is it in Paris", {"city": "Paris"}),
        (_object(city=STRING), "Please use get_weather for New York.", {"city": "New York"}),
        (_object(city=STRING), "get_weather lisbon", {"city": "lisbon"}),
        (
            _object(city=STRING, country=STRING),
            "in Paris, France",
            {"city": "Paris", "country": "France"},
        ),
        (_object(query=STRING), 'search for "blue whales" now', {"query": "blue whales"}),
        (_object(topic=STRING), "tell me about the history of jazz", {"topic": "history of jazz"}),
        (
            _object(origin=STRING, to=STRING),
            "fly origin Oslo to Rome",
            {"origin": "Oslo", "to": "Rome"},
        ),
        (
            _object(city=STRING, unit=UNIT),
            "weather in Paris in fahrenheit",
            {"city": "Paris", "unit": "fahrenheit"},
        ),
        (_object(city=STRING, unit=UNIT), "weather in Paris", {"city": "Paris", "unit": "celsius"}),
        (_object(days=DAYS), "the forecast for 3 days", {"days": 3}),
        (_object(days=DAYS), "the forecast for 30 days", {"days": 7}),
        (_object(days=DAYS | {"minimum": 2}), "the forecast", {"days": 2}),
        (
            _object(zip=STRING, days=DAYS),
            "weather in 10001 for 2 days",
            {"zip": "10001", "days": 2},
        ),
        (_object(price={"type": "number"}), "is 2.5 too much", {"price": 2.5}),
        (_object(umbrella={"type": "boolean"}), "do I need an umbrella? yes", {"umbrella": True}),
        (_object(umbrella={"type": "boolean"}), "do I need an umbrella", {"umbrella": False}),
        (_object(required=False, city=STRING, days=DAYS), "hello there", {}),
        ({"type": "object", "properties": {}}, "what time is it in Paris", {}),
        ({"type": "object"}, "what time is it in Paris", {}),
        (None, "what time is it in Paris", {}),
    ],
)
def test_arguments_come_from_the_users_words(
    parameters: Any, text: str, expected: dict[str, Any]
) -> None:
    """Tool-call arguments take strings, enum values, numbers and booleans from the text."""
    arguments = build_arguments(parameters, text, tool_name="get_weather")
    assert arguments == expected
    if parameters is not None:
        jsonschema.Draft202012Validator(parameters).validate(arguments)


@pytest.mark.parametrize(
    "parameters",
    [
        WEATHER,
        _object(name={"type": "string", "minLength": 4, "maxLength": 6}),
        _object(ratio={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
        _object(count={"type": "integer", "exclusiveMinimum": 2.5, "maximum": 9}),
        _object(level={"type": "integer", "enum": [1, 2, 3]}, mode={"const": "fast"}),
        _object(note={"type": ["null", "string"]}, flag={"anyOf": [{"type": "boolean"}]}),
        _object(nothing={"type": "null"}, anything={}),
        _object(
            tags={"type": "array", "items": STRING, "minItems": 2},
            where=_object(city=STRING, days=DAYS),
            extra={"type": "array", "items": {"type": "integer"}},
        ),
        {"type": "object", "properties": {"city": STRING}, "required": ["city", "country"]},
        {
            "type": "object",
            "properties": {"unit": UNIT | {"default": "fahrenheit"}},
            "required": ["unit"],
        },
    ],
)
@pytest.mark.parametrize(
    "text",
    [
        "",
        "what time is it in Paris",
        "Set it to 0.5, 12 or -3 in fahrenheit? no. Mode 3!",
        "x" * 300,
    ],
)
def test_arguments_always_fit_the_schema(parameters: dict[str, Any], text: str) -> None:
    """Whatever the text, the arguments validate against the tool's parameters schema."""
    arguments = build_arguments(parameters, text, tool_name="get_weather")
    jsonschema.Draft202012Validator(parameters).validate(arguments)
    assert json.loads(json.dumps(arguments)) == arguments


async def test_tool_call_arguments_fit_the_schema_on_the_wire(upstream: LocalUpstream) -> None:
    """Over a socket, the call's streamed arguments fit the tool's schema; its output comes back."""
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER}
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _session_update(ws, tools=[tool], output_modalities=["text"])
        await _user_text(
            ws, "What's the weather in Paris for 3 days in fahrenheit? Use get_weather."
        )
        await send_event(ws, "response.create")
        events = await events_until(ws, "response.done")
        deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
        done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        item = next(e for e in events if e["type"] == "response.output_item.done")["item"]
        call = events[-1]["response"]["output"][0]
        assert len(deltas) > 1 and "".join(d["delta"] for d in deltas) == done["arguments"]
        assert done["arguments"] == item["arguments"] == call["arguments"]
        assert {d["call_id"] for d in deltas} == {done["call_id"], call["call_id"]}
        arguments = json.loads(call["arguments"])
        jsonschema.Draft202012Validator(WEATHER).validate(arguments)
        assert arguments == {"city": "Paris", "unit": "fahrenheit", "days": 3}

        # Forced by a response's tool_choice, with words that do not name the tool.
        await _user_text(ws, "And in Tokyo?")
        choice = {"type": "function", "name": "get_weather"}
        await send_event(ws, "response.create", response={"tool_choice": choice})
        forced = (await events_until(ws, "response.done"))[-1]["response"]["output"][0]
        assert json.loads(forced["arguments"]) == {"city": "Tokyo", "unit": "celsius", "days": 1}

        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "21 F"}
        await send_event(ws, "conversation.item.create", item=output)
        await events_until(ws, "conversation.item.done")
        await send_event(ws, "response.create")
        answer = (await events_until(ws, "response.done"))[-1]["response"]
    assert "21 F" in answer["output"][0]["content"][0]["text"]


async def test_out_of_band_text_response(upstream: LocalUpstream) -> None:
    """conversation "none" with text output: no conversation events, conversation_id null."""
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _user_text(ws, "Summarise this.")
        overrides = {"conversation": "none", "output_modalities": ["text"], "metadata": {"k": "v"}}
        await send_event(ws, "response.create", response=overrides)
        events = await events_until(ws, "response.done")
    types = [e["type"] for e in events]
    assert "conversation.item.added" not in types and "response.output_audio.delta" not in types
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"k": "v"}
    assert done["output"][0]["content"] == [{"type": "output_text", "text": text}]
    assert done["usage"]["output_token_details"]["audio_tokens"] == 0


async def test_g711_audio_is_recorded_and_echoed_as_is(upstream: LocalUpstream) -> None:
    """With audio/pcmu in and out, appended bytes are recorded and echoed unchanged."""
    audio = tone(300, 400, fmt=PCMU)
    fmt = {"format": {"type": "audio/pcmu"}}
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _session_update(ws, audio={"input": fmt | {"turn_detection": None}, "output": fmt})
        await send_event(ws, "input_audio_buffer.append", audio=base64.b64encode(audio).decode())
        await send_event(ws, "input_audio_buffer.commit")
        await events_until(ws, "conversation.item.done")
        await send_event(ws, "response.create")
        events = await events_until(ws, "response.done")
    assert _audio_of(events) == audio and upstream.connections[0].input_audio == audio


async def test_invalid_events_get_errors(upstream: LocalUpstream) -> None:
    """Unknown types, bad JSON, bad base64 and binary frames get error events; the socket lives."""
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await send_event(ws, "bogus.event", event_id="cli_x")
        error = (await recv_event(ws))["error"]
        assert error["code"] == "invalid_event" and "bogus.event" in error["message"]
        assert error["event_id"] == "cli_x"
        await ws.send("{not json")
        assert (await recv_event(ws))["error"]["code"] == "invalid_event"
        await send_event(ws, "input_audio_buffer.append", audio="!!!")
        assert (await recv_event(ws))["error"]["code"] == "invalid_value"
        await ws.send(b"\x00\x01")
        assert (await recv_event(ws))["error"]["code"] == "invalid_event"
        await send_event(ws, "response.cancel")
        assert (await recv_event(ws))["error"]["code"] == "response_cancel_not_active"


async def test_beta_header_is_refused_after_accept(upstream: LocalUpstream) -> None:
    """An OpenAI-Beta header gets beta_api_shape_disabled and a 1008 close."""
    async with _connect(upstream, **{"OpenAI-Beta": "realtime=v1"}) as ws:
        error = (await recv_event(ws))["error"]
        assert error["code"] == "beta_api_shape_disabled"
        with pytest.raises(ConnectionClosed) as info:
            await recv_event(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008


async def test_session_created_knobs(upstream: LocalUpstream) -> None:
    """send_session_created=False skips the greeting; the delay knob postpones it."""
    upstream.send_session_created = False
    async with _connect(upstream) as ws:
        await send_event(ws, "input_audio_buffer.clear")
        assert (await recv_event(ws))["type"] == "input_audio_buffer.cleared"
    upstream.send_session_created = True
    upstream.session_created_delay = 0.3
    async with _connect(upstream) as ws:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await ws.recv()
        assert (await recv_event(ws))["type"] == "session.created"


async def test_drop_after_audio_deltas_aborts_the_connection(upstream: LocalUpstream) -> None:
    """The drop knob cuts TCP after N audio deltas: no close frame reaches the client."""
    upstream.drop_after_audio_deltas = 2
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _user_text(ws, "Say something long enough for several audio deltas to be sent.")
        await send_event(ws, "response.create")
        received: list[dict[str, Any]] = []
        with pytest.raises(ConnectionClosed) as info:
            while True:
                received.append(await recv_event(ws))
    assert info.value.rcvd is None  # abnormal closure, 1006
    assert sum(e["type"] == "response.output_audio.delta" for e in received) == 2
    record = upstream.connections[0]
    await asyncio.wait_for(record.closed.wait(), TIMEOUT)
    assert record.close_code == 1006


async def test_client_close_mid_response_stops_the_task(upstream: LocalUpstream) -> None:
    """Closing during a paced response cancels its task: nothing is left running."""
    upstream.realtime_pacing = True
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _user_text(ws, "Keep talking for a long, long time about anything at all.")
        await send_event(ws, "response.create")
        await events_until(ws, "response.output_audio.delta")
    record = upstream.connections[0]
    await asyncio.wait_for(record.closed.wait(), TIMEOUT)
    assert record.close_code == 1000
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("local-upstream-")]
    assert "response.done" not in record.sent_types()
