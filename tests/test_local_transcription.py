"""The local upstream's transcription-only sessions and its speech recognizer (PocketSphinx)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from app.local_upstream import LocalUpstream, asr
from app.local_upstream.pcm import PCM, PCMA, PCMU, convert
from tests.helpers import append_audio, events_until, recv_event, send_event

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KEY = "sk-local-test"
TIMEOUT = 10.0  # a first decode also loads the recognizer
BPM = 48  # bytes per millisecond of 24 kHz PCM16
# espeak-ng voices and phrases PocketSphinx hears exactly through the 24 kHz path (measured).
HELLO = ("en-us+m3", "hello world")
MORNING = ("en-us+m1", "good morning everyone")
TRANSCRIPTION_EVENTS = (
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
)
COMPLETED = TRANSCRIPTION_EVENTS[1]
Speak = Callable[[str, str], bytes]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def upstream() -> AsyncIterator[LocalUpstream]:
    async with LocalUpstream(api_key=KEY) as up:
        yield up


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speak:
    """A factory: (voice, text) -> that text spoken as PCM16 24 kHz, made once per module."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run scripts/bootstrap.sh test (it installs it)")
    folder = tmp_path_factory.mktemp("speech")
    made: dict[tuple[str, str], bytes] = {}

    def make(voice: str, text: str) -> bytes:
        if (voice, text) not in made:
            path = folder / f"{voice}-{text.replace(' ', '_')}.wav"
            command = ["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), text]
            subprocess.run(command, check=True, timeout=60)
            made[voice, text] = _pcm_24k(path)
        return made[voice, text]

    return make


def _pcm_24k(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        rate = w.getframerate()
    return bytes(soxr.resample(samples, rate, 24000, quality="VHQ").astype("<i2").tobytes())


def _silence(ms: int) -> bytes:
    return bytes(ms * BPM)


def _connect(up: LocalUpstream, query: str = "intent=transcription") -> Any:
    headers = {"Authorization": f"Bearer {KEY}"}
    return connect(f"{up.url}?{query}", additional_headers=headers, max_size=None)


async def _update(ws: ClientConnection, **session: Any) -> dict[str, Any]:
    await send_event(ws, "session.update", session={"type": "transcription", **session})
    event = await recv_event(ws)
    assert event["type"] == "session.updated", event
    session_object: dict[str, Any] = event["session"]
    return session_object


def _transcribe_with(model: str, **input_audio: Any) -> dict[str, Any]:
    return {"audio": {"input": {"transcription": {"model": model}, **input_audio}}}


def _check_tokens_usage(usage: dict[str, Any]) -> None:
    assert usage["type"] == "tokens"
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    details = usage["input_token_details"]
    assert usage["input_tokens"] == details["audio_tokens"] + details["text_tokens"] > 0
    assert usage["output_tokens"] > 0


async def test_handshake_opens_a_transcription_session(upstream: LocalUpstream) -> None:
    """?intent=transcription without a model opens one; another intent or both params are 400."""
    async with _connect(upstream) as ws:
        created = await recv_event(ws)
    session = created["session"]
    assert created["type"] == "session.created" and session["id"].startswith("sess_")
    assert isinstance(session.pop("expires_at"), int)
    assert session == {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": session["id"],
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 200,
                },
            }
        },
        "include": None,
    }
    assert upstream.connections[0].query == {"intent": "transcription"}
    for query in ("intent=translation", "intent=", "intent=transcription&model=gpt-realtime", ""):
        with pytest.raises(InvalidStatus) as info:
            async with asyncio.timeout(TIMEOUT), _connect(upstream, query):
                pass
        assert info.value.response.status_code == 400, query
        assert json.loads(info.value.response.body)["error"]["type"] == "invalid_request_error"


