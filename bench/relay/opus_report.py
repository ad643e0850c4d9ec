"""Opus mode's figures: per-frame latency, the relay's histograms, CPU per talking session."""

from __future__ import annotations

from typing import Any

from bench.relay.histograms import Scrape, histogram_ms
from bench.relay.measure import percentiles
from bench.relay.opus_input import kbps
from bench.relay.report import ms, num, run_warnings

KBPS_PLAUSIBLE = (16.0, 48.0)  # mean Opus bitrate band that is plausible for a 32 kbps encoder


def opus_figures(
    results: list[dict[str, Any]],
    upstream_stats: dict[str, Any],
    before: Scrape,
    after: Scrape,
    hop_cpu: float,
    opened: int,
    window: float,
) -> dict[str, Any]:
    """Issue 5's figures for one Opus run of the relay."""
    total = {
        key: sum(r[key] for r in results)
        for key in (
            "packets_sent",
            "packet_bytes_sent",
            "frames_received",
            "frame_bytes_received",
            "frames_announced",
            "bad_frames",
        )
    }
    per_session_s = hop_cpu / (opened * window) if opened else None
    metric = "realtime_relay_added_latency_seconds"
    transcode = "realtime_relay_transcode_seconds"
    return {
        **total,
        "up_kbps": kbps(total["packet_bytes_sent"], total["packets_sent"]),
        "down_kbps": kbps(total["frame_bytes_received"], total["frames_received"]),
        "cpu_s_per_session_s": per_session_s,
        "sessions_per_core": 1 / per_session_s if per_session_s else None,
        "frame_up_ms": frame_latency(results, upstream_stats["arrivals"]),
        "down_audio_ms": percentiles([v for r in results for v in r["down_audio_us"]], 1e-3),
        "down_first_ms": percentiles([v for r in results for v in r["down_first_us"]], 1e-3),
        "metrics_added_ms": {
            "up": histogram_ms(before, after, metric, direction="client_to_upstream"),
            "down": histogram_ms(before, after, metric, direction="upstream_to_client"),
        },
        "metrics_transcode_ms": {
            "decode": histogram_ms(before, after, transcode, operation="decode_opus"),
            "encode": histogram_ms(before, after, transcode, operation="encode_opus"),
        },
    }


def frame_latency(results: list[dict[str, Any]], arrivals: dict[str, Any]) -> dict[str, Any]:
    """Per-frame client->upstream latency: send of packet k (loadgen) to arrival of append k."""
    latencies: list[int] = []
    missing = negative = 0
    for result in results:
        for sid, (first, sends) in result["send_ns"].items():
            got = arrivals.get(sid)
            if got is None or first < 0:
                missing += len(sends)
                continue
            offset, times = got
            for i, sent in enumerate(sends):
                j = first + i - offset
                if 0 <= j < len(times):
                    latencies.append(times[j] - sent)
                    negative += times[j] < sent
                else:
                    missing += 1
    # Appends are 1:1 with packets, so each session's totals agree unless audio was refused.
    totals = {sid: n for result in results for sid, n in result["packets_total"].items()}
    arrived = {sid: got[0] + len(got[1]) for sid, got in arrivals.items()}
    mismatched = sum(1 for sid, n in totals.items() if arrived.get(sid) != n)
    return {
        **percentiles(latencies, 1e-6),
        "missing": missing,
        "negative": negative,
        "sessions_mismatched": mismatched,
    }


def add_opus_derived(runs: list[dict[str, Any]]) -> None:
    """Per-frame added latency of the Opus relay runs: minus the direct (JSON) run at the same N."""
    by = {(r["target"], r["sessions"]): r for r in runs}
    for run in runs:
        if "frame_up_ms" not in run:
            continue
        direct = by.get(("direct", run["sessions"]))
        added: dict[str, float | None] = {}
        for way, mine_ms, base_key in (
            ("up", run["frame_up_ms"], "up_ms"),
            ("down", run["down_audio_ms"], "down_ms"),
            ("first", run["down_first_ms"], "down_ms"),
        ):
            for q in ("p50", "p99"):
                mine = mine_ms[q]
                base = direct[base_key][q] if direct else None
                added[f"{way}_{q}"] = mine - base if mine is not None and base is not None else None
        run["added_frame_ms"] = added


