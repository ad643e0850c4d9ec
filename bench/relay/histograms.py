"""The relay's own histograms: scraped from its `/metrics`, quantiles of the difference of two."""

from __future__ import annotations

import math
import urllib.request
from typing import Any

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Scrape:
    """The histogram buckets of the relay's `/metrics`, keyed by sample name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    buckets: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return buckets


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs, +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower  # the top finite bound, as Prometheus answers
            if count <= below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def histogram_ms(before: Scrape, after: Scrape, name: str, **labels: str) -> dict[str, Any]:
    """p50/p99 in ms of the observations of `name` (with `labels`) between two scrapes."""
    by_le: dict[float, float] = {}
    for (sample, pairs), value in after.items():
        tags = dict(pairs)
        if sample != name + "_bucket" or any(tags.get(k) != v for k, v in labels.items()):
            continue
        le = float(tags["le"])
        by_le[le] = by_le.get(le, 0.0) + value - before.get((sample, pairs), 0.0)
    buckets = sorted(by_le.items())
    out: dict[str, Any] = {
        q: None if (v := bucket_quantile(f, buckets)) is None else v * 1000
        for q, f in (("p50", 0.5), ("p99", 0.99))
    }
    out["count"] = int(buckets[-1][1]) if buckets else 0
    finite = [b for b in buckets if not math.isinf(b[0])]
    out["top_bucket_ms"] = finite[-1][0] * 1000 if finite else None
    out["above_top"] = int(buckets[-1][1] - finite[-1][1]) if finite else 0
    return out
