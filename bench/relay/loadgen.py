"""A load generator, in its own process: N sessions talking in real time through a target.

Run by the bench as ``python -m bench.relay.loadgen --url .. --n ..``. It opens its sessions,
prints ``CONNECTED <opened> <failed>``, waits for ``GO <t_start> <t0> <t1>`` (CLOCK_MONOTONIC ns)
on stdin, streams until ``t1`` plus a tail, and prints ``RESULT <json>``: the events it sent and
received stamped in [t0, t1), their latencies down and how late its own sends were.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.relay.measure import percentiles
from bench.relay.opus_input import read_packets
from bench.relay.wire import (
    APPEND_HEAD,
    AUDIO_IN,
    AUDIO_OUT,
    SID_ID,
    STAMP,
    UPSTREAM_KEY,
    loop_factory,
    tone_b64,
)

CONNECT_TIMEOUT = 60.0
CONNECT_CONCURRENCY = 25
TAIL_SECONDS = 1.0  # events stamped before t1 still arriving are counted


@dataclass
class LoadStats:
    sent: int = 0
    received: int = 0
    errors: int = 0
    error_sample: str = ""
    dropped: int = 0
    down_us: list[int] = field(default_factory=list)
    lag_us: list[int] = field(default_factory=list)
    # Opus mode: binary frames both ways (payload bytes, without the type byte).
    packets_sent: int = 0
    packet_bytes_sent: int = 0
    frames_received: int = 0
    frame_bytes_received: int = 0
    frames_announced: int = 0
    bad_frames: int = 0
    down_audio_us: list[int] = field(default_factory=list)
    down_first_us: list[int] = field(default_factory=list)  # a delta's stamp to its first frame
    # sid -> [index of the first packet sent in the window, [send ns, ...]], and packets in all.
    send_ns: dict[str, list[Any]] = field(default_factory=dict)
    packets_total: dict[str, int] = field(default_factory=dict)


async def load(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    headers = [("Authorization", f"Bearer {UPSTREAM_KEY}")] if args.auth else []
    opus = args.codec == "opus"
    if opus:
        frames = [AUDIO_IN + packet for packet in read_packets(args.packets)]
        args.chunk_ms = 20  # one Opus packet per 20 ms
    chunk_ns = args.chunk_ms * 1_000_000
    append_tail = '","audio":"' + tone_b64(args.chunk_ms) + '"}'
    turn_chunks = max(1, round(args.turn_seconds * 1000 / args.chunk_ms))
    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(index: int) -> Any:
        async with semaphore:
            ws = await connect(
                args.url,
                additional_headers=headers,
                open_timeout=15,
                close_timeout=3,
                ping_interval=None,
                max_size=None,
                compression=None,
            )
            try:
                async with asyncio.timeout(15):
                    while '"session.created"' not in (await ws.recv())[:40]:
                        pass
                    if opus:  # names this session for the upstream's timing channel
                        await ws.send(
                            '{"type":"input_audio_buffer.clear",'
                            f'"event_id":"{SID_ID}{args.gen}.{index}"}}'
                        )
            except BaseException:
                ws.transport.abort()
                raise
            return ws

    opened = await asyncio.gather(*(open_one(i) for i in range(args.n)), return_exceptions=True)
    sids = [f"{args.gen}.{i}" for i, ws in enumerate(opened) if not isinstance(ws, BaseException)]
    sockets = [ws for ws in opened if not isinstance(ws, BaseException)]
    failures = [repr(exc)[:200] for exc in opened if isinstance(exc, BaseException)]
    print(f"CONNECTED {len(sockets)} {len(failures)}", flush=True)
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), CONNECT_TIMEOUT)
    if not line.startswith("GO "):
        for ws in sockets:
            ws.transport.abort()
        return
    t_start, t0, t1 = (int(part) for part in line.split()[1:])
    t_end = t1 + int(TAIL_SECONDS * 1e9)
    stats = LoadStats()
    mono = time.monotonic_ns

    async def ask_for_answer(send: Any, now: int) -> None:
        """Commit the turn and ask for a response, both stamped like every event."""
        await send(f'{{"type":"input_audio_buffer.commit","event_id":"t:{mono()}"}}')
        await send(
            f'{{"type":"response.create","event_id":"t:{mono()}",'
            '"response":{"output_modalities":["audio"]}}'
        )
        if t0 <= now < t1:
            stats.sent += 2

    async def writer(ws: Any, phase: int, k: int) -> None:
        send, sleep = ws.send, asyncio.sleep
        lag = stats.lag_us.append
        due = t_start + phase
        try:
            while due < t_end:
                now = mono()
                if due > now:
                    await sleep((due - now) / 1e9)
                    now = mono()
                await send(APPEND_HEAD + str(now) + append_tail)
                if t0 <= now < t1:
                    stats.sent += 1
                    lag((now - due) // 1000)
                k += 1
                if k % turn_chunks == 0:
                    await ask_for_answer(send, now)
                due += chunk_ns
        except ConnectionClosed:
            stats.dropped += 1
            return
        with contextlib.suppress(Exception):
            await ws.close()

    async def opus_writer(ws: Any, phase: int, k: int, sid: str, offset: int) -> None:
        """One packet per 20 ms as a binary frame; the send time of packet j kept for the window."""
        send, sleep = ws.send, asyncio.sleep
        lag = stats.lag_us.append
        due = t_start + phase
        stamps: array.array[int] = array.array("q")
        first = -1
        j = 0  # packets sent by this session: the upstream counts its appends the same way
        try:
            while due < t_end:
                now = mono()
                if due > now:
                    await sleep((due - now) / 1e9)
                    now = mono()
                frame = frames[(offset + j) % len(frames)]
                await send(frame)
                if t0 <= now < t1:
                    if first < 0:
                        first = j
                    stamps.append(now)
                    stats.sent += 1
                    stats.packets_sent += 1
                    stats.packet_bytes_sent += len(frame) - 1
                    lag((now - due) // 1000)
                j += 1
                k += 1
                if k % turn_chunks == 0:
                    await ask_for_answer(send, now)
                due += chunk_ns
        except ConnectionClosed:
            stats.dropped += 1
            return
        finally:
            stats.send_ns[sid] = [first, stamps.tolist()]
            stats.packets_total[sid] = j
        with contextlib.suppress(Exception):
            await ws.close()

    async def opus_reader(ws: Any) -> None:
        """JSON events as in `reader`; binary frames counted; a delta's latency at its end."""
        down, down_audio = stats.down_us.append, stats.down_audio_us.append
        down_first = stats.down_first_us.append
        pending, announced, stamp = 0, 0, 0
        try:
            async for message in ws:
                now = mono()
                if isinstance(message, bytes):
                    stats.frames_received += 1
                    stats.frame_bytes_received += len(message) - 1
                    if not message or message[0] != AUDIO_OUT:
                        stats.bad_frames += 1
                    if pending:
                        if pending == announced and t0 <= stamp < t1:
                            down_first((now - stamp) // 1000)
                        pending -= 1
                        if not pending and t0 <= stamp < t1:
                            down_audio((now - stamp) // 1000)
                    continue
                sent = 0
                start = message.find(STAMP, 0, 120)
                if start >= 0:
                    start += 14
                    sent = int(message[start : message.index('"', start)])
                    if t0 <= sent < t1:
                        stats.received += 1
                        down((now - sent) // 1000)
                at = message.rfind('"frames":')
                if at >= 0 and '"relay_audio"' in message:
                    announced = int(message[at + 9 : message.index("}", at)])
                    stats.frames_announced += announced
                    pending, stamp = announced, sent
                if message.startswith('{"type":"error"'):
                    stats.errors += 1
                    stats.error_sample = stats.error_sample or message[:300]
        except ConnectionClosed:
            pass

    async def reader(ws: Any) -> None:
        down = stats.down_us.append
        try:
            async for message in ws:
                now = mono()
                start = message.find(STAMP, 0, 120)
                if start >= 0:
                    start += 14
                    sent = int(message[start : message.index('"', start)])
                    if t0 <= sent < t1:
                        stats.received += 1
                        down((now - sent) // 1000)
                if message.startswith('{"type":"error"'):
                    stats.errors += 1
                    stats.error_sample = stats.error_sample or message[:300]
        except ConnectionClosed:
            pass

    tasks = []
    for index, ws in enumerate(sockets):
        # Sessions are independent talkers: spread their sends over the chunk period and
        # their turns over the turn period, as unsynchronised browsers would be.
        phase = (index * chunk_ns) // max(1, len(sockets))
        first_chunk = (index * turn_chunks) // max(1, len(sockets))
        if opus:  # each session starts at its own place in the speech
            offset = (index * 37) % len(frames)
            writing = opus_writer(ws, phase, first_chunk, sids[index], offset)
            tasks.append(asyncio.create_task(writing))
            tasks.append(asyncio.create_task(opus_reader(ws)))
            continue
        tasks.append(asyncio.create_task(writer(ws, phase, first_chunk)))
        tasks.append(asyncio.create_task(reader(ws)))
    budget = (t_end - mono()) / 1e9 + 10
    done, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
    for ws in sockets:
        ws.transport.abort()
    result = {
        "sessions": len(sockets),
        "connect_failures": failures[:5],
        "failed": len(failures),
        "sent": stats.sent,
        "received": stats.received,
        "errors": stats.errors,
        "error_sample": stats.error_sample,
        "dropped": stats.dropped,
        "unfinished": len(pending),
        "down_us": stats.down_us,
        "lag_us": percentiles(stats.lag_us, 1e-3),
    }
    if opus:
        result.update(
            packets_sent=stats.packets_sent,
            packet_bytes_sent=stats.packet_bytes_sent,
            frames_received=stats.frames_received,
            frame_bytes_received=stats.frame_bytes_received,
            frames_announced=stats.frames_announced,
            bad_frames=stats.bad_frames,
            down_audio_us=stats.down_audio_us,
            down_first_us=stats.down_first_us,
            send_ns=stats.send_ns,
            packets_total=stats.packets_total,
        )
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay.loadgen", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, required=True, help="sessions")
    parser.add_argument("--auth", action="store_true", help="send the upstream's key itself")
    parser.add_argument("--gen", type=int, default=0, help="this generator's index")
    parser.add_argument("--codec", choices=("json", "opus"), default="json")
    parser.add_argument("--packets", type=Path, help="Opus packets to send (opus_input's file)")
    parser.add_argument("--chunk-ms", type=int, default=20)
    parser.add_argument("--turn-seconds", type=float, default=3.0, help="commit+response period")
    args = parser.parse_args(argv)
    if args.codec == "opus" and args.packets is None:
        parser.error("--codec opus needs --packets")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(load(args))


if __name__ == "__main__":
    main()
