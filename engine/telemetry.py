"""Worker-side metrics: recorded on the hot path, shipped in heartbeats, merged by the supervisor.

A worker records into its :class:`Telemetry` (``ctx.telemetry``) once per record, never per
token: ``count`` and ``set`` add to or replace one number, ``observe`` takes a whole array of
seconds (a record's latencies) and bins it with one ``np.searchsorted``. ``snapshot`` returns
the cumulative totals (never deltas: a lost heartbeat loses nothing, the next one carries them),
which the worker sends with its heartbeat. The supervisor checks each snapshot
(:func:`check_snapshot`), keeps one :class:`WorkerTotals` per worker (counters of a dead
incarnation are carried into the next, so they never go back) and :func:`merge` sums the workers
for engine/metrics.py to render. No prometheus_client here: stages and clients stay light.

Every metric is declared in :data:`METRICS`; an unknown name or wrong labels raise at once (a
typo is a bug). Label values are bounded per metric and label: values past the bound fold into
``"other"``, so a hostile client cannot grow the series (and stream ids never go in labels).
The list with meanings is in docs/observability.md.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

OTHER = "other"  # the label value excess values fold into
MAX_LABEL_CHARS = 64  # a longer label value is cut (label values come from config and clients)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: kind, help text, label names, histogram bucket bounds (seconds, ascending).

    ``max_values``: distinct values kept per label (more fold into "other"). ``source``: who
    records it, "worker" (through Telemetry) or "supervisor" (from /proc and its own state).
    ``merge``: how the gauges of several workers combine, "sum" or "max"."""

    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    max_values: int = 32
    source: str = "worker"
    merge: str = "sum"


def _c(help: str, *labels: str, **kw: Any) -> MetricSpec:
    return MetricSpec("counter", help, labels, **kw)


def _g(help: str, *labels: str, **kw: Any) -> MetricSpec:
    return MetricSpec("gauge", help, labels, **kw)


def _h(help: str, buckets: tuple[float, ...], *labels: str, **kw: Any) -> MetricSpec:
    return MetricSpec("histogram", help, labels, buckets, **kw)


