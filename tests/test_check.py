"""`neuralpipe check` against real rings: healthy, corrupt, full, stale, torn, cleaning, speed.

Every check runs with --instance (the test's own), so rings of tests running alongside are
never seen, let alone cleaned.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from engine.check import inspect_segments
from engine.cli import main
from shm.naming import segment_name, segment_path
from shm.ring import Consumer, Producer, Ring
from shm.segment import remove_segment
from shm.wait import WaitStrategy

CAPACITY = 4096


def check(instance: str, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["check", "--instance", instance, "--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output)


@pytest.fixture
def rings(instance, tmp_path):
    """Create rings of this test's instance by short name; all destroyed at the end."""
    made: list[Ring] = []

    def _create(ring: str) -> Ring:
        made.append(Ring.create(segment_name(instance, ring), CAPACITY, doorbell_dir=str(tmp_path)))
        return made[-1]

    yield _create
    for ring in made:
        ring.destroy()


def _own_ring_then_wait(name: str, bells: str, ready) -> None:
    """Child: create a ring (so it owns it), say so, and wait to be killed."""
    ring = Ring.create(name, CAPACITY, doorbell_dir=bells)  # kept referenced: its lock marks it live
    ready.set()
    time.sleep(60)
    ring.destroy()


def _attach_then_wait(name: str, role: str, ready) -> None:
    """Child: attach to a ring as producer (with a claim left open) or consumer, then wait to be killed."""
    if role == "producer":
        side = Producer.attach(name)
        side.try_claim(64)
    else:
        side = Consumer.attach(name)
    ready.set()
    time.sleep(60)
    side.close()


