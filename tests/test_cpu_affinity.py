"""``[workers.<name>] cpus``: a worker's process, its threads (ZeroMQ's I/O thread) and its children
run only on the CPUs listed (docs/configuration.md)."""

from __future__ import annotations

import glob
import os

import pytest
from engine_harness import pipeline_config


def _allowed_cpus(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of ``pid``."""
    found = set()
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        with open(status) as f:
            found |= {line.split()[1] for line in f if line.startswith("Cpus_allowed_list:")}
    return found


@pytest.mark.timeout(60)
def test_a_worker_runs_only_on_its_cpus(start_engine) -> None:
    cpu = max(os.sched_getaffinity(0))
    config = pipeline_config().replace('stage = "relay"\n', f'stage = "relay"\ncpus = [{cpu}]\n', 1)
    engine = start_engine(config)
    assert _allowed_cpus(engine.worker("relay")["pid"]) == {str(cpu)}
    # a worker without cpus runs where the engine may
    assert _allowed_cpus(engine.worker("sink")["pid"]) == _allowed_cpus(os.getpid())
