"""Shared by the tests of engine/monitoring and notifications: the metric names the engine can expose, the
metric names a PromQL expression reads, promtool's verdict on a list of expressions, and repeated kills
of a worker of a running engine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import yaml
from engine_harness import wait_for
from prometheus_client.parser import text_string_to_metric_families

from engine.health import EgressSample, HealthMonitor, RingSample, WorkerSample
from engine.metrics import EngineMetrics
from engine.telemetry import METRICS
from shm.naming import segment_name
from shm.ring import Ring

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "engine" / "monitoring"
RULE_FILES = (MONITORING / "recording.yml", MONITORING / "alerts.yml")

# a metric name on its own: not part of a recorded name (level:metric:operations) or a longer word
_METRIC_NAME = re.compile(r"(?<![\w:])neuralpipe_\w+(?![\w:])")
_NOT_WORD = re.compile(r"\W")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def known_metric_names(instance: str) -> set[str]:
    """Every sample name the engine's /metrics can carry: the supervisor's own families (from a
    rendered snapshot with a ring, a worker and a PAS) and every Telemetry metric of contract A."""
    ring = Ring.create(segment_name(instance, "a-b"), capacity=4096)
    try:
        rings = [RingSample("a-b", ring.header())]
    finally:
        ring.destroy()
    workers = [WorkerSample("w", "stage", "running", True, 0, 0.1, 0)]
    metrics = EngineMetrics(instance)
    metrics.update(rings, workers, HealthMonitor().observe(0.0, rings, workers, EgressSample()), {"w": {"k": "v"}})
    names = {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    for name, spec in METRICS.items():
        names.update(name + s for s in _HISTOGRAM_SUFFIXES) if spec.kind == "histogram" else names.add(name)
    return names


def metrics_read_by(expr: str) -> set[str]:
    """The engine metric names an expression reads (recorded series, level:metric:op, excluded)."""
    return set(_METRIC_NAME.findall(expr))


# What Grafana substitutes before a dashboard query reaches Prometheus (the values the tests use)
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$engine": ".*"}


def grafana_expr(expr: str) -> str:
    """A dashboard expression as Prometheus receives it from Grafana (variables substituted)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable left in {expr!r}"
    return expr


def dashboard_queries(board: dict) -> dict[str, str]:
    """ "panel title refId" -> expression, for every panel's targets."""
    return {
        f"{panel['title']} {target['refId']}": target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets") or []
    }


def rule_groups() -> list[dict]:
    return [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False)


def check_expressions(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool's parse of each expression, written as a recording rule named after its key."""
    rules = [{"record": f"check:{_NOT_WORD.sub('_', key)}:{i}", "expr": e} for i, (key, e) in enumerate(exprs.items())]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return promtool("check", "rules", str(path))


def kill_until_restarted(engine, worker: str, times: int) -> None:
    """SIGKILL ``worker`` of a running engine (tests/engine_harness.py) ``times`` times, each time
    waiting until the supervisor has started its next incarnation."""
    for _ in range(times):
        before = wait_for(lambda: (w := engine.worker(worker))["pid"] and w, 15, f"{worker} to run")
        os.kill(before["pid"], signal.SIGKILL)
        wait_for(
            lambda b=before: (w := engine.worker(worker))["incarnation"] > b["incarnation"] and w["pid"],
            15,
            f"{worker} restarted",
        )
