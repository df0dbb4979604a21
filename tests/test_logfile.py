"""A detached engine's log file (engine/logfile.py): kept under ``[engine] log_max_bytes`` (its
older half in ``<instance>.log.1``) while every worker appends to it, and the logs of engines long
gone swept from the runtime base. Before, the log grew without bound in the runtime base (a tmpfs:
memory) for as long as an engine ran, at ~400 bytes per failed stream in an upstream outage, and
every detached run left its log there for good."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from engine_harness import wait_for
from gateway_harness import default_topology

from engine.logfile import keep_under, remove_old_logs

LIMIT = 4096


def _line(i: int) -> bytes:
    return b'{"event":"stream_error","n":%d,"pad":"%s"}\n' % (i, b"x" * 60)


def test_an_appended_log_over_its_limit_is_cut_and_its_lines_kept_once_in_the_previous_file(tmp_path):
    path = tmp_path / "abc.log"
    writers = [os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) for _ in range(3)]  # the workers
    base_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(100):
            os.write(writers[i % 3], _line(i))
        assert keep_under(writers[0], base_fd, "abc.log", LIMIT) == "abc.log.1"
        assert os.path.getsize(path) == 0
        kept = (tmp_path / "abc.log.1").read_bytes()
        assert kept == b"".join(_line(i) for i in range(100))
        os.write(writers[1], _line(100))  # O_APPEND: every writer goes on at the new end
        assert path.read_bytes() == _line(100)
        assert keep_under(writers[0], base_fd, "abc.log", LIMIT) is None  # under the limit: untouched
        assert (tmp_path / "abc.log.1").read_bytes() == kept
        assert oct(os.stat(tmp_path / "abc.log.1").st_mode & 0o777) == "0o600"
    finally:
        for fd in (*writers, base_fd):
            os.close(fd)


def test_a_log_whose_copy_cannot_be_made_is_cut_all_the_same(tmp_path):
    """The bound matters more than the old lines: a full tmpfs, or something planted where the
    copy goes (never followed), still gets the log cut."""
    path = tmp_path / "abc.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    base_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    (tmp_path / "elsewhere").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", tmp_path / "abc.log.1.tmp")
    try:
        os.write(fd, b"x" * (2 * LIMIT))
        assert keep_under(fd, base_fd, "abc.log", LIMIT) == ""
        assert path.stat().st_size == 0 and (tmp_path / "elsewhere").read_bytes() == b""
    finally:
        os.close(fd)
        os.close(base_fd)


def test_a_stream_that_is_not_that_log_is_never_cut(tmp_path):
    """A foreground engine's stderr may be a file of the user's (``run > my.log``): not ours to cut."""
    mine = tmp_path / "mine.log"
    mine.write_bytes(b"x" * (2 * LIMIT))
    fd = os.open(mine, os.O_WRONLY | os.O_APPEND)
    base_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert keep_under(fd, base_fd, "abc.log", LIMIT) is None
        (tmp_path / "abc.log").write_bytes(b"y" * (2 * LIMIT))  # a file of that name, but not fd's
        assert keep_under(fd, base_fd, "abc.log", LIMIT) is None
        assert mine.stat().st_size == 2 * LIMIT and (tmp_path / "abc.log").stat().st_size == 2 * LIMIT
    finally:
        os.close(fd)
        os.close(base_fd)


def test_logs_of_engines_gone_for_long_are_swept_and_the_others_kept(tmp_path):
    old = time.time() - 8 * 86400
    for name in ("gone.log", "gone.log.1", "recent.log", "live.log", "notes.txt"):
        (tmp_path / name).write_text("x")
    for name in ("gone.log", "gone.log.1", "live.log", "notes.txt"):
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "live").mkdir()  # a running engine's instance directory
    removed = remove_old_logs(str(tmp_path), max_age_s=7 * 86400)
    assert sorted(removed) == ["gone.log", "gone.log.1"]
    assert sorted(os.listdir(tmp_path)) == ["live", "live.log", "notes.txt", "recent.log"]


@pytest.mark.timeout(120)
def test_a_detached_engine_keeps_its_log_under_log_max_bytes(tmp_path):
    env = dict(os.environ, NEURALPIPE_RUNTIME_DIR=str(tmp_path / "run"), NEURALPIPE_METRICS_PORT="0")
    config = tmp_path / "engine.toml"
    limits = "params.client_requests_per_s = 1e6\nparams.client_burst = 1e6"
    config.write_text(default_topology(ingest=limits).replace("[engine]\n", "[engine]\nlog_max_bytes = 1048576\n"))
    cli = [sys.executable, "-m", "engine.cli"]
    started = subprocess.run([*cli, "run", "--detach", "--config", str(config)], env=env, capture_output=True)
    assert started.returncode == 0, started.stderr
    try:
        from engine.clients.requests import RequestClient
        from engine.clients.supervisor import find_engine
        from engine.protocol.requests import ingest_endpoint

        info = find_engine(str(tmp_path / "run"))
        log = tmp_path / "run" / f"{info['instance']}.log"
        with RequestClient(ingest_endpoint(info["runtime_dir"]), timeout_s=5) as client:
            sent = 0
            body = {"model": "nobody-serves-" + "m" * 200, "messages": [{"role": "user", "content": "x"}]}
            while not (tmp_path / "run" / f"{info['instance']}.log.1").exists():
                for _ in range(200):  # each a stream_error line: no upstream serves that model
                    client.submit(body)
                sent += 200
                assert sent < 10_000, f"no rotation after {sent} failed streams ({log.stat().st_size} bytes)"
        wait_for(lambda: log.stat().st_size < 1048576, 10, "the log cut")
        assert log.stat().st_size < 1048576
    finally:
        subprocess.run([*cli, "stop"], env=env, capture_output=True, timeout=60)