def print_opus_report(runs: list[dict[str, Any]]) -> list[str]:
    """Issue 5's figures: per-frame latency, the relay's histograms, CPU per talking session."""
    warnings: list[str] = []
    print()
    print(
        "Latency per frame, ms (relay: Opus both ways; direct: JSON PCM appends, the baseline).\n"
        "up = a packet's send to its append's arrival upstream (direct: an append's); down = a "
        "delta's stamp to its last binary frame (direct: to the delta); dn1 = to its first frame;"
        "\nadded = minus direct"
    )
    print(
        f"{'N':>4} {'target':<7} {'up p50':>7} {'up p99':>7} {'dn p50':>7} {'dn p99':>7} "
        f"{'+up p50':>8} {'+up p99':>8} {'+dn p50':>8} {'+dn p99':>8} {'+dn1 p50':>9} "
        f"{'+dn1 p99':>9} {'up n':>7}"
    )
    for r in runs:
        opus = "frame_up_ms" in r
        up = r["frame_up_ms"] if opus else r["up_ms"]
        down = r["down_audio_ms"] if opus else r["down_ms"]
        a = r.get("added_frame_ms", {})
        print(
            f"{r['sessions']:>4} {r['target']:<7} {ms(up['p50']):>7} {ms(up['p99']):>7} "
            f"{ms(down['p50']):>7} {ms(down['p99']):>7} {ms(a.get('up_p50')):>8} "
            f"{ms(a.get('up_p99')):>8} {ms(a.get('down_p50')):>8} {ms(a.get('down_p99')):>8} "
            f"{ms(a.get('first_p50')):>9} {ms(a.get('first_p99')):>9} {up['count']:>7}"
        )
    relays = [r for r in runs if "frame_up_ms" in r]
    print()
    print(
        "The relay's own histograms over the window (/metrics; bucket resolution, interpolated "
        "as histogram_quantile does),\nms: added = receipt to send inside the relay (no socket "
        "queues); decode = one packet; encode = one 100 ms delta"
    )
    print(
        f"{'N':>4} {'+up p50':>8} {'+up p99':>8} {'+dn p50':>8} {'+dn p99':>8} "
        f"{'dec p50':>8} {'dec p99':>8} {'enc p50':>8} {'enc p99':>8}"
    )
    for r in relays:
        m, t = r["metrics_added_ms"], r["metrics_transcode_ms"]
        print(
            f"{r['sessions']:>4} {num(m['up']['p50'], '.3f'):>8} {num(m['up']['p99'], '.3f'):>8}"
            f" {num(m['down']['p50'], '.3f'):>8} {num(m['down']['p99'], '.3f'):>8} "
            f"{num(t['decode']['p50'], '.3f'):>8} {num(t['decode']['p99'], '.3f'):>8} "
            f"{num(t['encode']['p50'], '.3f'):>8} {num(t['encode']['p99'], '.3f'):>8}"
        )
    print()
    print("Cost of the relay with Opus both ways (CPU of the relay process in the window)")
    print(
        f"{'N':>4} {'CPU %':>6} {'CPU ms/sess-s':>13} {'sess/core':>9} {'up kbps':>7} "
        f"{'dn kbps':>7} {'frames dn':>9} {'announced':>9} {'KB/session':>10} {'upstrm %':>8} "
        f"{'loadgen %':>9} {'lag p99':>7} {'machine':>7} {'others':>6}"
    )
    for r in relays:
        lag = max((g["p99"] or 0.0) for g in r["loadgen_lag_ms"]) if r["loadgen_lag_ms"] else None
        print(
            f"{r['sessions']:>4} {r['hop_cpu_share'] * 100:>6.0f} "
            f"{num(r['cpu_s_per_session_s'], '.2f', 1000):>13} "
            f"{num(r['sessions_per_core'], '.0f'):>9} {num(r['up_kbps'], '.1f'):>7} "
            f"{num(r['down_kbps'], '.1f'):>7} {r['frames_received']:>9} "
            f"{r['frames_announced']:>9} {num(r['rss_kb_per_session'], '.1f'):>10} "
            f"{r['upstream_cpu_share'] * 100:>8.0f} "
            f"{'/'.join(f'{s * 100:.0f}' for s in r['loadgen_cpu_share']):>9} "
            f"{ms(lag):>7} {r['machine_busy'] * 100:>6.0f}% {r['other_cores'] * 100:>5.0f}%"
        )
    for r in runs:
        lag = max((g["p99"] or 0.0) for g in r["loadgen_lag_ms"]) if r["loadgen_lag_ms"] else None
        warnings.extend(run_warnings(r, lag))
        if "frame_up_ms" not in r:
            continue
        where = f"{r['target']} N={r['sessions']} opus"
        low, high = KBPS_PLAUSIBLE
        for way in ("up", "down"):
            rate = r[f"{way}_kbps"]
            if rate is None or not low <= rate <= high:
                warnings.append(f"{where}: {way} Opus at {num(rate, '.1f')} kbps: implausible")
        if r["bad_frames"] or r["frames_received"] < r["frames_announced"]:
            warnings.append(
                f"{where}: {r['frames_received']} binary frames for {r['frames_announced']} "
                f"announced, {r['bad_frames']} with a wrong type byte"
            )
        frame = r["frame_up_ms"]
        if frame["missing"] or frame["negative"] or frame["sessions_mismatched"]:
            warnings.append(
                f"{where}: timing channel: {frame['missing']} packets without an append, "
                f"{frame['negative']} negative, {frame['sessions_mismatched']} sessions whose "
                "append count differs from their packet count"
            )
        for way, hist in r["metrics_added_ms"].items():
            if hist["above_top"]:
                warnings.append(
                    f"{where}: {hist['above_top']} relay {way} observations above the top bucket "
                    f"({hist['top_bucket_ms']} ms): its p99 is a floor"
                )
    print()
    print(
        "CPU ms/sess-s: relay CPU per session-second (CPU-s / (N x window)); sess/core: its "
        "inverse, a linear extrapolation;\nkbps: mean Opus payload bitrate sent (up) and "
        "received (down); frames dn: binary frames received, whole run; announced: their\n"
        "relay_audio.frames; up n: samples of the up latency (relay: packets; direct: events). "
        "Each session talks all the time and gets a response of --response-ms every "
        "--turn-seconds (full duplex)."
    )
    for warning in warnings:
        print("WARNING: " + warning)
    return warnings


