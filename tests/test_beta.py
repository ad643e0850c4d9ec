"""The beta <-> GA translator over plain dicts and strings: no sockets.

The events are those of the protocol reference's example exchanges (a and f: beta; b, c and g:
GA), trimmed to the fields that matter here; translated events are checked against the official
openai-python SDK's unions for the other dialect, as the examples themselves were.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeClientEvent as GAClientEvent
from pydantic import TypeAdapter

from app.core import beta
from app.core.beta import (
    GA_ONLY_UPSTREAM_TYPES,
    PARSED_UPSTREAM_TYPES,
    TRANSLATED_CLIENT_TYPES,
    client_event_to_ga,
    ga_param_to_beta,
    is_beta,
    upstream_event_to_beta,
)

GA_CLIENT = TypeAdapter(GAClientEvent)
BETA_SERVER = TypeAdapter(BetaServerEvent)

TURN_DETECTION: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "create_response": True,
    "interrupt_response": True,
}
TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
# examples/a: the beta client's session.update.
BETA_SESSION_UPDATE: dict[str, Any] = {
    "type": "session.update",
    "event_id": "cli_0001",
    "session": {
        "modalities": ["audio", "text"],
        "instructions": "You are a concise voice assistant for Acme support.",
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": TURN_DETECTION,
        "tools": [TOOL],
        "tool_choice": "auto",
        "temperature": 0.8,
        "max_response_output_tokens": "inf",
    },
}
# examples/b: what GA expects for the same settings.
GA_SESSION_UPDATE: dict[str, Any] = {
    "type": "session.update",
    "event_id": "cli_0001",
    "session": {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": "You are a concise voice assistant for Acme support.",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "whisper-1"},
                "turn_detection": TURN_DETECTION,
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
        },
        "tools": [TOOL],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
    },
}
# examples/b: the GA server's session.updated.
GA_SESSION: dict[str, Any] = {
    "type": "realtime",
    "object": "realtime.session",
    "id": "sess_Cg2r8UoWc3qLdE0f1GiKn",
    "model": "gpt-realtime",
    "output_modalities": ["audio"],
    "instructions": "You are a concise voice assistant for Acme support.",
    "tools": [],
    "tool_choice": "auto",
    "max_output_tokens": "inf",
    "tracing": None,
    "truncation": "auto",
    "prompt": None,
    "expires_at": 1767229200,
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-mini-transcribe", "language": "en", "prompt": None},
            "noise_reduction": {"type": "near_field"},
            "turn_detection": {**TURN_DETECTION, "idle_timeout_ms": None},
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0},
    },
    "include": None,
}
# examples/a: the keys of the beta server's session (what a beta client may read).
BETA_SESSION_KEYS = {
    "id",
    "object",
    "model",
    "expires_at",
    "modalities",
    "instructions",
    "voice",
    "input_audio_format",
    "output_audio_format",
    "input_audio_transcription",
    "input_audio_noise_reduction",
    "turn_detection",
    "tools",
    "tool_choice",
    "temperature",
    "max_response_output_tokens",
    "speed",
    "tracing",
    "include",
}

RESP = "resp_Cg2rB2Ur0ZiHg4Et3Lx1Q"
ITEM = "item_Cg2rB2xZf6tOgH3i4JlNq"
PART = {"response_id": RESP, "item_id": ITEM, "output_index": 0, "content_index": 0}
ASSISTANT_ITEM: dict[str, Any] = {
    "id": ITEM,
    "type": "message",
    "object": "realtime.item",
    "status": "completed",
    "role": "assistant",
    "content": [{"type": "output_audio", "transcript": "Paris is the capital of France."}],
}
GA_RESPONSE: dict[str, Any] = {
    "object": "realtime.response",
    "id": RESP,
    "conversation_id": "conv_Cg2r8V1pQa7Zy5Xx4Ww3v",
    "output_modalities": ["audio"],
    "max_output_tokens": "inf",
    "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}},
    "metadata": None,
    "status": "completed",
    "status_details": None,
    "output": [ASSISTANT_ITEM],
    "usage": {
        "total_tokens": 247,
        "input_tokens": 176,
        "output_tokens": 71,
        "input_token_details": {"text_tokens": 158, "audio_tokens": 18, "cached_tokens": 128},
        "output_token_details": {"text_tokens": 14, "audio_tokens": 57},
    },
}


def ev(event_type: str, **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "event_id": "event_Cg2rB2o4", **fields}


def wire(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


def to_beta(event: dict[str, Any]) -> dict[str, Any]:
    translated: dict[str, Any] = json.loads(upstream_event_to_beta(event["type"], wire(event)))
    return translated


# A GA voice turn (examples b and c) and the beta event each becomes (examples a and f).
GA_STREAM = [
    (ev("session.updated", session=GA_SESSION), "session.updated"),
    (
        ev(
            "conversation.item.added", previous_item_id=None, item={**ASSISTANT_ITEM, "content": []}
        ),
        "conversation.item.created",
    ),
    (
        ev("response.created", response={**GA_RESPONSE, "status": "in_progress", "output": []}),
        "response.created",
    ),
    (
        ev("response.output_item.added", response_id=RESP, output_index=0, item=ASSISTANT_ITEM),
        "response.output_item.added",
    ),
    (
        ev("response.content_part.added", **PART, part={"type": "audio", "transcript": ""}),
        "response.content_part.added",
    ),
    (ev("response.output_audio.delta", **PART, delta="AwD9/wQA/P8="), "response.audio.delta"),
    (ev("response.output_audio.done", **PART), "response.audio.done"),
    (
        ev("response.output_audio_transcript.delta", **PART, delta="Paris is"),
        "response.audio_transcript.delta",
    ),
    (
        ev("response.output_audio_transcript.done", **PART, transcript="Paris."),
        "response.audio_transcript.done",
    ),
    (ev("response.output_text.delta", **PART, delta="It's 18"), "response.text.delta"),
    (ev("response.output_text.done", **PART, text="It's 18 degrees."), "response.text.done"),
    (
        ev("response.content_part.done", **PART, part={"type": "audio", "transcript": "Paris."}),
        "response.content_part.done",
    ),
    (
        ev("response.output_item.done", response_id=RESP, output_index=0, item=ASSISTANT_ITEM),
        "response.output_item.done",
    ),
    (
        ev(
            "response.function_call_arguments.done",
            **PART,
            call_id="call_Rn8Yl3Wc0UaS5xMq",
            name="get_weather",
            arguments='{"city":"Paris"}',
        ),
        "response.function_call_arguments.done",
    ),
    (
        ev("conversation.item.input_audio_transcription.delta", item_id=ITEM, delta="What's"),
        "conversation.item.input_audio_transcription.delta",
    ),
    (ev("input_audio_buffer.speech_started", audio_start_ms=320, item_id=ITEM), None),
    (ev("response.done", response=GA_RESPONSE), "response.done"),
]


@pytest.mark.parametrize(
    ("ga", "beta_type"), GA_STREAM, ids=[event["type"] for event, _ in GA_STREAM]
)
def test_ga_stream_becomes_beta(ga, beta_type):
    """Each GA server event of a voice turn becomes a valid beta event of the beta name."""
    translated = to_beta(ga)
    assert translated["type"] == (beta_type or ga["type"])
    BETA_SERVER.validate_python(translated)  # the beta SDK's union accepts it


def test_every_renamed_event_is_in_the_stream():
    """The rename table is covered by the stream above, and beta names are all beta types."""
    renamed = {ga["type"] for ga, beta_type in GA_STREAM if beta_type not in (None, ga["type"])}
    assert set(beta._RENAMED) | {"conversation.item.added"} == renamed


def test_audio_delta_is_renamed_without_parsing(monkeypatch):
    """A huge audio delta is renamed in its prefix, otherwise byte-identical, never parsed."""
    payload = "QUJD" * 1_000_000  # 4 MB of base64
    text = (
        '{"type":"response.output_audio.delta","event_id":"event_1","response_id":"resp_1",'
        f'"item_id":"item_1","output_index":0,"content_index":0,"delta":"{payload}"}}'
    )

    def no_parse(*args, **kwargs):
        raise AssertionError("an audio delta was parsed")

    monkeypatch.setattr(json, "loads", no_parse)  # the module beta.py parses with
    out = upstream_event_to_beta("response.output_audio.delta", text)
    prefix = '{"type":"response.audio.delta"'
    assert out.startswith(prefix)
    assert out[len(prefix) :] == text[len('{"type":"response.output_audio.delta"') :]


def test_renamed_prefix_keeps_the_servers_spacing():
    """A prefix with spaces is rewritten in place; only the name changes."""
    text = '{ "type" : "response.output_text.delta", "delta": "hi"}'
    assert upstream_event_to_beta("response.output_text.delta", text) == (
        '{ "type" : "response.text.delta", "delta": "hi"}'
    )


def test_renamed_event_not_typed_first_is_parsed():
    """An event whose type is not its first field is still renamed (the slow way)."""
    text = '{"delta":"AAAA","type":"response.output_audio.delta"}'
    out = json.loads(upstream_event_to_beta("response.output_audio.delta", text))
    assert out == {"delta": "AAAA", "type": "response.audio.delta"}


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"input_audio_buffer.speech_started","audio_start_ms":1}',
        '{"type":"rate_limits.updated","rate_limits":[]}',
        '{"type":"error","error":{"code":"x"}}',
        '{"type":"response.content_part.added","part":{"type":"audio","transcript":""}}',
        '{"type":"response.output_item.added","item":{"type":"function_call","name":"f"}}',
        "not json",
    ],
)
def test_events_of_one_shape_keep_their_bytes(text):
    """An event the same in both dialects comes back as the very string it was."""
    event_type = text[9 : text.find('"', 9)] if text.startswith("{") else ""
    assert upstream_event_to_beta(event_type, text) is text


def test_ga_session_becomes_the_flat_beta_session():
    """session.updated carries the flat beta session: every beta field, with beta values."""
    session = to_beta(ev("session.updated", session=GA_SESSION))["session"]
    # Every field a beta server sends, but `temperature`, which GA does not have.
    assert BETA_SESSION_KEYS - {"temperature"} <= set(session)
    assert "type" not in session and "audio" not in session
    assert session["modalities"] == ["text", "audio"]
    assert session["voice"] == "marin" and session["speed"] == 1.0
    assert session["input_audio_format"] == session["output_audio_format"] == "pcm16"
    assert session["input_audio_transcription"]["model"] == "gpt-4o-mini-transcribe"
    assert session["input_audio_noise_reduction"] == {"type": "near_field"}
    assert session["turn_detection"]["silence_duration_ms"] == 500
    assert session["max_response_output_tokens"] == "inf"
    assert session["truncation"] == "auto"  # GA-only: kept for a client that reads it


def test_session_round_trip_keeps_the_clients_settings():
    """A beta session.update, sent up as GA and echoed back, reads as the client wrote it."""
    ga, dropped = client_event_to_ga(BETA_SESSION_UPDATE)
    echoed = to_beta(ev("session.updated", session={**ga["session"], "id": "sess_1"}))["session"]
    sent = dict(BETA_SESSION_UPDATE["session"])
    assert dropped == ["session.temperature"]
    del sent["temperature"]
    assert set(echoed.pop("modalities")) == set(sent.pop("modalities"))
    assert echoed == {**sent, "id": "sess_1"}


def test_ga_response_round_trip_keeps_the_beta_fields():
    """response.done reads as beta: modalities, voice, format, cap, items and usage."""
    response = to_beta(ev("response.done", response=GA_RESPONSE))["response"]
    assert response["modalities"] == ["text", "audio"]
    assert response["voice"] == "marin" and response["output_audio_format"] == "pcm16"
    assert response["max_output_tokens"] == "inf"  # beta's response object uses the GA name
    assert "audio" not in response and "output_modalities" not in response
    assert response["output"][0]["content"] == [
        {"type": "audio", "transcript": "Paris is the capital of France."}
    ]
    assert response["usage"] == GA_RESPONSE["usage"]


@pytest.mark.parametrize(
    "event_type", ["conversation.item.added", "conversation.item.done", "response.output_item.done"]
)
def test_item_content_takes_beta_part_types(event_type):
    """Assistant parts `output_text` / `output_audio` read as beta `text` / `audio`."""
    item = {
        **ASSISTANT_ITEM,
        "content": [{"type": "output_text", "text": "hi"}, {"type": "output_audio"}],
    }
    translated = to_beta(ev(event_type, item=item))
    assert [part["type"] for part in translated["item"]["content"]] == ["text", "audio"]
    assert item["content"][0]["type"] == "output_text"  # the input is not modified


def test_user_item_added_is_only_renamed():
    """A user item needs no new parts: conversation.item.added becomes .created, same item."""
    item = {"id": ITEM, "type": "message", "role": "user", "content": [{"type": "input_audio"}]}
    translated = to_beta(ev("conversation.item.added", previous_item_id=None, item=item))
    assert translated == ev("conversation.item.created", previous_item_id=None, item=item)


def test_ga_only_events_are_flagged():
    """GA-only events are not beta types: the wiring may drop what the set names."""
    assert "conversation.item.done" in GA_ONLY_UPSTREAM_TYPES
    assert not GA_ONLY_UPSTREAM_TYPES & set(beta._RENAMED)
    assert PARSED_UPSTREAM_TYPES.isdisjoint(beta._RENAMED)


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ("session.audio.output.voice", "session.voice"),
        ("session.audio.input.format.rate", "session.input_audio_format.rate"),
        ("session.audio.input.turn_detection.threshold", "session.turn_detection.threshold"),
        ("session.output_modalities", "session.modalities"),
        ("session.max_output_tokens", "session.max_response_output_tokens"),
        ("response.audio.output.format", "response.output_audio_format"),
        ("response.max_output_tokens", "response.max_response_output_tokens"),
        ("session.instructions", "session.instructions"),
        ("session.audio.output", "session.audio.output"),
        ("session.audio.output.voices", "session.audio.output.voices"),
        ("item.content", "item.content"),
    ],
)
def test_ga_params_read_as_beta(param, expected):
    """An error's GA parameter path is named as the beta client sent it."""
    assert ga_param_to_beta(param) == expected


