"""What the bench reads from the machine: CPU time and memory from /proc, one clock, percentiles."""

from __future__ import annotations

import array
import contextlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.relay.processes import Processes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentiles(values: list[int] | array.array[int], scale: float) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max of `values` (nearest rank), multiplied by `scale`."""
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float | None:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * scale if n else None

    out = {f"p{q * 100:g}": rank(q) for q in (0.5, 0.9, 0.99, 0.999)}
    out["max"] = ordered[-1] * scale if n else None
    out["count"] = n
    return out


def descendants(pid: int) -> list[int]:
    """`pid` and its live descendants (nginx's worker is the master's child)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of `pids`, in seconds, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    """VmRSS of `pids`, in KB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def check_clock(processes: Processes) -> str:
    """Stamps of CLOCK_MONOTONIC taken in a child fall between the parent's: one clock."""
    code = "import time; print(time.monotonic_ns())"
    for _ in range(3):
        before = time.monotonic_ns()
        child = processes.start([sys.executable, "-c", code], stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=10)
        after = time.monotonic_ns()
        processes.stop(child)
        if not before <= int(out) <= after:
            sys.exit("CLOCK_MONOTONIC differs between processes here; latencies would be wrong")
    info = time.get_clock_info("monotonic")
    return f"{info.implementation}: one clock across processes (3/3 child stamps in bracket)"
