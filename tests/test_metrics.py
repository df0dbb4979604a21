"""Prometheus metrics: every family with the right values from real rings, over real HTTP, and
accepted by promtool's linter."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import urllib.request

import pytest
from engine_harness import wait_for
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics as metrics_module
from engine.health import WORKER_STATES, EgressSample, HealthMonitor, RingSample, WorkerSample
from engine.metrics import EngineMetrics
from shm.naming import segment_name
from shm.ring import Consumer, Producer, Ring

RING_METRICS = {
    "neuralpipe_ring_capacity_bytes": "capacity",
    "neuralpipe_ring_used_bytes": "used",
    "neuralpipe_ring_occupancy_ratio": "occupancy",
    "neuralpipe_ring_records_written_total": "records_written",
    "neuralpipe_ring_records_read_total": "records_read",
    "neuralpipe_ring_written_bytes_total": "write_cursor",
    "neuralpipe_ring_read_bytes_total": "read_cursor",
    "neuralpipe_ring_backpressure_events_total": "backpressure_events",
    "neuralpipe_ring_drops_total": "drops",
    "neuralpipe_ring_unblocks_total": "unblocks",
    "neuralpipe_ring_lost_wakeups_total": "lost_wakeups",
}


@pytest.fixture
def snapshot(instance: str):
    """A ring with traffic (3 records written, 1 released, a full ring once, a drop), a corrupt
    ring, two workers and a PAS: (rings, workers, pas)."""
    ring = Ring.create(segment_name(instance, "ingest.compute"), capacity=4096, drop_when_full=True)
    try:
        with Producer.attach(ring.name) as producer, Consumer.attach(ring.name) as consumer:
            for _ in range(3):
                assert producer.write(b"x" * 100, record_type=16)
            assert consumer.try_read() is not None
            consumer.release()
            assert producer.write(b"y" * 1000, record_type=16)
            assert producer.write(b"y" * 1000, record_type=16)
            assert producer.write(b"y" * 1000, record_type=16)
            assert not producer.write(b"z" * 1000, record_type=16)  # full: dropped and counted
        header = ring.header()
    finally:
        ring.destroy()
    assert header.records_written == 6 and header.records_read == 1 and header.drops == 1
    rings = [RingSample("ingest.compute", header), RingSample("compute.cache", None, "bad magic")]
    workers = [
        WorkerSample("compute-0", "compute", "running", True, 2, 0.25, 1234),
        WorkerSample("compute-1", "compute", "backoff", False, 5, float("inf"), 0),
    ]
    pas = HealthMonitor().observe(0.0, rings, workers, EgressSample())
    return rings, workers, pas


def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def value(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:
    matches = [
        s.value
        for s in fams[family].samples
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (family, labels, matches)
    return matches[0]


def test_render_has_every_family_with_the_snapshot_values(instance: str, snapshot) -> None:
    rings, workers, pas = snapshot
    metrics = EngineMetrics(instance)
    metrics.update(rings, workers, pas, worker_info={"compute-0": {"adapter": "numpy", "pid": 4242}})
    fams = families(metrics.render())

    header = rings[0].header
    for metric, field in RING_METRICS.items():
        # The parser names counter families without their _total suffix.
        family = metric.removesuffix("_total")
        assert value(fams, family, metric, ring="ingest.compute", engine=instance) == pytest.approx(
            getattr(header, field)
        ), metric
        assert all(s.labels["ring"] != "compute.cache" for s in fams[family].samples)  # unreadable: no value
    assert value(fams, "neuralpipe_ring_valid", ring="ingest.compute") == 1
    assert value(fams, "neuralpipe_ring_valid", ring="compute.cache") == 0

    assert value(fams, "neuralpipe_worker_restarts", "neuralpipe_worker_restarts_total", worker="compute-1") == 5
    assert value(fams, "neuralpipe_worker_heartbeat_age_seconds", worker="compute-0") == 0.25
    assert value(fams, "neuralpipe_worker_heartbeat_age_seconds", worker="compute-1") == float("inf")
    assert value(fams, "neuralpipe_worker_up", worker="compute-0") == 1
    assert value(fams, "neuralpipe_worker_up", worker="compute-1") == 0
    processed = "neuralpipe_worker_processed_records"
    assert value(fams, processed, processed + "_total", worker="compute-0") == 1234
    for state in WORKER_STATES:
        assert value(fams, "neuralpipe_worker_state", worker="compute-1", state=state) == (state == "backoff")
    info = value(fams, "neuralpipe_worker_info", worker="compute-0", adapter="numpy", pid="4242")
    assert info == 1

    assert value(fams, "neuralpipe_pas_score", engine=instance) == pytest.approx(pas.score)
    for sub in ("integrity", "stability", "symmetry", "consistency"):
        assert value(fams, "neuralpipe_pas_subscore", subscore=sub) == pytest.approx(getattr(pas, sub))
    assert pas.integrity == 0.5 and pas.stability == 0.5  # the corrupt ring and the dead worker show

    for fam in fams.values():
        assert fam.documentation, fam.name
        assert all(s.labels["engine"] == instance for s in fam.samples), fam.name


def test_update_replaces_the_snapshot(instance: str, snapshot) -> None:
    rings, workers, pas = snapshot
    metrics = EngineMetrics(instance)
    metrics.update(rings, workers, pas)
    metrics.update(rings[1:], [], None)
    fams = families(metrics.render())
    assert [s.labels["ring"] for s in fams["neuralpipe_ring_valid"].samples] == ["compute.cache"]
    assert not fams["neuralpipe_worker_up"].samples
    assert "neuralpipe_pas_score" not in fams and "neuralpipe_worker_info" not in fams


def test_info_keys_become_valid_labels(instance: str) -> None:
    metrics = EngineMetrics(instance)
    worker = WorkerSample("w", "g", "running", True, 0, 0.1, 0)
    metrics.update([], [worker], None, worker_info={"w": {"gpu.adapter": "vulkan", "worker": "x", "1st": "y"}})
    labels = families(metrics.render())["neuralpipe_worker_info"].samples[0].labels
    assert labels == {
        "engine": instance,
        "worker": "w",
        "gpu_adapter": "vulkan",
        "info_worker": "x",
        "info_1st": "y",
    }


def test_serve_over_http(instance: str, snapshot) -> None:
    rings, workers, pas = snapshot
    metrics = EngineMetrics(instance)
    metrics.update(rings, workers, pas)
    port = metrics.serve("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read()
        assert body == metrics.render()
        with pytest.raises(RuntimeError, match="already running"):
            metrics.serve("127.0.0.1", 0)
    finally:
        metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.close()  # closing twice is harmless


def _threads() -> int:
    """The metrics server's connection threads (socketserver names them after their target): other
    threads of this process may come and go meanwhile."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


