"""``neuralpipe bench pipeline``: the quick run end to end through the CLI (a real engine over each
transport, a consumer that must receive every token, one JSON object in the issue's shape), and
the figures of a step, the sweep and the targets from given inputs. Never a speed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
from neuralpipe_bench import pipeline

REPO = Path(__file__).resolve().parent.parent
ENGINE = {"supervisor", "ingest", "compute", "cache", "broadcast"}


def _results_files() -> dict[Path, float]:
    """What a full run writes, with mtimes: a quick run must touch none of it."""
    paths = [REPO / "docs" / "benchmarks.md", *(REPO / "bench" / "results").glob("pipeline*.json")]
    return {path: path.stat().st_mtime for path in paths if path.exists()}


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "pipeline", *args], capture_output=True, text=True, timeout=110
    )


@pytest.mark.timeout(120)
def test_quick_json_measures_every_transport_and_process() -> None:
    before = _results_files()
    out = _bench("--quick", "--json")
    assert out.returncode == 0, out.stderr[-4000:]
    result = orjson.loads(out.stdout)  # one JSON object and nothing else on stdout
    assert result["benchmark"] == "pipeline" and result["settings"]["mode"] == "sweep"
    assert Path(result["engine_source"]) == REPO / "engine"
    rows = result["rows"]
    assert [(r["transport"], r["offered_tokens_per_s"]) for r in rows] == [
        (t, pipeline.QUICK.ladder[0]) for t in pipeline.TRANSPORTS
    ]
    for row in rows:
        assert row["streams"] == pipeline.QUICK.streams
        assert row["missing"] == 0 and row["stream_errors"] == 0, row  # every token of every stream came
        assert row["delivered_tokens_per_s"] > 0 and row["ingested_tokens_per_s"] > 0, row
        assert row["delivered_ratio"] == pytest.approx(
            row["delivered_tokens_per_s"] / row["offered_tokens_per_s"], 1e-3
        )
        assert row["p999_us"] >= row["p99_us"] >= row["p50_us"] > 0, row
        by_process = row["cpu_us_per_token_by_process"]
        assert ENGINE | {"upstream", "consumer"} <= set(by_process), by_process
        assert all(math.isfinite(v) and v >= 0 for v in by_process.values()), by_process
        engine = sum(v for name, v in by_process.items() if name not in ("upstream", "consumer"))
        assert row["engine_cpu_us_per_token"] == pytest.approx(engine, abs=0.05)
        assert by_process["ingest"] > 0 and by_process["broadcast"] > 0, by_process  # they did the work
        assert isinstance(row["held"], bool)
    assert set(result["saturation_tokens_per_s"]) == set(pipeline.TRANSPORTS)
    assert len(result["targets"]) == 5 and all(t["met"] in (True, False, None) for t in result["targets"])
    assert _results_files() == before


PINNABLE = len(os.sched_getaffinity(0)) >= 2  # --pin puts ingest and the compute chain on CPUs of their own


@pytest.mark.timeout(60)
def test_one_targeted_step() -> None:
    out = _bench(
        "--offered",
        "500",
        "--streams",
        "5",
        "--duration",
        "2",
        "--transport",
        "shm",
        "--flush-ms",
        "1",
        *(("--pin",) if PINNABLE else ()),
        "--sched-policy",
        "normal",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = orjson.loads(out.stdout)
    assert result["settings"]["mode"] == "targeted" and result["settings"]["flush_ms"] == 1
    assert result["settings"]["pin"] == PINNABLE and result["settings"]["sched_policy"] == "normal"
    [row] = result["rows"]
    assert (row["transport"], row["offered_tokens_per_s"], row["streams"]) == ("shm", 500, 5)
    assert row["tokens_per_stream"] == 200 and row["missing"] == 0
    assert result["saturation_tokens_per_s"] == {"shm": None}  # one step finds no saturation point


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--transport", "pipe"), "unknown transport"),
        (("--offered", "0"), "offered tokens/s must be"),
        (("--offered", "100", "--streams", "0"), "streams must be"),
        (("--offered", "100", "--duration", "0.5"), "duration must exceed"),
        (("--offered", "10", "--streams", "100"), "too few tokens"),
        (("--flush-ms", "500"), "--flush-ms"),
    ],
)
def test_bad_options_are_refused_before_any_engine_starts(args: tuple[str, ...], complaint: str) -> None:
    out = _bench("--quick", *args)
    assert out.returncode == 2 and complaint in out.stderr, out.stderr


def _step(offered: float, late: int = 0, latency_ns: int = 1_000_000, errors: int = 0) -> dict:
    """A step's row from synthetic tokens: ``offered`` tokens/s evenly from 0.1 s before a 2 s
    window to 0.1 s after it, each arriving ``latency_ns`` after ingest stamped it; the ``late``
    last ones stamped in the window arrive after it."""
    start, end = 10**12, 10**12 + 2 * 10**9
    recv = np.arange(start - 10**8, end + 10**8, 1e9 / offered).astype(np.int64)
    arrival = recv + latency_ns
    if late:
        arrival[np.nonzero(recv < end)[0][-late:]] = end + 1
    load = pipeline.Load("shm", offered, 10, len(recv) // 10)
    cpu_s = {"supervisor": 0.01, "ingest": 0.1, "upstream": 0.2, "consumer": 0.3}
    counts = {"ended": 10 - errors, "errors": errors}
    return pipeline.row(load, (start, end), recv, arrival, counts, cpu_s, ["supervisor", "ingest"])


def test_row_figures_over_the_window() -> None:
    row = _step(1000.0)  # 2,000 tokens, all within 1 ms
    assert row["delivered_tokens_per_s"] == 1000 and row["delivered_ratio"] == 1.0
    assert row["p50_us"] == row["p99_us"] == 1000.0 and row["missing"] == 0 and row["held"]
    # CPU seconds / tokens delivered in the window; the engine sums only its own processes
    assert row["cpu_us_per_token_by_process"] == {
        "supervisor": 5.0,
        "ingest": 50.0,
        "upstream": 100.0,
        "consumer": 150.0,
    }
    assert row["engine_cpu_us_per_token"] == 55.0
    assert row["cpu_percent_by_process"] == {"supervisor": 0.5, "ingest": 5.0, "upstream": 10.0, "consumer": 15.0}


def test_row_does_not_hold_when_short_or_slow() -> None:
    assert not _step(1000.0, late=30)["held"]  # 98.5 % delivered in the window
    assert _step(1000.0, late=20)["held"]  # 99 %
    assert not _step(1000.0, latency_ns=11_000_000)["held"]  # p99 11 ms
    assert not _step(1000.0, errors=1)["held"]  # a stream the engine ended with an error


@pytest.mark.parametrize(
    ("capacity", "tried", "saturation"),
    [
        (26_000.0, [2_500, 5_000, 10_000, 20_000, 30_000, 25_000], 25_000),  # up the ladder, then halfway back
        (1_000.0, [2_500, 1_250, 625, 900], 900),  # below the ladder: halved until a step holds
        (100.0, [2_500, 1_250, 625, 312.5], None),  # at most three halvings
    ],
)
def test_sweep_finds_the_highest_load_that_holds(
    monkeypatch: pytest.MonkeyPatch, capacity: float, tried: list[float], saturation: float | None
) -> None:
    offered = _fake_steps(monkeypatch, lambda rate, attempt: rate <= capacity)
    rows = pipeline.sweep("shm", replace(pipeline.FULL, retries=0, always=(), target_runs=1), progress=False)
    assert offered == tried
    assert [r["offered_tokens_per_s"] for r in rows] == sorted(tried)
    assert pipeline.saturation(rows, "shm") == saturation
    assert pipeline.saturation(rows, "queue") is None


def test_sweep_retries_a_step_that_failed_and_runs_the_targets_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2,500 fails once (a neighbour's spike), then holds; 5,000 fails twice: the ladder stops there
    offered = _fake_steps(monkeypatch, lambda rate, attempt: rate < 5_000 and (rate, attempt) != (2_500, 0))
    rows = pipeline.sweep("shm", pipeline.FULL, progress=False)
    assert offered == [2_500, 2_500, 5_000, 5_000, 3_800, 10_000]  # then halfway; the targets' 10k once
    assert pipeline.saturation(rows, "shm") == 3_800
    assert [r["held"] for r in rows] == [False, True, True, False, False, False]


def test_sweep_runs_the_targets_load_three_times_when_it_holds_and_targets_take_the_median(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offered = _fake_steps(monkeypatch, lambda rate, attempt: rate <= 26_000)
    rows = pipeline.sweep("shm", pipeline.FULL, progress=False)
    assert offered == [2_500, 5_000, 10_000, 20_000, 30_000, 30_000, 25_000, 10_000, 10_000]
    assert pipeline.saturation(rows, "shm") == 25_000
    assert pipeline.sweep("queue", pipeline.FULL, progress=False)  # one run at each load elsewhere
    assert offered[9:].count(10_000) == 1

    at_target = [
        _step(pipeline.TARGET_LOAD) | {"streams": pipeline.STREAMS, "engine_cpu_us_per_token": cpu}
        for cpu in (44.0, 38.0, 39.0)
    ]
    result = {"rows": at_target, "saturation_tokens_per_s": {"shm": None}, "ratios": []}
    engine = next(t for t in pipeline.targets(result) if t["target"].startswith("engine CPU"))
    assert engine["value"] == 39.0 and engine["met"] and "median of 3 runs" in engine["target"]


def _fake_steps(monkeypatch: pytest.MonkeyPatch, holds: Callable[[float, int], bool]) -> list[float]:
    """run_step replaced by ``holds(offered, attempt at that rate)``; the offered rates run, in order."""
    offered: list[float] = []

    def fake_step(load: pipeline.Load, settings: pipeline.Settings) -> dict:
        held = holds(load.offered, offered.count(load.offered))
        offered.append(load.offered)
        return {"transport": load.transport, "offered_tokens_per_s": load.offered, "held": held}

    monkeypatch.setattr(pipeline, "run_step", fake_step)
    return offered


def test_targets_from_rows() -> None:
    row = _step(pipeline.TARGET_LOAD) | {"streams": pipeline.STREAMS}
    saturations = {"shm": 40_000.0, "queue": 32_000.0, "zmq": None}
    result = {"rows": [row], "saturation_tokens_per_s": saturations, "ratios": pipeline.ratios(saturations, set())}
    assert result["ratios"] == [{"versus": "queue", "shm_over": 1.25, "lower_bound": False}]
    # delivered 100 %, p99 1 ms, engine 5.5 µs/token, saturation 40k; 1.25x the Queue (< 1.5x)
    assert [t["met"] for t in pipeline.targets(result)] == [True, True, True, True, False]
    none = pipeline.targets({"rows": [], "saturation_tokens_per_s": {"shm": None}, "ratios": []})
    assert [t["met"] for t in none] == [None] * 5


def test_a_saturation_above_the_ladder_is_a_lower_bound() -> None:
    # the rings held at the ladder's top: their ratio over Queue is at least the one measured;
    # over a transport that held there too it is unknown
    top = pipeline.FULL.ladder[-1]
    saturations = {"shm": top, "queue": top / 2, "zmq": top}
    ratios = pipeline.ratios(saturations, {"shm", "zmq"})
    assert ratios == [{"versus": "queue", "shm_over": 2.0, "lower_bound": True}]
    result = {"saturation_tokens_per_s": saturations, "saturation_above_ladder": ["shm", "zmq"], "ratios": ratios}
    shown = {r["transport"]: (r["saturation"], r["shm_over"]) for r in pipeline._saturation_rows(result)}
    assert shown == {
        "shm": (f">= {top:,.0f}", ""),
        "queue": (f"{top / 2:,.0f}", ">= 2.00"),
        "zmq": (f">= {top:,.0f}", ""),
    }
