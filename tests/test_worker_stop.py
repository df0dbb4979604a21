"""Stopping a worker: the supervisor drains it, and past ``[engine] stop_timeout_s`` sends SIGTERM;
an asyncio stage's clean-up (ingest's: end each open stream with an error row, flush the rows) must
then run to its end, not be cut at its first await."""

from __future__ import annotations

import os
import signal
import time

import pytest
from engine_harness import alive, full_config, wait_for, with_stage

from engine.worker import TERMINATE_GRACE_S


@pytest.mark.timeout(60)
def test_an_asyncio_stage_terminated_past_the_drain_deadline_finishes_its_clean_up(tmp_path, start_engine) -> None:
    """Its clean-up was cancelled at its first await: the runner cancelled every task left once the
    worker's main returned. Ingest lost its last rows so (the error rows saying the engine stopped)."""
    done = tmp_path / "clean-up-done"
    config = with_stage("source", "readiness_stages:SlowCleanupSource", f'cleanup_s = 0.2, done_path = "{done}"')
    engine = start_engine(config.replace("stop_timeout_s = 5.0", "stop_timeout_s = 0.5"))
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.wait_exit(30) == 0
    assert "worker_drain_timeout" in engine.log_path.read_text()  # the source was terminated, not drained
    assert done.exists(), "the stage's clean-up did not run to its end"


@pytest.mark.timeout(60)
def test_a_clean_up_that_does_not_end_is_cut_after_the_terminate_grace(tmp_path, start_engine) -> None:
    """A clean-up stuck (ingest flushing into a ring whose consumer is paused) must not keep a
    worker told to stop alive, heartbeats and all, when nothing will SIGKILL it (an operator's
    `kill`): it gets TERMINATE_GRACE_S, as under the supervisor."""
    done = tmp_path / "clean-up-done"
    engine = start_engine(
        with_stage("source", "readiness_stages:SlowCleanupSource", f'cleanup_s = 30, done_path = "{done}"')
    )
    pid = engine.worker("source")["pid"]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), TERMINATE_GRACE_S + 5, "the worker gone")
    assert not done.exists()


@pytest.mark.timeout(60)
def test_a_parked_duty_cycle_worker_acts_on_sigterm_at_once(tmp_path, start_engine) -> None:
    """A duty-cycle worker (compute) idle on its rings parks in one poll for up to its next
    heartbeat. SIGTERM only set a flag that the poll did not see: the worker went on sleeping and
    past TERMINATE_GRACE_S the supervisor SIGKILLed it, its clean-up never run."""
    config = full_config().replace("heartbeat_interval_s = 0.1", "heartbeat_interval_s = 4.0")
    engine = start_engine(config.replace("heartbeat_timeout_s = 1.0", "heartbeat_timeout_s = 10.0"))
    pid = engine.worker("compute")["pid"]

    def parked() -> bool:  # idle since its start (its parks doubled up to the next heartbeat) and between two
        compute = engine.worker("compute")
        return compute["uptime_s"] > 4.5 and 0.3 < compute["heartbeat_age_s"] < 2.0

    wait_for(parked, 20, "compute idle and half-way between two heartbeats")
    os.kill(pid, signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: not alive(pid), 10, "the worker gone")
    assert time.monotonic() - sent < 0.5 * TERMINATE_GRACE_S
