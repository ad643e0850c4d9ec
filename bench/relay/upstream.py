"""The upstream the bench runs in its own process: a GA Realtime echo server that times arrivals.

Run by the bench as ``python -m bench.relay.upstream --response-ms .. --delta-ms ..``; it prints
``READY <port>`` once it listens on 127.0.0.1 and serves until SIGTERM or SIGINT.

For the sideband mode it also takes WebRTC calls on the same port, as OpenAI does (the local
upstream's `side_door` serves the HTTP requests): `POST /v1/realtime/calls` answers 201 with a fixed
SDP answer and no media, and a call's sideband (`?call_id=`) gets a scripted voice turn, its
`TURN_EVENTS` server events, every `--turn-seconds`, until the call is hung up.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import json
import logging
import random
import signal
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from app.local_upstream.http import HttpRequest, HttpResponse
from bench.relay.measure import percentiles
from bench.relay.wire import (
    APPEND_HEAD,
    BARE_APPEND,
    MODEL,
    RATE,
    SID_ID,
    UPSTREAM_KEY,
    event,
    loop_factory,
    tone_b64,
)

ANSWER = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    b"m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\n"
)
USAGE = {  # a response's usage, the same in every response
    "total_tokens": 230,
    "input_tokens": 150,
    "output_tokens": 80,
    "input_token_details": {
        "text_tokens": 30,
        "audio_tokens": 120,
        "cached_tokens": 0,
        "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0},
    },
    "output_token_details": {"text_tokens": 10, "audio_tokens": 70},
}
TRANSCRIPT_DELTAS = 20


def turn_events(turn: str) -> list[tuple[str, str]]:
    """A voice turn's server events on a call, as (type, body): VAD, the user's item and its
    transcription, a response with its transcript, usage, and the WebRTC output buffer."""
    user, said, response = f"item_u{turn}", f"item_a{turn}", f"resp_{turn}"
    ids = f'"response_id":"{response}","item_id":"{said}","output_index":0,"content_index":0'
    user_item = {"id": user, "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_audio", "transcript": None}]}  # fmt: skip
    said_item = {"id": said, "type": "message", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_audio", "transcript": "an echo"}]}  # fmt: skip
    events = [
        ("input_audio_buffer.speech_started", f'"audio_start_ms":0,"item_id":"{user}"'),
        ("input_audio_buffer.speech_stopped", f'"audio_end_ms":900,"item_id":"{user}"'),
        ("input_audio_buffer.committed", f'"previous_item_id":null,"item_id":"{user}"'),
        ("conversation.item.added", '"previous_item_id":null,"item":' + json.dumps(user_item)),
        ("conversation.item.done", '"previous_item_id":null,"item":' + json.dumps(user_item)),
        ("response.created", f'"response":{{"id":"{response}","status":"in_progress"}}'),
        ("response.output_item.added", f'"response_id":"{response}","output_index":0,"item":'
         + json.dumps(said_item)),
        ("conversation.item.added", f'"previous_item_id":"{user}","item":' + json.dumps(said_item)),
        ("response.content_part.added", ids + ',"part":{"type":"audio","transcript":""}'),
        ("output_audio_buffer.started", f'"response_id":"{response}"'),
    ]  # fmt: skip
    events += [("response.output_audio_transcript.delta", ids + ',"delta":"echo "')] * (
        TRANSCRIPT_DELTAS
    )
    tokens = {"type": "tokens", "input_tokens": 19, "output_tokens": 3, "total_tokens": 22,
              "input_token_details": {"text_tokens": 0, "audio_tokens": 19}}  # fmt: skip
    events += [
        ("conversation.item.input_audio_transcription.delta",
         f'"item_id":"{user}","content_index":0,"delta":"hello"'),
        ("conversation.item.input_audio_transcription.completed",
         f'"item_id":"{user}","content_index":0,"transcript":"hello","usage":'
         + json.dumps(tokens)),
        ("response.output_audio_transcript.done", ids + ',"transcript":"an echo"'),
        ("response.content_part.done", ids + ',"part":{"type":"audio","transcript":"an echo"}'),
        ("response.output_item.done", f'"response_id":"{response}","output_index":0,"item":'
         + json.dumps(said_item)),
        ("conversation.item.done", f'"previous_item_id":"{user}","item":' + json.dumps(said_item)),
        ("response.done", '"response":' + json.dumps({"id": response, "status": "completed",
                                                      "output": [said_item], "usage": USAGE})),
        ("output_audio_buffer.stopped", f'"response_id":"{response}"'),
    ]  # fmt: skip
    return events


TURN_EVENTS = len(turn_events("0"))


class EchoUpstream:
    """A GA Realtime echo server that records when each client event arrived.

    `GET /stats?t0=..&t1=..` answers the client->upstream latency of the events stamped in
    [t0, t1) and forgets every sample (the orchestrator asks once per run). Opus mode: it also
    answers, per named session, the arrival times of the relay's unstamped appends from about
    `t0` on, as `[index of the first, [ns, ...]]`, for the per-frame timing channel.
    """

    def __init__(self, key: str, delta_ms: int) -> None:
        self.key = key
        self.delta_ms = delta_ms
        self.delta = tone_b64(delta_ms, hz=330.0)
        self.sent_at: array.array[int] = array.array("q")
        self.latency: array.array[int] = array.array("q")
        self.sessions = 0
        self.response_deltas = 10
        self.arrivals: dict[str, array.array[int]] = {}
        # Sideband mode: the calls, their sockets, when each sideband event was sent.
        self.turn_seconds = 3.0
        self.calls = 0
        self.sidebands: dict[str, Any] = {}
        self.sideband_sent: array.array[int] = array.array("q")

    async def http(self, request: HttpRequest) -> HttpResponse:
        """`POST /v1/realtime/calls` and `.../{id}/hangup` (the side door of the port)."""
        path = urlsplit(request.target).path
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return HttpResponse(401, b"bad key\n")
        if request.method == "POST" and path == "/v1/realtime/calls":
            self.calls += 1
            location = f"/v1/realtime/calls/rtc_bench{self.calls}"
            headers = {"Content-Type": "application/sdp", "Location": location}
            return HttpResponse(201, ANSWER, headers)
        parts = path.split("/")
        if request.method == "POST" and len(parts) == 6 and parts[5] == "hangup":
            sideband = self.sidebands.pop(parts[4], None)
            if sideband is not None:
                await sideband.close(1000)
            return HttpResponse(200)
        return HttpResponse(404, b"not found\n")

    async def sideband(self, ws: Any, call_id: str) -> None:
        """A scripted voice turn every `turn_seconds`, first at a random offset, until closed."""
        from websockets.exceptions import ConnectionClosed

        self.sidebands[call_id] = ws
        turns = 0
        loop = asyncio.get_running_loop()
        due = loop.time() + random.uniform(0, self.turn_seconds)
        try:
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                turns += 1
                for event_type, body in turn_events(f"{call_id}_{turns}"):
                    await ws.send(event(event_type, body))
                    self.sideband_sent.append(time.monotonic_ns())
                due += self.turn_seconds
        except ConnectionClosed:
            pass
        finally:
            self.sidebands.pop(call_id, None)

    def process_request(self, connection: Any, request: Any) -> Any:
        url = urlsplit(request.path)
        if url.path == "/stats":
            query = parse_qs(url.query)
            body = self.stats(int(query["t0"][0]), int(query["t1"][0]))
            return connection.respond(200, json.dumps(body))
        if url.path != "/v1/realtime":
            return connection.respond(404, "not found\n")
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return connection.respond(401, "bad key\n")
        return None

    def stats(self, t0: int, t1: int) -> dict[str, Any]:
        window = [
            lat for sent, lat in zip(self.sent_at, self.latency, strict=True) if t0 <= sent < t1
        ]
        self.sent_at = array.array("q")
        self.latency = array.array("q")
        # A packet sent at t0 arrives after t0 - 2 s: the orchestrator needs no earlier arrival.
        arrivals = {}
        for sid, times in self.arrivals.items():
            first = bisect.bisect_left(times, t0 - 2_000_000_000)
            arrivals[sid] = [first, times[first:].tolist()]
        self.arrivals = {}
        sideband = sum(1 for sent in self.sideband_sent if t0 <= sent < t1)
        self.sideband_sent = array.array("q")
        return {
            "up_ms": percentiles(window, 1e-6),
            "sessions": self.sessions,
            "arrivals": arrivals,
            "sideband_events": sideband,
        }

    async def handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        query = parse_qs(urlsplit(ws.request.path).query)
        if "call_id" in query:
            await self.sideband(ws, query["call_id"][0])
            return
        self.sessions += 1
        session: dict[str, Any] = {
            "type": "realtime",
            "object": "realtime.session",
            "id": f"sess_bench{self.sessions}",
            "model": query.get("model", [MODEL])[0],
            "output_modalities": ["audio"],
            "instructions": "You are an echo.",
            "tools": [],
            "tool_choice": "auto",
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None},
                "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "marin"},
            },
        }
        send = ws.send
        sent_at, latency = self.sent_at.append, self.latency.append
        mono = time.monotonic_ns
        head = len(APPEND_HEAD)
        responses: set[asyncio.Task[None]] = set()
        arrive: Callable[[int], None] | None = None  # Opus mode, once the session is named
        await send(event("session.created", '"session":' + json.dumps(session)))
        try:
            async for message in ws:
                now = mono()
                if message.startswith(APPEND_HEAD):  # the hot path: read the stamp only
                    sent = int(message[head : message.index('"', head)])
                    sent_at(sent)
                    latency(now - sent)
                    continue
                if message.startswith(BARE_APPEND):  # Opus mode: a decoded packet, unstamped
                    if arrive is not None:
                        arrive(now)
                    continue
                data = json.loads(message)
                event_id = data.get("event_id") or ""
                if event_id.startswith("t:"):
                    sent = int(event_id[2:])
                    sent_at(sent)
                    latency(now - sent)
                elif event_id.startswith(SID_ID):
                    times = self.arrivals[event_id[len(SID_ID) :]] = array.array("q")
                    arrive = times.append
                kind = data.get("type")
                if kind == "session.update":
                    session.update(data.get("session") or {})
                    await send(event("session.updated", '"session":' + json.dumps(session)))
                elif kind == "input_audio_buffer.commit":
                    item = f"item_{now}"
                    await send(
                        event(
                            "input_audio_buffer.committed",
                            f'"previous_item_id":null,"item_id":"{item}"',
                        )
                    )
                elif kind == "response.create":
                    task = asyncio.create_task(self.respond(send, f"resp_{now}"))
                    responses.add(task)
                    task.add_done_callback(responses.discard)
        except ConnectionClosed:
            pass
        finally:
            for task in list(responses):
                task.cancel()

    async def respond(self, send: Callable[[str], Any], response_id: str) -> None:
        from websockets.exceptions import ConnectionClosed

        ids = f'"response_id":"{response_id}","item_id":"item_{response_id}"'
        part = f'{ids},"output_index":0,"content_index":0'
        delta_tail = f'{part},"delta":"{self.delta}"'
        try:
            await send(
                event(
                    "response.created",
                    f'"response":{{"id":"{response_id}","object":"realtime.response",'
                    '"status":"in_progress","output":[]}',
                )
            )
            loop = asyncio.get_running_loop()
            due = loop.time()
            for _ in range(self.response_deltas):
                await send(event("response.output_audio.delta", delta_tail))
                due += self.delta_ms / 1000
                await asyncio.sleep(max(0.0, due - loop.time()))
            await send(event("response.output_audio.done", part))
            response = {
                "id": response_id,
                "object": "realtime.response",
                "status": "completed",
                "output": [],
                "usage": USAGE,
            }
            await send(event("response.done", '"response":' + json.dumps(response)))
        except ConnectionClosed:
            pass


async def serve_upstream(response_ms: int, delta_ms: int, turn_seconds: float) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    from app.local_upstream.internals import side_door, side_door_enabled

    # Readiness probes are plain GETs; websockets would log each as a failed handshake.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    upstream = EchoUpstream(UPSTREAM_KEY, delta_ms)
    upstream.response_deltas = max(1, response_ms // delta_ms)
    upstream.turn_seconds = turn_seconds
    connection = side_door(upstream.http) if side_door_enabled() else ServerConnection
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(
        upstream.handle,
        "127.0.0.1",
        0,
        process_request=upstream.process_request,
        create_connection=connection,
        max_size=None,
        compression=None,
        ping_interval=None,
        backlog=1024,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"READY {port}", flush=True)
        await stop.wait()  # the orchestrator stops it; it also dies with its parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay.upstream", description=__doc__)
    parser.add_argument("--response-ms", type=int, default=1000, help="audio per response")
    parser.add_argument("--delta-ms", type=int, default=100, help="audio per output delta")
    parser.add_argument("--turn-seconds", type=float, default=3.0, help="a call's turn period")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve_upstream(args.response_ms, args.delta_ms, args.turn_seconds))


if __name__ == "__main__":
    main()
