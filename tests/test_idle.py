"""The idle loop: shm.wait.idle's phases, and a real worker runtime idling on real rings (the ring
keys govern it, it parks only on the doorbells of what it waits for, lost wake-ups are counted,
and an idle worker calls its stage almost never)."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import shm_helpers as h
import zmq
from engine_harness import Engine, pipeline_config, wait_for

from engine.worker import RingEnd, WorkerSpec, _DutyCycle, _Runtime
from shm.doorbell import Doorbell, create_fifo
from shm.naming import segment_name
from shm.ring import Consumer, Producer, Ring
from shm.wait import SpinGate, WaitStrategy, idle

# ---------------------------------------------------------------------------------------------
# shm.wait.idle: spin, then yield, then park once


class Probe:
    """A ``ready`` that says yes from its ``ready_at``-th call on; counts calls and parks."""

    def __init__(self, ready_at: float = math.inf) -> None:
        self.calls, self.ready_at = 0, ready_at
        self.parks: list[tuple[int, float]] = []  # (calls made before the park, its timeout)

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.ready_at

    def park(self, timeout: float) -> None:
        self.parks.append((self.calls, timeout))


@pytest.mark.parametrize(("spins", "yields"), [(0, 0), (5, 3), (200, 20)])
def test_block_checks_spins_plus_yields_times_then_parks_once(spins: int, yields: int) -> None:
    probe = Probe()
    wait = WaitStrategy("block", spins=spins, yields=yields, park_timeout_s=0.25)
    assert idle(wait, probe, probe.park, time.monotonic() + 60) is False
    assert probe.parks == [(1 + spins + yields, 0.25)]  # spins=0, yields=0: parks after one look


def test_ready_ends_the_spell_without_parking() -> None:
    probe = Probe(ready_at=3)
    assert idle(WaitStrategy("block", spins=10, yields=0), probe, probe.park, time.monotonic() + 60) is True
    assert probe.calls == 3 and probe.parks == []


def test_park_never_sleeps_past_the_deadline() -> None:
    probe = Probe()
    idle(WaitStrategy("block", spins=0, yields=0, park_timeout_s=30), probe, probe.park, time.monotonic() + 0.5)
    ((_, timeout),) = probe.parks
    assert 0 < timeout <= 0.5


@pytest.mark.parametrize("kind", ["spin", "yield"])
def test_spin_and_yield_never_park_and_end_at_the_deadline(kind: str) -> None:
    probe = Probe()
    assert idle(WaitStrategy.named(kind), probe, probe.park, time.monotonic() + 0.02) is False
    assert probe.parks == [] and probe.calls > 1


def test_a_deadline_already_passed_ends_the_spell_at_the_first_look() -> None:
    probe = Probe()
    assert idle(WaitStrategy("block"), probe, probe.park, time.monotonic() - 1) is False
    assert probe.calls == 1 and probe.parks == []


def test_gate_shuts_spinning_after_spells_that_waited_past_the_spin_window() -> None:
    """Paced records never come within the spin window: after a few such spells the next ones
    park after one look instead of burning spins and yields first."""
    wait, gate = WaitStrategy("block", spins=50, yields=5, park_timeout_s=0.001), SpinGate()
    probe = Probe()
    for _ in range(6):
        idle(wait, probe, lambda timeout: time.sleep(timeout), time.monotonic() + 60, gate)
    assert not gate.open and gate.window_s > 0
    probe.calls = 0
    idle(wait, probe, probe.park, time.monotonic() + 60, gate)
    assert probe.calls == 2 and len(probe.parks) == 1  # one look, the park, one look after it


def test_gate_reopens_when_what_it_waits_for_comes_within_the_window() -> None:
    wait, gate = WaitStrategy("block", spins=50, yields=5), SpinGate()
    gate.hit_rate = 0.0
    for _ in range(6):  # ready at once: each spell a hit, whether it spun or not
        assert idle(wait, Probe(ready_at=1), Probe().park, time.monotonic() + 60, gate)
    assert gate.open
    probe = Probe(ready_at=30)
    assert idle(wait, probe, probe.park, time.monotonic() + 60, gate) and probe.parks == []  # spins again


def test_a_gate_never_stops_spin_and_yield_strategies() -> None:
    gate = SpinGate()
    gate.hit_rate = 0.0
    probe = Probe(ready_at=100)
    assert idle(WaitStrategy.named("yield"), probe, probe.park, time.monotonic() + 60, gate)
    assert probe.calls == 100 and probe.parks == []


# ---------------------------------------------------------------------------------------------
# a real worker runtime (this process) on real rings, with a control ROUTER standing in for the
# supervisor


@contextlib.contextmanager
def relay_runtime(tmp_path, instance: str, wait: WaitStrategy) -> Iterator[tuple[_DutyCycle, Ring, Ring]]:
    """A relay's runtime attached to two fresh rings (input, output) with strategy ``wait``."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/control.sock"
    router.bind(endpoint)
    names = [segment_name(instance, "in"), segment_name(instance, "out")]
    rt = None
    try:
        with h.make_ring(names[0], 4096) as inp, h.make_ring(names[1], 4096) as out:
            spec = WorkerSpec(
                name="relay",
                stage="stages.testing.relay:Relay",
                inputs=(RingEnd(names[0], wait),),
                outputs=(RingEnd(names[1], wait),),
                control_endpoint=endpoint,
                runtime_dir=str(tmp_path),
                state_dir=str(tmp_path),
                supervisor_pid=os.getpid(),
            )
            rt = _Runtime(spec)
            rt.stage.start(rt.ctx)
            rt.next_heartbeat = time.monotonic() + 60
            try:
                yield _DutyCycle(rt), inp, out
            finally:
                rt.stage.close()
                rt.close()
    finally:
        router.close(0)
        ctx.term()


