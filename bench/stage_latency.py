"""The engine's own per-stage latency over a window, from its /metrics: the histogram
``neuralpipe_stage_latency_seconds{stage}`` (a row's ``recv_ns`` at ingest -> the stage committed or
published it) read before and after, its quantiles interpolated within the buckets as Prometheus'
histogram_quantile does. The buckets are coarse (1, 2.5, 5, 10 ms, ...): a figure says which stage
the time goes to, not a precise latency."""

from __future__ import annotations

import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from engine.telemetry import METRICS, quantile

LATENCY = "neuralpipe_stage_latency_seconds"

Buckets = dict[str, np.ndarray]  # stage -> cumulative counts by bucket, +Inf last


def read(metrics_port: int) -> Buckets:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    kept = "".join(line + "\n" for line in text.splitlines() if line.startswith(f"{LATENCY}_bucket"))
    found: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(kept):
        for sample in family.samples:
            found.setdefault(sample.labels["stage"], {})[float(sample.labels["le"])] = sample.value
    return {stage: np.array([n for _, n in sorted(by_le.items())]) for stage, by_le in found.items()}


def quantiles(before: Buckets, after: Buckets, qs: tuple[int, ...] = (50, 99)) -> dict[str, dict[str, float]]:
    """Per stage, ``p<q>_us`` of what was observed between the two readings, and ``count``."""
    spec = METRICS[LATENCY]
    out = {}
    for stage, cumulative in after.items():
        window = cumulative - before.get(stage, np.zeros_like(cumulative))
        counts = tuple(np.diff(window, prepend=0.0).tolist())
        row: dict[str, float] = {"count": int(window[-1])}
        for q in qs:
            value = quantile(spec, (counts, 0.0), q / 100)
            row[f"p{q}_us"] = round(value * 1e6, 1) if value is not None else 0.0
        out[stage] = row
    return out