async def test_speech_is_transcribed_and_never_answered(
    upstream: LocalUpstream, speech: Speak
) -> None:
    """Server VAD commits spoken words; deltas and completed carry them; no item or response."""
    voice, text = HELLO
    async with _connect(upstream) as ws:
        await recv_event(ws)
        session = await _update(ws, **_transcribe_with("gpt-4o-mini-transcribe"))
        assert session["audio"]["input"]["transcription"] == {
            "model": "gpt-4o-mini-transcribe",
            "language": None,
            "prompt": None,
        }
        await append_audio(ws, _silence(300) + speech(voice, text) + _silence(1000))
        events = await events_until(ws, COMPLETED)
    types = [e["type"] for e in events]
    assert types[:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    assert set(types[3:-1]) == {TRANSCRIPTION_EVENTS[0]}
    item_id = events[2]["item_id"]
    assert events[2]["previous_item_id"] is None
    assert {e["item_id"] for e in events} == {item_id}
    completed = events[-1]
    assert completed["content_index"] == 0
    assert completed["transcript"] == text
    assert "".join(e["delta"] for e in events[3:-1]) == completed["transcript"]
    assert len(events) - 4 == len(text.split())  # one delta per word
    _check_tokens_usage(completed["usage"])
    record = upstream.connections[0]
    await asyncio.wait_for(record.closed.wait(), TIMEOUT)
    sent = record.sent_types()
    assert not [t for t in sent if t.startswith("response.")]
    assert not {"conversation.item.added", "conversation.item.done", "error"} & set(sent)
    assert "rate_limits.updated" not in sent


async def test_only_transcription_events_are_accepted(upstream: LocalUpstream) -> None:
    """Realtime-only client events, a realtime session type and realtime fields are refused."""
    async with _connect(upstream) as ws:
        created = (await recv_event(ws))["session"]
        await send_event(
            ws, "session.update", event_id="cli_1", session={"type": "realtime", "model": "x"}
        )
        error = (await recv_event(ws))["error"]
        assert (error["code"], error["param"], error["event_id"]) == (
            "invalid_value",
            "session.type",
            "cli_1",
        )
        for event_type in ("response.create", "conversation.item.create", "response.cancel"):
            await send_event(ws, event_type, event_id="cli_2")
            error = (await recv_event(ws))["error"]
            assert (error["code"], error["param"], error["event_id"]) == (
                "invalid_event",
                "type",
                "cli_2",
            )
            assert event_type in error["message"]
        for field, value, param in [
            ("instructions", "Be a pirate.", "session.instructions"),
            ("model", "gpt-realtime", "session.model"),
            ("audio", {"output": {"voice": "cedar"}}, "session.audio.output"),
        ]:
            await send_event(ws, "session.update", session={"type": "transcription", field: value})
            error = (await recv_event(ws))["error"]
            assert (error["code"], error["param"]) == ("unknown_parameter", param)
        # The read-only fields a client echoes back are ignored; the rest applies.
        echoed = created | {"include": ["item.input_audio_transcription.logprobs"]}
        echoed["audio"]["input"]["turn_detection"] = None
        session = await _update(ws, **{k: v for k, v in echoed.items() if k != "type"})
        assert session["id"] == created["id"] and session["object"] == created["object"]
        assert session["include"] == ["item.input_audio_transcription.logprobs"]
        assert session["audio"]["input"]["turn_detection"] is None
        vad = {"type": "server_vad", "silence_duration_ms": 500}
        session = await _update(ws, audio={"input": {"turn_detection": vad}})
        assert session["audio"]["input"]["turn_detection"] == {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 500,
        }
        await send_event(ws, "input_audio_buffer.commit")
        assert (await recv_event(ws))["error"]["code"] == "input_audio_buffer_commit_empty"
        await send_event(ws, "input_audio_buffer.clear")
        assert (await recv_event(ws))["type"] == "input_audio_buffer.cleared"


async def test_realtime_session_refuses_the_transcription_type(upstream: LocalUpstream) -> None:
    """A session opened with ?model= stays realtime: session.type "transcription" is refused."""
    async with _connect(upstream, "model=gpt-realtime") as ws:
        await recv_event(ws)
        await send_event(ws, "session.update", session={"type": "transcription"})
        error = (await recv_event(ws))["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "session.type")


async def test_commits_are_transcribed_in_order_with_duration_usage(
    upstream: LocalUpstream, speech: Speak
) -> None:
    """Push-to-talk with whisper-1: two quick commits, transcripts in commit order, seconds."""
    first, second = speech(*HELLO), speech(*MORNING)
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _update(ws, **_transcribe_with("whisper-1", turn_detection=None))
        for audio in (first, second):
            await append_audio(ws, audio)
            await send_event(ws, "input_audio_buffer.commit")
        events = await events_until(ws, COMPLETED, count=2)
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert [c["previous_item_id"] for c in committed] == [None, committed[0]["item_id"]]
    transcription = [e for e in events if e["type"] in TRANSCRIPTION_EVENTS]
    ids = [e["item_id"] for e in transcription]
    # Every event of the first turn comes before any of the second.
    assert ids == sorted(ids, key=[c["item_id"] for c in committed].index)
    completed = [e for e in transcription if e["type"] == COMPLETED]
    assert [c["transcript"] for c in completed] == [HELLO[1], MORNING[1]]
    for done, audio in zip(completed, (first, second), strict=True):
        assert done["usage"] == {"type": "duration", "seconds": len(audio) // BPM / 1000}
    assert "speech_started" not in json.dumps(events)  # VAD was off


@pytest.mark.parametrize("fmt", [PCM, PCMU, PCMA])
async def test_every_input_format_is_recognized(
    upstream: LocalUpstream, speech: Speak, fmt: str
) -> None:
    """audio/pcm, audio/pcmu and audio/pcma input all reach the recognizer as the same words."""
    audio = convert(speech(*HELLO), PCM, fmt)
    async with _connect(upstream) as ws:
        await recv_event(ws)
        fmt_object = {"type": fmt}
        session = await _update(
            ws, **_transcribe_with("gpt-4o-transcribe", format=fmt_object, turn_detection=None)
        )
        assert session["audio"]["input"]["format"]["type"] == fmt
        await send_event(ws, "input_audio_buffer.append", audio=base64.b64encode(audio).decode())
        await send_event(ws, "input_audio_buffer.commit")
        completed = (await events_until(ws, COMPLETED))[-1]
    assert completed["transcript"] == HELLO[1]


async def test_conversation_session_transcribes_before_answering(
    upstream: LocalUpstream, speech: Speak
) -> None:
    """In a realtime session the user's words are transcribed, then the response starts."""
    voice, text = MORNING
    async with _connect(upstream, "model=gpt-realtime") as ws:
        await recv_event(ws)
        update = {"type": "realtime"} | _transcribe_with("gpt-4o-transcribe")
        await send_event(ws, "session.update", session=update)
        assert (await recv_event(ws))["type"] == "session.updated"
        await append_audio(ws, _silence(300) + speech(voice, text) + _silence(1000))
        events = await events_until(ws, "response.done")
        item_id = events[2]["item_id"]
        await send_event(ws, "conversation.item.retrieve", item_id=item_id)
        item = (await recv_event(ws))["item"]
    types = [e["type"] for e in events]
    deltas = len(text.split())
    assert types[: 7 + deltas] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        *[TRANSCRIPTION_EVENTS[0]] * deltas,
        COMPLETED,
        "response.created",
    ]
    completed = events[5 + deltas]
    assert completed["transcript"] == text and completed["item_id"] == item_id
    _check_tokens_usage(completed["usage"])
    assert item["content"][0]["transcript"] == text


async def test_asr_off_gives_the_placeholder(upstream: LocalUpstream, speech: Speak) -> None:
    """With the asr knob off, a turn's transcript is "(N.NN s of speech)" in one delta."""
    upstream.asr = False
    audio = speech(*HELLO)
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _update(ws, **_transcribe_with("gpt-4o-mini-transcribe", turn_detection=None))
        await append_audio(ws, audio)
        await send_event(ws, "input_audio_buffer.commit")
        events = await events_until(ws, COMPLETED)
    placeholder = f"({len(audio) // BPM / 1000:.2f} s of speech)"
    assert [e.get("delta") for e in events[1:]] == [placeholder, None]
    assert events[-1]["transcript"] == placeholder
    _check_tokens_usage(events[-1]["usage"])


async def test_no_transcription_model_no_transcription(
    upstream: LocalUpstream, speech: Speak
) -> None:
    """Without a transcription model a commit is only committed."""
    async with _connect(upstream) as ws:
        await recv_event(ws)
        await _update(ws, audio={"input": {"turn_detection": None}})
        await append_audio(ws, speech(*HELLO))
        await send_event(ws, "input_audio_buffer.commit")
        assert (await recv_event(ws))["type"] == "input_audio_buffer.committed"
        await send_event(
            ws, "input_audio_buffer.clear"
        )  # the next event is the clear's, nothing else
        assert (await recv_event(ws))["type"] == "input_audio_buffer.cleared"


async def test_recognizer_without_pocketsphinx_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the package, transcribe() gives None (the placeholder) and warns once."""
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # `import` now raises ImportError
    recognizer = asr.Recognizer()
    with caplog.at_level(logging.WARNING, logger="app.local_upstream.asr"):
        assert await recognizer.transcribe(_silence(500), PCM) is None
        assert await recognizer.transcribe(_silence(500), PCM) is None
    warnings = [r for r in caplog.records if "pocketsphinx" in r.getMessage()]
    assert len(warnings) == 1


def test_decoded_audio_is_capped() -> None:
    """At most MAX_SECONDS of a turn reach the decoder, at 16 kHz, from every format."""
    for fmt, bytes_per_ms in ((PCM, 48), (PCMU, 8)):
        samples = asr.to_16k(bytes(40_000 * bytes_per_ms), fmt)
        assert len(samples) == asr.MAX_SECONDS * asr.RATE and samples.dtype == np.int16