def test_upstream_error_names_the_beta_param():
    """An upstream error about a GA path names the beta field; the rest is as sent."""
    error = {
        "type": "invalid_request_error",
        "code": "invalid_value",
        "message": "Invalid voice.",
        "param": "session.audio.output.voice",
        "event_id": "cli_0001",
    }
    translated = to_beta(ev("error", error=error))
    assert translated == ev("error", error={**error, "param": "session.voice"})


# -- client (beta) -> GA ---------------------------------------------------------------------


def test_beta_session_update_becomes_ga():
    """examples/a's beta session.update becomes examples/b's GA shape, temperature dropped."""
    before = copy.deepcopy(BETA_SESSION_UPDATE)
    ga, dropped = client_event_to_ga(BETA_SESSION_UPDATE)
    assert ga == GA_SESSION_UPDATE
    assert dropped == ["session.temperature"]
    assert BETA_SESSION_UPDATE == before  # the input is not modified
    GA_CLIENT.validate_python(ga)


@pytest.mark.parametrize(
    ("beta_format", "ga_format"),
    [
        ("pcm16", {"type": "audio/pcm", "rate": 24000}),
        ("g711_ulaw", {"type": "audio/pcmu"}),
        ("g711_alaw", {"type": "audio/pcma"}),
    ],
)
def test_audio_formats_map_both_ways(beta_format, ga_format):
    """Each beta format string is its GA object, and back."""
    event = {
        "type": "session.update",
        "session": {"input_audio_format": beta_format, "output_audio_format": beta_format},
    }
    ga, _ = client_event_to_ga(event)
    assert ga["session"]["audio"] == {
        "input": {"format": ga_format},
        "output": {"format": ga_format},
    }
    echoed = to_beta(ev("session.created", session=ga["session"]))["session"]
    assert echoed == event["session"]


