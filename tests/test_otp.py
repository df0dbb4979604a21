"""Supervision as docs/architecture.md says (OTP's rules): each restart type under each strategy,
with real processes. Normal exit: SIGTERM (a worker stops cleanly, exit 0); abnormal: SIGKILL."""

from __future__ import annotations

import os
import signal

import pytest
from engine_harness import Engine, wait_for

from shm.registry import list_segments

TYPES = ("permanent", "transient", "temporary")


def _config(strategy: str, pairs: list[tuple[str, str]]) -> str:
    """A counter -> verify pair per (prefix, restart type), both workers of a pair of that type,
    in this order (the topology order rest_for_one follows)."""
    text = f"""
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 1.0
health_interval_s = 0.2
[supervisor]
strategy = "{strategy}"
intensity = 10
period_s = 30.0
backoff_initial_s = 0.01
backoff_max_s = 0.05
[ring_defaults]
capacity = 65536
"""
    for prefix, restart in pairs:
        text += f"""
[workers.{prefix}_src]
stage = "counter"
restart = "{restart}"
outputs = ["{prefix}"]
params = {{ streams = 1, batch = 4, rate = 200 }}
[workers.{prefix}_sink]
stage = "verify"
restart = "{restart}"
inputs = ["{prefix}"]
params = {{ streams = 1 }}
"""
    return text


@pytest.fixture
def engine(tmp_path, instance):
    made: list[Engine] = []

    def start(config: str) -> Engine:
        made.append(Engine(tmp_path, config, instance).start())
        return made[-1]

    yield start
    for e in made:
        e.kill_all()
        for seg in list_segments(e.instance):
            os.unlink(f"/dev/shm/{seg.name}")


def _workers(e: Engine) -> dict[str, dict]:
    return {w["name"]: w for w in e.status()["workers"]}


def _back(e: Engine, name: str, old_pid: int) -> bool:
    w = _workers(e)[name]
    return w["pid"] not in (None, old_pid) and w["state"] == "running"


def _down(e: Engine, name: str, state: str) -> bool:
    w = _workers(e)[name]
    return w["pid"] is None and w["state"] == state


@pytest.mark.timeout(90)
def test_one_for_one_honours_each_restart_type_on_normal_and_abnormal_exit(engine):
    e = engine(_config("one_for_one", [(f"{t}_k", t) for t in TYPES] + [(f"{t}_n", t) for t in TYPES]))
    before = _workers(e)
    for t in TYPES:
        os.kill(before[f"{t}_k_src"]["pid"], signal.SIGKILL)  # abnormal exit
        os.kill(before[f"{t}_n_src"]["pid"], signal.SIGTERM)  # normal exit (0)
    for name in ("permanent_k_src", "transient_k_src", "permanent_n_src"):
        wait_for(lambda n=name: _back(e, n, before[n]["pid"]), 15, f"{name} restarted")
    wait_for(lambda: _down(e, "temporary_k_src", "failed"), 10, "temporary_k_src failed, not restarted")
    wait_for(lambda: _down(e, "transient_n_src", "stopped"), 10, "transient_n_src stopped, not restarted")
    wait_for(lambda: _down(e, "temporary_n_src", "stopped"), 10, "temporary_n_src stopped, not restarted")
    after = _workers(e)
    assert {n: w["restarts"] for n, w in after.items() if w["restarts"]} == {
        "permanent_k_src": 1,
        "transient_k_src": 1,
        "permanent_n_src": 1,
    }
    assert all(after[f"{t}_{k}_sink"]["pid"] == before[f"{t}_{k}_sink"]["pid"] for t in TYPES for k in "kn")
    assert e.stop() == 0


@pytest.mark.timeout(90)
def test_rest_for_one_restarts_later_workers_by_their_own_restart_type(engine):
    e = engine(_config("rest_for_one", [("head", "permanent"), *((t, t) for t in TYPES)]))
    before = _workers(e)
    # a temporary worker that fails is not restarted, and nothing after it is touched
    os.kill(before["temporary_src"]["pid"], signal.SIGKILL)
    wait_for(lambda: _down(e, "temporary_src", "failed"), 10, "temporary_src failed")
    assert _workers(e)["temporary_sink"]["pid"] == before["temporary_sink"]["pid"]
    # the head fails: every later worker is stopped; permanent and transient ones come back, as
    # OTP's rest_for_one does; temporary ones do not
    os.kill(before["head_src"]["pid"], signal.SIGKILL)
    later = ["head_sink", "permanent_src", "permanent_sink", "transient_src", "transient_sink"]
    for name in ["head_src", *later]:
        wait_for(lambda n=name: _back(e, n, before[n]["pid"]), 15, f"{name} restarted")
    wait_for(lambda: _down(e, "temporary_sink", "stopped"), 10, "temporary_sink stopped, not restarted")
    after = _workers(e)
    assert after["temporary_src"]["state"] == "failed" and after["temporary_sink"]["restarts"] == 0
    # a transient worker that exits normally is not restarted, and stops nobody after it
    os.kill(after["transient_src"]["pid"], signal.SIGTERM)
    wait_for(lambda: _down(e, "transient_src", "stopped"), 10, "transient_src stopped, not restarted")
    assert _workers(e)["transient_sink"]["pid"] == after["transient_sink"]["pid"]
    assert e.stop() == 0


@pytest.mark.timeout(60)
def test_rest_for_one_waits_for_no_worker_that_ignores_its_sigterm(engine):
    e = engine(_config("rest_for_one", [("head", "permanent")]))
    before = _workers(e)
    os.kill(before["head_sink"]["pid"], signal.SIGSTOP)  # its SIGTERM stays pending: only SIGKILL ends it
    os.kill(before["head_src"]["pid"], signal.SIGKILL)

    def head_back_while_sink_lingers() -> bool:
        now = _workers(e)
        return now["head_src"]["pid"] not in (None, before["head_src"]["pid"]) and (
            now["head_sink"]["pid"] == before["head_sink"]["pid"]
        )

    # the loop went on (restarting the failed worker, answering status) while the sink lingered;
    # a join() on the sink would have held everything until it was gone
    wait_for(head_back_while_sink_lingers, 10, "head_src restarted while head_sink is still there")
    wait_for(lambda: _back(e, "head_sink", before["head_sink"]["pid"]), 15, "head_sink killed and restarted")
    assert '"event":"worker_killed"' in e.log() and "no exit after SIGTERM" in e.log()
    assert e.stop() == 0
