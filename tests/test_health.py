"""PAS: an idle healthy engine scores 1.0, and each sub-score falls when its fault is injected."""

from __future__ import annotations

import json

import pytest

from engine.health import (
    EgressSample,
    HealthMonitor,
    RingSample,
    WorkerSample,
    status_for,
)
from shm.ring import RingHeader

CAPACITY = 4096


def header(name: str = "r", **fields) -> RingHeader:
    base = dict(
        name=name,
        capacity=CAPACITY,
        max_record=1024,
        drop_when_full=False,
        created_ns=0,
        owner_pid=1,
        write_cursor=0,
        read_cursor=0,
        producer_pid=2,
        producer_heartbeat_ns=0,
        consumer_pid=3,
        consumer_heartbeat_ns=0,
        records_written=0,
        records_read=0,
        backpressure_events=0,
        drops=0,
        lost_wakeups=0,
        unblocks=0,
        consumer_waiting=False,
        producer_waiting=False,
        pending_claim=False,
        doorbell_dir="/tmp/x",
    )
    return RingHeader(**(base | fields))


def ring(name: str = "r", **fields) -> RingSample:
    return RingSample(name, header(name, **fields))


def worker(name: str = "w", group: str = "compute", **fields) -> WorkerSample:
    base = dict(state="running", alive=True, restarts=0, heartbeat_age_s=0.1, processed=0)
    return WorkerSample(name=name, group=group, **(base | fields))


def healthy_rings() -> list[RingSample]:
    return [ring("a"), ring("b")]


def healthy_workers() -> list[WorkerSample]:
    return [worker("w0"), worker("w1")]


def test_idle_healthy_engine_scores_one() -> None:
    monitor = HealthMonitor()
    for t in range(5):
        pas = monitor.observe(float(t), healthy_rings(), healthy_workers(), EgressSample())
        assert (pas.integrity, pas.stability, pas.symmetry, pas.consistency, pas.score) == (1.0, 1.0, 1.0, 1.0, 1.0)
        assert pas.status == "healthy"
    json.dumps(pas.details)  # JSON-serialisable for status/--json
    assert pas.details["window"]["samples"] == 5


def test_empty_engine_scores_one() -> None:
    pas = HealthMonitor().observe(0.0, [], [], EgressSample())
    assert pas.score == 1.0


def test_busy_balanced_engine_scores_one() -> None:
    monitor = HealthMonitor()
    for t in range(5):
        workers = [worker("w0", processed=100 * t), worker("w1", processed=100 * t)]
        egress = EgressSample(messages=50 * t, batches=10 * t, batches_within_budget=10 * t)
        pas = monitor.observe(float(t), [ring("a", write_cursor=512 * t, read_cursor=512 * t)], workers, egress)
    assert pas.score == 1.0


@pytest.mark.parametrize(
    ("score", "status"),
    [
        (1.0, "healthy"),
        (0.90, "healthy"),
        (0.8999, "warning"),
        (0.85, "warning"),
        (0.8499, "critical"),
        (0.0, "critical"),
    ],
)
def test_status_thresholds(score: float, status: str) -> None:
    assert status_for(score) == status


def test_status_follows_the_score() -> None:
    # One of two rings invalid: integrity 0.5, score 0.875 -> warning; both invalid -> critical.
    monitor = HealthMonitor()
    pas = monitor.observe(0.0, [ring("a"), RingSample("b", None, "bad magic")], [], EgressSample())
    assert pas.integrity == 0.5
    assert pas.score == pytest.approx(0.875)
    assert pas.status == "warning"
    pas = monitor.observe(1.0, [RingSample("a", None, "x"), RingSample("b", None, "y")], [], EgressSample())
    assert pas.status == "critical"


# Integrity ------------------------------------------------------------------------------------


def test_corrupt_ring_lowers_integrity() -> None:
    pas = HealthMonitor().observe(0.0, [*healthy_rings(), RingSample("c", None, "bad magic")], [], EgressSample())
    assert pas.integrity == pytest.approx(2 / 3)
    assert pas.details["integrity"]["invalid"] == {"c": "bad magic"}


def test_leaked_segments_lower_integrity() -> None:
    pas = HealthMonitor().observe(0.0, healthy_rings(), [], EgressSample(), leaked_segments=2)
    assert pas.integrity == pytest.approx(0.81)


def test_unblocked_torn_records_lower_integrity() -> None:
    monitor = HealthMonitor()
    assert monitor.observe(0.0, [ring("a", unblocks=4)], [], EgressSample()).integrity == 1.0  # no delta yet
    pas = monitor.observe(1.0, [ring("a", unblocks=5)], [], EgressSample())
    assert pas.integrity == pytest.approx(0.9)
    assert pas.details["integrity"]["unblocks_in_window"] == 1


# Stability ------------------------------------------------------------------------------------


def test_restarts_lower_stability() -> None:
    monitor = HealthMonitor(intensity=5)
    monitor.observe(0.0, [], [worker("w0"), worker("w1")], EgressSample())
    pas = monitor.observe(1.0, [], [worker("w0", restarts=2), worker("w1")], EgressSample())
    assert pas.stability == pytest.approx((0.6 + 1.0) / 2)
    assert pas.details["stability"]["workers"]["w0"]["restarts_in_window"] == 2


