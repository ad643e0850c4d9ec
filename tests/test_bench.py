"""The relay benchmark (`python -m bench.relay`): two sessions end to end, so it cannot rot.

Each test runs the whole bench as a subprocess for a couple of seconds against its own local
upstream, without nginx (CI does not install it), and checks that the report holds the figures a
reader needs. No timing is asserted: speed belongs in the bench's output, not in the suite.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 150.0
STOP_TIMEOUT = 15.0
# Two sessions, a 2 s window after 1 s of streaming, a response asked for every second.
SHORT = ("--sessions", "2", "--seconds", "2", "--warmup", "1", "--turn-seconds", "1")
NUMBER = r"-?\d+(?:\.\d+)?"


async def run_bench(*args: str) -> str:
    """Run the bench with `args` (bounded); return its output, stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "bench.relay", *args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:  # SIGTERM: the bench stops every process it started
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                process.kill()  # its children get SIGTERM as it dies (PR_SET_PDEATHSIG)
                await process.wait()
    output = out.decode()
    assert process.returncode == 0, output
    return output


def table_rows(output: str, title: str, target: str) -> list[list[str]]:
    """The cells of the rows for `target` in the table printed under the line `title`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 2 :]:  # past the title and the column header
        if not line.strip():
            break
        cells = line.split()
        if cells[1] == target:
            rows.append(cells)
    return rows


def is_number(cell: str) -> bool:
    return re.fullmatch(NUMBER, cell) is not None


async def test_the_relay_bench_reports_events_cpu_and_latency_of_the_relay(tmp_path):
    """Two sessions through `realtime-relay` and direct: events, CPU per event and percentiles."""
    results = tmp_path / "results.json"
    output = await run_bench(*SHORT, "--targets", "direct", "relay", "--json", str(results))

    assert re.search(r"^relay: \S*realtime-relay\b", output, re.MULTILINE), output
    latency = table_rows(output, "Latency, ms", "relay")
    assert len(latency) == 1, output
    # N, target, up p50/p99, down p50/p99, added up p50/p99, added down p50/p99, vs nginx
    assert all(is_number(cell) for cell in latency[0][2:10]), output
    cost = table_rows(output, "Cost of the hop", "relay")
    assert len(cost) == 1, output
    events_per_s, cpu_per_1k = cost[0][2], cost[0][4]
    assert float(events_per_s) > 0, output
    assert is_number(cpu_per_1k), output
    assert "Targets at N=2" in output

    relay = next(run for run in json.loads(results.read_text())["runs"] if run["target"] == "relay")
    assert (relay["opened"], relay["connect_failures"], relay["errors"]) == (2, 0, 0)
    assert relay["events_up"] > 0
    assert relay["events_down"] > 0
    assert relay["cpu_s_per_1k"] >= 0
    for way in ("up_ms", "down_ms"):
        assert relay[way]["count"] > 0
        assert 0 <= relay[way]["p50"] <= relay[way]["p99"]


async def test_the_opus_bench_reports_frames_cpu_and_latency_of_the_relay(tmp_path):
    """`--codec opus` with two sessions: Opus frames both ways, CPU per session, frame latency."""
    results = tmp_path / "results.json"
    output = await run_bench(*SHORT, "--codec", "opus", "--json", str(results))

    frames = table_rows(output, "Latency per frame, ms", "relay")
    assert len(frames) == 1, output
    assert all(is_number(cell) for cell in frames[0][2:6]), output
    assert "Cost of the relay with Opus both ways" in output
    assert "Targets (issue 5):" in output

    relay = next(run for run in json.loads(results.read_text())["runs"] if run["target"] == "relay")
    assert (relay["opened"], relay["connect_failures"], relay["errors"]) == (2, 0, 0)
    assert relay["packets_sent"] > 0
    assert relay["frames_received"] > 0
    assert relay["bad_frames"] == 0
    assert relay["cpu_s_per_session_s"] >= 0
    assert relay["frame_up_ms"]["count"] > 0
    assert 0 <= relay["frame_up_ms"]["p50"] <= relay["frame_up_ms"]["p99"]


async def test_the_sideband_bench_reports_calls_beside_websocket_sessions(tmp_path):
    """`--sideband` with two calls: created through the relay, their sideband events counted,
    the relay's CPU per call beside two WebSocket sessions'."""
    results = tmp_path / "results.json"
    output = await run_bench(*SHORT, "--sideband", "--json", str(results))

    assert "Cost per session: WebRTC calls" in output
    runs = {run["target"]: run for run in json.loads(results.read_text())["runs"]}
    calls, sessions = runs["sideband"], runs["relay"]
    assert (calls["opened"], calls["connect_failures"]) == (2, 0), output
    assert calls["events"] > 0 and calls["cpu_s_per_1k"] >= 0
    assert calls["rss_kb_per_session"] is not None
    assert sessions["opened"] == 2 and sessions["events"] > 0
