"""Readiness: the engine reports running only once every worker has said ready; an asyncio stage's
set-up is awaited with heartbeats running; a worker that fails to start fails the engine's start
with a reason, and `run --detach` says so in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import orjson
import pytest
from engine_harness import Engine, pipeline_config, wait_for, with_stage

from engine.clients.supervisor import EngineNotFound, find_engine
from engine.status_view import format_status


def _info(engine: Engine) -> dict:
    try:
        return engine.info()
    except EngineNotFound:
        return {}


def _run_detach(engine: Engine, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``neuralpipe run --detach`` with the engine's config, as a user runs it; its exit and output."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "--detach", "--config", str(engine.config_path)],
        env=env or engine.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(60)
def test_engine_is_starting_until_every_worker_is_ready(tmp_path, instance: str) -> None:
    engine = Engine(tmp_path, with_stage("relay", "readiness_stages:SlowRelay", "start_s = 1.5"), instance)
    engine.start(wait_running=False)
    try:
        info = wait_for(lambda: (i := _info(engine)).get("waiting_for") == ["relay"] and i, 20, "only relay awaited")
        assert info["state"] == "starting"
        status = engine.status()
        assert status["state"] == "starting"
        workers = {w["name"]: w for w in status["workers"]}
        assert workers["relay"]["ready"] is False and workers["relay"]["state"] == "starting"
        assert workers["source"]["ready"] and workers["sink"]["ready"]
        text = format_status(status)
        assert f"engine {instance}  starting (waiting for relay to be ready)" in text
        wait_for(lambda: _info(engine).get("state") == "running", 20, "the engine to report running")
        status = engine.status()
        assert status["state"] == "running" and all(w["ready"] for w in status["workers"])
        assert _info(engine)["waiting_for"] == []
        assert engine.stop() == 0
    finally:
        engine.kill_all()


@pytest.mark.timeout(60)
def test_async_setup_is_awaited_with_heartbeats_before_ready(tmp_path, instance: str) -> None:
    """A set-up longer than the heartbeat timeout (1 s here) keeps heartbeats fresh: the worker
    is neither killed as hung nor reported ready before its set-up is done (issue 12 item 5)."""
    config = with_stage("source", "readiness_stages:SlowSetupSource", "start_s = 2.5")
    engine = Engine(tmp_path, config, instance).start(wait_running=False)
    try:
        wait_for(lambda: _info(engine).get("waiting_for") == ["source"], 20, "only the source awaited")
        ages, deadline = [], time.monotonic() + 20
        while (status := engine.status())["state"] == "starting":
            assert time.monotonic() < deadline, "the engine never reported running"
            source = next(w for w in status["workers"] if w["name"] == "source")
            assert source["restarts"] == 0 and not source["ready"]
            if source["heartbeat_age_s"] is not None:
                ages.append(source["heartbeat_age_s"])
            time.sleep(0.05)  # between status samples
        assert ages and max(ages) < 1.0, ages
        source = engine.worker("source")
        assert source["ready"] and source["state"] == "running" and source["restarts"] == 0
        assert engine.stop() == 0
    finally:
        engine.kill_all()


@pytest.mark.timeout(60)
def test_worker_failing_in_setup_exits_non_zero_and_fails_the_start(tmp_path, instance: str) -> None:
    config = with_stage("source", "readiness_stages:SlowSetupSource", 'fail = "setup"')
    engine = Engine(tmp_path, config, instance).start(wait_running=False)
    try:
        assert engine.wait_exit(30) == 3
        events = [orjson.loads(line) for line in engine.log().splitlines() if line.startswith("{")]
        failed = next(e for e in events if e["event"] == "stage_failed")
        assert failed["stage"] == "source" and failed["phase"] == "start-up"
        assert "told to fail in setup" in failed["error"]
        exited = next(e for e in events if e["event"] == "worker_exited")
        assert exited["worker"] == "source" and exited["exit_code"] == 3
    finally:
        engine.kill_all()


@pytest.mark.timeout(60)
def test_run_detach_reports_a_start_failure_in_one_line(tmp_path, instance: str) -> None:
    engine = Engine(tmp_path, with_stage("relay", "readiness_stages:SlowRelay", 'fail = "start"'), instance)
    done = _run_detach(engine, 50)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "Error: engine not started: worker 'relay' failed during start-up (exit code 3): "
        "RuntimeError('SlowRelay was told to fail in start')"
    ), line
    log = line.rsplit("log: ", 1)[1]
    assert os.path.exists(log)
    with pytest.raises(EngineNotFound):
        find_engine(engine.base, instance)


EMBEDDED = """
[workers.ingest]
stage = "ingest"
outputs = ["x"]
params.embedded = {{ {embedded} }}

[workers.sink]
stage = "verify"
inputs = ["x"]
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("embedded", "named"),
    [
        ('decode_steps = "yes"', "params.embedded.decode_steps: must be a bool (got 'yes')"),
        ("decode_step = true", "params.embedded: unknown key 'decode_step'"),
    ],
)
def test_a_bad_embedded_upstream_setting_is_named_at_start(tmp_path, instance: str, embedded: str, named: str) -> None:
    """Before, a string where a flag belongs was taken as true, and a word where a number belongs
    stopped the upstream's process with no reason given."""
    engine = Engine(tmp_path, EMBEDDED.format(embedded=embedded), instance)
    done = _run_detach(engine, 80)
    assert done.returncode != 0 and named in done.stderr, done.stderr


@pytest.mark.timeout(60)
def test_run_detach_relays_a_refused_start_in_one_line(tmp_path, instance: str) -> None:
    """The engine refusing to start (here: its metrics port is taken) reaches `run --detach` as
    the engine's own one-line reason."""
    engine = Engine(tmp_path, pipeline_config(), instance)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(engine.env(), NEURALPIPE_METRICS_PORT=str(busy.getsockname()[1]))
        done = _run_detach(engine, 50, env)
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("Error: engine not started: cannot serve metrics on 127.0.0.1:"), line
    assert line.count("engine not started") == 1
