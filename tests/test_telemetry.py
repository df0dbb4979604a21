"""engine/telemetry.py: the registry, recording, bounds, snapshots and the supervisor's merge."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest

from engine.telemetry import (
    MAX_LABEL_CHARS,
    MAX_SERIES,
    METRICS,
    OTHER,
    Telemetry,
    WorkerTotals,
    check_snapshot,
    merge,
    quantile,
    values_of,
)

LATENCY = "neuralpipe_stage_latency_seconds"
TOKENS = "neuralpipe_tokens_total"


def test_registry_has_every_metric_of_the_contract() -> None:
    wanted = {
        "neuralpipe_tokens_total": ("counter", ("stage",)),
        "neuralpipe_streams_total": ("counter", ("outcome",)),
        "neuralpipe_streams_active": ("gauge", ()),
        "neuralpipe_stage_latency_seconds": ("histogram", ("stage",)),
        "neuralpipe_time_to_first_token_seconds": ("histogram", ("upstream",)),
        "neuralpipe_upstream_up": ("gauge", ("upstream",)),
        "neuralpipe_upstream_requests_total": ("counter", ("upstream",)),
        "neuralpipe_upstream_errors_total": ("counter", ("upstream", "kind")),
        "neuralpipe_upstream_in_flight": ("gauge", ("upstream",)),
        "neuralpipe_cache_hits_total": ("counter", ()),
        "neuralpipe_cache_misses_total": ("counter", ()),
        "neuralpipe_cache_evictions_total": ("counter", ()),
        "neuralpipe_cache_bytes": ("gauge", ()),
        "neuralpipe_cache_entries": ("gauge", ()),
        "neuralpipe_broadcast_subscribers": ("gauge", ()),
        "neuralpipe_broadcast_messages_total": ("counter", ()),
        "neuralpipe_broadcast_drops_total": ("counter", ()),
        "neuralpipe_broadcast_gap_refills_total": ("counter", ()),
        "neuralpipe_worker_cpu_seconds_total": ("counter", ("worker",)),
        "neuralpipe_worker_resident_memory_bytes": ("gauge", ("worker",)),
        "neuralpipe_build_info": ("gauge", ("version", "python")),
        "neuralpipe_worker_info": ("gauge", ("worker", "stage")),
        "neuralpipe_gateway_requests_total": ("counter", ("endpoint", "code")),
        "neuralpipe_gateway_request_duration_seconds": ("histogram", ("endpoint",)),
        "neuralpipe_gateway_time_to_first_token_seconds": ("histogram", ()),
        "neuralpipe_gateway_active_streams": ("gauge", ()),
        "neuralpipe_gateway_send_timeouts_total": ("counter", ()),
        "neuralpipe_gateway_backlog_tokens": ("gauge", ()),
        "neuralpipe_gateway_whole_answer_bytes": ("gauge", ()),
        "neuralpipe_gateway_cut_total": ("counter", ("bound",)),
        "neuralpipe_gateway_key_requests_total": ("counter", ("key",)),
        "neuralpipe_gateway_key_tokens_total": ("counter", ("key", "kind")),
        "neuralpipe_gateway_limited_total": ("counter", ("key", "reason")),
    }
    assert {name: (m.kind, m.labels) for name, m in METRICS.items()} == wanted
    for name, metric in METRICS.items():
        assert metric.help.endswith(".") and "engine" not in metric.labels, name
        assert not any(label in ("stream", "stream_id", "sid") for label in metric.labels), name


def test_unknown_name_kind_or_labels_raise_at_once() -> None:
    t = Telemetry()
    with pytest.raises(KeyError, match="neuralpipe_token_total"):
        t.count("neuralpipe_token_total", stage="ingest")
    with pytest.raises(TypeError, match="counter"):
        t.set(TOKENS, 1, stage="ingest")
    with pytest.raises(ValueError, match="labels"):
        t.count(TOKENS, 1)
    with pytest.raises(ValueError, match="labels"):
        t.count(TOKENS, 1, stage="ingest", stream="7")
    with pytest.raises(ValueError, match="labels"):
        t.count(TOKENS, 1, stag="ingest")
    with pytest.raises(ValueError, match="only go up"):
        t.count(TOKENS, -1, stage="ingest")
    with pytest.raises(ValueError, match="only go up"):
        t.count(TOKENS, float("nan"), stage="ingest")
    with pytest.raises(ValueError, match="finite"):
        t.set("neuralpipe_cache_bytes", float("inf"))
    with pytest.raises(ValueError, match="finite"):
        t.observe(LATENCY, float("nan"), stage="compute")
    with pytest.raises(ValueError, match="finite"):
        t.observe(LATENCY, np.array([0.1, np.nan]), stage="compute")
    assert t.snapshot() == {}


def test_counts_gauges_and_histograms() -> None:
    t = Telemetry()
    t.count(TOKENS, 5, stage="ingest")
    t.count(TOKENS, 7, stage="ingest")
    t.count("neuralpipe_cache_hits_total")
    t.set("neuralpipe_streams_active", 3)
    t.set("neuralpipe_streams_active", 2)
    t.observe(LATENCY, 0.002, stage="compute")  # one float
    t.observe(LATENCY, np.array([0.0001, 0.5, 100.0, 0.0]), stage="compute")  # bounds are `le`
    now = time.monotonic_ns()
    t.observe_since_ns(LATENCY, np.array([now - 3_000_000] * 4, dtype=np.int64), now, stage="cache")
    t.observe_since_ns(LATENCY, np.array([], dtype=np.int64), now, stage="broadcast")  # nothing: no series
    snap = t.snapshot()
    assert check_snapshot(snap) is None
    assert json.loads(json.dumps(snap)) == snap
    assert snap[TOKENS] == [["ingest", 12.0]]
    assert snap["neuralpipe_cache_hits_total"] == [[1.0]]
    assert snap["neuralpipe_streams_active"] == [[2.0]]
    buckets = METRICS[LATENCY].buckets
    compute = dict((row[0], row[1]) for row in snap[LATENCY])["compute"]
    assert len(compute) == len(buckets) + 2 and sum(compute[:-1]) == 5
    assert compute[buckets.index(0.0001)] == 2  # 0.0 and 0.0001 (<= the first bound)
    assert compute[buckets.index(0.0025)] == 1 and compute[buckets.index(0.5)] == 1
    assert compute[len(buckets)] == 1  # 100 s: above every bound
    assert compute[-1] == pytest.approx(100.5021)
    cache = dict((row[0], row[1]) for row in snap[LATENCY])["cache"]
    assert cache[buckets.index(0.005)] == 4 and cache[-1] == pytest.approx(0.012)
    assert "broadcast" not in dict((row[0], row[1]) for row in snap[LATENCY])


def test_total_follows_a_running_count_and_never_goes_back() -> None:
    t = Telemetry()
    t.total("neuralpipe_cache_hits_total", 5)
    t.total("neuralpipe_cache_hits_total", 9)
    t.total("neuralpipe_cache_hits_total", 3)  # lower: ignored
    t.count("neuralpipe_cache_hits_total", 1)
    assert t.snapshot()["neuralpipe_cache_hits_total"] == [[10.0]]
    with pytest.raises(TypeError, match="gauge"):
        t.total("neuralpipe_cache_bytes", 1)


def test_label_values_are_bounded_and_fold_into_other() -> None:
    t = Telemetry()
    bound = METRICS["neuralpipe_gateway_key_requests_total"].max_values
    for i in range(bound + 50):
        t.count("neuralpipe_gateway_key_requests_total", key=f"key-{i}")
    t.count("neuralpipe_gateway_key_requests_total", key="key-0")  # a known value keeps its series
    t.count(TOKENS, 1, stage="x" * 1000)  # a long value is cut
    snap = t.snapshot()
    rows = {row[0]: row[1] for row in snap["neuralpipe_gateway_key_requests_total"]}
    assert len(rows) == bound + 1 and rows[OTHER] == 50 and rows["key-0"] == 2
    assert snap[TOKENS] == [["x" * MAX_LABEL_CHARS, 1.0]]
    assert check_snapshot(snap) is None


def test_the_series_of_a_metric_are_bounded_whatever_its_labels_product() -> None:
    t = Telemetry()
    for endpoint in range(32):
        for code in range(32):
            t.count("neuralpipe_gateway_requests_total", endpoint=f"e{endpoint}", code=str(code))
    rows = t.snapshot()["neuralpipe_gateway_requests_total"]
    assert len(rows) == MAX_SERIES and rows[-1] == [OTHER, OTHER, 32 * 32 - (MAX_SERIES - 1)]
    assert check_snapshot(t.snapshot()) is None


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"neuralpipe_nope_total": [["a", 1]]},
        {"neuralpipe_worker_cpu_seconds_total": [["w", 1]]},  # the supervisor's own: not from a worker
        {TOKENS: "x"},
        {TOKENS: [["ingest"]]},
        {TOKENS: [[1, 1]]},
        {TOKENS: [["ingest", -1]]},
        {TOKENS: [["ingest", "1"]]},
        {TOKENS: [["ingest", float("inf")]]},
        {TOKENS: [["y" * (MAX_LABEL_CHARS + 1), 1]]},
        {TOKENS: [["s", 1]] * 10_000},
        {LATENCY: [["compute", [1, 2, 3]]]},
        {LATENCY: [["compute", [-1] * (len(METRICS[LATENCY].buckets) + 2)]]},
    ],
)
def test_check_snapshot_refuses_what_a_worker_must_not_send(bad) -> None:
    assert check_snapshot(bad)


def test_counters_survive_a_restart_and_gauges_end_with_the_process() -> None:
    first = Telemetry()
    first.count(TOKENS, 100, stage="compute")
    first.set("neuralpipe_cache_entries", 9)
    first.observe(LATENCY, np.array([0.001, 0.001]), stage="compute")
    totals = WorkerTotals()
    totals.update(first.snapshot())
    first.count(TOKENS, 50, stage="compute")
    totals.update(first.snapshot())  # cumulative: replaces, never adds
    assert totals.totals()[TOKENS] == {("compute",): 150.0}
    totals.end_incarnation()  # the process died
    assert "neuralpipe_cache_entries" not in totals.totals()
    second = Telemetry()  # the restarted worker counts from zero
    second.count(TOKENS, 7, stage="compute")
    second.observe(LATENCY, 0.001, stage="compute")
    totals.update(second.snapshot())
    after = totals.totals()
    assert after[TOKENS] == {("compute",): 157.0}
    counts, _ = after[LATENCY][("compute",)]
    assert sum(counts) == 3
    totals.end_incarnation()
    totals.end_incarnation()  # twice (no heartbeat in between): nothing counted twice
    assert totals.totals()[TOKENS] == {("compute",): 157.0}


def test_merge_sums_workers_and_takes_the_max_of_up() -> None:
    a, b = Telemetry(), Telemetry()
    a.count(TOKENS, 3, stage="compute")
    b.count(TOKENS, 4, stage="compute")
    a.set("neuralpipe_upstream_up", 0, upstream="u")
    b.set("neuralpipe_upstream_up", 1, upstream="u")
    a.set("neuralpipe_upstream_in_flight", 2, upstream="u")
    b.set("neuralpipe_upstream_in_flight", 5, upstream="u")
    merged = merge([values_of(a.snapshot()), values_of(b.snapshot())])
    assert merged[TOKENS] == {("compute",): 7.0}
    assert merged["neuralpipe_upstream_up"] == {("u",): 1.0}
    assert merged["neuralpipe_upstream_in_flight"] == {("u",): 7.0}


def test_quantile_interpolates_like_histogram_quantile() -> None:
    metric = METRICS[LATENCY]
    t = Telemetry()
    assert quantile(metric, ((0,) * (len(metric.buckets) + 1), 0.0), 0.5) is None
    t.observe(LATENCY, np.full(10, 0.003), stage="compute")  # all in (0.0025, 0.005]
    value = values_of(t.snapshot())[LATENCY][("compute",)]
    assert 0.0025 < quantile(metric, value, 0.5) <= 0.005
    t.observe(LATENCY, np.full(1000, 1000.0), stage="compute")
    assert quantile(metric, values_of(t.snapshot())[LATENCY][("compute",)], 0.99) == metric.buckets[-1]


def test_every_metric_is_documented(instance: str) -> None:
    """docs/observability.md names every metric of the registry and every family /metrics has."""
    from prometheus_client.parser import text_string_to_metric_families

    from engine.health import EgressSample, HealthMonitor, RingSample, WorkerSample
    from engine.metrics import EngineMetrics
    from shm.naming import segment_name
    from shm.ring import Ring

    docs = (pathlib.Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    ring = Ring.create(segment_name(instance, "a-b"), capacity=4096)
    try:
        rings = [RingSample("a-b", ring.header())]
    finally:
        ring.destroy()
    workers = [WorkerSample("w", "g", "running", True, 0, 0.1, 0)]
    metrics = EngineMetrics(instance)
    metrics.update(rings, workers, HealthMonitor().observe(0.0, rings, workers, EgressSample()), {"w": {"stage": "x"}})
    exposed = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        exposed |= {s.name for s in family.samples} | {family.name}
    names = {n.removesuffix("_total") for n in exposed} | {n.removesuffix("_total") for n in METRICS}
    missing = sorted(n for n in names if f"`{n}`" not in docs and f"`{n}_total`" not in docs)
    assert not missing, missing


@pytest.mark.parametrize(
    ("faults", "kind"),
    [("status=500", "http"), ("disconnect_after=2", "protocol"), ("first_byte_delay_ms=2000", "timeout")],
)
def test_the_pool_counts_requests_errors_by_kind_and_time_to_first_token(faults: str, kind: str) -> None:
    """Per upstream, over real HTTP: u0 refuses connections, u1 fails with the embedded upstream's
    fault, u2 answers; round robin tries them in that order (a deterministic request is re-issued)."""
    from test_pool import CHAT, collect, run, servers

    from stages.ingest.pool import PoolPolicy, UpstreamPool

    async def scenario(telemetry: Telemetry) -> list:
        async with servers({}, {"faults": faults}, {}) as ups:
            policy = PoolPolicy(
                strategy="round_robin",
                health_interval_s=60,
                health_timeout_s=0.3,
                first_token_timeout_s=0.5,
                mid_stream="reissue",
            )
            pool = UpstreamPool([u for _, u in ups], policy, telemetry=telemetry)
            await pool.start()
            await ups[0][0].stop()
            try:
                for upstream in pool._upstreams:  # the start-up health check saw u1's fault too: in rotation
                    upstream.healthy = True
                return await collect(pool, CHAT, deterministic=True)
            finally:
                await pool.close()

    telemetry = Telemetry()
    events = run(scenario(telemetry))
    assert events[-1].kind == "end" and sum(e.kind == "token" for e in events) == CHAT["max_tokens"]
    found = values_of(telemetry.snapshot())
    assert found["neuralpipe_upstream_requests_total"] == {("u0",): 1.0, ("u1",): 1.0, ("u2",): 1.0}
    errors = found["neuralpipe_upstream_errors_total"]
    assert errors == {("u0", "connect"): 1.0, ("u1", kind): 1.0}, errors
    ttft = {key: sum(counts) for key, (counts, _) in found["neuralpipe_time_to_first_token_seconds"].items()}
    assert ttft == ({("u1",): 1, ("u2",): 1} if kind == "protocol" else {("u2",): 1})
