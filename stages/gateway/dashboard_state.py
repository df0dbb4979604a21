"""What the live web dashboard shows (``GET /dashboard/state.json``), built from what the gateway can
ask: the supervisor's status reply (workers, rings, PAS, upstreams; the same reply /health uses,
through its EngineHealth) and the supervisor's /metrics (tokens, latency histograms, worker CPU and
RSS, cache, broadcast). Rates and latency quantiles are over the last ``WINDOW_S`` of samples; one
sample is taken at most every ``REFRESH_S``, and only while some page asks, however many ask."""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from engine.rundir import INFO_FILE
from engine.telemetry import METRICS, quantile
from stages.gateway.health import EngineHealth

REFRESH_S = 1.0
WINDOW_S = 10.0  # rates and latency quantiles are over this much of the past
HISTORY_POINTS = 600  # the time series the charts draw (10 min at one sample per second)
SCRAPE_TIMEOUT_S = 1.0
MAX_METRICS_BYTES = 8 << 20  # a /metrics answer larger than this is not read
LATENCY = "neuralpipe_stage_latency_seconds"
# the metrics the dashboard reads (sample name prefixes)
USED = (
    "neuralpipe_tokens_total",
    "neuralpipe_streams_",
    f"{LATENCY}_bucket",
    "neuralpipe_worker_cpu_seconds_total",
    "neuralpipe_worker_resident_memory_bytes",
    "neuralpipe_cache_",
    "neuralpipe_broadcast_",
    "neuralpipe_gateway_active_streams",
    "neuralpipe_gateway_requests_total",
)
HISTORY_FIELDS = ("t", "pas", "integrity", "stability", "symmetry", "consistency", "tokens_per_s", "p50_s", "p99_s")

Series = dict[tuple[tuple[str, str], ...], float]  # sorted label pairs (without ``engine``) -> value


@dataclass
class Sample:
    at: float  # time.monotonic()
    metrics: dict[str, Series]  # sample name -> series


def parse_metrics(text: str, prefixes: tuple[str, ...] = USED) -> dict[str, Series]:
    """The samples of a Prometheus text exposition whose names start with one of ``prefixes``, as
    sample name -> {labels: value}. The other lines are dropped before parsing: this runs on the
    gateway's event loop, and the whole exposition takes ~10x longer to parse."""
    kept = "".join(line + "\n" for line in text.splitlines() if line.startswith(prefixes))
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(kept):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "engine"))
            out.setdefault(s.name, {})[labels] = s.value
    return out


def by_label(series: Series | None, label: str) -> dict[str, float]:
    """``series`` summed by one label's value."""
    out: dict[str, float] = {}
    for labels, value in (series or {}).items():
        key = dict(labels).get(label)
        if key is not None:
            out[key] = out.get(key, 0.0) + value
    return out


def total(series: Series | None) -> float | None:
    return None if not series else sum(series.values())


def buckets(metrics: dict[str, Series], name: str, **match: str) -> tuple[float, ...] | None:
    """A histogram's counts per bucket (not cumulative; the +Inf bucket last) over the series whose
    labels include ``match``, in the order of its METRICS buckets; None when it has none."""
    cumulative: dict[float, float] = {}
    for labels, value in metrics.get(name + "_bucket", {}).items():
        pairs = dict(labels)
        if all(pairs.get(k) == v for k, v in match.items()) and "le" in pairs:
            le = float(pairs["le"])
            cumulative[le] = cumulative.get(le, 0.0) + value
    bounds = (*METRICS[name].buckets, math.inf)
    if set(cumulative) != set(bounds):
        return None
    running = [cumulative[b] for b in bounds]
    return tuple(max(0.0, b - a) for a, b in zip([0.0, *running[:-1]], running, strict=True))