def test_formats_without_a_beta_name_stay_as_sent():
    """PCM at another rate, or an unknown string, is not guessed at: the upstream judges it."""
    ga, _ = client_event_to_ga({"type": "session.update", "session": {"input_audio_format": "mp3"}})
    assert ga["session"]["audio"]["input"]["format"] == "mp3"
    other_rate = {"type": "audio/pcm", "rate": 16000}
    session = {"type": "realtime", "audio": {"input": {"format": other_rate}}}
    assert to_beta(ev("session.updated", session=session))["session"] == {
        "input_audio_format": other_rate
    }


@pytest.mark.parametrize(
    ("modalities", "ga_modalities", "echoed"),
    [
        (["text", "audio"], ["audio"], ["text", "audio"]),
        (["audio", "text"], ["audio"], ["text", "audio"]),
        (["text"], ["text"], ["text"]),
    ],
)
def test_modalities_map_both_ways(modalities, ga_modalities, echoed):
    """Beta text+audio is GA audio (with its transcript); text only is text only."""
    ga, _ = client_event_to_ga({"type": "session.update", "session": {"modalities": modalities}})
    assert ga["session"] == {"type": "realtime", "output_modalities": ga_modalities}
    back = to_beta(ev("session.updated", session=ga["session"]))["session"]
    assert back == {"modalities": echoed}