class CountingCalls:
    """Wraps a bound method and counts its calls."""

    def __init__(self, method) -> None:
        self.method, self.calls = method, 0

    def __call__(self, *args):
        self.calls += 1
        return self.method(*args)


@pytest.mark.parametrize(("spins", "yields"), [(0, 0), (50, 5)])
def test_worker_idle_spell_follows_the_ring_keys(tmp_path, instance: str, spins: int, yields: int) -> None:
    wait = WaitStrategy("block", spins=spins, yields=yields, park_timeout_s=0.01)
    with relay_runtime(tmp_path, instance, wait) as (dc, _, _):
        consumer = dc.rt.inputs[0]
        consumer.available = probe = CountingCalls(consumer.available)  # the input cursor, looked at
        dc.park = park = CountingCalls(dc.park)
        dc.rt.stage.do_work = work = CountingCalls(dc.rt.stage.do_work)
        dc.idle_spell(time.monotonic())
        assert park.calls == 1
        assert probe.calls == 1 + spins + yields + 1  # ... and once more after the park
        assert work.calls == 0  # the stage is not called while idling


def test_after_a_quiet_park_the_next_spells_park_at_once_and_longer_until_work_comes(tmp_path, instance: str) -> None:
    wait = WaitStrategy("block", spins=50, yields=5, park_timeout_s=0.01)
    with relay_runtime(tmp_path, instance, wait) as (dc, inp, _):
        consumer = dc.rt.inputs[0]
        dc.idle_spell(time.monotonic())  # times out: nothing came
        consumer.available = probe = CountingCalls(consumer.available)
        parks: list[float] = []
        real_park = dc.park
        dc.park = lambda timeout: parks.append(timeout) or real_park(timeout)
        dc.idle_spell(time.monotonic())
        assert probe.calls == 2  # one look, the park, one look after it: no spinning
        dc.idle_spell(time.monotonic())
        assert parks == [0.02, 0.04]  # each quiet park twice as long (up to the next heartbeat)
        dc.park = real_park
        with Producer.attach(inp.name) as producer:
            producer.write(b"work", h.RECORD_TYPE)
        assert dc.rt.stage.do_work() == 1
        dc.quiet = False  # what run() does when do_work found work
        probe.calls = 0
        dc.idle_spell(time.monotonic())
        assert probe.calls == 1 + 50 + 5 + 1  # spinning again after work, and parking park_timeout_s