METRICS: dict[str, MetricSpec] = {
    # data plane
    "neuralpipe_tokens_total": _c("Tokens a stage passed on (token rows; START/END rows not counted).", "stage"),
    "neuralpipe_streams_total": _c(
        "Streams ended at ingest, by outcome: completed, error, cancelled, cache_hit.", "outcome"
    ),
    "neuralpipe_streams_active": _g("Streams open at ingest."),
    "neuralpipe_stage_latency_seconds": _h(
        "Upstream event received (its row's recv_ns) to the stage having committed or published it;"
        " stage=broadcast is end to end, to the broadcast socket.",
        LATENCY_BUCKETS,
        "stage",
    ),
    # upstreams (ingest)
    "neuralpipe_time_to_first_token_seconds": _h("Request sent upstream to its first token.", TTFT_BUCKETS, "upstream"),
    "neuralpipe_upstream_up": _g(
        "1 while the upstream is usable (last request reached it), 0 while it is failing.", "upstream", merge="max"
    ),
    "neuralpipe_upstream_requests_total": _c("Requests sent to the upstream.", "upstream"),
    "neuralpipe_upstream_errors_total": _c(
        "Failed upstream requests, by kind: connect, http, protocol, timeout, cancelled.", "upstream", "kind"
    ),
    "neuralpipe_upstream_in_flight": _g("Requests to the upstream in flight.", "upstream"),
    # cache
    "neuralpipe_cache_hits_total": _c("Cache lookups that found a completed stream."),
    "neuralpipe_cache_misses_total": _c("Cache lookups that found nothing."),
    "neuralpipe_cache_evictions_total": _c("Entries evicted from the cache (size or age bound)."),
    "neuralpipe_cache_bytes": _g("Bytes held by the cache's entries."),
    "neuralpipe_cache_entries": _g("Entries in the cache."),
    # broadcast
    "neuralpipe_broadcast_subscribers": _g("Subscriptions the broadcast socket serves."),
    "neuralpipe_broadcast_messages_total": _c("Messages published on the broadcast socket."),
    # what ZeroMQ drops for a slow subscriber the publisher cannot see (its consumer refills the gap)
    "neuralpipe_broadcast_drops_total": _c(
        "Rows the broadcast dropped instead of publishing: already published (sent again after an earlier"
        " stage restarted)."
    ),
    "neuralpipe_broadcast_gap_refills_total": _c("Gap refills answered: `batches` and snapshot requests."),
    # processes (the supervisor reads them from /proc)
    "neuralpipe_worker_cpu_seconds_total": _c(
        "CPU time (user + system) of the worker's process, summed over its incarnations.",
        "worker",
        max_values=256,
        source="supervisor",
    ),
    "neuralpipe_worker_resident_memory_bytes": _g(
        "Resident set size of the worker's current process.", "worker", max_values=256, source="supervisor"
    ),
    "neuralpipe_build_info": _g(
        "1, labelled with the neuralpipe and Python versions.", "version", "python", source="supervisor"
    ),
    "neuralpipe_worker_info": _g(
        "1 per worker, labelled with its stage and the facts it reported (e.g. compute's backend).",
        "worker",
        "stage",
        max_values=256,
        source="supervisor",
    ),
    # gateway
    "neuralpipe_gateway_requests_total": _c(
        "Gateway HTTP requests answered, by endpoint (chat, completions, models, health, feed, dashboard)"
        " and status code.",
        "endpoint",
        "code",
    ),
    "neuralpipe_gateway_request_duration_seconds": _h(
        "Gateway request received to its response complete.", REQUEST_BUCKETS, "endpoint"
    ),
    "neuralpipe_gateway_time_to_first_token_seconds": _h(
        "Gateway request received to the first byte of its first token chunk.", TTFT_BUCKETS
    ),
    "neuralpipe_gateway_active_streams": _g("Streaming responses the gateway is sending."),
    "neuralpipe_gateway_send_timeouts_total": _c(
        "Connections the gateway closed because their client took nothing of an answer for send_timeout_s."
    ),
    "neuralpipe_gateway_backlog_tokens": _g(
        "Tokens waiting in the gateway for streaming clients that read slower than they come"
        " (max_total_backlog bounds them)."
    ),
    "neuralpipe_gateway_whole_answer_bytes": _g(
        "Whole (non-streamed) answers being collected in the gateway, estimated bytes of JSON"
        " (max_total_whole_bytes bounds them)."
    ),
    "neuralpipe_gateway_cut_total": _c(
        "Requests the gateway ended for holding too much, by the bound that ended them: max_stream_backlog,"
        " max_total_backlog, max_whole_bytes, max_total_whole_bytes.",
        "bound",
    ),
    "neuralpipe_gateway_key_requests_total": _c(
        "Gateway requests per API key name or JWT subject.", "key", max_values=100
    ),
    "neuralpipe_gateway_key_tokens_total": _c(
        "Tokens per API key name or JWT subject, by kind: prompt, completion, cached.", "key", "kind", max_values=100
    ),
    "neuralpipe_gateway_limited_total": _c(
        "Gateway requests refused by a limit, by reason: rpm, tpm, streams, budget.", "key", "reason", max_values=100
    ),
}

_KINDS = ("counter", "gauge", "histogram")
for _name, _spec in METRICS.items():  # the registry's own invariants, checked at import
    assert _spec.kind in _KINDS and _spec.merge in ("sum", "max"), _name
    assert (_spec.kind == "counter") == _name.endswith("_total"), _name
    assert _spec.kind != "histogram" or list(_spec.buckets) == sorted(set(_spec.buckets)), _name

MAX_SERIES = 512  # series of one metric (a worker folds more into "other"; the supervisor refuses more)