def run_child_until_killed(target, *args) -> None:
    """Spawn ``target(*args, ready)``, wait until it is ready, then SIGKILL it (leaving its state)."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=target, args=(*args, ready))
    child.start()
    try:
        assert ready.wait(30), "child did not get ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL


def test_no_segments_is_healthy(instance):
    code, report = check(instance)
    assert code == 0
    assert report["status"] == "healthy" and report["segments"] == [] and report["removed"] == []


def test_healthy_rings(instance, rings):
    rings("a")
    name = rings("b").name
    with Producer.attach(name) as producer, Consumer.attach(name):
        producer.write(b"x" * 100, 16)
        code, report = check(instance)
    assert code == 0, report
    assert report["status"] == "healthy" and report["exit_code"] == 0
    by_ring = {s["ring"]: s for s in report["segments"]}
    assert set(by_ring) == {"a", "b"}
    b = by_ring["b"]
    assert b["live"] and b["valid"] and b["capacity"] == CAPACITY and b["used"] == 112
    assert b["producer_pid"] == b["consumer_pid"] == os.getpid()
    assert b["producer_alive"] and b["consumer_alive"]
    assert 0 <= b["producer_heartbeat_age_s"] < 5 and 0 <= b["consumer_heartbeat_age_s"] < 5
    assert by_ring["a"]["producer_heartbeat_age_s"] is None  # never attached


def test_table_output(instance, rings):
    ring = rings("tbl")
    result = CliRunner().invoke(main, ["check", "--instance", instance])
    assert result.exit_code == 0
    header, row, verdict = result.output.strip().splitlines()
    assert header.split()[:3] == ["SEGMENT", "OWNER", "STATUS"]
    assert row.split()[:4] == [ring.name, "live", "healthy", "4Ki"]
    assert verdict.startswith("healthy: 1 segment(s), 0 warning, 0 critical (")


def test_corrupt_magic_is_critical(instance, rings):
    ring = rings("bad")
    rings("good")
    with open(segment_path(ring.name), "r+b") as f:
        f.write((0xDEADBEEF).to_bytes(8, "little"))
    code, report = check(instance)
    assert code == 2 and report["status"] == "critical"
    bad = next(s for s in report["segments"] if s["ring"] == "bad")
    assert not bad["valid"] and "bad magic" in bad["error"]
    assert bad["status"] == "critical"
    assert next(s for s in report["segments"] if s["ring"] == "good")["status"] == "healthy"


def test_nearly_full_ring_is_a_warning(instance, rings):
    name = rings("full").name
    with Producer.attach(name, WaitStrategy("spin")) as producer:
        while producer.try_claim(100) is not None:
            producer.commit(16)
        code, report = check(instance)
    assert code == 1, report
    (segment,) = report["segments"]
    assert segment["occupancy"] >= 0.9 and segment["status"] == "warning"
    assert any("full" in problem for problem in segment["problems"])


def test_stale_heartbeat_of_a_live_process_is_a_warning(instance, rings):
    name = rings("slow").name
    with Consumer.attach(name):
        time.sleep(0.05)
        report = inspect_segments(instance, heartbeat_stale_s=0.01)
    assert report.exit_code == 1
    assert any("heartbeat" in problem for problem in report.segments[0].problems)


def test_dead_consumer_is_a_warning(instance, rings):
    name = rings("orphan").name
    run_child_until_killed(_attach_then_wait, name, "consumer")
    code, report = check(instance)
    assert code == 1, report
    (segment,) = report["segments"]
    assert segment["consumer_pid"] > 0 and not segment["consumer_alive"]


def test_torn_claim_of_a_dead_producer_is_critical(instance, rings):
    ring = rings("torn")
    run_child_until_killed(_attach_then_wait, ring.name, "producer")
    code, report = check(instance)
    assert code == 2, report
    (segment,) = report["segments"]
    assert segment["pending_claim"] and segment["torn_claim"] and not segment["producer_alive"]
    assert ring.unblock()  # what the supervisor does: afterwards the ring is healthy again
    assert check(instance)[0] == 0


def test_stale_segment_is_critical_and_clean_removes_only_it(instance, rings, tmp_path):
    live = rings("live")
    stale = segment_name(instance, "stale")
    try:
        run_child_until_killed(_own_ring_then_wait, stale, str(tmp_path))
        code, report = check(instance)
        assert code == 2, report
        by_name = {s["name"]: s for s in report["segments"]}
        assert not by_name[stale]["live"] and by_name[stale]["status"] == "critical"
        assert by_name[live.name]["live"] and by_name[live.name]["status"] == "healthy"

        code, report = check(instance, "--clean")
        assert code == 0, report
        assert report["removed"] == [stale]
        assert [s["name"] for s in report["segments"]] == [live.name]
        assert not os.path.exists(segment_path(stale)) and os.path.exists(segment_path(live.name))
    finally:
        remove_segment(stale)


def test_clean_never_removes_a_live_ring(instance, rings):
    ring = rings("keep")
    code, report = check(instance, "--clean")
    assert code == 0 and report["removed"] == []
    assert os.path.exists(segment_path(ring.name))


def test_bad_instance_id_is_refused():
    result = CliRunner().invoke(main, ["check", "--instance", "no/slashes"])
    assert result.exit_code == 2
    assert "instance id" in result.output


def test_a_dozen_rings_are_checked_fast(instance, rings):
    for i in range(12):
        name = rings(f"r{i}").name
        with Producer.attach(name) as producer:
            producer.write(b"t" * 200, 16)
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        report = inspect_segments(instance)
        timings.append((time.perf_counter() - start) * 1e3)
    code, via_cli = check(instance)
    print(
        f"\ncheck of 12 rings: median {statistics.median(timings):.2f} ms, max {max(timings):.2f} ms "
        f"(in-process); CLI elapsed_ms {via_cli['elapsed_ms']:.2f}"
    )
    assert len(report.segments) == 12 and code == 0
    assert statistics.median(timings) < 1000  # generous: the target is well under 100 ms


def test_a_zombie_consumer_is_dead_not_alive(instance, rings):
    """A process that exited but was not reaped still answers kill(pid, 0): check must not call it alive."""
    name = rings("zombie").name
    code = f"import os; from shm.ring import Consumer; Consumer.attach({name!r}); print('ok', flush=True); os._exit(0)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        deadline = time.monotonic() + 10
        while not _state_is_zombie(child.pid):  # exited, not yet reaped by us
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        code_, report = check(instance)
        (segment,) = report["segments"]
        assert segment["consumer_pid"] == child.pid and not segment["consumer_alive"], report
        assert code_ == 1 and f"consumer pid {child.pid} is dead" in segment["problems"]
    finally:
        child.wait(10)
        child.stdout.close()


def _state_is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"


def test_check_defaults_to_the_running_engine_and_all_sees_every_segment(instance, rings, tmp_path):
    """Without --instance, check looks at the engine running under the configured runtime base (not
    at other engines' or other tests' rings); --all looks at every segment."""
    rings("mine")
    other = f"{instance}x"
    foreign = Ring.create(segment_name(other, "theirs"), CAPACITY, doorbell_dir=str(tmp_path))
    try:
        base = tmp_path / "run"
        (base / instance).mkdir(parents=True)
        lock = os.open(base / instance / "supervisor.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running supervisor holds it
        (base / instance / "supervisor.json").write_text(json.dumps({"instance": instance, "started": 1}))
        env = {"NEURALPIPE_RUNTIME_DIR": str(base)}
        result = CliRunner().invoke(main, ["check", "--json"], env=env)
        names = {s["name"] for s in json.loads(result.output)["segments"]}
        assert names == {segment_name(instance, "mine")}, result.output
        result = CliRunner().invoke(main, ["check", "--json", "--all"], env=env)
        names = {s["name"] for s in json.loads(result.output)["segments"]}
        assert {segment_name(instance, "mine"), foreign.name} <= names
        os.close(lock)
    finally:
        foreign.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_check_under_another_users_runtime_dir_is_one_line_not_a_traceback(tmp_path):
    base = tmp_path / "theirs"
    base.mkdir(mode=0o700)
    os.chown(base, 65534, 65534)
    result = CliRunner().invoke(main, ["check"], env={"NEURALPIPE_RUNTIME_DIR": str(base)})
    assert result.exit_code == 1 and "belongs to uid 65534" in result.output, result.output
    assert not isinstance(result.exception, RuntimeError)
