"""Worker runtime: the process a stage runs in.

``main(spec)`` is the target the supervisor spawns (``spawn`` start method). It ties the worker
to its supervisor's life (PR_SET_PDEATHSIG plus the parent's sentinel pipe), attaches the rings,
connects the control DEALER, starts the stage and runs its duty cycle or its asyncio loop,
sending heartbeats and obeying pause/resume/drain/stop/reconfigure. SIGTERM stops it cleanly;
SIGINT is ignored (Ctrl-C reaches the whole process group, and the supervisor drains workers in
order rather than letting them all die at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import zmq

from engine import control, transport
from engine.logs import JsonLogger
from engine.stage import AsyncStage, Stage, WorkerContext
from engine.transport import Channel
from shm.wait import WaitStrategy

_PR_SET_PDEATHSIG = 1
EXIT_STAGE_ERROR = 3
EXIT_ORPHANED = 4


@dataclass(frozen=True)
class RingEnd:
    """One ring a worker attaches to: full segment name and the wait strategy to use; ``channel``
    instead of the segment when the engine runs another transport (engine/transport.py)."""

    segment: str
    wait: WaitStrategy
    channel: Channel | None = None


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
    heartbeat_interval_s: float = 0.5
    log_level: str = "info"
    params: dict[str, Any] = field(default_factory=dict)


def load_stage(ref: str) -> Stage:
    """Instantiate the stage class named ``package.module:Class``."""
    module_name, _, class_name = ref.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"stage reference {ref!r} must look like 'package.module:Class'")
    stage_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(stage_class, type) and issubclass(stage_class, Stage)):
        raise TypeError(f"stage {ref!r} is not a subclass of engine.stage.Stage")
    return stage_class()


def _die_with_parent(supervisor_pid: int) -> None:
    """Have the kernel SIGKILL us when the supervisor dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os._exit(EXIT_ORPHANED)