class DashboardState:
    """The shared sampler behind every dashboard page of this gateway."""

    def __init__(self, runtime_dir: str, health: EngineHealth) -> None:
        self.runtime_dir = runtime_dir
        self.health = health
        self.samples: collections.deque[Sample] = collections.deque()
        self.history: collections.deque[tuple] = collections.deque(maxlen=HISTORY_POINTS)
        self.metrics_problem: str | None = "not asked yet"
        self._last: dict[str, Any] | None = None
        self._taken_at = -REFRESH_S
        self._taking: asyncio.Future | None = None
        self._session: aiohttp.ClientSession | None = None

    async def state(self, since: float = 0.0) -> dict[str, Any]:
        """The dashboard's JSON body; ``history`` holds the points after ``since`` (wall-clock s)."""
        if time.monotonic() - self._taken_at >= REFRESH_S:
            if self._taking is None:  # one sample in flight, shared by every page
                self._taking = asyncio.ensure_future(self._take())
            try:
                await asyncio.shield(self._taking)
            finally:
                if self._taking is not None and self._taking.done():
                    self._taking = None
        body = dict(self._last or {})
        body["history"] = {"fields": HISTORY_FIELDS, "points": [p for p in self.history if p[0] > since]}
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _take(self) -> None:
        status = await self.health.status()
        metrics = await self._scrape(status)
        now = time.monotonic()
        if metrics is not None:
            self.samples.append(Sample(now, metrics))
        while self.samples and now - self.samples[0].at > WINDOW_S:
            self.samples.popleft()
        self._last = self._build(status)
        self._taken_at = time.monotonic()
        pas = self._last.get("pas") or {}
        throughput = self._last["throughput"]
        self.history.append(
            (
                self._last["t"],
                *(pas.get(k) for k in ("score", "integrity", "stability", "symmetry", "consistency")),
                throughput["delivered_per_s"],
                throughput["latency_p50_s"],
                throughput["latency_p99_s"],
            )
        )

    async def _scrape(self, status: dict[str, Any] | None) -> dict[str, Series] | None:
        url = self._metrics_url(status)
        if url is None:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        try:
            async with self._session.get(url) as answer:
                if answer.status != 200:
                    self.metrics_problem = f"{url} answered {answer.status}"
                    return None
                raw = await answer.content.read(MAX_METRICS_BYTES + 1)
            if len(raw) > MAX_METRICS_BYTES:
                self.metrics_problem = f"{url} answered more than {MAX_METRICS_BYTES} bytes"
                return None
            metrics = parse_metrics(raw.decode("utf-8", "replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.metrics_problem = f"{url}: {exc!r}"[:300]
            return None
        self.metrics_problem = None
        return metrics

    def _metrics_url(self, status: dict[str, Any] | None) -> str | None:
        """The supervisor's /metrics, from its supervisor.json (host) and status (port)."""
        try:
            with open(os.path.join(self.runtime_dir, INFO_FILE), "rb") as f:
                info = orjson.loads(f.read())
            host, port = info.get("metrics_host"), (status or info).get("metrics_port")
        except (OSError, ValueError, AttributeError):
            self.metrics_problem = "the supervisor's supervisor.json could not be read"
            return None
        if not isinstance(port, int) or port <= 0 or not isinstance(host, str):
            self.metrics_problem = "the supervisor serves no /metrics ([engine] metrics_port < 0)"
            return None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    # ---- the body ---------------------------------------------------------------------------

    def _build(self, status: dict[str, Any] | None) -> dict[str, Any]:
        latest = self.samples[-1].metrics if self.samples else {}
        rates = self._rates
        cpu = rates("neuralpipe_worker_cpu_seconds_total", "worker")
        rss = by_label(latest.get("neuralpipe_worker_resident_memory_bytes"), "worker")
        tokens_per_s = rates("neuralpipe_tokens_total", "stage")
        st = status or {}
        workers = [
            {
                **{k: w.get(k) for k in ("name", "pid", "state", "ready", "restarts", "uptime_s", "heartbeat_age_s")},
                "records_per_s": w.get("rate_per_s"),
                "cpu": cpu.get(w.get("name")),
                "rss_bytes": rss.get(w.get("name")),
            }
            for w in st.get("workers", ())
        ]
        ring_keys = ("name", "transport", "occupancy", "capacity", "used", "records_written", "records_read")
        ring_keys += ("backpressure_events", "drops")
        p50, p99 = self._latency(0.5), self._latency(0.99)
        return {
            "t": round(time.time(), 3),
            "engine": None if status is None else {k: st.get(k) for k in ("instance", "state", "pid", "uptime_s")},
            "pas": st.get("pas"),
            "workers": workers,
            "rings": [{k: r[k] for k in ring_keys if k in r} for r in st.get("rings", ())],
            "upstreams": st.get("upstreams") or [],
            "throughput": {
                "tokens_per_s": tokens_per_s,
                "delivered_per_s": tokens_per_s.get("broadcast"),
                "tokens_delivered": by_label(latest.get("neuralpipe_tokens_total"), "stage").get("broadcast"),
                "latency_p50_s": p50,
                "latency_p99_s": p99,
                "streams_active": total(latest.get("neuralpipe_streams_active")),
                "streams": by_label(latest.get("neuralpipe_streams_total"), "outcome"),
            },
            "cache": self._cache(latest),
            "broadcast": {
                "subscribers": total(latest.get("neuralpipe_broadcast_subscribers")),
                "messages": total(latest.get("neuralpipe_broadcast_messages_total")),
                "drops": total(latest.get("neuralpipe_broadcast_drops_total")),
                "gap_refills": total(latest.get("neuralpipe_broadcast_gap_refills_total")),
            },
            "gateway": {
                "active_streams": total(latest.get("neuralpipe_gateway_active_streams")),
                "requests_per_s": sum(rates("neuralpipe_gateway_requests_total", "endpoint").values()) or 0.0,
            },
            "metrics": self.metrics_problem or "ok",
            "window_s": WINDOW_S,
        }

    def _rates(self, name: str, label: str) -> dict[str, float]:
        """Per second over the window, by ``label`` (empty until two samples exist)."""
        if len(self.samples) < 2:
            return {}
        first, last = self.samples[0], self.samples[-1]
        elapsed = last.at - first.at
        before = by_label(first.metrics.get(name), label)
        now = by_label(last.metrics.get(name), label)
        return {k: round(max(0.0, v - before.get(k, 0.0)) / elapsed, 3) for k, v in now.items()}

    def _latency(self, q: float) -> float | None:
        """End to end (upstream event -> broadcast socket) latency quantile over the window; None
        when no row was published in it."""
        if len(self.samples) < 2:
            return None
        before = buckets(self.samples[0].metrics, LATENCY, stage="broadcast")
        now = buckets(self.samples[-1].metrics, LATENCY, stage="broadcast")
        if now is None:
            return None
        if before is None:  # nothing observed yet when the window began
            before = (0.0,) * len(now)
        window = tuple(max(0.0, b - a) for a, b in zip(before, now, strict=True))
        return quantile(METRICS[LATENCY], (window, 0.0), q)

    @staticmethod
    def _cache(latest: dict[str, Series]) -> dict[str, float | None]:
        hits = total(latest.get("neuralpipe_cache_hits_total"))
        misses = total(latest.get("neuralpipe_cache_misses_total"))
        looked = (hits or 0.0) + (misses or 0.0)
        return {
            "hits": hits,
            "misses": misses,
            "hit_ratio": (hits or 0.0) / looked if looked else None,
            "evictions": total(latest.get("neuralpipe_cache_evictions_total")),
            "entries": total(latest.get("neuralpipe_cache_entries")),
            "bytes": total(latest.get("neuralpipe_cache_bytes")),
        }