def test_unknown_beta_fields_pass_through():
    """A field the tables do not know goes up as sent, for the policy to judge."""
    ga, dropped = client_event_to_ga(
        {"type": "session.update", "session": {"model": "gpt-realtime", "foo": 1}}
    )
    assert ga["session"] == {"model": "gpt-realtime", "foo": 1, "type": "realtime"}
    assert dropped == []


def test_beta_client_secret_and_type_are_dropped():
    """Beta fields GA has no place for are dropped and named, `type` included."""
    session = {"client_secret": {"expires_after": {"seconds": 60}}, "type": "transcription"}
    ga, dropped = client_event_to_ga({"type": "session.update", "session": session})
    assert ga["session"] == {"type": "realtime"}
    assert sorted(dropped) == ["session.client_secret", "session.type"]


def test_beta_response_create_becomes_ga():
    """response.create's beta overrides take GA names; temperature is dropped and named."""
    event = {
        "type": "response.create",
        "event_id": "cli_0403",
        "response": {
            "modalities": ["text", "audio"],
            "voice": "alloy",
            "output_audio_format": "g711_ulaw",
            "temperature": 0.7,
            "max_response_output_tokens": 200,
            "instructions": "Be brief.",
            "conversation": "none",
            "metadata": {"topic": "weather"},
            "input": [
                {"type": "item_reference", "id": "item_1"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Earlier answer."}],
                },
            ],
        },
    }
    ga, dropped = client_event_to_ga(event)
    assert dropped == ["response.temperature"]
    assert ga == {
        "type": "response.create",
        "event_id": "cli_0403",
        "response": {
            "output_modalities": ["audio"],
            "audio": {"output": {"voice": "alloy", "format": {"type": "audio/pcmu"}}},
            "max_output_tokens": 200,
            "instructions": "Be brief.",
            "conversation": "none",
            "metadata": {"topic": "weather"},
            "input": [
                {"type": "item_reference", "id": "item_1"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Earlier answer."}],
                },
            ],
        },
    }


