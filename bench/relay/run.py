"""One run: a target at N sessions, with its load generators, CPU samples and latencies."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.relay.histograms import Scrape, scrape
from bench.relay.loadgen import CONNECT_TIMEOUT, TAIL_SECONDS
from bench.relay.measure import cpu_seconds, machine_ticks, percentiles, rss_kb
from bench.relay.opus_report import opus_figures
from bench.relay.processes import Lines, Processes
from bench.relay.servers import Upstream, start_hop, stop_hop, warm_up
from bench.relay.wire import ROOT


def run_one(
    target: str,
    n: int,
    args: argparse.Namespace,
    up: Upstream,
    tmp: Path,
    processes: Processes,
    packets: list[bytes] | None = None,
) -> dict[str, Any]:
    """`n` sessions through `target` for the window of `args`: its figures, as one dict."""
    codec = args.codec if target == "relay" else "json"  # only the relay transcodes
    hop = start_hop(target, up.port, tmp, processes, codec=codec)
    before: Scrape = {}
    after: Scrape = {}
    try:
        warm_up(hop, packets)
        time.sleep(0.5)
        rss_idle = rss_kb(hop.pids())
        generators = []
        shares = [
            n // args.loadgen_procs + (i < n % args.loadgen_procs)
            for i in range(args.loadgen_procs)
        ]
        for gen, share in enumerate(s for s in shares if s):
            argv = [
                sys.executable,
                "-m",
                "bench.relay.loadgen",
                f"--url={hop.url}",
                f"--n={share}",
                f"--chunk-ms={args.chunk_ms}",
                f"--turn-seconds={args.turn_seconds}",
                f"--gen={gen}",
            ] + (["--auth"] if hop.auth else [])
            if hop.opus:
                argv += ["--codec=opus", f"--packets={tmp / 'packets.bin'}"]
            process = processes.start(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            generators.append((process, Lines(process)))
        opened = failed = 0
        for _, lines in generators:
            _, ok, bad = lines.readline(CONNECT_TIMEOUT).split()
            opened, failed = opened + int(ok), failed + int(bad)
        t_start = time.monotonic_ns() + 200_000_000
        t0 = t_start + int(args.warmup * 1e9)
        t1 = t0 + int(args.seconds * 1e9)
        for process, _ in generators:
            assert process.stdin is not None
            process.stdin.write(f"GO {t_start} {t0} {t1}\n".encode())
            process.stdin.flush()
        load_pids = [process.pid for process, _ in generators]

        def sample() -> tuple[float, float, list[float], tuple[int, int]]:
            return (
                cpu_seconds(hop.pids()),
                cpu_seconds([up.process.pid]),
                [cpu_seconds([pid]) for pid in load_pids],
                machine_ticks(),
            )

        # The scrapes are outside the CPU samples, so their cost is not counted as the hop's.
        time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9 - 0.05))
        before = scrape(hop.port) if hop.opus else {}
        time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
        first = sample()
        time.sleep(max(0.0, (t1 - time.monotonic_ns()) / 1e9))
        last = sample()
        after = scrape(hop.port) if hop.opus else {}
        rss_loaded = rss_kb(hop.pids())
        results = []
        for process, lines in generators:
            while True:
                line = lines.readline(TAIL_SECONDS + 30)
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
                    break
            processes.stop(process)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{up.port}/stats?t0={t0}&t1={t1}", timeout=30
        ) as response:
            upstream_stats = json.loads(response.read())
    finally:
        stop_hop(hop, processes)
    window = (t1 - t0) / 1e9
    down = [v for result in results for v in result["down_us"]]
    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    events = sent + received
    busy = (last[3][0] - first[3][0]) / max(1, last[3][1] - first[3][1])
    hop_cpu = last[0] - first[0]
    own = hop_cpu + (last[1] - first[1]) + sum(last[2]) - sum(first[2])
    # CPU of everything else on the machine (other users' work contends for the same cores).
    others = max(0.0, busy * (os.cpu_count() or 1) - own / window)
    run = {
        "target": target,
        "sessions": n,
        "opened": opened,
        "connect_failures": failed,
        "failure_samples": [s for r in results for s in r["connect_failures"]][:3],
        "errors": sum(r["errors"] for r in results),
        "error_sample": next((r["error_sample"] for r in results if r["error_sample"]), ""),
        "dropped": sum(r["dropped"] for r in results),
        "window_s": window,
        "events": events,
        "events_up": sent,
        "events_down": received,
        "events_per_s": events / window,
        "up_ms": upstream_stats["up_ms"],
        "down_ms": percentiles(down, 1e-3),
        "hop_cpu_s": hop_cpu if hop.process else None,
        "cpu_s_per_1k": hop_cpu / (events / 1000) if hop.process and events else None,
        "hop_cpu_share": hop_cpu / window if hop.process else None,
        "rss_idle_kb": rss_idle if hop.process else None,
        "rss_loaded_kb": rss_loaded if hop.process else None,
        "rss_kb_per_session": (rss_loaded - rss_idle) / max(1, opened) if hop.process else None,
        "upstream_cpu_share": (last[1] - first[1]) / window,
        "loadgen_cpu_share": [(b - a) / window for a, b in zip(first[2], last[2], strict=True)],
        "loadgen_lag_ms": [r["lag_us"] for r in results],
        "machine_busy": busy,
        "other_cores": others,
    }
    if hop.opus:
        run.update(opus_figures(results, upstream_stats, before, after, hop_cpu, opened, window))
    return run
