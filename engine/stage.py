"""The contract between the worker runtime and stage code.

A duty-cycle stage (compute, cache, broadcast, the test stages) subclasses :class:`Stage`:

    class Relay(Stage):
        def start(self, ctx):  self.inp, self.out = ctx.inputs[0], ctx.outputs[0]
        def do_work(self):     ... move what is there; return how many records it handled
        def close(self):       ...

The runtime calls ``do_work`` in a loop; a return of 0 means "nothing to do", and the runtime
then idles with the rings' wait strategy, waking on input data, on output space (when an output
was full) or on a control message. An asyncio stage (ingest talks HTTP) subclasses
:class:`AsyncStage` and implements ``async run(ctx)``; the runtime runs it under uvloop next to
its own control and heartbeat tasks, and ``wait_readable`` / ``wait_writable`` wait on rings
through ``loop.add_reader`` on their doorbells.

Readiness: the worker tells the supervisor "ready" once a duty-cycle stage's ``start`` has
returned, or once an asyncio stage's ``async setup(ctx)`` has (awaited with heartbeats and
control already running, so a slow set-up is not taken for a hang); then ``run`` is called. The
engine reports itself running only when every worker is ready, so whatever a stage must have
before data or requests can reach it (sockets bound, pools and upstreams started) belongs in
``start`` or ``setup``.

Stages persist what must survive their own restart through ``ctx.state_array`` (a file-backed
array in the engine's runtime directory: it outlives the worker, not the engine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.logs import JsonLogger
from engine.protocol import endpoints
from engine.telemetry import Telemetry
from engine.validated import ModelRef, ValidatedParams
from shm.ports import RecordConsumer, RecordProducer


@dataclass
class WorkerContext:
    """What the runtime hands a stage: its rings, params and facilities."""

    name: str
    params: ValidatedParams | dict[str, Any]  # the supervisor's validated values; a dict: validated in start
    inputs: list[RecordConsumer]  # shm.ring's Consumer, or a comparison transport's adapter
    outputs: list[RecordProducer]
    log: JsonLogger
    runtime_dir: str
    state_dir: str
    incarnation: int
    # the supervisor kills this worker as hung after this long without its heartbeat, then restarts it
    hang_timeout_s: float = 2.0
    draining: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # metrics, recorded once per record (never per token) and sent with each heartbeat
    telemetry: Telemetry = field(default_factory=Telemetry)

    def endpoint(self, role: str = "") -> str:
        """``ipc://`` endpoint for a socket this worker binds, named after the worker
        (engine/protocol/endpoints.py), inside the supervisor's runtime directory (the
        supervisor owns the path and removes it with the directory)."""
        return endpoints.endpoint(self.runtime_dir, self.name, role)

    def state_array(self, key: str, dtype: str, shape: int | tuple[int, ...]) -> np.ndarray:  # noqa: F821
        """A zero-initialised array that survives restarts of this worker (not of the engine).

        Writes are plain memory stores into a shared file mapping, so they are kept even when
        the worker is killed with SIGKILL right after."""
        import numpy as np  # here, not at the top: workers that keep no state start faster

        path = os.path.join(self.state_dir, f"{self.name}.{key}.bin")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mode = "r+" if os.path.exists(path) and os.path.getsize(path) == size else "w+"
        return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


class Stage:
    """A duty-cycle stage. Override ``do_work``; the other hooks are optional."""

    pausable = True  # `neuralpipe pause` stops the runtime calling do_work
    # The stage's params model (an engine.params.StageParams subclass), by reference
    # (ModelRef("stages.<stage>.params:<Model>"): imported only where a dict is validated):
    # checked for every worker at config load, before anything starts, and read in ``start``
    # through ``parse_params``. None: the params are not checked (a dict is passed on).
    Params: ClassVar[ModelRef | type | None] = None

    @classmethod
    def parse_params(cls, params: ValidatedParams | dict[str, Any]) -> Any:
        """``params`` read like the stage's ``Params`` model: as handed over when the supervisor
        validated them, else validated here (ValueError naming the key)."""
        if isinstance(params, ValidatedParams) or cls.Params is None:
            return params
        from engine.params import parse  # pydantic: only for a dict, never in a supervised worker

        return parse(cls.Params, params)

    def start(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def do_work(self) -> int:
        raise NotImplementedError

    def pollables(self) -> list[Any]:
        """ZMQ sockets or file descriptors of the stage's own (e.g. a ROUTER serving requests) that
        must wake an idle worker; ``do_work`` then serves them without blocking. Asked once, after
        ``start``."""
        return []

    def idle_timeout_s(self) -> float | None:
        """Longest the runtime may sleep when ``do_work`` found nothing (a source's pacing);
        None: until a ring or control message wakes it."""
        return None

    def keep_alive(self) -> None:
        """While the stage is paused (``do_work`` is not called): what it still owes others besides
        its work, e.g. the broadcast's heartbeats to its subscribers. Called at least every
        ``idle_timeout_s()`` (when not None) and at each of the worker's heartbeats."""

    def drained(self) -> bool:
        """True once a draining stage has nothing left in flight (default: every input empty)."""
        return all(ring.available() == 0 for ring in self.ctx.inputs)

    def stats(self) -> dict[str, Any]:
        """Stage counters sent with every heartbeat (JSON-serialisable); asked only once the
        stage is ready (``start``/``setup`` returned), so they may use what those made."""
        return {}

    def close(self) -> None:
        """Release what ``start`` took."""


class SocketTurns:
    """When a duty-cycle stage asks its own sockets (its ``pollables``) for messages: each ask is a
    system call, and the turn right after a record finds nothing new but rarely. Asked:

    - in a turn after an idle spell with no record waiting: a message is then what woke the
      worker's park (the sockets are among what it parks on);
    - while the last ask read as many messages as a turn may (more are waiting);
    - ``every_s`` after the last ask, for records flowing back to back (no turn is idle).

    The stage calls :meth:`due` at the start of a turn, :meth:`asked` after asking and
    :meth:`turn_done` at its end."""

    __slots__ = ("after_idle", "every_s", "left", "next_at")

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.after_idle, self.left, self.next_at = True, False, 0.0

    def due(self, now: float, records_waiting: int) -> bool:
        return (self.after_idle and not records_waiting) or self.left or now >= self.next_at

    def asked(self, now: float, more_waiting: bool) -> None:
        self.next_at, self.left = now + self.every_s, more_waiting

    def turn_done(self, did_work: bool) -> None:
        self.after_idle = not did_work  # the next turn follows an idle spell


class AsyncStage(Stage):
    """An asyncio stage: implement ``run``, which returns when ``ctx.draining`` or on cancel."""

    pausable = False  # the runtime cannot stop an event loop's tasks: `pause` is refused

    async def setup(self, ctx: WorkerContext) -> None:
        """Start-up work on the event loop: awaited before the worker reports ready, while its
        heartbeats already run (so it must await, not block: a blocking call belongs in a thread,
        e.g. ``asyncio.to_thread``). An exception ends the worker (non-zero exit, logged)."""

    async def run(self, ctx: WorkerContext) -> None:
        raise NotImplementedError

    def do_work(self) -> int:  # pragma: no cover - the async runtime never calls it
        raise TypeError("an AsyncStage runs through run(), not do_work()")


async def wait_readable(consumer: RecordConsumer, timeout: float | None = None) -> bool:
    """In a stage's event loop: wait until ``consumer`` has a record (True) or ``timeout`` passes.
    A wait that times out while a record was there counts a lost wake-up in the ring's header."""
    return await _wait_bell(
        consumer.prepare_wait, consumer.end_wait, consumer.data_bell.fileno(), timeout, consumer.missed_wakeup
    )


async def wait_writable(producer: RecordProducer, timeout: float | None = None) -> bool:
    """In a stage's event loop: wait until the consumer of ``producer``'s ring frees space."""
    return await _wait_bell(producer.prepare_wait, producer.end_wait, producer.space_bell.fileno(), timeout)


async def _wait_bell(prepare, end, fd: int, timeout: float | None, missed=None) -> bool:
    import asyncio  # only asyncio stages get here; duty-cycle workers never import it

    if not prepare():
        end()
        return True
    loop = asyncio.get_running_loop()
    rung = loop.create_future()
    loop.add_reader(fd, lambda: rung.done() or rung.set_result(True))
    try:
        await asyncio.wait_for(rung, timeout)
        return True
    except TimeoutError:
        return missed is not None and missed()
    finally:
        loop.remove_reader(fd)
        end()
