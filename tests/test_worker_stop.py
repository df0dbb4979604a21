"""Stopping a worker: the supervisor drains it, and past ``[engine] stop_timeout_s`` sends SIGTERM;
an asyncio stage's clean-up (ingest's: end each open stream with an error row, flush the rows) must
then run to its end, not be cut at its first await."""

from __future__ import annotations

import os
import signal

import pytest
from engine_harness import alive, wait_for, with_stage

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
