"""The supervisor with real worker processes and real rings: restarts without loss, hang
detection, escalation, parent death and clean stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest
import zmq
from engine_harness import Engine, pipeline_config, wait_for

from engine.clients.supervisor import request
from engine.launcher import process_gone as pid_gone
from shm.registry import list_segments


@pytest.fixture
def engine_factory(tmp_path, instance):
    engines: list[Engine] = []

    def make(config: str, suffix: str = "") -> Engine:
        engine = Engine(tmp_path, config, instance + suffix)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.kill_all()
    for engine in engines:  # a killed supervisor leaves its segments: clean them as the next run would
        for seg in list_segments(engine.instance):
            os.unlink(f"/dev/shm/{seg.name}")


def sink_stats(engine: Engine) -> dict:
    return engine.worker("sink")["stats"]


def restarted(engine: Engine, name: str, old_pid: int, restarts: int):
    """The worker's status once it has been restarted ``restarts`` times and runs again."""
    w = engine.worker(name)
    if w["restarts"] >= restarts and w["pid"] not in (None, old_pid) and w["state"] == "running":
        return w
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source_stage", ["counter", "async_counter"])
def test_kill_each_role_loses_and_duplicates_nothing(engine_factory, source_stage):
    total = 120_000
    engine = engine_factory(pipeline_config(total=total, rate=25_000, source_stage=source_stage)).start()
    try:
        for name in ("source", "relay", "sink"):
            before = sink_stats(engine).get("messages", 0)
            wait_for(lambda b=before: sink_stats(engine).get("messages", 0) > b + 2000, 20, "tokens flowing")
            victim = engine.worker(name)
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda n=name, v=victim: restarted(engine, n, v["pid"], v["restarts"] + 1), 20, f"{name} restart")
        stats = wait_for(
            lambda: (s := sink_stats(engine)).get("messages", 0) >= total and s,
            60,
            f"all {total} tokens at the sink",
        )
        assert stats["messages"] == total, stats
        assert stats["gaps"] == 0, stats
        assert stats["foreign"] == 0, stats
        assert engine.stop() == 0
    finally:
        engine.kill_all()
    log = engine.log()
    assert log.count('"event":"worker_restarted"') == 3


@pytest.mark.timeout(60)
def test_sigstop_hang_is_detected_and_recovered(engine_factory):
    engine = engine_factory(pipeline_config(rate=5000, heartbeat_interval_s=0.05, heartbeat_timeout_s=0.5)).start()
    relay = wait_for(lambda: (w := engine.worker("relay"))["state"] == "running" and w, 10, "relay running")
    os.kill(relay["pid"], signal.SIGSTOP)
    started = time.monotonic()
    new = wait_for(lambda: restarted(engine, "relay", relay["pid"], 1), 10, "hung relay replaced")
    detected_after = time.monotonic() - started
    assert pid_gone(relay["pid"])
    assert new["pid"] != relay["pid"]
    flowing = sink_stats(engine)["messages"]
    wait_for(lambda: sink_stats(engine)["messages"] > flowing + 500, 10, "tokens flowing after the restart")
    assert '"event":"worker_hung"' in engine.log()
    assert detected_after < 5
    assert sink_stats(engine)["gaps"] == 0
    assert engine.stop() == 0


@pytest.mark.timeout(60)
def test_a_stalled_supervisor_does_not_take_its_workers_for_hung(engine_factory):
    """The supervisor itself stalls (stopped here, as a long pause or a descheduled VM would) for
    longer than the hang timeout. Its workers went on and their heartbeats waited in its socket;
    on resuming it judged them by its clock before reading them, killed every worker as hung and
    cut every stream (the gateway's connections too). The time it was not running is not theirs."""
    engine = engine_factory(pipeline_config(rate=5000, heartbeat_interval_s=0.05, heartbeat_timeout_s=0.5)).start()
    wait_for(lambda: all(w["state"] == "running" for w in engine.status()["workers"]), 10, "all running")
    pids = {w["name"]: w["pid"] for w in engine.status()["workers"]}
    for _ in range(5):  # the race (its poll's timer against its I/O thread's backlog) went wrong 1 in 2-4
        os.kill(engine.proc.pid, signal.SIGSTOP)
        time.sleep(1.5)  # the stall: three hang timeouts
        os.kill(engine.proc.pid, signal.SIGCONT)
        flowing = sink_stats(engine)["messages"]
        wait_for(lambda f=flowing: sink_stats(engine)["messages"] > f + 500, 10, "tokens flowing after the stall")
    assert {w["name"]: w["pid"] for w in engine.status()["workers"]} == pids
    assert all(w["restarts"] == 0 for w in engine.status()["workers"])
    assert '"event":"worker_hung"' not in engine.log()
    assert '"event":"supervisor_stalled"' in engine.log()
    assert engine.stop() == 0


