"""The report of PCM (`--codec json`) runs: added latency, the hop's cost, warnings, targets."""

from __future__ import annotations

from typing import Any

CORE_SATURATED = 0.85  # a single-threaded process above this share of a core is the bottleneck


def ms(value: float | None) -> str:
    """A figure in ms for a table: two decimals, or `-` when there is none."""
    return "-" if value is None else f"{value:.2f}"


def num(value: float | None, spec: str, scale: float = 1.0) -> str:
    """`value` times `scale` in `spec` for a table, or `-` when there is none."""
    return "-" if value is None else format(value * scale, spec)


def add_derived(runs: list[dict[str, Any]]) -> None:
    """Added latency (target minus direct at the same N) and ratios to nginx and direct."""
    by = {(r["target"], r["sessions"]): r for r in runs}
    for run in runs:
        direct = by.get(("direct", run["sessions"]))
        nginx = by.get(("nginx", run["sessions"]))
        added: dict[str, float | None] = {}
        for way in ("up", "down"):
            for q in ("p50", "p99"):
                mine = run[f"{way}_ms"][q]
                base = direct[f"{way}_ms"][q] if direct else None
                added[f"{way}_{q}"] = mine - base if mine is not None and base is not None else None
        run["added_ms"] = added
        worst = [added["up_p99"], added["down_p99"]]
        run["added_p99_ms"] = None if None in worst else max(w for w in worst if w is not None)
    for run in runs:
        direct = by.get(("direct", run["sessions"]))
        nginx = by.get(("nginx", run["sessions"]))
        if nginx is not None and run["target"] not in ("nginx", "direct"):
            run["vs_nginx"] = {
                "cpu_per_event": _div(run["cpu_s_per_1k"], nginx["cpu_s_per_1k"]),
                "added_p99": _div(run["added_p99_ms"], nginx.get("added_p99_ms")),
                "rss_per_session": _div(run["rss_kb_per_session"], nginx["rss_kb_per_session"]),
            }
        if direct is not None and run is not direct:
            run["vs_direct"] = {
                f"{way}_p99": _div(run[f"{way}_ms"]["p99"], direct[f"{way}_ms"]["p99"])
                for way in ("up", "down")
            }


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def print_report(runs: list[dict[str, Any]]) -> list[str]:
    """The latency and cost tables; returns the warnings it printed under them."""
    warnings: list[str] = []
    print()
    print("Latency, ms (up = client->upstream, down = upstream->client; added = minus direct)")
    header = (
        f"{'N':>4} {'target':<7} {'up p50':>7} {'up p99':>7} {'dn p50':>7} {'dn p99':>7} "
        f"{'+up p50':>8} {'+up p99':>8} {'+dn p50':>8} {'+dn p99':>8}  {'p99 vs nginx':>12}"
    )
    print(header)
    for r in runs:
        a = r["added_ms"]
        vs = r.get("vs_nginx", {}).get("added_p99")
        print(
            f"{r['sessions']:>4} {r['target']:<7} {ms(r['up_ms']['p50']):>7} "
            f"{ms(r['up_ms']['p99']):>7} {ms(r['down_ms']['p50']):>7} "
            f"{ms(r['down_ms']['p99']):>7} {ms(a['up_p50']):>8} {ms(a['up_p99']):>8} "
            f"{ms(a['down_p50']):>8} {ms(a['down_p99']):>8}  "
            f"{'-' if vs is None else f'{vs:.2f}x':>12}"
        )
    print()
    print("Cost of the hop (CPU of the relay process / nginx master+worker, in the window)")
    print(
        f"{'N':>4} {'target':<7} {'events/s':>9} {'CPU %':>6} {'CPU-s/1k ev':>11} "
        f"{'vs nginx':>8} {'RSS idle MB':>11} {'RSS MB':>7} {'KB/session':>10} "
        f"{'upstrm %':>8} {'loadgen %':>9} {'lag p99':>7} {'machine':>7} {'others':>6}"
    )
    for r in runs:
        vs = r.get("vs_nginx", {}).get("cpu_per_event")
        lag = max((g["p99"] or 0.0) for g in r["loadgen_lag_ms"]) if r["loadgen_lag_ms"] else None
        share = r["hop_cpu_share"]
        print(
            f"{r['sessions']:>4} {r['target']:<7} {r['events_per_s']:>9.0f} "
            f"{'-' if share is None else f'{share * 100:.0f}':>6} "
            f"{num(r['cpu_s_per_1k'], '.4f'):>11} "
            f"{'-' if vs is None else f'{vs:.2f}x':>8} "
            f"{num(r['rss_idle_kb'], '.1f', 1 / 1024):>11} "
            f"{num(r['rss_loaded_kb'], '.1f', 1 / 1024):>7} "
            f"{num(r['rss_kb_per_session'], '.1f'):>10} "
            f"{r['upstream_cpu_share'] * 100:>8.0f} "
            f"{'/'.join(f'{s * 100:.0f}' for s in r['loadgen_cpu_share']):>9} "
            f"{ms(lag):>7} {r['machine_busy'] * 100:>6.0f}% {r['other_cores'] * 100:>5.0f}%"
        )
        warnings.extend(run_warnings(r, lag))
    print()
    print(
        "CPU %: share of one core; loadgen %: per load-generator process; lag: how late the "
        "load generator sent appends (ms);\nmachine: all cores busy; others: CPU of processes "
        "outside the bench, in % of one core. Added latency is a "
        "difference of percentiles; negative values are noise."
    )
    for warning in warnings:
        print("WARNING: " + warning)
    return warnings


