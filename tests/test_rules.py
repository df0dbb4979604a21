"""The recording and alert rules of engine/monitoring: accepted by `promtool check rules`, unit-tested
by `promtool test rules` (tests/promtool/), every alert labelled and linked to its runbook section,
and every metric they read one the engine exposes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from monitoring_helpers import REPO, RULE_FILES, known_metric_names, metrics_read_by, promtool, rule_groups

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")

PROMTOOL_TESTS = sorted((REPO / "tests" / "promtool").glob("*_test.yml"))
RUNBOOK = REPO / "docs" / "runbook.md"


def _alerts() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_promtool_check_rules_accepts_both_files() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL_TESTS, "no tests/promtool/*_test.yml"
    result = promtool("test", "rules", *map(str, PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    tested = set()
    for path in PROMTOOL_TESTS:
        tested.update(re.findall(r"alertname:\s*(\w+)", path.read_text()))
    assert {a["alert"] for a in _alerts()} <= tested


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    anchors = _anchors(RUNBOOK.read_text())
    alerts = _alerts()
    assert len(alerts) >= 10
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/runbook.md" and anchor in anchors, (alert["alert"], annotations["runbook_url"])


def test_rules_read_only_metrics_the_engine_exposes(instance: str) -> None:
    known = known_metric_names(instance)
    read = set()
    for group in rule_groups():
        for rule in group["rules"]:
            read |= metrics_read_by(rule["expr"])
    assert read, "no engine metric found in the rules"
    assert read <= known, f"rules read metrics the engine does not expose: {sorted(read - known)}"


def test_a_wrong_expectation_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: the same file with one expected annotation changed does."""
    original = (REPO / "tests" / "promtool" / "alerts_test.yml").read_text()
    mutated = original.replace("(0.880)", "(0.870)").replace("../../engine/monitoring", str(RULE_FILES[0].parent))
    assert mutated != original
    path = tmp_path / "mutated_test.yml"
    path.write_text(mutated)
    result = promtool("test", "rules", str(path))
    assert result.returncode != 0 and "NeuralpipePasWarning" in result.stdout + result.stderr