@pytest.mark.timeout(60)
def test_a_command_read_after_its_clients_deadline_is_not_carried_out(engine_factory):
    """A client that gave up on a command (its timeout passed: it reported a failure) must not
    see it carried out later: a pause would stall every stream through that worker, a shutdown
    stop the engine, each after its user saw it fail. A supervisor whose loop is held up while its
    ZeroMQ I/O thread goes on receiving reads commands late; each carries its client's deadline
    (CLOCK_MONOTONIC) and one read after it is refused. Sent here with a deadline already past,
    as such a read sees it."""
    engine = engine_factory(pipeline_config(rate=5000)).start()
    control_endpoint = engine.info()["control"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control_endpoint)
    try:
        replies = []
        for command, fields in (("pause", {"worker": "relay"}), ("shutdown", {})):
            sock.send(orjson.dumps({"type": command, "deadline_ns": time.monotonic_ns() - 1, **fields}))
            assert sock.poll(5000)
            replies.append(orjson.loads(sock.recv()))
    finally:
        sock.close(0)
    assert [r["type"] for r in replies] == ["error", "error"], replies
    assert all("after its client's deadline: not done" in r["message"] for r in replies), replies
    assert engine.log().count('"event":"control_request_expired"') == 2
    assert engine.worker("relay")["state"] == "running" and engine.proc.poll() is None
    request(control_endpoint, "pause", worker="relay")  # in time: carried out
    wait_for(lambda: engine.worker("relay")["state"] == "paused", 10, "paused in time")
    assert engine.stop() == 0


@pytest.mark.timeout(60)
def test_worker_failing_at_start_fails_the_engine_start(engine_factory):
    """A worker that cannot start makes the engine's own start fail at once (OTP's rule), with
    the worker named: no restart loop that keeps reporting "starting"."""
    config = pipeline_config(intensity=2).replace('stage = "relay"', 'stage = "stages.testing.missing:Nope"')
    engine = engine_factory(config).start(wait_running=False)
    code = engine.wait_exit(30)
    assert code == 3
    log = engine.log()
    escalation = next(orjson.loads(line) for line in log.splitlines() if '"event":"escalation"' in line)
    assert escalation["reason"] == "worker 'relay' failed during start-up (exit code 3)"
    assert '"event":"worker_restarted"' not in log
    assert '"event":"engine_running"' not in log
    assert not os.path.exists(os.path.join(engine.base, engine.instance))
    assert list_segments(engine.instance) == []


@pytest.mark.timeout(60)
def test_crash_loop_escalates_and_stops_cleanly(engine_factory):
    engine = engine_factory(pipeline_config(intensity=2)).start()
    for kills in range(3):
        relay = wait_for(lambda: (w := engine.worker("relay"))["state"] == "running" and w, 15, "relay running")
        os.kill(relay["pid"], signal.SIGKILL)
        if kills < 2:
            wait_for(lambda k=kills, pid=relay["pid"]: restarted(engine, "relay", pid, k + 1), 15, "relay restart")
    code = engine.wait_exit(30)
    assert code == 3
    log = engine.log()
    escalation = next(orjson.loads(line) for line in log.splitlines() if '"event":"escalation"' in line)
    assert "relay" in escalation["reason"] and "2 restarts" in escalation["reason"]
    assert log.count('"event":"worker_restarted"') == 2
    assert not os.path.exists(os.path.join(engine.base, engine.instance))
    assert list_segments(engine.instance) == []


@pytest.mark.timeout(60)
def test_supervisor_sigkill_takes_workers_down_and_next_run_cleans(engine_factory):
    first = engine_factory(pipeline_config(), "a").start()
    pids = [w["pid"] for w in first.status()["workers"]]
    first.proc.kill()
    first.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: all(pid_gone(p) for p in pids), 1.0, "every worker to die with its supervisor")
    assert time.monotonic() - killed < 1.0
    stale = list_segments(first.instance)
    assert stale and not any(s.live for s in stale)

    second = engine_factory(pipeline_config(), "b").start()
    assert list_segments(first.instance) == []
    assert '"event":"stale_segment_removed"' in second.log()
    assert second.stop() == 0


