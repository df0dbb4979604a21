"""Every test must leave no process and no shared-memory segment behind: checked here."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import pytest

from shm.naming import PREFIX, SHM_DIR
from shm.ring import RingError, read_header

# The default topology's gateway listens on 127.0.0.1:8080; engines of tests (several at once, and
# other runs on this machine) take any free port instead (`neuralpipe status --json`: gateway.url).
os.environ.setdefault("NEURALPIPE_GATEWAY_LISTEN", "127.0.0.1:0")


def _our_segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX + "-")}


def _foreign(name: str, family: set[int]) -> bool:
    """A segment whose creator is alive and outside this test's process tree (a benchmark or
    another test run on the same machine): not this test's leak. A segment without a valid
    header yet may be one being created by someone else: it counts as foreign while young."""
    try:
        owner = read_header(name).owner_pid
    except (OSError, RingError):
        try:
            return time.time() - os.stat(os.path.join(SHM_DIR, name)).st_mtime < 2.0
        except FileNotFoundError:
            return True  # gone already: nobody's leak
    if owner in family:
        return False
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        return False
    return True


def _children() -> dict[int, str]:
    """Live descendants of this test process, except multiprocessing's resource tracker."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents[int(entry)] = int(fields[1])
        cmdlines[int(entry)] = cmdline
    mine, frontier = {}, {os.getpid()}
    while frontier:
        nxt = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in mine}
        for pid in nxt:
            mine[pid] = cmdlines[pid]
        frontier = nxt
    return {pid: cmd for pid, cmd in mine.items() if "resource_tracker" not in cmd}


def _foreign_now() -> set[str]:
    family = {os.getpid(), *_children()}
    return {n for n in _our_segments() if _foreign(n, family)}


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a segment or a process behind (and clean up after it)."""
    before = _our_segments()
    yield
    deadline = time.monotonic() + 5
    while (_children() or _our_segments() - before - _foreign_now()) and time.monotonic() < deadline:
        time.sleep(0.02)
    leaked_procs = _children()
    family = {os.getpid(), *leaked_procs}
    leaked_segments = {n for n in _our_segments() - before if not _foreign(n, family)}
    for pid in leaked_procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in leaked_segments:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    assert not leaked_procs, f"test left processes behind: {leaked_procs}"
    assert not leaked_segments, f"test left segments behind: {sorted(leaked_segments)}"


@pytest.fixture
def instance() -> str:
    """A fresh engine instance id, so tests never see each other's segments."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def start_engine(tmp_path, instance):
    """Start real engines (tests/engine_harness.py) from config text; stopped at the end."""
    from engine_harness import Engine

    engines = []

    def start(config: str, name: str = "") -> Engine:
        engine = Engine(tmp_path, config, instance + name).start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()
        engine.kill_all()
