"""Worker runtime: the process a stage runs in.

``main(spec)`` is the target the supervisor spawns (``spawn`` start method). It ties the worker
to its supervisor's life (PR_SET_PDEATHSIG plus the parent's sentinel pipe), attaches the rings,
connects the control DEALER, starts the stage (an asyncio stage's ``setup`` is awaited with
heartbeats already running), says "ready", and runs its duty cycle or its asyncio loop, sending
heartbeats and obeying pause/resume/drain. SIGTERM stops it cleanly;
SIGINT is ignored (Ctrl-C reaches the whole process group, and the supervisor drains workers in
order rather than letting them all die at once).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import multiprocessing
import os
import select
import signal
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from engine import ports
from engine.lifeline import EXIT_ORPHANED, die_with_parent
from engine.logs import JsonLogger
from engine.protocol import control
from engine.stage import AsyncStage, Stage, WorkerContext
from engine.validated import ValidatedParams
from shm.wait import PARK_AT_ONCE, SpinGate, WaitStrategy, idle

EXIT_STAGE_ERROR = 3
# a worker sent SIGTERM is SIGKILLed this much later (engine/supervisor.py): its stage's clean-up
# has this long, bounded here too (a clean-up stuck on a paused neighbour would run on for good)
TERMINATE_GRACE_S = 1.0
_MAX_PARK_S = 60.0  # WaitStrategy's bound; the next heartbeat comes much sooner anyway


@dataclass(frozen=True)
class RingEnd:
    """One ring a worker attaches to: full segment name and the wait strategy to use; with another
    transport than ``shm``, its port factory's reference and ``channel`` (engine/ports.py)."""

    segment: str
    wait: WaitStrategy
    transport: str = "shm"
    channel: Any = None


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, passed through spawn (so: picklable, small)."""

    name: str
    stage: str  # "package.module:Class"
    inputs: tuple[RingEnd, ...]
    outputs: tuple[RingEnd, ...]
    control_endpoint: str
    runtime_dir: str
    state_dir: str
    supervisor_pid: int
    incarnation: int = 0
    token: str = ""  # this spawn's secret: its control identity (control.worker_identity)
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 2.0  # the supervisor kills a worker silent this long as hung
    log_level: str = "info"
    # as the supervisor validated them (engine.validated.ValidatedParams), or a dict the stage validates
    params: ValidatedParams | dict[str, Any] = field(default_factory=dict)
    cpus: tuple[int, ...] = ()  # the CPUs the process may run on (empty: any)
    sched_policy: str = "normal"  # "batch" or "normal" ([engine] sched_policy); "normal": as started


def stage_class(ref: str) -> type[Stage]:
    """The stage class named ``package.module:Class`` (its module imported by name: the engine
    never imports stages statically)."""
    module_name, _, class_name = ref.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"stage reference {ref!r} must look like 'package.module:Class'")
    found = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(found, type) and issubclass(found, Stage)):
        raise TypeError(f"stage {ref!r} is not a subclass of engine.stage.Stage")
    return found


def load_stage(ref: str) -> Stage:
    """Instantiate the stage class named ``package.module:Class``."""
    return stage_class(ref)()


class _Runtime:
    """State shared by the duty-cycle and asyncio loops: control socket, heartbeats, rings."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.log = JsonLogger(spec.name, spec.log_level)
        self.state = "starting"
        self.is_ready = False
        self.processed = 0
        self.stopping = False
        self.zmq = zmq.Context(io_threads=1)
        self.sock = self.zmq.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, control.worker_identity(spec.name, spec.token))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(spec.control_endpoint)
        self.inputs = [ports.open_consumer(end, self.zmq) for end in spec.inputs]
        self.outputs = [ports.open_producer(end, self.zmq) for end in spec.outputs]
        parent = multiprocessing.parent_process()
        self.parent_sentinel = parent.sentinel if parent is not None else None
        self.stage = load_stage(spec.stage)
        self.send("hello", pid=os.getpid(), incarnation=spec.incarnation, pausable=self.stage.pausable)
        self.ctx = WorkerContext(
            name=spec.name,
            params=spec.params,
            inputs=self.inputs,
            outputs=self.outputs,
            log=self.log,
            runtime_dir=spec.runtime_dir,
            state_dir=spec.state_dir,
            incarnation=spec.incarnation,
            hang_timeout_s=spec.heartbeat_timeout_s,
        )
        self.next_heartbeat = 0.0

    def ready(self) -> None:
        """The stage is set up: tell the supervisor (the engine is running once every worker is)."""
        self.is_ready = True
        self.state = "running"
        # numpy 2 imports numpy.ma on the first np.unique or np.percentile (8-20 ms here): compute
        # paid it at its first stream's end, ingest at its first stats, with tokens waiting
        importlib.import_module("numpy.ma")
        # what start-up made (imports, the stage's tables) lives as long as the worker: out of the
        # collector's full passes, each of which would stop the worker ~10 ms (~50k objects)
        gc.freeze()
        self.send("ready")
        self.heartbeat(time.monotonic())

    def send(self, msg_type: str, **fields: Any) -> None:
        # supervisor not reading: heartbeats are periodic, so a lost one is not an error
        with contextlib.suppress(zmq.Again):
            self.sock.send(control.encode(msg_type, worker=self.spec.name, **fields), zmq.NOBLOCK)

    def heartbeat(self, now: float) -> None:
        for ring in self.inputs:
            ring.heartbeat()
        for ring in self.outputs:
            ring.heartbeat()
        # a stage's counters exist once it is set up: until then its heartbeats carry none
        stats = self.stage.stats() if self.is_ready else {}
        # the metrics' cumulative totals: a lost heartbeat loses nothing, the next one has them
        telemetry = self.ctx.telemetry.snapshot()
        self.send("heartbeat", state=self.state, processed=self.processed, stats=stats, telemetry=telemetry)
        self.next_heartbeat = now + self.spec.heartbeat_interval_s

    def handle_control(self) -> None:
        """Apply every control message waiting on the socket."""
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = control.decode(frame, control.SUPERVISOR_TO_WORKER)
            except control.ProtocolError as exc:
                self.log.warning("bad_control_message", error=str(exc))
                continue
            self.apply(msg)

    def apply(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        self.log.debug("control", command=kind)
        if kind == "pause":
            self.state = "paused"
        elif kind == "resume":
            self.state = "running"
        elif kind == "drain":
            self.state = "draining"
            self.ctx.draining = True

    def close(self) -> None:
        for ring in self.inputs + self.outputs:
            ring.close()
        self.sock.close(0)
        self.zmq.term()


class _DutyCycle:
    """Call ``do_work`` while it finds work; when it finds none, idle with the rings' wait strategy
    (:func:`shm.wait.idle`): spin and yield on the ring cursors only (a full output ring's read
    cursor, else the input rings' write cursors: memory loads, no system call), then park in one
    ``zmq.Poller`` on those rings' doorbells, the control socket, the stage's own sockets and the
    supervisor's sentinel, for at most ``park_timeout_s``, never past the next heartbeat or the
    stage's idle hint. The stage's sockets are served by ``do_work`` after a park that they woke,
    so an idle spell makes no ZeroMQ call before it parks."""

    def __init__(self, rt: _Runtime) -> None:
        self.rt = rt
        self.poller = zmq.Poller()
        self.poller.register(rt.sock, zmq.POLLIN)
        if rt.parent_sentinel is not None:
            self.poller.register(rt.parent_sentinel, zmq.POLLIN)
        for pollable in rt.stage.pollables():
            self.poller.register(pollable, zmq.POLLIN)
        # SIGTERM's handler only sets a flag, which a park would see at its end (the next heartbeat,
        # past the supervisor's TERMINATE_GRACE_S): the signal also writes a byte here, which ends it
        self.signalled, wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
        self.poller.register(self.signalled, zmq.POLLIN)
        # what a side does while its ring is empty (inputs) or full (outputs): docs/configuration.md
        self.input_wait = WaitStrategy.eagerest([end.wait for end in rt.spec.inputs])
        self.output_wait = WaitStrategy.eagerest([end.wait for end in rt.spec.outputs])
        everything = WaitStrategy.eagerest([end.wait for end in rt.spec.inputs + rt.spec.outputs])
        # nothing to spin on (a source whose output has room): park at once
        self.no_ring_wait = replace(PARK_AT_ONCE, park_timeout_s=everything.park_timeout_s)
        self.waiting: list[tuple[Any, Any]] = []  # (ring, its doorbell) of the current idle spell
        self.waiting_for_input = False  # the spell's rings are inputs (else full outputs, or none)
        # Agrona keeps backing off until work comes: after a park that timed out with nothing
        # found since, the next spell parks at once (spinning then would only burn the wake-up)
        # and for twice as long, up to the next heartbeat, so an idle worker wakes a few times a
        # second; the first park of a spell keeps park_timeout_s
        self.quiet = False
        self.backoff_s = 0.0
        # spin and yield only while that pays (shm.wait.SpinGate): records paced milliseconds
        # apart never come within the spin window, so each spell would burn it before parking
        self.input_gate, self.output_gate = SpinGate(), SpinGate()

    def run(self) -> None:
        rt, stage = self.rt, self.rt.stage
        while not rt.stopping:
            now = time.monotonic()
            if now >= rt.next_heartbeat:
                rt.handle_control()
                rt.heartbeat(now)
            if rt.state == "paused":
                self.waiting, self.waiting_for_input = [], False
                hint = stage.idle_timeout_s()
                self.park(min(rt.next_heartbeat, now + hint if hint is not None else math.inf) - now)
                stage.keep_alive()
                continue
            done = stage.do_work()
            if done:
                rt.processed += done
                self.quiet = False
                continue
            if rt.ctx.draining and stage.drained():
                return
            self.idle_spell(now)

    def idle_spell(self, now: float) -> None:
        """Idle until a ring moves, something wakes the park, the next heartbeat or the stage's
        idle hint."""
        rt = self.rt
        deadline = rt.next_heartbeat
        hint = rt.stage.idle_timeout_s()
        if hint is not None:
            deadline = min(deadline, now + hint)
        full = [ring for ring in rt.outputs if ring.is_full]
        if full:  # blocked on output space
            wait, gate = self.output_wait, self.output_gate
            self.waiting, self.waiting_for_input = [(ring, ring.space_bell) for ring in full], False
            probes = [ring.space_freed for ring in full]
        else:  # waiting for input
            wait, gate = (self.input_wait if rt.inputs else self.no_ring_wait), self.input_gate
            self.waiting, self.waiting_for_input = [(ring, ring.data_bell) for ring in rt.inputs], True
            probes = [ring.available for ring in rt.inputs]
        if not self.quiet:
            self.backoff_s = wait.park_timeout_s
        elif wait.blocks:
            self.backoff_s = min(2 * self.backoff_s, _MAX_PARK_S)
            wait = replace(wait, spins=0, yields=0, park_timeout_s=self.backoff_s)
        if len(probes) == 1:
            ready = probes[0]
        else:

            def ready() -> bool:
                return any(probe() for probe in probes)

        if wait.blocks:
            idle(wait, ready, self.park, deadline, gate)
        elif not idle(wait, ready, self.park, min(deadline, now + wait.park_timeout_s)):
            # spin and yield never park: every park_timeout_s at most, look at the control
            # socket without sleeping (do_work serves the stage's sockets next)
            self.poll_now()

    def park(self, timeout: float) -> None:
        """Sleep until a ring of the spell moves, a control message or a stage socket wakes us,
        or ``timeout``. A park that times out while an input had a record counts a lost wake-up
        in that ring's header."""
        waiting = self.waiting
        asleep = [ring.prepare_wait() for ring, _ in waiting]  # each must be ended: no short-circuit
        try:
            if all(asleep):
                # only this spell's bells: another may hold an old ring (drained only when waited on)
                for _, bell in waiting:
                    self.poller.register(bell.fileno(), zmq.POLLIN)
                try:
                    # round up: truncating a sub-millisecond timeout to 0 would make a paced source spin
                    events = self.poller.poll(math.ceil(max(0.0, timeout) * 1000))
                finally:
                    for _, bell in waiting:
                        self.poller.unregister(bell.fileno())
                self.on_events(dict(events))
                self.quiet = not events
                if not events and self.waiting_for_input:
                    for ring, bell in waiting:
                        # a commit that rang just as the poll timed out raced the timeout: its
                        # wake-up was not lost (a record every few ms meets a deadline now and then)
                        if not _rung(bell):
                            ring.missed_wakeup()
        finally:
            for ring, _ in waiting:
                ring.end_wait()

    def poll_now(self) -> None:
        """Look at the control socket and the sentinel without sleeping (spin and yield spells)."""
        self.on_events(dict(self.poller.poll(0)))

    def on_events(self, events: dict[Any, int]) -> None:
        rt = self.rt
        if rt.parent_sentinel is not None and rt.parent_sentinel in events:
            rt.log.error("supervisor_gone")
            os._exit(EXIT_ORPHANED)
        if rt.sock in events:
            rt.handle_control()
        if self.signalled in events:  # its handler has run (the flag is set): only the bytes are left
            with contextlib.suppress(BlockingIOError):
                while os.read(self.signalled, 64):
                    pass


def _rung(bell: Any) -> bool:
    """Whether ``bell`` holds a ring (readable now), without draining it. ``poll``, not ``select``:
    select refuses a descriptor above 1023, and the engine raises its open-file limit (engine/fdlimit.py)."""
    poller = select.poll()
    poller.register(bell.fileno(), select.POLLIN)
    return bool(poller.poll(0))


async def _run_async(rt: _Runtime) -> None:
    """Run an :class:`AsyncStage` next to control and heartbeat tasks on one event loop."""
    import asyncio  # here: duty-cycle workers never need it, and it costs start-up time

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_control() -> None:
        rt.handle_control()
        if rt.stopping:
            stopped.set()

    def on_sigterm() -> None:  # at once, not at the next heartbeat: the supervisor waits 1 s, then kills
        rt.stopping = True
        stopped.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    # ZMQ_FD is edge-triggered: check the socket after registering, and after each wake-up.
    fd = rt.sock.getsockopt(zmq.FD)
    loop.add_reader(fd, lambda: rt.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN and on_control())
    if rt.parent_sentinel is not None:
        loop.add_reader(rt.parent_sentinel, lambda: os._exit(EXIT_ORPHANED))

    async def heartbeats() -> None:
        while True:
            on_control()
            rt.heartbeat(time.monotonic())
            await asyncio.sleep(rt.spec.heartbeat_interval_s)

    # heartbeats and control run from here on, through the stage's set-up (issue 12 item 5: a
    # set-up that starts an upstream must not get the worker killed as hung)
    beat = asyncio.create_task(heartbeats())
    stop = asyncio.create_task(stopped.wait())
    stage_tasks = []
    try:
        setup = asyncio.create_task(rt.stage.setup(rt.ctx))
        stage_tasks.append(setup)
        await asyncio.wait({setup, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not setup.done():
            return  # stopped while setting up
        setup.result()  # re-raise a set-up failure
        rt.ready()
        work = asyncio.create_task(rt.stage.run(rt.ctx))
        stage_tasks.append(work)
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()  # re-raise a stage failure
    finally:
        # The stage's clean-up (ingest's: end each open stream with an error row, flush the rows)
        # runs to its end here, heartbeats still going, for up to TERMINATE_GRACE_S: once this
        # returns, the runner cancels every task left, a clean-up too, at its next await.
        for task in stage_tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*stage_tasks, return_exceptions=True), TERMINATE_GRACE_S)
        for task in (beat, stop):
            task.cancel()
        loop.remove_reader(fd)
        if rt.parent_sentinel is not None:
            loop.remove_reader(rt.parent_sentinel)
        loop.remove_signal_handler(signal.SIGTERM)  # which restores SIG_DFL: the flag again, as before
        _stop_on_sigterm(rt)


def _stop_on_sigterm(rt: _Runtime) -> None:
    """SIGTERM stops the worker cleanly: its loop sees the flag and ends."""
    signal.signal(signal.SIGTERM, lambda *_: setattr(rt, "stopping", True))


def _set_sched_policy(policy: str) -> None:
    """With "batch", this process runs SCHED_BATCH instead of the kernel's normal SCHED_OTHER
    (which needs no privilege); a policy the engine was started with otherwise (``chrt``: idle,
    real-time) is the operator's and stays, as does everything with "normal". Linux only."""
    if policy == "batch" and hasattr(os, "SCHED_BATCH") and os.sched_getscheduler(0) == os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (the target the supervisor spawns)."""
    die_with_parent(spec.supervisor_pid)  # the kernel kills us if the supervisor dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # before any thread (ZeroMQ's I/O thread) or child starts: they inherit both
    _set_sched_policy(spec.sched_policy)
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    try:
        rt = _Runtime(spec)
    except Exception as exc:
        JsonLogger(spec.name, spec.log_level).error("worker_start_failed", error=repr(exc))
        os._exit(EXIT_STAGE_ERROR)
    _stop_on_sigterm(rt)
    code = 0
    try:
        rt.stage.start(rt.ctx)
        if isinstance(rt.stage, AsyncStage):
            import uvloop

            uvloop.run(_run_async(rt))  # ready once the stage's async set-up is done
        else:
            rt.ready()  # a duty-cycle stage is ready once start() returned
            _DutyCycle(rt).run()
        rt.state = "stopped"
        rt.heartbeat(time.monotonic())
    except Exception as exc:
        phase = "running" if rt.is_ready else "start-up"
        rt.log.error("stage_failed", phase=phase, error=repr(exc), traceback=traceback.format_exc())
        rt.send("error", message=repr(exc)[: control.MAX_TEXT], fatal=True)
        code = EXIT_STAGE_ERROR
    finally:
        try:
            rt.stage.close()
        finally:
            rt.close()
    os._exit(code)