def test_a_worker_fed_paced_records_stops_spinning_between_them(tmp_path, instance: str) -> None:
    """Records 20 ms apart never come within the spin window: after a few spells the worker parks
    after one look at its input instead of spinning and yielding before each record. (5 ms apart
    they did, on a 2-core machine with two busy processes beside the test: each yield gave the CPU
    away for ~0.8 ms, so the spin and yield phases took ~4 ms and the records came within them.)"""
    wait = WaitStrategy("block", spins=50, yields=5, park_timeout_s=0.5)
    with relay_runtime(tmp_path, instance, wait) as (dc, inp, out):
        consumer, producer = dc.rt.inputs[0], Producer.attach(inp.name)
        real_available = consumer.available
        records = 20

        def paced() -> None:
            for _ in range(records):
                time.sleep(0.02)
                producer.write(b"paced", h.RECORD_TYPE)

        writer = threading.Thread(target=paced)
        writer.start()
        looks = []
        try:
            moved = 0
            while moved < records:
                consumer.available = probe = CountingCalls(real_available)
                dc.idle_spell(time.monotonic())
                looks.append(probe.calls)
                while done := dc.rt.stage.do_work():
                    moved += done
                with Consumer.attach(out.name) as sink:  # keep the relay's output from filling
                    while sink.try_read() is not None:
                        pass
                    sink.release()
        finally:
            writer.join(10)
            producer.close()
        assert max(looks[-4:]) <= 2, looks  # one look, the park, one look after it: no spinning


def test_worker_parks_only_on_the_doorbells_it_waits_for(tmp_path, instance: str) -> None:
    """An old ring on the output's space bell (rung while the worker once waited for space) must
    not wake a worker waiting for input: it would busy-loop until the output filled again."""
    with relay_runtime(tmp_path, instance, WaitStrategy("block", spins=0, yields=0, park_timeout_s=0.05)) as (dc, _, _):
        dc.rt.outputs[0].space_bell.ring()
        woken: list[dict] = []
        dc.on_events = lambda events: woken.append(events)
        dc.idle_spell(time.monotonic())
        assert woken == [{}]  # the park timed out: nothing it waits on moved


def test_a_commit_that_rang_as_the_park_timed_out_is_no_lost_wake_up(tmp_path, instance: str) -> None:
    """A record committed (and rung) just as the park's timeout expires arrives while the poll
    returns empty: its wake-up raced the deadline, it was not lost, so nothing is counted."""
    wait = WaitStrategy("block", spins=0, yields=0, park_timeout_s=0.05)
    with relay_runtime(tmp_path, instance, wait) as (dc, inp, _):
        producer = Producer.attach(inp.name)
        real_poll = dc.poller.poll

        def commit_as_the_timeout_expires(timeout_ms: int) -> list:
            producer.write(b"just at the deadline", h.RECORD_TYPE)  # rings: the worker is declared asleep
            real_poll(0)
            return []  # the poll's own timeout came first

        dc.poller.poll = commit_as_the_timeout_expires
        try:
            dc.idle_spell(time.monotonic())
        finally:
            dc.poller.poll = real_poll
            producer.close()
        assert inp.header().lost_wakeups == 0
        assert dc.rt.stage.do_work() == 1  # the record is there all the same


def test_worker_counts_a_lost_wake_up(tmp_path, instance: str) -> None:
    """A park that times out while its input has a record (the commit's ring never reached it)
    counts one lost wake-up in that ring's header."""
    wait = WaitStrategy("block", spins=0, yields=0, park_timeout_s=0.3)
    with relay_runtime(tmp_path, instance, wait) as (dc, inp, _):
        consumer = dc.rt.inputs[0]
        deaf = str(tmp_path / "deaf-bell")
        create_fifo(deaf)
        real_bell, consumer.data_bell = consumer.data_bell, Doorbell(deaf)  # rung by nobody
        producer = Producer.attach(inp.name)

        def commit_while_parked() -> None:
            h.wait_for(lambda: inp.header().consumer_waiting, 10, "the worker to park")
            producer.write(b"late", h.RECORD_TYPE)

        writer = threading.Thread(target=commit_while_parked)
        writer.start()
        try:
            dc.idle_spell(time.monotonic())
        finally:
            writer.join(10)
            producer.close()
            consumer.data_bell.close()
            consumer.data_bell = real_bell
        assert inp.header().lost_wakeups == 1
        assert bytes(consumer.try_read()[1]) == b"late"


