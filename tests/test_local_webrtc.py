"""The local upstream answers WebRTC calls as OpenAI does: the offer over HTTP on the WebSocket's
port, the `oai-events` data channel, the caller's audio heard and echoed on the answer's track,
the `?call_id=` sideband, and hang-ups.

The caller is an aiortc peer (tests/webrtc_tools.py), as a browser is one.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.local_upstream import LocalUpstream, LocalUpstreamConfig
from app.local_upstream.http import MAX_BODY_BYTES
from app.local_upstream.internals import use_ice_addresses
from app.local_upstream.session_config import DEFAULT_INSTRUCTIONS
from tests.audio_tools import envelope, spoken_pcm
from tests.helpers import UPSTREAM_KEY, eventually
from tests.webrtc_tools import RATE, Caller

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
TIMEOUT = 10.0
LOCATION = re.compile(r"/v1/realtime/calls/(rtc_[0-9a-f]{32})")
TRANSCRIBED = {
    "type": "realtime",
    "model": "gpt-realtime",
    "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
}
SILENCE_BEFORE = 300 * RATE // 1000 * 2  # `spoken_pcm`'s leading silence, in bytes
MakeCaller = Callable[..., Caller]


@pytest.fixture(autouse=True)
async def no_call_tasks_left() -> AsyncIterator[None]:
    """Set up first, so checked last: once the servers are stopped, no call task runs."""
    yield
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("local-upstream")]
    assert left == []


@pytest.fixture
async def caller_factory() -> AsyncIterator[MakeCaller]:
    """Makes aiortc callers (`pcm`: what their microphone plays); closes them after the test."""
    made: list[Caller] = []

    def make(pcm: bytes = b"") -> Caller:
        made.append(Caller(pcm))
        return made[-1]

    yield make
    for caller in made:
        await caller.close()


class Sideband:
    """A `?call_id=` WebSocket read all the time, as the relay reads it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                async with self._arrived:
                    self.events.append(json.loads(message))
                    self._arrived.notify_all()
        except ConnectionClosed:
            pass

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def wait_for(self, event_type: str, count: int = 1) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT), self._arrived:
            while True:
                seen = [e for e in self.events if e["type"] == event_type]
                if len(seen) >= count:
                    return seen[count - 1]
                await self._arrived.wait()

    async def closed(self) -> int | None:
        """The close code, once the upstream has closed the socket."""
        async with asyncio.timeout(TIMEOUT):
            await self._reader
        return self.ws.close_code

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


@pytest.fixture
async def sideband_factory(upstream: LocalUpstream) -> AsyncIterator[Callable[..., Any]]:
    """Opens sidebands to the upstream's calls; closes them after the test."""
    opened: list[Sideband] = []

    async def open_sideband(call_id: str, headers: dict[str, str] = AUTH) -> Sideband:
        url = f"{upstream.url}?call_id={call_id}"
        async with asyncio.timeout(TIMEOUT):
            ws = await connect(url, additional_headers=headers)
        opened.append(Sideband(ws))
        return opened[-1]

    yield open_sideband
    for sideband in opened:
        await sideband.ws.close()
        await sideband.closed()


