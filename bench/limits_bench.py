"""Admission figures: Redis lease latency, and what the limiter adds to a session's connect time.

    .venv/bin/python bench/limits_bench.py [--sessions 10000] [--connects 300]

1. Acquire + release of a lease over three caps (tier, client, model) against a private
   redis-server on loopback, `--sessions` times in sequence: p50 / p99 of each step.
2. Session connect time (WebSocket open to `session.created`) through a relay served in this
   process, against the bundled local upstream, with no caps, with the in-process limiter and
   with the Redis limiter, interleaved in rounds so machine noise hits all three alike.
Loopback only; every server it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import time
from pathlib import Path

import uvicorn
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings
from app.limits.leases import Cap
from app.limits.redis import RedisLimiter
from app.local_upstream import LocalUpstream
from app.main import create_app, server_config
from tests.redis_server import RedisServer

KEY = "sk-bench-0000000000"


def quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def lease_latency(url: str, sessions: int) -> None:
    import redis.asyncio as redis

    limiter = RedisLimiter(redis.Redis.from_url(url), ttl_seconds=30)
    caps = [
        Cap("tier:bench", 1_000_000, "tier"),
        Cap("client:bench:c1", 1_000_000, "client"),
        Cap("model:gpt-realtime-mini", 1_000_000, "model"),
    ]
    acquire, release = [], []
    for _ in range(200):  # warm up: scripts loaded, connection pooled
        await limiter.release(await limiter.acquire(caps))
    for _ in range(sessions):
        started = time.perf_counter()
        lease = await limiter.acquire(caps)
        taken = time.perf_counter()
        await limiter.release(lease)
        acquire.append(taken - started)
        release.append(time.perf_counter() - taken)
    await limiter.aclose()
    for name, samples in (("acquire", acquire), ("release", release)):
        p50, p99 = quantiles(samples)
        print(f"  {name:8} p50 {p50 * 1e3:6.3f} ms   p99 {p99 * 1e3:6.3f} ms")
    both = [a + r for a, r in zip(acquire, release, strict=True)]
    p50, p99 = quantiles(both)
    print(f"  {'both':8} p50 {p50 * 1e3:6.3f} ms   p99 {p99 * 1e3:6.3f} ms   ({sessions} sessions)")


@contextlib.asynccontextmanager
async def serve(settings: Settings):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(settings)
    server = uvicorn.Server(server_config(app, settings, log_level="error"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while True:
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
    finally:
        server.should_exit = True
        await task


async def connect_time(url: str) -> float:
    started = time.perf_counter()
    async with connect(url) as ws:
        await ws.recv()  # session.created
        elapsed = time.perf_counter() - started
    return elapsed


async def connect_overhead(redis_url: str, rounds: int) -> None:
    caps = {"default": {"max_sessions": 100_000, "max_sessions_per_client": 100_000}}
    async with LocalUpstream(api_key=KEY) as upstream:

        def settings(**extra: object) -> Settings:
            upstream_settings = {"url": upstream.url}
            return Settings(openai_api_key=KEY, upstream=upstream_settings, **extra)

        variants = {
            "no limits": settings(),
            "in-process limiter": settings(tiers=caps),
            "Redis limiter": settings(tiers=caps, redis_url=redis_url),
        }
        async with contextlib.AsyncExitStack() as stack:
            urls = {name: await stack.enter_async_context(serve(s)) for name, s in variants.items()}
            times: dict[str, list[float]] = {name: [] for name in urls}
            for url in urls.values():  # warm up
                for _ in range(10):
                    await connect_time(url)
            for _ in range(rounds):
                for name, url in urls.items():
                    times[name].append(await connect_time(url))
    base = statistics.median(times["no limits"])
    for name, samples in times.items():
        p50, p99 = quantiles(samples)
        print(
            f"  {name:20} p50 {p50 * 1e3:6.2f} ms   p99 {p99 * 1e3:6.2f} ms   "
            f"added p50 {(p50 - base) * 1e3:+6.2f} ms   ({rounds} sessions)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--connects", type=int, default=300)
    args = parser.parse_args()
    with RedisServer() as redis_server:
        print(f"Lease acquire + release, 3 caps, private redis-server on {redis_server.url}")
        await lease_latency(redis_server.url, args.sessions)
        print("Session connect time (open to session.created) through the relay")
        await connect_overhead(redis_server.url, args.connects)


if __name__ == "__main__":
    asyncio.run(main())