def run_warnings(r: dict[str, Any], lag: float | None) -> list[str]:
    """What may make one run's figures wrong: failures, a saturated bench process, contention."""
    warnings: list[str] = []
    where = f"{r['target']} N={r['sessions']}"
    if r["connect_failures"] or r["errors"] or r["dropped"]:
        warnings.append(
            f"{where}: {r['connect_failures']} connect failures, {r['errors']} error events, "
            f"{r['dropped']} sessions dropped {r['failure_samples']} {r['error_sample'][:200]}"
        )
    if any(s > CORE_SATURATED for s in r["loadgen_cpu_share"]):
        warnings.append(
            f"{where}: a load generator used >{CORE_SATURATED:.0%} of a core: it may be the "
            "bottleneck (try --loadgen-procs 2)"
        )
    if lag is not None and lag > 5.0:
        warnings.append(f"{where}: load generator send lag p99 {lag:.1f} ms (behind schedule)")
    if r["upstream_cpu_share"] > CORE_SATURATED:
        warnings.append(f"{where}: the upstream used >{CORE_SATURATED:.0%} of a core")
    if r["other_cores"] > 0.25:
        warnings.append(
            f"{where}: processes outside the bench used {r['other_cores']:.2f} cores during "
            "the window: figures include their contention; rerun on a quiet machine"
        )
    if r["machine_busy"] > 0.9:
        warnings.append(
            f"{where}: the machine was {r['machine_busy']:.0%} busy: latencies include CPU "
            "contention between the bench's own processes"
        )
    return warnings


def check_targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets for the relay at the largest N, against nginx in the same run."""
    n = max(r["sessions"] for r in runs)
    relay = next((r for r in runs if r["target"] == "relay" and r["sessions"] == n), None)
    nginx = next((r for r in runs if r["target"] == "nginx" and r["sessions"] == n), None)
    if relay is None:
        return {}
    checks: dict[str, Any] = {"sessions": n}
    rss = relay["rss_kb_per_session"]
    checks["rss_under_64kb"] = {"value_kb": rss, "ok": rss is not None and rss < 64}
    if nginx is not None:
        cpu = relay["vs_nginx"]["cpu_per_event"]
        checks["cpu_within_2x_nginx"] = {"ratio": cpu, "ok": None if cpu is None else cpu <= 2}
        mine, theirs = relay["added_p99_ms"], nginx["added_p99_ms"]
        # nginx's added p99 can be within noise of 0; 2x of a floor of 1 ms then.
        bound = 2 * max(theirs, 1.0) if theirs is not None else None
        ok = None if mine is None or bound is None else mine <= bound
        checks["added_p99_within_2x_nginx"] = {
            "relay_ms": mine,
            "nginx_ms": theirs,
            "bound_ms": bound,
            "ok": ok,
        }
    else:
        for name in ("cpu_within_2x_nginx", "added_p99_within_2x_nginx"):
            checks[name] = {"ok": None, "why": "nginx did not run at this N"}
    print()
    print(f"Targets at N={n} (issue 2):")
    for name, check in checks.items():
        if isinstance(check, dict):
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in check.items()}
            verdict = {True: "PASS", False: "MISS", None: "N/A "}[check["ok"]]
            print(f"  {verdict} {name}: {shown}")
    return checks