async def post(url: str, **options: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        return await http.post(url, **options)


async def call(
    upstream: LocalUpstream,
    caller: Caller,
    session: dict[str, Any] | None = None,
    headers: dict[str, str] = AUTH,
) -> httpx.Response:
    """Post the caller's offer (multipart with a `session`, else raw SDP); answer it on 201."""
    offer = await caller.offer()
    if session is None:
        content = {"content": offer, "headers": {**headers, "Content-Type": "application/sdp"}}
        response = await post(upstream.calls_url, **content)
    else:
        files = {
            "sdp": (None, offer, "application/sdp"),
            "session": (None, json.dumps(session), "application/json"),
        }
        response = await post(upstream.calls_url, files=files, headers=headers)
    if response.status_code == 201:
        await caller.answer(response.text)
    return response


def call_id_of(response: httpx.Response) -> str:
    match = LOCATION.fullmatch(response.headers["location"])
    assert match is not None, response.headers["location"]
    return match.group(1)


def echo_match(heard: bytes, said: bytes) -> tuple[float, float]:
    """How well the speech in `said` comes back in `heard`: the best Pearson r of their 20 ms
    loudness envelopes over every delay, and that delay in seconds."""
    got = envelope(np.frombuffer(heard, "<i2"), RATE)
    ref = envelope(np.frombuffer(said, "<i2"), RATE)
    loud = np.flatnonzero(ref > ref.max() / 100)
    ref = ref[max(0, loud[0] - 5) : loud[-1] + 5]  # the speech, without the silence around it
    best = (-1.0, 0.0)
    for lag in range(len(got) - len(ref) + 1):
        window = got[lag : lag + len(ref)]
        if window.std() > 0:  # digital silence (before the call connects) has no correlation
            best = max(best, (float(np.corrcoef(window, ref)[0, 1]), lag / 50))
    return best


async def test_a_multipart_offer_is_answered_with_the_session_part(
    upstream: LocalUpstream, caller_factory: MakeCaller
) -> None:
    """A multipart offer gets 201, Location and an answer; session.created has the session part."""
    caller = caller_factory()
    session = {
        "type": "realtime",
        "model": "gpt-realtime-mini",
        "instructions": "Be brief.",
        "audio": {"output": {"voice": "cedar"}},
    }
    response = await call(upstream, caller, session)
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/sdp"
    call_id = call_id_of(response)
    answer = response.text
    assert "m=audio" in answer and "webrtc-datachannel" in answer
    candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
    assert candidates and all(" 127.0.0.1 " in line for line in candidates)

    created = await caller.wait_for("session.created")
    assert created["session"]["instructions"] == "Be brief."
    assert created["session"]["model"] == "gpt-realtime-mini"
    assert created["session"]["audio"]["output"]["voice"] == "cedar"
    record = await upstream.wait_for_call()
    assert record.id == call_id
    assert record.offer == caller.pc.localDescription.sdp
    assert record.session == session
    assert record.answer == answer
    assert record.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert record.sent_types() == ["session.created"]
    assert not record.closed.is_set()


async def test_a_raw_offer_gets_the_default_session_on_either_path(
    upstream: LocalUpstream, caller_factory: MakeCaller
) -> None:
    """An application/sdp offer gets the default session; Azure's path takes `api-key`."""
    caller = caller_factory()
    response = await call(upstream, caller)
    assert response.status_code == 201, response.text
    created = await caller.wait_for("session.created")
    assert created["session"]["instructions"] == DEFAULT_INSTRUCTIONS
    assert created["session"]["model"] == "gpt-realtime"
    assert upstream.calls[0].session is None

    azure = caller_factory()
    headers = {"api-key": UPSTREAM_KEY, "Content-Type": "application/sdp"}
    url = upstream.calls_url.replace("/v1/", "/openai/v1/")
    response = await post(url, content=await azure.offer(), headers=headers)
    assert response.status_code == 201, response.text
    assert upstream.calls[1].path == "/openai/v1/realtime/calls"


async def test_the_caller_is_heard_transcribed_and_echoed(
    upstream: LocalUpstream, caller_factory: MakeCaller, tmp_path
) -> None:
    """The caller's speech is transcribed and echoed on the track, with buffer events, no deltas."""
    said = spoken_pcm(tmp_path / "hello.wav", "hello world")
    caller = caller_factory(said)
    assert (await call(upstream, caller, TRANSCRIBED)).status_code == 201

    stopped = await caller.wait_for("output_audio_buffer.stopped", within=30)
    transcript = await caller.wait_for("conversation.item.input_audio_transcription.completed")
    assert "hello world" in transcript["transcript"]
    done = await caller.wait_for("response.done")
    started = await caller.wait_for("output_audio_buffer.started")
    response_id = done["response"]["id"]
    assert started["response_id"] == stopped["response_id"] == response_id
    types = [e["type"] for e in caller.events]
    assert types.index("response.content_part.added") < types.index("output_audio_buffer.started")
    assert types.index("response.done") < types.index("output_audio_buffer.stopped")
    assert "response.output_audio_transcript.delta" in types
    assert "response.output_audio.delta" not in types
    assert "response.output_audio.delta" not in upstream.calls[0].sent_types()

    played = len(caller.heard)  # the track goes on with silence: wait for the echo's tail
    await eventually(lambda: len(caller.heard) > played + RATE)
    r, delay = echo_match(bytes(caller.heard), said)
    assert r > 0.9, (r, delay)
    assert delay > 0.5  # it came back after it was said


async def test_the_sideband_sees_every_event_and_steers_the_call(
    upstream: LocalUpstream, caller_factory: MakeCaller, sideband_factory
) -> None:
    """A sideband sees every event but session.created, and steers the call as the channel does."""
    caller = caller_factory()
    call_id = call_id_of(await call(upstream, caller, TRANSCRIBED))
    sideband = await sideband_factory(call_id)
    await caller.wait_for("session.created")
    record = upstream.calls[0]
    await eventually(lambda: len(record.sidebands) == 1)

    steer = {"type": "realtime", "instructions": "Sideband rules."}
    await sideband.send({"type": "session.update", "session": steer})
    updated = await sideband.wait_for("session.updated")
    assert updated["session"]["instructions"] == "Sideband rules."
    on_channel = await caller.wait_for("session.updated")
    assert on_channel["event_id"] == updated["event_id"]

    caller.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Arr"}})
    updated = await sideband.wait_for("session.updated", count=2)
    assert updated["session"]["instructions"] == "Arr"  # the relay watches for this

    text = {"type": "input_text", "text": "hello there"}
    item = {"type": "message", "role": "user", "content": [text]}
    await sideband.send({"type": "conversation.item.create", "item": item})
    await sideband.send({"type": "response.create"})
    await sideband.wait_for("output_audio_buffer.stopped")
    await caller.wait_for("output_audio_buffer.stopped")
    assert caller.loudness() > 300  # the answer's tone, played on the track

    channel_types = [e["type"] for e in caller.events]
    assert channel_types[0] == "session.created"
    assert sideband.types() == channel_types[1:]
    assert "response.output_audio.delta" not in channel_types
    assert [e["type"] for e in record.events] == ["session.update"]
    assert [e["type"] for e in record.sidebands[0].events] == [
        "session.update",
        "conversation.item.create",
        "response.create",
    ]
    assert record.sidebands[0].sent == sideband.events


async def test_a_hang_up_ends_the_call(
    upstream: LocalUpstream, caller_factory: MakeCaller, sideband_factory
) -> None:
    """A hang-up (200, no body) closes the peer and the sideband (1000); then the call is gone."""
    caller = caller_factory()
    call_id = call_id_of(await call(upstream, caller))
    sideband = await sideband_factory(call_id)
    await asyncio.wait_for(caller.opened.wait(), TIMEOUT)
    record = upstream.calls[0]
    await eventually(lambda: len(record.sidebands) == 1)

    hangup = f"{upstream.calls_url}/{call_id}/hangup"
    response = await post(hangup, headers=AUTH)
    assert response.status_code == 200 and response.content == b""
    assert record.hung_up and record.end_reason == "hangup"
    assert await sideband.closed() == 1000
    await asyncio.wait_for(record.closed.wait(), TIMEOUT)
    await eventually(lambda: caller.pc.connectionState == "closed")
    await eventually(lambda: caller.channel.readyState == "closed")

    again = await post(hangup, headers=AUTH)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "not_found"
    assert (await post(f"{upstream.calls_url}/rtc_nope/hangup", headers=AUTH)).status_code == 404
    with pytest.raises(InvalidStatus) as refused:
        await sideband_factory(call_id)
    assert refused.value.response.status_code == 404


async def test_a_caller_that_leaves_ends_the_call(
    upstream: LocalUpstream, caller_factory: MakeCaller, sideband_factory
) -> None:
    """The caller closing its peer connection ends the call: its sideband closes with 1000."""
    caller = caller_factory()
    call_id = call_id_of(await call(upstream, caller))
    sideband = await sideband_factory(call_id)
    await asyncio.wait_for(caller.opened.wait(), TIMEOUT)
    await caller.pc.close()
    record = upstream.calls[0]
    await asyncio.wait_for(record.closed.wait(), TIMEOUT)
    assert record.end_reason == "peer closed" and not record.hung_up
    assert await sideband.closed() == 1000


async def test_a_clear_or_a_barge_in_cuts_the_answer(
    upstream: LocalUpstream, caller_factory: MakeCaller, tmp_path
) -> None:
    """A client clear and a barge-in drop the answer's audio: cleared, and no stopped for it."""
    said = spoken_pcm(tmp_path / "hello.wav", "hello world")
    caller = caller_factory(said)
    assert (await call(upstream, caller)).status_code == 201
    started = await caller.wait_for("output_audio_buffer.started", within=30)
    caller.send({"type": "output_audio_buffer.clear"})
    cleared = await caller.wait_for("output_audio_buffer.cleared")
    assert cleared["response_id"] == started["response_id"]

    caller.microphone.play(said)  # the next answer is cut by the caller's own speech
    second = await caller.wait_for("output_audio_buffer.started", count=2, within=30)
    caller.microphone.pending[:] = said[SILENCE_BEFORE:]  # speech at once, over the answer
    barged = await caller.wait_for("output_audio_buffer.cleared", count=2, within=30)
    assert barged["response_id"] == second["response_id"]
    stopped = [e for e in caller.events if e["type"] == "output_audio_buffer.stopped"]
    assert not {e["response_id"] for e in stopped} & {started["response_id"], barged["response_id"]}
    types = [e["type"] for e in caller.events]
    speech = [i for i, t in enumerate(types) if t == "input_audio_buffer.speech_started"]
    clears = [i for i, t in enumerate(types) if t == "output_audio_buffer.cleared"]
    assert clears[0] < speech[1] and speech[2] < clears[1]  # the third turn cut the second


async def test_auth_is_enforced_on_calls_hang_ups_and_sidebands(
    upstream: LocalUpstream, caller_factory: MakeCaller, sideband_factory
) -> None:
    """A wrong or missing key gets 401 invalid_api_key everywhere; an unknown call id 404."""
    caller = caller_factory()
    for headers in ({"Authorization": "Bearer sk-wrong"}, {}):
        refused = await call(upstream, caller, TRANSCRIBED, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert UPSTREAM_KEY not in refused.text
    assert upstream.calls == []

    call_id = call_id_of(await call(upstream, caller, TRANSCRIBED))
    hangup = f"{upstream.calls_url}/{call_id}/hangup"
    assert (await post(hangup, headers={"Authorization": "Bearer sk-wrong"})).status_code == 401
    assert not upstream.calls[0].closed.is_set()
    for headers, status in (({"Authorization": "Bearer sk-wrong"}, 401), (AUTH, 404)):
        target = call_id if status == 401 else "rtc_unknown"
        with pytest.raises(InvalidStatus) as info:
            await sideband_factory(target, headers)
        assert info.value.response.status_code == status
        assert json.loads(info.value.response.body)["error"]["message"]


def multipart(**parts: str) -> Callable[[str], dict[str, Any]]:
    """A request with these form parts; `sdp="OFFER"` stands for the caller's offer."""

    def build(offer: str) -> dict[str, Any]:
        files = {
            name: (None, offer if value == "OFFER" else value) for name, value in parts.items()
        }
        return {"files": files, "headers": AUTH}

    return build


def body(content: str | bytes, content_type: str = "application/sdp") -> Callable[[str], Any]:
    """A request with this body; "OFFER" stands for the caller's offer."""

    def build(offer: str) -> dict[str, Any]:
        sent = offer if content == "OFFER" else content
        return {"content": sent, "headers": {**AUTH, "Content-Type": content_type}}

    return build


@pytest.mark.parametrize(
    ("build", "status", "code"),
    [
        (body("OFFER", "text/plain"), 415, "unsupported_content_type"),
        (body("hello"), 400, "invalid_request"),
        (body("v=0\r\n"), 400, "invalid_request"),
        (body("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"), 400, "invalid_request"),
        (body(b"x" * (MAX_BODY_BYTES + 1)), 413, "request_too_large"),
        (multipart(session=json.dumps(TRANSCRIBED)), 400, "invalid_request"),
        (multipart(sdp="OFFER", session="{"), 400, "invalid_request"),
        (multipart(sdp="OFFER", session="[]"), 400, "invalid_request"),
        (multipart(sdp="OFFER", session='{"type": "transcription"}'), 400, "invalid_value"),
        (multipart(sdp="OFFER", session='{"type": "realtime", "a": 1}'), 400, "unknown_parameter"),
    ],
)
async def test_a_bad_offer_gets_a_4xx_and_opens_nothing(
    upstream: LocalUpstream, caller_factory: MakeCaller, build, status, code
) -> None:
    """Bad content types, offers, session parts and sizes get a JSON 4xx and make no call."""
    offer = await caller_factory().offer()
    response = await post(upstream.calls_url, **build(offer))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert upstream.calls == []


async def exchange(upstream: LocalUpstream, *chunks: bytes, eof: bool = False) -> bytes:
    """Write raw bytes to the upstream's port (`eof`: then our end of stream), and read until
    it closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
    try:
        for chunk in chunks:
            writer.write(chunk)
        if eof:
            writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_raw_http_requests_are_answered_and_closed(
    upstream: LocalUpstream, caller_factory: MakeCaller
) -> None:
    """Raw requests: malformed, oversized, chunked after 100-continue, other methods and paths."""
    head = (
        f"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {UPSTREAM_KEY}\r\n"
    )
    answer = await exchange(upstream, b"POST\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    big = f"{head}Content-Type: application/sdp\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    assert (await exchange(upstream, big.encode())).startswith(b"HTTP/1.1 413 ")
    chunk = b"x" * 65536
    chunks = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * (MAX_BODY_BYTES // len(chunk) + 1)
    chunked = f"{head}Content-Type: application/sdp\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert (await exchange(upstream, chunked.encode(), *chunks)).startswith(b"HTTP/1.1 413 ")
    assert await exchange(upstream, b"POS", eof=True) == b""  # gave up: a clean close

    offer = (await caller_factory().offer()).encode()
    expect = f"{head}Content-Type: application/sdp\r\nTransfer-Encoding: chunked\r\n"
    expect += "Expect: 100-continue\r\n\r\n"
    body = f"{len(offer):x}\r\n".encode() + offer + b"\r\n0\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
    try:
        writer.write(expect.encode())
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            writer.write_eof()
            answered = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert answered.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"\r\nLocation: /v1/realtime/calls/rtc_" in answered
    assert upstream.calls[0].offer == offer.decode()

    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        put = await http.put(upstream.calls_url, headers=AUTH)
        assert put.status_code == 405 and put.headers["allow"] == "POST, OPTIONS"
        assert (await http.options(upstream.calls_url)).status_code == 204
        other = await http.post(upstream.calls_url.replace("/calls", "/other"), headers=AUTH)
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"


async def test_refuse_status_refuses_calls_too(
    upstream: LocalUpstream, caller_factory: MakeCaller
) -> None:
    """The refuse_status knob answers call creation with that status and a JSON error."""
    upstream.refuse_status = 503
    response = await call(upstream, caller_factory(), TRANSCRIBED)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"
    assert upstream.calls == []


async def test_stopping_the_server_ends_its_calls(upstream_factory, caller_factory, tmp_path):
    """A stopping upstream ends every call and closes its sidebands with 1000."""
    upstream = await upstream_factory()
    caller = caller_factory(spoken_pcm(tmp_path / "hello.wav", "hello world"))
    call_id = call_id_of(await call(upstream, caller, TRANSCRIBED))
    ws = await connect(f"{upstream.url}?call_id={call_id}", additional_headers=AUTH)
    sideband = Sideband(ws)
    await caller.wait_for("input_audio_buffer.speech_started", within=30)
    await upstream.__aexit__(None, None, None)
    record = upstream.calls[0]
    assert record.closed.is_set() and record.end_reason == "shutdown"
    assert await sideband.closed() == 1000


async def test_ice_addresses_chooses_the_candidates(upstream_factory, caller_factory) -> None:
    """The ice_addresses setting puts the answer's host candidates, and the call, there."""
    upstream = await upstream_factory(ice_addresses=["127.0.0.2"])
    try:
        caller = caller_factory()
        response = await call(upstream, caller, TRANSCRIBED)
        candidates = [line for line in response.text.splitlines() if "a=candidate" in line]
        assert candidates and all(" 127.0.0.2 " in line for line in candidates)
        await caller.wait_for("session.created")  # connected over 127.0.0.2
    finally:
        use_ice_addresses(LocalUpstreamConfig().ice_addresses)  # the process-wide default
