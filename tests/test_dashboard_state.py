"""The dashboard's numbers from the supervisor's /metrics (stages/gateway/dashboard_state.py): the
exposition rendered by the engine's own EngineMetrics from telemetry values, rates and latency
quantiles over the window, and a window that began before the first observation."""

from __future__ import annotations

from engine.metrics import EngineMetrics
from engine.telemetry import METRICS, quantile
from stages.gateway.dashboard_state import LATENCY, DashboardState, Sample, buckets, parse_metrics

N_BUCKETS = len(METRICS[LATENCY].buckets) + 1


def exposition(tokens: float, latency_counts: tuple[float, ...] | None, cpu: float) -> str:
    """What the supervisor's /metrics serves for these telemetry values."""
    values = {
        "neuralpipe_tokens_total": {("broadcast",): tokens, ("ingest",): tokens / 2},
        "neuralpipe_worker_cpu_seconds_total": {("compute",): cpu},
        "neuralpipe_worker_resident_memory_bytes": {("compute",): 1 << 20},
    }
    if latency_counts is not None:
        values[LATENCY] = {("broadcast",): (latency_counts, 0.01 * sum(latency_counts))}
    metrics = EngineMetrics("dash-test")
    metrics.update([], [], None, {}, values)
    return metrics.render().decode()


def sampler(*texts_at: tuple[float, str]) -> DashboardState:
    state = DashboardState("/nonexistent", health=None)
    for at, text in texts_at:
        state.samples.append(Sample(at, parse_metrics(text)))
    return state


def test_only_the_metrics_shown_are_parsed_and_buckets_come_back_per_bucket():
    counts = (0, 1, 2, 3) + (0,) * (N_BUCKETS - 5) + (4,)
    text = exposition(100, counts, 1.0) + "other_metric 5\n"
    parsed = parse_metrics(text)
    assert "other_metric" not in parsed and "neuralpipe_tokens_total" in parsed
    assert buckets(parsed, LATENCY, stage="broadcast") == tuple(float(c) for c in counts)
    assert buckets(parsed, LATENCY, stage="compute") is None


def test_rates_and_quantiles_are_over_the_window():
    early = (0, 10) + (0,) * (N_BUCKETS - 2)
    late = (0, 10, 0, 0, 0, 0, 50) + (0,) * (N_BUCKETS - 7)
    state = sampler((10.0, exposition(100, early, 1.0)), (12.0, exposition(1100, late, 1.5)))
    assert state._rates("neuralpipe_tokens_total", "stage") == {"broadcast": 500.0, "ingest": 250.0}
    assert state._rates("neuralpipe_worker_cpu_seconds_total", "worker") == {"compute": 0.25}
    # only the window's 50 new rows count: all in bucket 6, the 10 older fast ones do not
    window = (0.0,) * 6 + (50.0,) + (0.0,) * (N_BUCKETS - 7)
    assert state._latency(0.5) == quantile(METRICS[LATENCY], (window, 0.0), 0.5)
    assert METRICS[LATENCY].buckets[5] < state._latency(0.5) <= METRICS[LATENCY].buckets[6]


def test_a_window_that_began_before_the_first_row_still_gives_quantiles():
    late = (0, 0, 0, 8) + (0,) * (N_BUCKETS - 4)
    state = sampler((10.0, exposition(0, None, 1.0)), (11.0, exposition(8, late, 1.0)))
    assert state._latency(0.99) is not None
    assert state._latency(0.99) <= METRICS[LATENCY].buckets[3]


def test_no_rates_from_one_sample_and_none_without_rows():
    same = (0, 3) + (0,) * (N_BUCKETS - 2)
    assert sampler((1.0, exposition(5, same, 1.0)))._rates("neuralpipe_tokens_total", "stage") == {}
    state = sampler((1.0, exposition(5, same, 1.0)), (2.0, exposition(5, same, 1.0)))
    assert state._latency(0.5) is None
