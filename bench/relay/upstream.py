"""The upstream the bench runs in its own process: a GA Realtime echo server that times arrivals.

Run by the bench as ``python -m bench.relay.upstream --response-ms .. --delta-ms ..``; it prints
``READY <port>`` once it listens on 127.0.0.1 and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import json
import logging
import signal
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
        return {"up_ms": percentiles(window, 1e-6), "sessions": self.sessions, "arrivals": arrivals}

    async def handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.sessions += 1
        query = parse_qs(urlsplit(ws.request.path).query)
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
            usage = {
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
            response = {
                "id": response_id,
                "object": "realtime.response",
                "status": "completed",
                "output": [],
                "usage": usage,
            }
            await send(event("response.done", '"response":' + json.dumps(response)))
        except ConnectionClosed:
            pass


async def serve_upstream(response_ms: int, delta_ms: int) -> None:
    from websockets.asyncio.server import serve

    # Readiness probes are plain GETs; websockets would log each as a failed handshake.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    upstream = EchoUpstream(UPSTREAM_KEY, delta_ms)
    upstream.response_deltas = max(1, response_ms // delta_ms)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(
        upstream.handle,
        "127.0.0.1",
        0,
        process_request=upstream.process_request,
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
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve_upstream(args.response_ms, args.delta_ms))


if __name__ == "__main__":
    main()