@pytest.mark.timeout(60)
def test_rest_for_one_restarts_the_stages_after_the_failed_one(engine_factory):
    engine = engine_factory(pipeline_config(strategy="rest_for_one")).start()
    before = {w["name"]: w for w in engine.status()["workers"]}
    os.kill(before["relay"]["pid"], signal.SIGKILL)
    wait_for(lambda: restarted(engine, "relay", before["relay"]["pid"], 1), 15, "relay restart")
    wait_for(lambda: restarted(engine, "sink", before["sink"]["pid"], 1), 15, "sink restart (rest_for_one)")
    assert engine.worker("source")["pid"] == before["source"]["pid"]
    assert engine.worker("source")["restarts"] == 0
    assert engine.stop() == 0


@pytest.mark.timeout(60)
def test_status_metrics_and_stop_through_the_cli(engine_factory):
    engine = engine_factory(pipeline_config(rate=4000)).start()
    wait_for(lambda: engine.status().get("pas"), 10, "a PAS")
    wait_for(lambda: all(w["state"] == "running" for w in engine.status()["workers"]), 20, "every worker running")
    cli = [sys.executable, "-m", "engine.cli"]
    out = subprocess.run([*cli, "status", "--json"], env=engine.env(), capture_output=True, timeout=20, check=True)
    status = orjson.loads(out.stdout)
    assert {w["name"] for w in status["workers"]} == {"source", "relay", "sink"}
    assert all(w["pid"] and w["state"] == "running" and w["ready"] for w in status["workers"])
    assert status["state"] == "running"
    assert {r["name"] for r in status["rings"]} == {"source-relay", "relay-sink"}
    assert 0.0 <= status["pas"]["score"] <= 1.0

    text = subprocess.run([*cli, "status"], env=engine.env(), capture_output=True, timeout=20, check=True).stdout
    assert b"PAS" in text and b"relay-sink" in text
    assert f"engine {engine.instance}  running".encode() in text

    port = engine.info()["metrics_port"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "neuralpipe_pas_score" in body and 'ring="source-relay"' in body

    out = subprocess.run([*cli, "stop", "--json"], env=engine.env(), capture_output=True, timeout=60, check=True)
    assert orjson.loads(out.stdout)["stopped"] is True
    assert engine.wait_exit(10) == 0
    assert not os.path.exists(os.path.join(engine.base, engine.instance))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly(engine_factory, sig):
    engine = engine_factory(pipeline_config()).start()
    pids = [w["pid"] for w in engine.status()["workers"]]
    assert engine.stop(sig) == 0
    assert all(pid_gone(p) for p in pids)
    assert list_segments(engine.instance) == []
    assert '"event":"engine_stopped"' in engine.log()


@pytest.mark.timeout(30)
def test_bad_config_is_refused_with_the_key_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[supervisor]\nstrategy = "all_for_none"\n')
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "--config", str(bad)], capture_output=True, timeout=20
    )
    assert out.returncode != 0
    assert b"supervisor.strategy" in out.stderr


@pytest.mark.timeout(60)
def test_pause_and_resume_a_worker(engine_factory):
    engine = engine_factory(pipeline_config(rate=4000)).start()
    wait_for(lambda: engine.worker("relay")["processed"] > 10, 10, "relay processing")
    cli = [sys.executable, "-m", "engine.cli"]
    subprocess.run([*cli, "pause", "relay"], env=engine.env(), capture_output=True, timeout=20, check=True)
    wait_for(lambda: engine.worker("relay")["state"] == "paused", 5, "relay paused")
    frozen = engine.worker("relay")["processed"]
    backlog = wait_for(lambda: (r := engine.status()["rings"][0])["used"] > 0 and r, 5, "input ring filling")
    assert engine.worker("relay")["processed"] == frozen
    assert backlog["name"] == "source-relay"
    subprocess.run([*cli, "resume", "relay"], env=engine.env(), capture_output=True, timeout=20, check=True)
    wait_for(lambda: engine.worker("relay")["processed"] > frozen, 5, "relay processing again")
    refused = subprocess.run([*cli, "pause", "nobody"], env=engine.env(), capture_output=True, timeout=20)
    assert refused.returncode != 0 and b"no running worker named 'nobody'" in refused.stderr
    assert engine.stop() == 0


