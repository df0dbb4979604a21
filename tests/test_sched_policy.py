"""``[engine] sched_policy``: the Linux scheduling policy of every worker process, its threads
(ZeroMQ's I/O thread) and its children; ``batch`` by default (docs/configuration.md,
docs/benchmarks.md "Scheduling policy")."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
from engine_harness import pipeline_config

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")

WORKERS = ("source", "relay", "sink")


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of ``pid``."""
    return {os.sched_getscheduler(int(task.rsplit("/", 1)[1])) for task in glob.glob(f"/proc/{pid}/task/*")}


@pytest.mark.timeout(60)
def test_workers_run_sched_batch_by_default_and_the_supervisor_does_not(start_engine) -> None:
    engine = start_engine(pipeline_config())
    for name in WORKERS:
        assert _policies(engine.worker(name)["pid"]) == {os.SCHED_BATCH}, name
    assert _policies(engine.info()["pid"]) == {os.SCHED_OTHER}


@pytest.mark.timeout(60)
def test_sched_policy_normal_leaves_workers_on_the_default_policy(start_engine) -> None:
    config = pipeline_config().replace("[engine]\n", '[engine]\nsched_policy = "normal"\n', 1)
    engine = start_engine(config)
    for name in WORKERS:
        assert _policies(engine.worker(name)["pid"]) == {os.SCHED_OTHER}, name


@pytest.mark.timeout(30)
def test_a_policy_the_engine_was_started_with_is_kept() -> None:
    """An operator who starts the engine SCHED_IDLE (``chrt --idle 0``) keeps it: "batch" only
    replaces the kernel's normal policy."""
    probe = (
        "import os; from engine.worker import _set_sched_policy; "
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
        "_set_sched_policy('batch'); print(os.sched_getscheduler(0))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=20, check=True)
    assert int(out.stdout) == os.SCHED_IDLE
