"""Prometheus metrics of one engine instance, served over HTTP by the supervisor.

The values live in shared-memory ring headers and in the workers' reports, not in this process,
so there are no client-side counters to increment: the supervisor hands the latest samples to
:meth:`EngineMetrics.update` on each health tick, and a collector turns that snapshot into metric
families when Prometheus scrapes. Counters are the rings' and workers' own monotonic totals, and
the workers' telemetry (engine/telemetry.py: its METRICS registry names, types and labels them)
as the supervisor merged it across workers and incarnations.

Every sample carries the constant label ``engine`` (the instance id); ``instance`` is reserved
by Prometheus for the scrape target. The list of metrics is in docs/observability.md.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from engine.health import WORKER_STATES, Pas, RingSample, WorkerSample
from engine.telemetry import METRICS, Values
from shm.ring import RingHeader

MAX_METRICS_CLIENTS = 16  # connections to /metrics served at once (a thread each); more are closed
METRICS_CLIENT_TIMEOUT_S = 10.0  # a connection that sends no request (or takes no answer) this long is closed
SUBSCORES = ("integrity", "stability", "symmetry", "consistency")

# (name, help, unit, value) of each per-ring metric; counters are the ring header's own totals.
_RING_GAUGES = (
    ("neuralpipe_ring_capacity_bytes", "Size of the ring's data area.", "bytes", lambda h: h.capacity),
    ("neuralpipe_ring_used_bytes", "Bytes written and not yet released by the consumer.", "bytes", lambda h: h.used),
    ("neuralpipe_ring_occupancy_ratio", "Used bytes over capacity (0 to 1).", "ratio", lambda h: h.occupancy),
)
_RING_COUNTERS = (
    ("neuralpipe_ring_records_written_total", "Records committed by producers.", "", lambda h: h.records_written),
    ("neuralpipe_ring_records_read_total", "Records released by consumers.", "", lambda h: h.records_read),
    ("neuralpipe_ring_written_bytes_total", "Bytes committed (the write cursor).", "bytes", lambda h: h.write_cursor),
    ("neuralpipe_ring_read_bytes_total", "Bytes released (the read cursor).", "bytes", lambda h: h.read_cursor),
    (
        "neuralpipe_ring_backpressure_events_total",
        "Times a producer found the ring full.",
        "",
        lambda h: h.backpressure_events,
    ),
    ("neuralpipe_ring_drops_total", "Records dropped because the ring was full (drop mode).", "", lambda h: h.drops),
    ("neuralpipe_ring_unblocks_total", "Torn records of dead producers cleared.", "", lambda h: h.unblocks),
    (
        "neuralpipe_ring_lost_wakeups_total",
        "Consumer parks that timed out with data waiting.",
        "",
        lambda h: h.lost_wakeups,
    ),
)

_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class _Snapshot:
    rings: list[RingSample] = field(default_factory=list)
    workers: list[WorkerSample] = field(default_factory=list)
    pas: Pas | None = None
    worker_info: dict[str, dict] = field(default_factory=dict)
    telemetry: dict[str, Values] = field(default_factory=dict)


_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
_INFO = "neuralpipe_worker_info"  # in METRICS for its docs; rendered from worker_info (its labels vary)


def _info_labels(info: dict) -> dict[str, str]:
    """Info values as label pairs: names made valid, clear of the labels every sample has."""
    labels = {}
    for key, value in info.items():
        name = _LABEL_NAME.sub("_", str(key))
        if not name or name[0].isdigit() or name.startswith("__") or name in ("engine", "worker"):
            name = "info_" + name
        labels[name] = str(value)
    return labels


class EngineMetrics:
    """The latest snapshot of one engine, exposed in its own registry (never the global one)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._lock = threading.Lock()
        self._snapshot = _Snapshot()
        self._server = None
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def update(
        self,
        rings: list[RingSample],
        workers: list[WorkerSample],
        pas: Pas | None,
        worker_info: dict[str, dict] | None = None,
        telemetry: dict[str, Values] | None = None,
    ) -> None:
        """Replace the snapshot; a scrape running meanwhile sees the old one or the new one whole.
        ``telemetry``: the merged totals of engine.telemetry (``{name: {label values: value}}``)."""
        snapshot = _Snapshot(list(rings), list(workers), pas, dict(worker_info or {}), dict(telemetry or {}))
        with self._lock:
            self._snapshot = snapshot

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics from a daemon thread on (host, port); port 0 picks a free one. Returns the port."""
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        try:
            self._server, self._thread = _start_bounded_server(host, port, self.registry)
        except OSError as exc:  # errno 98 (in use), 99 (not an address of this host), ...
            raise OSError(
                exc.errno,
                f"cannot serve metrics on {host}:{port}: {exc.strerror}"
                " (another engine? set [engine] metrics_port or NEURALPIPE_METRICS_PORT, 0 picks a free port)",
            ) from None
        return self._server.server_port

    def close(self) -> None:
        """Stop the HTTP server (if serving) and free its port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def render(self) -> bytes:
        """The text exposition format, as a scrape would see it."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """The prometheus_client Collector protocol: metric families of the current snapshot."""
        with self._lock:
            snapshot = self._snapshot
        yield from self._ring_metrics(snapshot.rings)
        yield from self._worker_metrics(snapshot.workers, snapshot.worker_info)
        if snapshot.pas is not None:
            yield from self._pas_metrics(snapshot.pas)
        yield from self._telemetry_metrics(snapshot.telemetry)

    def _telemetry_metrics(self, telemetry: dict[str, Values]) -> Iterator[Metric]:
        """Every metric of the registry, with the series it has (a family without any is still
        described: dashboards and rules find their names before the first sample)."""
        for name, metric in METRICS.items():
            if name == _INFO:
                continue
            family = _FAMILIES[metric.kind](name, metric.help, labels=["engine", *metric.labels])
            for key, value in sorted(telemetry.get(name, {}).items()):
                if metric.kind == "histogram":
                    counts, total = value
                    cumulative, buckets = 0, []
                    for bound, count in zip([*metric.buckets, float("inf")], counts, strict=True):
                        cumulative += count
                        buckets.append((floatToGoString(bound), cumulative))
                    family.add_metric([self.instance, *key], buckets, total)
                else:
                    family.add_metric([self.instance, *key], value)
            yield family

    def _ring_metrics(self, rings: list[RingSample]) -> Iterator[Metric]:
        labels = ["engine", "ring"]
        valid = GaugeMetricFamily("neuralpipe_ring_valid", "1 when the ring's header is valid, else 0.", labels=labels)
        for ring in rings:
            valid.add_metric([self.instance, ring.name], 0 if ring.header is None else 1)
        yield valid
        readable = [(ring.name, ring.header) for ring in rings if ring.header is not None]
        for name, doc, unit, value in _RING_GAUGES:
            yield self._family(GaugeMetricFamily(name, doc, labels=labels, unit=unit), readable, value)
        for name, doc, unit, value in _RING_COUNTERS:
            yield self._family(CounterMetricFamily(name, doc, labels=labels, unit=unit), readable, value)

    def _family(
        self, family: Metric, readable: list[tuple[str, RingHeader]], value: Callable[[RingHeader], float]
    ) -> Metric:
        for name, header in readable:
            family.add_metric([self.instance, name], value(header))
        return family

    def _worker_metrics(self, workers: list[WorkerSample], worker_info: dict[str, dict]) -> Iterator[Metric]:
        labels = ["engine", "worker"]
        restarts = CounterMetricFamily(
            "neuralpipe_worker_restarts_total", "Restarts since the supervisor started.", labels=labels
        )
        age = GaugeMetricFamily(
            "neuralpipe_worker_heartbeat_age_seconds",
            "Time since the worker's last heartbeat (+Inf before the first).",
            labels=labels,
            unit="seconds",
        )
        up = GaugeMetricFamily("neuralpipe_worker_up", "1 while the worker's process is alive, else 0.", labels=labels)
        processed = CounterMetricFamily(
            "neuralpipe_worker_processed_records_total", "Records processed, as reported by the worker.", labels=labels
        )
        state = GaugeMetricFamily(
            "neuralpipe_worker_state", "1 for the worker's current state, 0 for the others.", labels=[*labels, "state"]
        )
        for w in workers:
            key = [self.instance, w.name]
            restarts.add_metric(key, w.restarts)
            age.add_metric(key, w.heartbeat_age_s)
            up.add_metric(key, 1 if w.alive else 0)
            processed.add_metric(key, w.processed)
            for s in WORKER_STATES:
                state.add_metric([*key, s], 1 if s == w.state else 0)
        yield from (restarts, age, up, processed, state)
        if worker_info:
            info = InfoMetricFamily("neuralpipe_worker", METRICS[_INFO].help, labels=labels)
            for name, facts in worker_info.items():
                info.add_metric([self.instance, name], _info_labels(facts))
            yield info

    def _pas_metrics(self, pas: Pas) -> Iterator[Metric]:
        score = GaugeMetricFamily(
            "neuralpipe_pas_score", "Pipeline alignment score, the mean of the sub-scores (0 to 1).", labels=["engine"]
        )
        score.add_metric([self.instance], pas.score)
        sub = GaugeMetricFamily("neuralpipe_pas_subscore", "PAS sub-score (0 to 1).", labels=["engine", "subscore"])
        for name in SUBSCORES:
            sub.add_metric([self.instance, name], getattr(pas, name))
        yield from (score, sub)


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on the supervisor's stderr."""


class _BoundedServer(ThreadingWSGIServer):
    """prometheus_client's server (a thread per connection), with at most MAX_METRICS_CLIENTS
    connections served at once: one more is closed at once, so idle connections cannot grow the
    supervisor's threads without bound (each also closed after METRICS_CLIENT_TIMEOUT_S)."""

    def server_activate(self) -> None:
        self.slots = threading.BoundedSemaphore(MAX_METRICS_CLIENTS)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _start_bounded_server(host: str, port: int, registry: CollectorRegistry) -> tuple[_BoundedServer, threading.Thread]:
    """Serve ``registry`` on (host, port) from a daemon thread, as prometheus_client's
    start_http_server does, with the bounds of :class:`_BoundedServer`."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_BoundedServer):
        address_family = family

    class Handler(_Handler):
        timeout = METRICS_CLIENT_TIMEOUT_S  # read at each start (the socket's timeout per connection)

    server = make_server(sockaddr[0], port, make_wsgi_app(registry), Server, handler_class=Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