@pytest.mark.timeout(60)
def test_run_detach_returns_once_running_and_stop_ends_it(tmp_path, instance):
    env = dict(os.environ, NEURALPIPE_RUNTIME_DIR=str(tmp_path / "run"), NEURALPIPE_METRICS_PORT="0")
    config = tmp_path / "engine.toml"
    config.write_text(pipeline_config())
    cli = [sys.executable, "-m", "engine.cli"]
    env["NEURALPIPE_INSTANCE"] = instance
    out = subprocess.run(
        [*cli, "run", "--detach", "--json", "--config", str(config)], env=env, capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    info = orjson.loads(out.stdout)
    try:
        assert info["instance"] == instance and info["state"] == "running"
        assert os.path.exists(info["log"])
        status = orjson.loads(
            subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, timeout=20).stdout
        )
        assert status["pid"] == info["pid"]
        stopped = subprocess.run([*cli, "stop", "--json"], env=env, capture_output=True, timeout=60)
        assert orjson.loads(stopped.stdout)["stopped"] is True
    finally:
        if not pid_gone(info["pid"]):
            os.kill(info["pid"], signal.SIGKILL)


# ---- hostile control messages (issue 13 items 3 and 11) ----------------------------------------


class ControlClient:
    """A DEALER on the engine's control socket with whatever identity it claims."""

    def __init__(self, endpoint: str, identity: bytes) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg: dict) -> None:
        self.sock.send(orjson.dumps(msg))

    def replies(self, timeout_s: float) -> list[dict]:
        got = []
        while self.sock.poll(int(timeout_s * 1000)):
            got.append(orjson.loads(self.sock.recv()))
            timeout_s = 0.05
        return got

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.timeout(60)
def test_a_client_cannot_pass_for_a_worker(engine_factory):
    """A client naming itself after a worker sends it forged heartbeats (one with a field of the
    wrong type, which crashed the supervisor) and would take the worker's commands: refused."""
    engine = engine_factory(pipeline_config(rate=1000)).start()
    forger = ControlClient(engine.info()["control"], b"relay")
    try:
        beat = {"type": "heartbeat", "worker": "relay", "stats": {}, "telemetry": {}}
        forger.send({**beat, "state": "running", "processed": "x"})
        forger.send({**beat, "state": "paused", "processed": 10**12})
        replies = forger.replies(5)
        assert [r["type"] for r in replies] == ["error", "error"]
        assert "processed must be an integer" in replies[0]["message"]
        assert "not a worker of this engine" in replies[1]["message"]
        subprocess.run(
            [sys.executable, "-m", "engine.cli", "pause", "relay"], env=engine.env(), capture_output=True, check=True
        )
        wait_for(lambda: engine.worker("relay")["state"] == "paused", 5, "the real relay paused")
        assert forger.replies(0.2) == []  # the command reached the worker, not the forger
        relay = engine.worker("relay")
        assert relay["processed"] < 10**12 and engine.proc.poll() is None
        assert '"event":"control_message_refused"' in engine.log()
    finally:
        forger.close()
    assert engine.stop() == 0


@pytest.mark.timeout(60)
def test_control_errors_quote_only_an_excerpt(engine_factory):
    engine = engine_factory(pipeline_config()).start()
    client = ControlClient(engine.info()["control"], b"cli-hostile")
    try:
        client.send({"type": "t" * 500_000})
        client.send({"type": "pause", "worker": "w" * 100_000})
        client.send({"type": "status", "extra": "e" * 100_000})
        replies = client.replies(5)
        assert [r["type"] for r in replies] == ["error"] * 3
        assert all(len(r["message"]) < 300 for r in replies), [len(r["message"]) for r in replies]
        assert max(len(line) for line in engine.log().splitlines()) < 2000
    finally:
        client.close()
    assert engine.stop() == 0


@pytest.mark.timeout(60)
def test_pausing_an_asyncio_worker_is_refused(engine_factory):
    """An asyncio stage (ingest) runs on its own event loop and is not paused by the runtime: the
    request is refused, not acknowledged and ignored."""
    engine = engine_factory(pipeline_config(source_stage="async_counter")).start()
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "pause", "source"], env=engine.env(), capture_output=True, timeout=20
    )
    assert out.returncode != 0
    assert b"'source' runs an asyncio stage, which cannot be paused" in out.stderr
    assert engine.worker("source")["state"] == "running"
    assert engine.stop() == 0