def test_restarts_beyond_intensity_give_zero() -> None:
    monitor = HealthMonitor(intensity=2)
    monitor.observe(0.0, [], [worker()], EgressSample())
    assert monitor.observe(1.0, [], [worker(restarts=3)], EgressSample()).stability == 0.0


def test_intensity_zero_any_restart_gives_zero() -> None:
    monitor = HealthMonitor(intensity=0)
    assert monitor.observe(0.0, [], [worker()], EgressSample()).stability == 1.0
    assert monitor.observe(1.0, [], [worker(restarts=1)], EgressSample()).stability == 0.0


def test_a_worker_may_bring_its_own_intensity() -> None:
    monitor = HealthMonitor(intensity=5)
    monitor.observe(0.0, [], [worker("w0", intensity=1), worker("w1")], EgressSample())
    pas = monitor.observe(1.0, [], [worker("w0", intensity=1, restarts=1), worker("w1", restarts=1)], EgressSample())
    assert pas.stability == pytest.approx((0.0 + 0.8) / 2)


def test_stale_heartbeat_lowers_stability() -> None:
    pas = HealthMonitor(heartbeat_timeout_s=2.0).observe(
        0.0, [], [worker("w0"), worker("w1", heartbeat_age_s=2.5)], EgressSample()
    )
    assert pas.stability == 0.5


def test_never_heartbeating_worker_is_json_safe() -> None:
    pas = HealthMonitor().observe(0.0, [], [worker(heartbeat_age_s=float("inf"))], EgressSample())
    assert pas.stability == 0.0
    assert json.loads(json.dumps(pas.details, allow_nan=False))["stability"]["workers"]["w"]["heartbeat_age_s"] is None


def test_dead_worker_lowers_stability() -> None:
    workers = [worker("w0"), worker("w1", alive=False, state="backoff")]
    assert HealthMonitor().observe(0.0, [], workers, EgressSample()).stability == 0.5


def test_starting_worker_needs_no_heartbeat_yet_but_stopped_one_is_ignored() -> None:
    workers = [worker("w0", state="starting", heartbeat_age_s=10.0), worker("w1", state="stopped", alive=False)]
    pas = HealthMonitor().observe(0.0, [], workers, EgressSample())
    assert pas.stability == 1.0
    assert list(pas.details["stability"]["workers"]) == ["w0"]


def test_unknown_worker_state_is_refused() -> None:
    with pytest.raises(ValueError, match="state 'sleeping'"):
        worker(state="sleeping")


def test_old_restart_stops_counting_after_the_window() -> None:
    monitor = HealthMonitor(window_s=10.0, intensity=5)
    monitor.observe(0.0, [], [worker(restarts=0)], EgressSample())
    assert monitor.observe(1.0, [], [worker(restarts=1)], EgressSample()).stability == pytest.approx(0.8)
    for t in range(2, 11):
        pas = monitor.observe(float(t), [], [worker(restarts=1)], EgressSample())
        assert pas.stability == pytest.approx(0.8), t  # the sample at 0.0 is still inside the window
    pas = monitor.observe(11.0, [], [worker(restarts=1)], EgressSample())
    assert pas.stability == 1.0
    assert pas.details["window"]["span_s"] == 10.0


def test_restarted_worker_counter_reset_counts_from_zero() -> None:
    monitor = HealthMonitor()
    monitor.observe(0.0, [], [worker("w0", processed=900), worker("w1", processed=900)], EgressSample())
    # w0 restarted and reports from 0 again: its load is 100, not -800.
    pas = monitor.observe(1.0, [], [worker("w0", processed=100), worker("w1", processed=1000)], EgressSample())
    assert pas.details["symmetry"]["load"]["compute"] == {"w0": 100, "w1": 100}


# Symmetry -------------------------------------------------------------------------------------


def test_skewed_replica_load_lowers_symmetry() -> None:
    monitor = HealthMonitor()
    monitor.observe(0.0, [], [worker("w0"), worker("w1"), worker("x", group="cache")], EgressSample())
    workers = [worker("w0", processed=1000), worker("w1", processed=0), worker("x", group="cache", processed=7)]
    pas = monitor.observe(1.0, [], workers, EgressSample())
    # compute: all load on one of two replicas -> entropy 0; cache: one member -> 1.
    assert pas.details["symmetry"]["entropy"] == {"compute": 0.0, "cache": 1.0}
    assert pas.symmetry == pytest.approx(0.7 * 0.5 + 0.3)


def test_partly_skewed_load_gives_partial_entropy() -> None:
    monitor = HealthMonitor()
    monitor.observe(0.0, [], [worker("w0"), worker("w1")], EgressSample())
    pas = monitor.observe(1.0, [], [worker("w0", processed=300), worker("w1", processed=100)], EgressSample())
    assert pas.details["symmetry"]["balance"] == pytest.approx(0.811278, abs=1e-6)  # H(3/4, 1/4) in bits
    assert 0.85 < pas.symmetry < 1.0


