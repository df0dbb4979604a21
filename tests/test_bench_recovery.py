"""`neuralpipe bench recovery` and `neuralpipe bench idle` as a user runs them: quick runs through the
CLI, the shape of their JSON, and that they leave nothing behind (the autouse fixture checks
processes and segments) and write no result file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ("detect", "respawn", "attach", "flowing")  # after the kill, in this order
DEFAULT_STEPS = ("detect", "respawn", "attach", "ready", "flowing")
PHASES = (*STEPS, "exit", "reap", "restart_delay", "worker_start", "first_batch")


def _bench(name: str, *options: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", name, "--quick", "--json", *options],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)  # one JSON object and nothing else on stdout


def _generated_files() -> dict[Path, float]:
    """What a full run would write, with mtimes: a quick run must touch none of it."""
    paths = [REPO / "docs" / "recovery.md", *(REPO / "bench" / "results").glob("*.json")]
    return {path: path.stat().st_mtime for path in paths if path.exists()}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _check_machine(result: dict[str, Any]) -> None:
    assert result["machine"]["cores"] >= 1
    assert len(result["load_before"]) == 3 and len(result["load_after"]) == 3


@pytest.mark.timeout(180)
def test_recovery_quick_times_each_kill_and_loses_nothing() -> None:
    before = _generated_files()
    result = _bench("recovery", "--topology", "test")
    _check_machine(result)
    assert "default" not in result
    kills = result["kills"]
    assert [k["worker"] for k in kills] == ["relay", "sink", "source"]
    for kill in kills:
        assert kill["new_pid"] != kill["old_pid"] and kill["new_pid"] > 0, kill
        times = [kill[f"{step}_ms"] for step in STEPS]
        assert all(map(_positive, times)) and times == sorted(times), kill
        assert 0 < kill["dead_ms"] < kill["attach_ms"], kill
    assert set(result["summary"]) == set(PHASES)
    for phase, stats in result["summary"].items():
        assert all(map(_number, stats.values())), (phase, stats)
        assert stats["median"] <= stats["p99"] <= stats["max"], (phase, stats)
        # the process is gone and its sentinel readable at about the same moment: only that
        # difference may come out negative, by the two wake-ups' jitter
        assert phase == "reap" or stats["median"] > 0, (phase, stats)
    assert [row["worker"] for row in result["by_worker"]] == ["relay", "sink", "source"]
    startup = result["startup"]
    assert _positive(startup["interpreter_ms"]) and _positive(startup["worker_imports_ms"])
    assert {"numpy", "engine.worker"} <= set(startup["import_ms"])
    assert all(map(_positive, startup["import_ms"].values()))
    sink = result["sink"]
    assert sink["messages"] > 0 and sink["gaps"] == 0 and sink["foreign"] == 0, sink
    assert result["restarts"] == {"source": 1, "relay": 1, "sink": 1}
    assert {t["target"] for t in result["targets"]} == {"detect p99", "flowing again p99", "sink gaps"}
    assert _generated_files() == before


@pytest.mark.timeout(180)
def test_recovery_quick_default_topology_times_each_role_and_loses_nothing() -> None:
    before = _generated_files()
    result = _bench("recovery", "--topology", "default")
    _check_machine(result)
    assert "kills" not in result  # the test topology's part did not run
    part = result["default"]
    kills = part["kills"]
    assert [k["worker"] for k in kills] == ["compute", "cache", "broadcast", "ingest"]
    for kill in kills:
        assert kill["new_pid"] != kill["old_pid"] and kill["new_pid"] > 0, kill
        assert all(_positive(kill[f"{step}_ms"]) for step in ("dead", *DEFAULT_STEPS)), kill
        # the runtime attaches its rings before the stage is set up; flowing is timed apart, by
        # the consumer
        assert kill["detect_ms"] <= kill["respawn_ms"] < kill["attach_ms"] <= kill["ready_ms"], kill
        assert kill["dead_ms"] < kill["ready_ms"], kill
    assert "backend" in kills[0] and "wgpu_loaded" in kills[0]  # what the restarted compute chose and loaded
    assert [row["worker"] for row in part["by_role"]] == ["compute", "cache", "broadcast", "ingest"]
    for row in part["by_role"]:
        assert row["kills"] == 1
        for step in DEFAULT_STEPS:
            assert row[f"{step}_p50_ms"] <= row[f"{step}_p99_ms"], row
    assert [row["worker"] for row in part["startup"]] == ["ingest", "compute", "cache", "broadcast"]
    assert all(_positive(row["imports_ms"]) and "engine.worker" in row["import_ms"] for row in part["startup"])
    check = part["check"]
    # every accepted stream came complete, in order, each row once, or ended by an explicit error
    # row (the streams open in the killed ingest); none ended at the client, none still open
    assert check["submitted"] > 0 and check["ended"] > 0 and check["tokens"] > 0, check
    for key in ("never_seen", "open", "synthetic_errors", "incomplete", "gaps", "repeats", "rows_after_end"):
        assert check[key] == 0, (key, check)
    assert check["ended"] + check["errors"] == check["streams"] >= check["submitted"], check
    assert part["restarts"] == {"ingest": 1, "compute": 1, "cache": 1, "broadcast": 1}
    assert [t["target"] for t in part["targets"]] == [
        "detect p99 (every kill)",
        "flowing again p99 (compute, cache, broadcast)",
        "flowing again p99 (ingest)",
        "streams lost or with a gap/repeat",
    ]
    assert _generated_files() == before


@pytest.mark.timeout(180)
def test_idle_quick_measures_every_process_and_check() -> None:
    before = _generated_files()
    result = _bench("idle")
    _check_machine(result)
    assert [(e["workers"], e["rings"]) for e in result["engines"]] == [(3, 2), (13, 12)]
    for engine in result["engines"]:
        rows = {row["process"]: row for row in engine["processes"]}
        workers = {"source", "relay", "sink"} | {f"relay{i}" for i in range(2, engine["workers"] - 1)}
        assert {"supervisor", "workers (all)", "engine (all)"} | workers <= set(rows)
        for row in rows.values():
            assert all(_number(row[key]) and row[key] >= 0 for key in ("cpu_s", "cpu_pct", "wakeups_per_s")), row
        assert all(rows[name]["pid"] > 0 for name in {"supervisor"} | workers)
        assert _positive(rows["supervisor"]["wakeups_per_s"])  # heartbeats go on while idle
    check = result["check"]
    assert check["rings"] == 12 and check["runs"] == 3
    assert all(map(_positive, [*check["wall_ms"].values(), *check["elapsed_ms"].values()])), check
    assert check["statuses"] == ["healthy"]
    default = {row["process"]: row for row in result["default_topology"]["processes"]}
    assert {"supervisor", "ingest", "compute", "cache", "broadcast", "workers (all)"} <= set(default)
    assert [t["target"] for t in result["targets"]] == [
        "idle supervisor CPU, 3 workers",
        "idle supervisor CPU, 13 workers",
        "idle workers CPU, default topology (all together)",
        "check wall time (max)",
    ]
    assert _generated_files() == before