@pytest.mark.timeout(60)
def test_idle_connections_are_bounded_and_closed(instance: str, snapshot, monkeypatch) -> None:
    """Each connection to /metrics held a thread of the supervisor for as long as it stayed open,
    sending nothing: a local user could grow its threads without bound. Now at most
    MAX_METRICS_CLIENTS are served at once (more are closed at once) and a connection that sends no
    request within METRICS_CLIENT_TIMEOUT_S is closed; a scrape then works again."""
    monkeypatch.setattr(metrics_module, "METRICS_CLIENT_TIMEOUT_S", 2.0)
    bound = metrics_module.MAX_METRICS_CLIENTS
    metrics = EngineMetrics(instance)
    metrics.update(*snapshot)
    port = metrics.serve("127.0.0.1", 0)
    held, extra = [], []
    try:
        before = _threads()
        for n in range(1, bound + 1):  # one at a time: each accepted before the next connects
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            wait_for(lambda n=n: _threads() >= before + n, 10, f"connection {n} served")
        for _ in range(4):
            extra.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        assert [sock.recv(1) for sock in extra] == [b""] * 4  # closed at once: no slot
        assert _threads() == before + bound
        assert [sock.recv(1) for sock in held] == [b""] * bound  # closed by the timeout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.read() == metrics.render()
    finally:
        for sock in held + extra:
            sock.close()
        metrics.close()


def test_promtool_accepts_the_exposition(instance: str, snapshot) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: tools/test.sh installs it (Debian package prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rings, workers, pas = snapshot
    metrics = EngineMetrics(instance)
    metrics.update(rings, workers, pas, worker_info={"compute-0": {"adapter": "numpy"}})
    result = subprocess.run(
        [promtool, "check", "metrics"], input=metrics.render(), capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