def test_skewed_upstream_load_lowers_symmetry() -> None:
    monitor = HealthMonitor()
    monitor.observe(0.0, [], [], EgressSample(), upstream_load={"u0": 0, "u1": 0})
    pas = monitor.observe(1.0, [], [], EgressSample(), upstream_load={"u0": 50, "u1": 0})
    assert pas.details["symmetry"]["entropy"] == {"upstreams": 0.0}
    assert pas.symmetry == pytest.approx(0.3)


def test_ring_stuck_full_lowers_symmetry() -> None:
    monitor = HealthMonitor()
    full = int(CAPACITY * 0.96) // 8 * 8
    for t in range(4):
        pas = monitor.observe(float(t), [ring("a", write_cursor=full), ring("b")], [], EgressSample())
    assert pas.details["symmetry"]["full_fraction"] == {"a": 1.0, "b": 0.0}
    assert pas.symmetry == pytest.approx(0.7 + 0.3 * 0.5)


def test_backpressure_counts_the_interval_as_full() -> None:
    monitor = HealthMonitor()
    for t, events in enumerate([0, 0, 1, 1, 1]):  # the producer hit a full ring once, between t=1 and t=2
        pas = monitor.observe(float(t), [ring("a", backpressure_events=events)], [], EgressSample())
    assert pas.details["symmetry"]["full_fraction"] == {"a": 0.25}
    assert pas.symmetry == pytest.approx(0.7 + 0.3 * 0.75)


def test_drops_count_the_interval_as_full() -> None:
    monitor = HealthMonitor()
    monitor.observe(0.0, [ring("a", drop_when_full=True)], [], EgressSample())
    pas = monitor.observe(1.0, [ring("a", drop_when_full=True, drops=3)], [], EgressSample())
    assert pas.details["symmetry"]["full_fraction"] == {"a": 1.0}


# Consistency ----------------------------------------------------------------------------------


def test_gaps_and_duplicates_lower_consistency() -> None:
    monitor = HealthMonitor()
    assert monitor.observe(0.0, [], [], EgressSample(messages=1000, gaps=500)).consistency == 1.0  # no delta yet
    pas = monitor.observe(1.0, [], [], EgressSample(messages=1100, gaps=505, duplicates=5))
    assert pas.consistency == pytest.approx(0.9)


def test_slow_batches_lower_consistency() -> None:
    monitor = HealthMonitor(latency_budget_ms=20.0)
    monitor.observe(0.0, [], [], EgressSample())
    pas = monitor.observe(1.0, [], [], EgressSample(messages=10, batches=10, batches_within_budget=7))
    assert pas.consistency == pytest.approx(0.7)
    assert pas.details["consistency"]["latency_budget_ms"] == 20.0


def test_each_fault_alone_leaves_other_subscores_at_one() -> None:
    monitor = HealthMonitor()
    monitor.observe(0.0, healthy_rings(), healthy_workers(), EgressSample())
    pas = monitor.observe(1.0, healthy_rings(), healthy_workers(), EgressSample(messages=10, gaps=5))
    assert (pas.integrity, pas.stability, pas.symmetry) == (1.0, 1.0, 1.0)
    assert pas.consistency == 0.5
    assert pas.score == pytest.approx(0.875)
    assert pas.status == "warning"


# ---- a stalled stage: input waiting, no progress, heartbeats still fresh ---------------------


def _stall_run(seconds: int, consumer_state: str = "running") -> object:
    """Ring "a" holds 512 bytes its consumer w1 never reads, while every heartbeat stays fresh."""
    monitor = HealthMonitor(heartbeat_timeout_s=2.0)
    pas = None
    for t in range(seconds + 1):
        rings = [RingSample("a", header("a", write_cursor=512, read_cursor=0, records_written=1), consumer="w1")]
        workers = [worker("w0", processed=1), worker("w1", state=consumer_state)]
        pas = monitor.observe(float(t), rings, workers, EgressSample())
    return pas


def test_a_total_stall_does_not_score_healthy() -> None:
    pas = _stall_run(3)
    assert pas.status == "critical"
    assert pas.consistency == 0.0
    assert pas.details["stability"]["workers"]["w1"]["stalled"] is True
    assert pas.details["consistency"]["stalled_rings"] == {"a": 3.0}


def test_waiting_shorter_than_the_stall_time_is_not_a_stall() -> None:
    pas = _stall_run(1)
    assert pas.score == 1.0
    assert pas.details["consistency"]["stalled_rings"] == {}


def test_a_paused_consumer_is_not_stalled() -> None:
    # an operator's pause keeps records waiting on purpose
    pas = _stall_run(5, consumer_state="paused")
    assert pas.details["consistency"]["stalled_rings"] == {}


def test_a_consumer_that_keeps_reading_is_not_stalled() -> None:
    monitor = HealthMonitor(heartbeat_timeout_s=2.0)
    for t in range(6):
        rings = [
            RingSample("a", header("a", write_cursor=512 * (t + 1), read_cursor=512 * t, records_read=t), consumer="w1")
        ]
        pas = monitor.observe(float(t), rings, [worker("w1")], EgressSample())
    assert pas.score == 1.0