def spec(name: str) -> MetricSpec:
    """The metric's spec; KeyError naming it when it is not in :data:`METRICS`."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r} (not in engine.telemetry.METRICS)") from None


def _label_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_LABEL_CHARS]


class _Series:
    """The values of one metric, by label values (a tuple in the spec's label order)."""

    __slots__ = ("bounds", "bounds_ns", "seen", "single", "spec", "values")

    def __init__(self, metric: MetricSpec) -> None:
        self.spec = metric
        self.values: dict[tuple[str, ...], Any] = {}  # counter/gauge: float; histogram: _Histogram
        self.seen: list[set[str]] = [set() for _ in metric.labels]
        self.single = metric.labels[0] if len(metric.labels) == 1 else None  # the usual case, made fast
        self.bounds: np.ndarray | None = None  # the bucket bounds as arrays, once an array is observed
        self.bounds_ns: np.ndarray | None = None

    def arrays(self, np: Any) -> None:
        if self.bounds is None:
            self.bounds = np.array(self.spec.buckets, dtype=np.float64)
            self.bounds_ns = np.array([round(b * 1e9) for b in self.spec.buckets], dtype=np.int64)

    def key(self, name: str, labels: dict[str, Any]) -> tuple[str, ...]:
        """The series key of ``labels`` (existing, or new with each value bounded)."""
        names = self.spec.labels
        if len(labels) != len(names):
            raise ValueError(f"metric {name!r} takes labels {names}, got {tuple(labels)}")
        try:
            key = (labels[self.single],) if self.single is not None else tuple(map(labels.__getitem__, names))
        except KeyError:
            raise ValueError(f"metric {name!r} takes labels {names}, got {tuple(labels)}") from None
        if key in self.values:
            return key
        folded = []
        for value, seen in zip(key, self.seen, strict=True):
            value = _label_value(value)
            if value not in seen:
                if len(seen) >= self.spec.max_values:
                    value = OTHER
                else:
                    seen.add(value)
            folded.append(value)
        key = tuple(folded)
        if key not in self.values and len(self.values) >= MAX_SERIES - 1:  # the labels' product too ("other": 1)
            key = (OTHER,) * len(key)
        return key

    def histogram(self, key: tuple[str, ...]) -> _Histogram:
        found = self.values.get(key)
        if found is None:
            found = self.values[key] = _Histogram(len(self.spec.buckets) + 1)
        return found


class _Histogram:
    """Counts per bucket (the last: above every bound) and the sum of one histogram series. The
    counts are a list until an array is observed, then a numpy array (a worker that only
    observes floats never imports numpy for it: start-up time). Arrays of elapsed nanoseconds
    wait in ``pending`` and are binned all at once at the next snapshot (a heartbeat), off the
    hot path, or when ``PENDING_ROWS`` rows wait."""

    __slots__ = ("counts", "pending", "pending_rows", "total")

    def __init__(self, buckets: int) -> None:
        self.counts: list[int] | np.ndarray = [0] * buckets
        self.total = 0.0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def add_indices(self, np: Any, idx: np.ndarray) -> None:
        if isinstance(self.counts, list):
            self.counts = np.array(self.counts, dtype=np.int64)
        self.counts += np.bincount(idx.ravel(), minlength=len(self.counts))

    def bin_pending(self, series: _Series) -> None:
        """Bin the waiting arrays of elapsed nanoseconds."""
        if not self.pending:
            return
        import numpy as np  # whoever left arrays here has it imported

        series.arrays(np)
        elapsed = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending, self.pending_rows = [], 0
        self.add_indices(np, np.searchsorted(series.bounds_ns, elapsed))
        self.total += float(elapsed.sum()) / 1e9


PENDING_ROWS = 1 << 16  # elapsed times one histogram series holds before binning them (512 KiB)


class Telemetry:
    """One worker's metrics (``ctx.telemetry``). Not thread-safe: record from the stage's thread."""

    def __init__(self) -> None:
        self._series = {name: _Series(metric) for name, metric in METRICS.items()}

    def _get(self, name: str, kind: str) -> _Series:
        series = self._series.get(name)
        if series is None:
            spec(name)  # raises, naming it
        if series.spec.kind != kind:
            raise TypeError(f"metric {name!r} is a {series.spec.kind}, not a {kind}")
        return series

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` (>= 0) to a counter."""
        series = self._get(name, "counter")
        if not value >= 0:  # also NaN
            raise ValueError(f"counter {name!r} can only go up (got {value!r})")
        key = series.key(name, labels)
        series.values[key] = series.values.get(key, 0.0) + value

    def total(self, name: str, value: float, **labels: str) -> None:
        """Set a counter to a running total the stage keeps anyway (its stats counters): no
        cost on the hot path. A total below the last one is ignored (a counter never goes back)."""
        series = self._get(name, "counter")
        key = series.key(name, labels)
        if value > series.values.get(key, 0.0):
            series.values[key] = float(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge (a finite number: the supervisor refuses a snapshot with NaN or infinity)."""
        series = self._get(name, "gauge")
        if not math.isfinite(value):
            raise ValueError(f"gauge {name!r} must be finite (got {value!r})")
        series.values[series.key(name, labels)] = float(value)

    def observe(self, name: str, seconds: np.ndarray | float, **labels: str) -> None:
        """Add one observation (a float) or many (an array of seconds) to a histogram."""
        series = self._get(name, "histogram")
        scalar = isinstance(seconds, int | float)  # numpy's float64 too
        total = float(seconds) if scalar else float(seconds.sum())
        if not math.isfinite(total):
            raise ValueError(f"histogram {name!r} observes finite numbers (got NaN or infinity)")
        hist = series.histogram(series.key(name, labels))
        if scalar:
            hist.counts[bisect.bisect_left(series.spec.buckets, seconds)] += 1  # left: v <= bound, as `le`
        elif seconds.size:
            import numpy as np  # the caller has it imported: a dictionary look-up

            series.arrays(np)
            hist.add_indices(np, np.searchsorted(series.bounds, seconds))
        hist.total += total

    def observe_since_ns(self, name: str, start_ns: np.ndarray, now_ns: int | None = None, **labels: str) -> None:
        """Observe ``now_ns - start_ns`` (``time.monotonic_ns`` values, e.g. a record's recv_ns
        column) in seconds. On the hot path only the subtraction (which copies: ``start_ns`` may
        be ring memory about to be released); binning waits for the snapshot."""
        series = self._get(name, "histogram")
        if len(start_ns) == 0:
            return
        hist = series.histogram(series.key(name, labels))
        hist.pending.append((time.monotonic_ns() if now_ns is None else now_ns) - start_ns)
        hist.pending_rows += len(start_ns)
        if hist.pending_rows >= PENDING_ROWS:
            hist.bin_pending(series)

    def clear(self, name: str) -> None:
        """Forget every series of a metric (a gauge whose subjects went away)."""
        spec(name)
        self._series[name].values.clear()

    def snapshot(self) -> dict[str, list[list]]:
        """Cumulative totals, JSON-able: ``{name: [[*label values, value], ...]}``; a histogram's
        value is ``[count per bucket ..., count above the last bound, sum]``. Metrics without a
        series are left out."""
        out: dict[str, list[list]] = {}
        for name, series in self._series.items():
            if not series.values:
                continue
            if series.spec.kind == "histogram":
                for hist in series.values.values():
                    hist.bin_pending(series)
                rows = [[*key, [*map(int, h.counts), h.total]] for key, h in series.values.items()]
            else:
                rows = [[*key, value] for key, value in series.values.items()]
            out[name] = rows
        return out


# ---- supervisor side ---------------------------------------------------------------------

Values = dict[tuple[str, ...], Any]  # label values -> float, or (bucket counts tuple, sum) for a histogram


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_snapshot(snapshot: Any) -> str | None:
    """None when ``snapshot`` is a valid :meth:`Telemetry.snapshot`, else what is wrong (a
    worker's heartbeat is checked before the supervisor uses it)."""
    if not isinstance(snapshot, dict):
        return "must be an object"
    for name, rows in snapshot.items():
        metric = METRICS.get(name)
        if metric is None or metric.source != "worker":
            return f"unknown metric {name[:MAX_LABEL_CHARS]!r}"
        if not isinstance(rows, list) or len(rows) > MAX_SERIES:
            return f"{name}: must be a list of <= {MAX_SERIES} series"
        width = len(metric.labels)
        for row in rows:
            if not isinstance(row, list) or len(row) != width + 1:
                return f"{name}: a series must be [{width} label values, value]"
            if not all(isinstance(v, str) and len(v) <= MAX_LABEL_CHARS for v in row[:width]):
                return f"{name}: label values must be strings of <= {MAX_LABEL_CHARS} characters"
            value = row[width]
            if metric.kind == "histogram":
                n = len(metric.buckets) + 2
                if not isinstance(value, list) or len(value) != n or not all(_number(v) and v >= 0 for v in value):
                    return f"{name}: a histogram value must be {n} non-negative numbers"
            elif not _number(value) or (metric.kind == "counter" and value < 0):
                return f"{name}: bad value"
    return None


def values_of(snapshot: Mapping[str, list[list]]) -> dict[str, Values]:
    """A checked snapshot as ``{name: {label values: value}}``."""
    out: dict[str, Values] = {}
    for name, rows in snapshot.items():
        width = len(METRICS[name].labels)
        if METRICS[name].kind == "histogram":
            out[name] = {tuple(row[:width]): (tuple(row[width][:-1]), row[width][-1]) for row in rows}
        else:
            out[name] = {tuple(row[:width]): row[width] for row in rows}
    return out


def _add(into: dict[str, Values], name: str, values: Values) -> None:
    """Combine ``values`` of metric ``name`` into ``into`` (counters and histograms add up,
    gauges by their spec's ``merge``)."""
    metric = METRICS[name]
    target = into.setdefault(name, {})
    for key, value in values.items():
        old = target.get(key)
        if old is None:
            target[key] = value
        elif metric.kind == "histogram":
            target[key] = (tuple(a + b for a, b in zip(old[0], value[0], strict=True)), old[1] + value[1])
        elif metric.kind == "gauge" and metric.merge == "max":
            target[key] = max(old, value)
        else:
            target[key] = old + value


class WorkerTotals:
    """The supervisor's view of one worker's telemetry across its incarnations: the latest
    snapshot of the current one plus the counters and histograms of those that ended (gauges
    end with their process)."""

    def __init__(self) -> None:
        self.current: dict[str, Values] = {}
        self.carried: dict[str, Values] = {}

    def update(self, snapshot: Mapping[str, list[list]]) -> None:
        """The current incarnation's latest (checked) snapshot, replacing the previous one."""
        self.current = values_of(snapshot)

    def end_incarnation(self) -> None:
        """The process is gone: keep its counters and histograms, drop its gauges."""
        for name, values in self.current.items():
            if METRICS[name].kind != "gauge":
                _add(self.carried, name, values)
        self.current = {}

    def totals(self) -> dict[str, Values]:
        out: dict[str, Values] = {}
        for part in (self.carried, self.current):
            for name, values in part.items():
                _add(out, name, values)
        return out


def merge(parts: Iterable[Mapping[str, Values]]) -> dict[str, Values]:
    """The workers' totals as one engine's: same label values add up (gauges by ``merge``)."""
    out: dict[str, Values] = {}
    for part in parts:
        for name, values in part.items():
            _add(out, name, values)
    return out


def quantile(metric: MetricSpec, value: tuple[tuple[float, ...], float], q: float) -> float | None:
    """The ``q`` quantile of a histogram value, interpolated within its bucket as Prometheus'
    histogram_quantile does (None with no observation; the last bound when above it)."""
    counts, _ = value
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if seen + n >= rank and n > 0:
            if i == len(metric.buckets):
                return metric.buckets[-1]
            low = metric.buckets[i - 1] if i else 0.0
            return low + (metric.buckets[i] - low) * (rank - seen) / n
        seen += n
    return metric.buckets[-1]


def upstream_health(merged: Mapping[str, Values]) -> list[dict[str, Any]]:
    """Per upstream, from the merged metrics, what `neuralpipe status` shows: up (None while no
    ingest reports it), requests in flight, requests, errors (by kind) and time to first token."""
    up = merged.get("neuralpipe_upstream_up", {})
    requests = merged.get("neuralpipe_upstream_requests_total", {})
    errors = merged.get("neuralpipe_upstream_errors_total", {})
    in_flight = merged.get("neuralpipe_upstream_in_flight", {})
    ttft = merged.get("neuralpipe_time_to_first_token_seconds", {})
    ttft_spec = METRICS["neuralpipe_time_to_first_token_seconds"]
    out = []
    for (name,) in sorted(set(up) | set(requests)):
        by_kind = {kind: int(n) for (upstream, kind), n in sorted(errors.items()) if upstream == name and n}
        hist = ttft.get((name,))
        state = up.get((name,))
        out.append(
            {
                "name": name,
                "up": None if state is None else bool(state),
                "in_flight": int(in_flight.get((name,), 0)),
                "requests": int(requests.get((name,), 0)),
                "errors": sum(by_kind.values()),
                "errors_by_kind": by_kind,
                "ttft_p50_s": None if hist is None else quantile(ttft_spec, hist, 0.5),
                "ttft_p99_s": None if hist is None else quantile(ttft_spec, hist, 0.99),
            }
        )
    return out