class _Runtime:
    """State shared by the duty-cycle and asyncio loops: control socket, heartbeats, rings."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.log = JsonLogger(spec.name, spec.log_level)
        self.state = "starting"
        self.processed = 0
        self.stopping = False
        self.zmq = zmq.Context(io_threads=1)
        self.sock = self.zmq.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, spec.name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(spec.control_endpoint)
        self.inputs = [transport.attach_consumer(end, self.zmq) for end in spec.inputs]
        self.outputs = [transport.attach_producer(end, self.zmq) for end in spec.outputs]
        parent = multiprocessing.parent_process()
        self.parent_sentinel = parent.sentinel if parent is not None else None
        self.send("hello", pid=os.getpid(), incarnation=spec.incarnation)
        self.stage = load_stage(spec.stage)
        self.ctx = WorkerContext(
            name=spec.name,
            params=dict(spec.params),
            inputs=self.inputs,
            outputs=self.outputs,
            log=self.log,
            runtime_dir=spec.runtime_dir,
            state_dir=spec.state_dir,
            incarnation=spec.incarnation,
        )
        self.next_heartbeat = 0.0

    def send(self, msg_type: str, **fields: Any) -> None:
        # supervisor not reading: heartbeats are periodic, so a lost one is not an error
        with contextlib.suppress(zmq.Again):
            self.sock.send(control.encode(msg_type, worker=self.spec.name, **fields), zmq.NOBLOCK)

    def heartbeat(self, now: float) -> None:
        for ring in self.inputs:
            ring.heartbeat()
        for ring in self.outputs:
            ring.heartbeat()
        self.send("heartbeat", state=self.state, processed=self.processed, stats=self.stage.stats())
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
        elif kind == "stop":
            self.stopping = True
        elif kind == "reconfigure":
            self.stage.reconfigure(dict(msg.get("params") or {}))

    def close(self) -> None:
        for ring in self.inputs + self.outputs:
            ring.close()
        self.sock.close(0)
        self.zmq.term()


class _DutyCycle:
    """Call ``do_work`` while it finds work; idle on doorbells, control socket and timers."""

    def __init__(self, rt: _Runtime) -> None:
        self.rt = rt
        self.poller = zmq.Poller()
        self.poller.register(rt.sock, zmq.POLLIN)
        if rt.parent_sentinel is not None:
            self.poller.register(rt.parent_sentinel, zmq.POLLIN)
        for ring in rt.inputs:
            self.poller.register(ring.data_bell.fileno(), zmq.POLLIN)
        for ring in rt.outputs:
            self.poller.register(ring.space_bell.fileno(), zmq.POLLIN)
        for pollable in rt.stage.pollables():
            self.poller.register(pollable, zmq.POLLIN)
        strategies = [end.wait for end in rt.spec.inputs + rt.spec.outputs]
        self.spins = min((w.spins for w in strategies), default=0)
        self.blocks = all(w.blocks for w in strategies)

    def run(self) -> None:
        rt, stage = self.rt, self.rt.stage
        idle = 0
        while not rt.stopping:
            now = time.monotonic()
            if now >= rt.next_heartbeat:
                rt.handle_control()
                rt.heartbeat(now)
            if rt.state == "paused":
                self.park(rt.spec.heartbeat_interval_s, rings=False)
                continue
            done = stage.do_work()
            if done:
                rt.processed += done
                idle = 0
                continue
            if rt.ctx.draining and stage.drained():
                return
            idle += 1
            if idle <= self.spins:
                continue
            if not self.blocks:
                os.sched_yield()
                if idle & 1023 == 0:
                    rt.handle_control()
                continue
            timeout = max(0.0, rt.next_heartbeat - time.monotonic())
            hint = stage.idle_timeout_s()
            if hint is not None:
                timeout = min(timeout, hint)
            self.park(timeout, rings=True)

    def park(self, timeout: float, rings: bool) -> None:
        """Sleep until a ring this stage waits on moves, a control message comes, or timeout."""
        rt = self.rt
        waiting = []
        if rings:
            full = [ring for ring in rt.outputs if ring.is_full]
            waiting = full or rt.inputs  # blocked on output space, else on input data
        ready = False
        for ring in waiting:
            if not ring.prepare_wait():
                ready = True
        try:
            if not ready:
                # round up: truncating a sub-millisecond timeout to 0 would make a paced source spin
                events = dict(self.poller.poll(math.ceil(timeout * 1000)))
                if rt.parent_sentinel is not None and rt.parent_sentinel in events:
                    rt.log.error("supervisor_gone")
                    os._exit(EXIT_ORPHANED)
                if rt.sock in events:
                    rt.handle_control()
        finally:
            for ring in waiting:
                ring.end_wait()


async def _run_async(rt: _Runtime) -> None:
    """Run an :class:`AsyncStage` next to control and heartbeat tasks on one event loop."""
    import asyncio  # here: duty-cycle workers never need it, and it costs start-up time

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_control() -> None:
        rt.handle_control()
        if rt.stopping:
            stopped.set()

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

    beat = asyncio.create_task(heartbeats())
    work = asyncio.create_task(rt.stage.run(rt.ctx))
    stop = asyncio.create_task(stopped.wait())
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()  # re-raise a stage failure
    finally:
        for task in (beat, work, stop):
            task.cancel()
        loop.remove_reader(fd)
        if rt.parent_sentinel is not None:
            loop.remove_reader(rt.parent_sentinel)


def main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (the target the supervisor spawns)."""
    _die_with_parent(spec.supervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rt = _Runtime(spec)
    except Exception as exc:
        JsonLogger(spec.name, spec.log_level).error("worker_start_failed", error=repr(exc))
        os._exit(EXIT_STAGE_ERROR)
    signal.signal(signal.SIGTERM, lambda *_: setattr(rt, "stopping", True))
    code = 0
    try:
        rt.stage.start(rt.ctx)
        rt.state = "running"
        rt.send("ready")
        rt.heartbeat(time.monotonic())
        if isinstance(rt.stage, AsyncStage):
            import uvloop

            uvloop.run(_run_async(rt))
        else:
            _DutyCycle(rt).run()
        rt.state = "stopped"
        rt.heartbeat(time.monotonic())
    except Exception as exc:
        rt.log.error("stage_failed", error=repr(exc), traceback=traceback.format_exc())
        rt.send("error", message=repr(exc), fatal=True)
        code = EXIT_STAGE_ERROR
    finally:
        try:
            rt.stage.close()
        finally:
            rt.close()
    os._exit(code)