@pytest.mark.parametrize(
    ("beta_parts", "ga_parts"),
    [
        ([{"type": "text", "text": "hi"}], [{"type": "output_text", "text": "hi"}]),
        ([{"type": "audio", "transcript": "hi"}], [{"type": "output_audio", "transcript": "hi"}]),
    ],
)
def test_assistant_item_create_takes_ga_part_types(beta_parts, ga_parts):
    """An assistant message's beta parts take their GA types."""
    item = {"type": "message", "role": "assistant", "content": beta_parts}
    ga, dropped = client_event_to_ga({"type": "conversation.item.create", "item": item})
    assert ga["item"]["content"] == ga_parts and dropped == []


@pytest.mark.parametrize(
    "event",
    [
        # examples/f: a user's text and a tool's output are the same in both dialects.
        {
            "type": "conversation.item.create",
            "event_id": "cli_0402",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "What's the weather in Paris?"}],
            },
        },
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "call_1", "output": "{}"},
        },
        {"type": "response.create", "event_id": "cli_0403"},
        {"type": "input_audio_buffer.append", "audio": "AAABAP//AgA="},
        {"type": "input_audio_buffer.commit"},
        {
            "type": "conversation.item.truncate",
            "item_id": ITEM,
            "content_index": 0,
            "audio_end_ms": 9,
        },
        {"type": "response.cancel"},
        {"type": "no.such.event"},
        {"no_type": True},
    ],
)
def test_events_of_one_shape_pass_through(event):
    """An event the same in both dialects comes back as the very object it was."""
    ga, dropped = client_event_to_ga(event)
    assert ga is event and dropped == []


