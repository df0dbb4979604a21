"""The Grafana dashboard: engine/monitoring/dashboard.json is what tools/make_dashboard.py generates, has
the rows an operator needs, and every PromQL expression in it and in the rules parses (promtool) and
reads only metrics the engine exposes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from monitoring_helpers import (
    MONITORING,
    REPO,
    check_expressions,
    dashboard_queries,
    grafana_expr,
    known_metric_names,
    metrics_read_by,
    rule_groups,
)

DASHBOARD = MONITORING / "dashboard.json"
ROWS = ["Overview", "Workers", "Rings", "Upstreams", "Cache", "Broadcast", "Gateway"]


@pytest.fixture(scope="module")
def board() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_committed_json_is_what_the_generator_writes() -> None:
    generated = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_dashboard.py"), "--stdout"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert generated == DASHBOARD.read_text(), "run: python3 tools/make_dashboard.py"


def test_rows_and_panels(board: dict) -> None:
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ROWS
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    assert len({p["title"] for p in board["panels"]}) == len(board["panels"])  # queries are found by title
    for panel in panels:
        assert panel["targets"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert all('engine=~"$engine"' in t["expr"] for t in panel["targets"]), panel["title"]
    exprs = " ".join(dashboard_queries(board).values())
    for needed in ("neuralpipe_pas_score", "neuralpipe_pas_subscore", "neuralpipe_tokens_total", "le) (rate("):
        assert needed in exprs
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "engine"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_every_expression_of_dashboard_and_rules_parses(board: dict, tmp_path: Path) -> None:
    exprs = {key: grafana_expr(expr) for key, expr in dashboard_queries(board).items()}
    for group in rule_groups():
        for rule in group["rules"]:
            exprs[rule.get("alert") or rule["record"]] = rule["expr"]
    assert len(exprs) > 50
    result = check_expressions(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    result = check_expressions({"ok": "up", "broken": "sum by (x (rate(up[1m]))"}, tmp_path)
    assert result.returncode != 0 and "check:broken:1" in result.stdout + result.stderr


def test_dashboard_reads_only_metrics_the_engine_exposes(board: dict, instance: str) -> None:
    read = set().union(*(metrics_read_by(e) for e in dashboard_queries(board).values()))
    unknown = read - known_metric_names(instance)
    assert not unknown, f"the dashboard reads metrics the engine does not expose: {sorted(unknown)}"
