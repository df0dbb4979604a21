"""A second engine that cannot start says why in one line, exits non-zero and leaves the first alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from engine_harness import Engine, pipeline_config

from shm.registry import list_segments


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _second_run(first: Engine, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "--config", str(first.config_path)],
        env={**first.env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(90)
def test_a_busy_metrics_port_is_one_line_and_exit_1(tmp_path, instance) -> None:
    port = str(_free_port())
    first = Engine(tmp_path, pipeline_config(), instance)
    first.env = lambda: {**Engine.env(first), "NEURALPIPE_METRICS_PORT": port}
    first.start()
    try:
        segments = {s.name for s in list_segments()}
        second = _second_run(first, NEURALPIPE_INSTANCE=instance + "b")
        assert second.returncode == 1, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: engine not started: cannot serve metrics on 127.0.0.1:" + port), second.stderr
        assert "Traceback" not in second.stderr
        assert {s.name for s in list_segments()} == segments  # the second left nothing behind
        assert first.status()["pid"] == first.proc.pid  # and the first still answers
    finally:
        assert first.stop() == 0


@pytest.mark.timeout(90)
def test_an_instance_id_already_running_is_refused(tmp_path, instance) -> None:
    first = Engine(tmp_path, pipeline_config(), instance).start()
    try:
        before = first.log()
        second = _second_run(first)
        assert second.returncode == 1, second.stderr
        assert f"engine instance {instance!r} is already running" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert first.log() == before or "Traceback" not in first.log()[len(before) :]
        assert first.status()["pid"] == first.proc.pid
        assert os.path.isdir(first.info()["runtime_dir"])
    finally:
        assert first.stop() == 0