def test_transcription_session_update_becomes_ga_session_update():
    """Beta transcription_session.update is GA session.update of type transcription (examples/g)."""
    event = {
        "type": "transcription_session.update",
        "event_id": "cli_0501",
        "session": {
            "input_audio_format": "pcm16",
            "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "input_audio_noise_reduction": {"type": "near_field"},
            "turn_detection": None,
            "include": ["item.input_audio_transcription.logprobs"],
            "modalities": ["text"],
            "client_secret": {"expires_at": {"anchor": "created_at", "seconds": 600}},
        },
    }
    ga, dropped = client_event_to_ga(event)
    assert ga == {
        "type": "session.update",
        "event_id": "cli_0501",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": None,
                }
            },
            "include": ["item.input_audio_transcription.logprobs"],
        },
    }
    assert sorted(dropped) == ["session.client_secret", "session.modalities"]
    GA_CLIENT.validate_python(ga)


def test_ga_transcription_session_becomes_transcription_session_event():
    """A GA transcription session.created reads as beta transcription_session.created."""
    session = {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": "sess_Hq7wT2cXb9LmN4pQ1rS8v",
        "expires_at": 1767229200,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {"type": "server_vad", "threshold": 0.5},
            }
        },
        "include": None,
    }
    translated = to_beta(ev("session.created", session=session))
    assert translated["type"] == "transcription_session.created"
    assert translated["session"] == {
        "object": "realtime.transcription_session",
        "id": "sess_Hq7wT2cXb9LmN4pQ1rS8v",
        "expires_at": 1767229200,
        "include": None,
        "input_audio_format": "pcm16",
        "input_audio_transcription": None,
        "input_audio_noise_reduction": None,
        "turn_detection": {"type": "server_vad", "threshold": 0.5},
    }


def test_translated_client_types():
    """Only the four beta events whose GA form differs are rebuilt."""
    assert TRANSLATED_CLIENT_TYPES == {
        "session.update",
        "transcription_session.update",
        "response.create",
        "conversation.item.create",
    }


# -- dialect ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "subprotocols", "expected"),
    [
        ([(b"openai-beta", b"realtime=v1")], [], True),
        ([(b"OpenAI-Beta", b"Realtime=V1")], [], True),
        ([(b"openai-beta", b"assistants=v2, realtime=v1")], [], True),
        ([], ["realtime", "openai-insecure-api-key.ek_x", "openai-beta.realtime-v1"], True),
        ([(b"openai-beta", b"assistants=v2")], ["realtime"], False),
        ([(b"openai-beta", b"realtime=v10")], [], False),
        ([(b"x-openai-beta", b"realtime=v1")], [], False),
        ([], ["realtime", "openai-agents-sdk.0.17.0"], False),
        ([], [], False),
    ],
)
def test_is_beta(headers, subprotocols, expected):
    """Beta is the `OpenAI-Beta: realtime=v1` header or the `openai-beta.realtime-v1` offer."""
    assert is_beta(headers, subprotocols) is expected
