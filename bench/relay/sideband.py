"""Sideband mode (`--sideband`): how many WebRTC calls one relay process controls.

On a WebRTC call the caller's audio and data-channel events go to the upstream directly; the
relay holds the call's sideband socket, on which it sees the session's server events and runs the
session core. This mode measures that work alone: N calls are created through the relay's
`POST /v1/realtime/calls` (a minimal SDP offer: the bench's upstream answers with a fixed SDP and
sets up no media), the upstream streams each call's sideband a scripted voice turn every
`--turn-seconds` (the server events of a turn as OpenAI sends them, `TURN_EVENTS` of them, usage
included), and the relay's CPU and memory are read over the window as in the WebSocket runs.
Figures: CPU-seconds per 1,000 sideband events, CPU per call-second and its inverse, calls per
core (a linear extrapolation from N), and RSS per call; the WebSocket relay at the same N runs
beside it (JSON audio both ways), so the two costs per session compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.relay.measure import cpu_seconds, rss_kb
from bench.relay.processes import Processes
from bench.relay.servers import Upstream, start_hop, stop_hop

OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
CREATE_CONCURRENCY = 16


async def _create_calls(base: str, n: int) -> tuple[list[str], list[str]]:
    """Post `n` offers to the relay: the call ids created, and the failures (a sample)."""
    import httpx

    created: list[str] = []
    failures: list[str] = []
    slots = asyncio.Semaphore(CREATE_CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:

        async def one() -> None:
            async with slots:
                try:
                    response = await http.post(
                        "/v1/realtime/calls",
                        content=OFFER,
                        headers={"Content-Type": "application/sdp"},
                    )
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    return
            if response.status_code == 201:
                created.append(response.headers["location"].rsplit("/", 1)[1])
            else:
                failures.append(f"{response.status_code} {response.text[:120]}")

        await asyncio.gather(*(one() for _ in range(n)))
    return created, failures


def _upstream_stats(port: int, t0: int, t1: int) -> dict[str, Any]:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/stats?t0={t0}&t1={t1}", timeout=30
    ) as response:
        stats: dict[str, Any] = json.loads(response.read())
        return stats


def run_sideband(
    n: int, args: argparse.Namespace, up: Upstream, tmp: Path, processes: Processes
) -> dict[str, Any]:
    """`n` calls controlled by a fresh relay for the window of `args`: its figures."""
    hop = start_hop("relay", up.port, tmp, processes)
    base = f"http://127.0.0.1:{hop.port}"
    try:
        warm, _ = asyncio.run(_create_calls(base, 2))  # imports and first-use caches
        time.sleep(1.0)
        _hang_up(base, warm)
        time.sleep(0.5)
        rss_idle = rss_kb(hop.pids())
        created, failures = asyncio.run(_create_calls(base, n))
        t0 = time.monotonic_ns() + int(args.warmup * 1e9)
        t1 = t0 + int(args.seconds * 1e9)
        time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
        first = cpu_seconds(hop.pids())
        time.sleep(max(0.0, (t1 - time.monotonic_ns()) / 1e9))
        last = cpu_seconds(hop.pids())
        rss_loaded = rss_kb(hop.pids())
        stats = _upstream_stats(up.port, t0, t1)
        _hang_up(base, created)
    finally:
        stop_hop(hop, processes)
    window = (t1 - t0) / 1e9
    events = stats["sideband_events"]
    cpu = last - first
    opened = len(created)
    return {
        "target": "sideband",
        "sessions": n,
        "opened": opened,
        "connect_failures": len(failures),
        "failure_samples": failures[:3],
        "window_s": window,
        "events": events,
        "events_per_s": events / window,
        "hop_cpu_s": cpu,
        "hop_cpu_share": cpu / window,
        "cpu_s_per_1k": cpu / (events / 1000) if events else None,
        "cpu_per_session_s": cpu / window / opened if opened else None,
        "rss_idle_kb": rss_idle,
        "rss_loaded_kb": rss_loaded,
        "rss_kb_per_session": (rss_loaded - rss_idle) / max(1, opened),
    }


def _hang_up(base: str, call_ids: list[str]) -> None:
    for call_id in call_ids:
        request = urllib.request.Request(
            f"{base}/v1/realtime/calls/{call_id}/hangup", method="POST", data=b""
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError:
            pass  # ended already


def print_sideband_report(runs: list[dict[str, Any]]) -> list[str]:
    """WebRTC calls (sideband events only) beside WebSocket sessions (audio both ways)."""
    warnings: list[str] = []
    print()
    print("Cost per session: WebRTC calls (the relay holds the sideband) vs WebSocket sessions")
    print(
        f"{'target':<10} {'N':>5} {'opened':>7} {'events/s':>9} {'CPU share':>10} "
        f"{'CPU-s/1k ev':>12} {'CPU ms/s per session':>21} {'sessions/core':>14} {'KB/session':>11}"
    )
    for run in runs:
        per_session = run.get("cpu_per_session_s")
        if per_session is None and run.get("hop_cpu_share") is not None and run["opened"]:
            per_session = run["cpu_per_session_s"] = run["hop_cpu_share"] / run["opened"]
        per_core = 1 / per_session if per_session else None
        run["sessions_per_core"] = per_core
        print(
            f"{run['target']:<10} {run['sessions']:>5} {run['opened']:>7} "
            f"{run['events_per_s']:>9.0f} {run['hop_cpu_share']:>10.3f} "
            f"{_fmt(run['cpu_s_per_1k'], '.4f'):>12} {_fmt(per_session, '.3f', 1e3):>21} "
            f"{_fmt(per_core, '.0f'):>14} {_fmt(run['rss_kb_per_session'], '.1f'):>11}"
        )
        if run["connect_failures"]:
            warnings.append(
                f"{run['target']} N={run['sessions']}: {run['connect_failures']} sessions not "
                f"opened, e.g. {run['failure_samples'][:1]}"
            )
    for warning in warnings:
        print("WARNING: " + warning)
    return warnings


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)
