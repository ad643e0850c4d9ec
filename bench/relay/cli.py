"""The command line: options, the runs in order, the report and the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench.relay as package
from bench.relay.measure import check_clock
from bench.relay.opus_input import (
    OPUS_BITRATE,
    kbps,
    opus_packets,
    speech_pcm,
    write_packets,
)
from bench.relay.opus_report import add_opus_derived, check_opus_targets, print_opus_report
from bench.relay.processes import Processes
from bench.relay.report import add_derived, check_targets, print_report
from bench.relay.run import run_one
from bench.relay.servers import TARGETS, relay_command, upstream_process
from bench.relay.sideband import print_sideband_report, run_sideband
from bench.relay.wire import OPUS_QUERY

CODECS = ("json", "opus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    about = (package.__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=about)
    parser.add_argument(
        "--codec",
        choices=CODECS,
        default="json",
        help="audio of the relay sessions: json (PCM16 base64 appends) or opus (binary Opus both "
        "ways; targets relay and direct as the baseline)",
    )
    parser.add_argument(
        "--sideband",
        action="store_true",
        help="WebRTC calls: N calls whose sideband the relay holds (events, no audio), beside N "
        "WebSocket relay sessions",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        nargs="+",
        help="default 50 200 (json), 50 100 (opus), 100 400 (sideband)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="streaming before the window")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        help="default all (json; nginx is skipped with a note when not installed), direct relay "
        "(opus)",
    )
    parser.add_argument("--chunk-ms", type=int, default=20)
    parser.add_argument("--turn-seconds", type=float, default=3.0, help="commit+response period")
    parser.add_argument("--response-ms", type=int, default=1000, help="audio per response")
    parser.add_argument("--delta-ms", type=int, default=100, help="audio per output delta")
    parser.add_argument("--loadgen-procs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    opus = args.codec == "opus"
    if args.sideband and (opus or args.targets):
        parser.error("--sideband runs the relay's calls and WebSocket sessions: no --codec opus "
                     "or --targets")  # fmt: skip
    if args.sessions is None:
        args.sessions = [100, 400] if args.sideband else [50, 100] if opus else [50, 200]
    if args.targets is None:
        args.targets = (
            ["relay"] if args.sideband else ["direct", "relay"] if opus else list(TARGETS)
        )
    if opus and ("nginx" in args.targets or "relay" not in args.targets):
        parser.error("--codec opus runs the relay (and direct as the baseline); nginx cannot")
    if args.seconds <= 0 or args.seconds > 600 or not 1 <= args.loadgen_procs <= 8:
        parser.error("--seconds must be in (0, 600], --loadgen-procs in 1..8")
    if any(not 1 <= n <= 2000 for n in args.sessions):
        parser.error("--sessions must be in 1..2000")
    if args.response_ms < 1 or args.delta_ms < 1 or args.chunk_ms < 1 or args.turn_seconds <= 0:
        parser.error("--response-ms, --delta-ms, --chunk-ms and --turn-seconds must be positive")
    return args


def bench(args: argparse.Namespace) -> None:
    """Every run of `args` in order, then the report (and the JSON file); children always stop."""
    processes = Processes()

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    # Even when started in the background (where shells ignore SIGINT), Ctrl-C cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    targets = list(args.targets)
    nginx_note = None
    if "nginx" in targets and shutil.which("nginx") is None:
        targets.remove("nginx")
        nginx_note = (
            "nginx is not installed: the nginx target is SKIPPED (apt-get install nginx-light)"
        )
        print("NOTE: " + nginx_note)
    started = time.monotonic()
    try:
        clock = check_clock(processes)
        print(f"clock: {clock}")
        print(
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, sessions {args.sessions}, "
            f"{args.seconds:g} s window after {args.warmup:g} s warm-up, {args.chunk_ms} ms "
            f"appends, a {args.response_ms} ms response every {args.turn_seconds:g} s"
        )
        if "relay" in targets:
            print(f"relay: {' '.join(relay_command())} (RELAY_HOST, RELAY_PORT, ...)")
        runs = []
        packets: list[bytes] | None = None
        with (
            tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp,
            upstream_process(args.response_ms, args.delta_ms, processes, args.turn_seconds) as up,
        ):
            if args.codec == "opus":
                pcm, source = speech_pcm(Path(tmp))
                packets = opus_packets(pcm)
                write_packets(Path(tmp) / "packets.bin", packets)
                sizes = [len(p) for p in packets]
                print(
                    f"opus input: {source}, {len(packets)} packets of 20 ms at "
                    f"{OPUS_BITRATE // 1000} kbps, {min(sizes)}-{max(sizes)} bytes, mean "
                    f"{kbps(sum(sizes), len(sizes)):.1f} kbps; relay URL query: {OPUS_QUERY}"
                )
            for n in args.sessions:
                for target in targets:
                    print(f"... {target} at N={n}", flush=True)
                    runs.append(run_one(target, n, args, up, Path(tmp), processes, packets))
                if args.sideband:
                    print(f"... sideband at N={n}", flush=True)
                    runs.append(run_sideband(n, args, up, Path(tmp), processes))
        add_derived([run for run in runs if run["target"] != "sideband"])
        if args.sideband:
            warnings = print_sideband_report(runs)
            checks: dict[str, Any] = {}
        elif args.codec == "opus":
            add_opus_derived(runs)
            warnings = print_opus_report(runs)
            checks = check_opus_targets(runs)
        else:
            warnings = print_report(runs)
            checks = check_targets(runs)
    finally:
        processes.stop_all()
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        for run in runs:
            run.pop("down_us", None)
            run.pop("down_audio_us", None)
            run.pop("down_first_us", None)
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "clock": clock,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "nginx": nginx_note or shutil.which("nginx"),
            "runs": runs,
            "checks": checks,
            "warnings": warnings,
        }
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        bench(args)
    except KeyboardInterrupt:
        sys.exit("interrupted: every process the bench started was stopped")