# ---------------------------------------------------------------------------------------------
# a real engine


@pytest.mark.timeout(60)
def test_a_worker_between_records_idles_on_ring_cursors_not_on_its_stage(tmp_path, instance: str) -> None:
    """Between paced records a worker spins on its ring's cursor, then parks: its stage's do_work
    runs about twice per record (the call that moves it, the one that finds nothing), not once per
    spin (for a stage with sockets that meant ~200 failed ZeroMQ receives per record)."""
    config = pipeline_config(rate=1000).replace('stage = "relay"', 'stage = "readiness_stages:SlowRelay"')
    engine = Engine(tmp_path, config, instance).start()
    try:
        wait_for(lambda: engine.worker("relay")["processed"] > 10, 20, "records through the relay")
        first = engine.worker("relay")
        wait_for(lambda: engine.worker("relay")["processed"] > first["processed"] + 40, 20, "40 more records")
        last = engine.worker("relay")
        calls = last["stats"]["do_work_calls"] - first["stats"]["do_work_calls"]
        records = last["processed"] - first["processed"]
        assert calls / records < 10, f"{calls} do_work calls for {records} records"
        assert engine.stop() == 0
    finally:
        engine.kill_all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["spin", "yield"])
def test_workers_that_never_park_still_obey_control(tmp_path, instance: str, kind: str) -> None:
    """`spin` and `yield` never sleep: the workers look at the control socket every
    park_timeout_s, so pause, drain and stop still reach them."""
    config = pipeline_config(rate=1000).replace("[ring_defaults]\n", f'[ring_defaults]\nwait = "{kind}"\n')
    engine = Engine(tmp_path, config, instance).start()
    try:
        wait_for(lambda: engine.worker("sink")["processed"] > 20, 20, "records at the sink")
        assert all(w["restarts"] == 0 for w in engine.status()["workers"])
        assert engine.stop() == 0
        assert '"event":"worker_drain_timeout"' not in engine.log()
    finally:
        engine.kill_all()


READY_IN_A_FRESH_PROCESS = """
import sys, tempfile, uuid
from test_idle import relay_runtime
from shm.wait import WaitStrategy
with tempfile.TemporaryDirectory() as tmp, relay_runtime(tmp, uuid.uuid4().hex[:8], WaitStrategy("block")) as runtime:
    dc = runtime[0]
    before = "numpy.ma" in sys.modules
    dc.rt.ready()
    print(before, "numpy.ma" in sys.modules)
"""


def test_a_ready_worker_has_what_numpy_imports_lazily_on_a_first_call(tmp_path) -> None:
    """numpy 2 imports numpy.ma on the first np.unique or np.percentile: 8-20 ms here, which
    compute paid at its first stream's end and ingest at its first stats, on the token path (the
    first streams after a start had p50 7-15 ms against 3-5 later)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    ready = [sys.executable, "-c", READY_IN_A_FRESH_PROCESS]
    done = subprocess.run(ready, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True"]  # not there before ready, there after


def test_a_ready_worker_leaves_its_start_up_heap_out_of_full_collections(tmp_path, instance: str) -> None:
    """What a worker made before it was ready (imports, the stage's tables) is frozen: a full
    collection over it stopped a worker ~10 ms, a tail of the pipeline's latency."""
    with relay_runtime(tmp_path, instance, WaitStrategy("block")) as (dc, _, _):
        before = gc.get_freeze_count()
        try:
            dc.rt.ready()
            assert gc.get_freeze_count() > before + 1000  # this process's heap, pytest's included
        finally:
            gc.unfreeze()