def check_opus_targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 5's targets at each N: >= 100 talking sessions per core, added p99 < 2 ms a frame."""
    checks: dict[str, Any] = {}
    print()
    print("Targets (issue 5):")
    for r in runs:
        if "frame_up_ms" not in r:
            continue
        n = r["sessions"]
        per_core = r["sessions_per_core"]
        added = r["added_frame_ms"]
        # Per 20 ms frame: a packet up, and the first packet of a delta down (the later packets of
        # a 100 ms delta are sent after it, before the listener needs them; `dn` shows the last).
        worst = [v for v in (added["up_p99"], added["first_p99"]) if v is not None]
        found = {
            "sessions_per_core_100": {
                "value": per_core,
                "ok": None if per_core is None else per_core >= 100,
            },
            "added_p99_under_2ms": {
                "up_ms": added["up_p99"],
                "down_first_frame_ms": added["first_p99"],
                "down_last_frame_ms": added["down_p99"],
                "relay_metric_up_ms": r["metrics_added_ms"]["up"]["p99"],
                "relay_metric_down_ms": r["metrics_added_ms"]["down"]["p99"],
                "ok": max(worst) < 2.0 if len(worst) == 2 else None,
            },
        }
        checks[str(n)] = found
        for name, check in found.items():
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in check.items()}
            verdict = {True: "PASS", False: "MISS", None: "N/A "}[check["ok"]]
            print(f"  N={n:<4} {verdict} {name}: {shown}")
    return checks
