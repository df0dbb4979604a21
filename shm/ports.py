"""The ring API stages use, as two protocols: what a stage may call on ``ctx.inputs`` (a
:class:`RecordConsumer`) and ``ctx.outputs`` (a :class:`RecordProducer`). ``shm.ring``'s Consumer
and Producer implement them, and so do the comparison transports' adapters
(bench/ring_transports.py, bounded ``multiprocessing.Queue`` and zmq PUSH/PULL, plugged in through a
:class:`PortFactory`): a stage written against these works over all three, with no special case.
The semantics are the ring's (docs/data-plane.md); where a message transport differs, the member
says so. ``isinstance(x, RecordConsumer)`` checks that every member is there (tests/test_ports.py),
not their signatures."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class Bell(Protocol):
    """A doorbell: readable (in a poller, ``loop.add_reader``) when the other side rang it."""

    def fileno(self) -> int: ...


@runtime_checkable
class RecordConsumer(Protocol):
    name: str
    # what ``position`` may run ahead of the last release before the producer is held up: bytes
    # for a ring, messages for the message transports (``position`` counts in the same unit)
    capacity: int
    # True for a ring: its cursors, and the records read but not released, outlive this worker
    # (a restarted one resumes at the same positions); False for a message transport, whose
    # positions start again from 0 in each incarnation
    durable: bool
    data_bell: Bell | None  # rung by the producer's commit to a waiting consumer (None: a ring made without doorbells)

    @property
    def position(self) -> int:
        """Where the next read starts (after the last record handed out)."""
        ...

    def try_read(self) -> tuple[int, memoryview] | None:
        """The next record (type, payload view valid until released), or None when empty."""
        ...

    def unread(self) -> None:
        """Push the last record read back, to be read again."""
        ...

    def rewind(self) -> None:
        """Push back every record read since the last release."""
        ...

    def release(self) -> None:
        """Free every record read so far for the producer to reuse."""
        ...

    def release_to(self, position: int, records: int) -> None:
        """Free the ``records`` records read before ``position``; the later ones stay held."""
        ...

    def available(self) -> int:
        """Non-zero while a record is waiting (bytes for a ring; a message transport cannot count
        before receiving)."""
        ...

    def prepare_wait(self) -> bool:
        """About to sleep on ``data_bell``: False when a record is there already (do not sleep).
        Always paired with ``end_wait``."""
        ...

    def end_wait(self) -> None: ...

    def missed_wakeup(self) -> bool:
        """After a wait that timed out: True (and counted, on a ring) when a record was there."""
        ...

    def heartbeat(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class RecordProducer(Protocol):
    name: str
    capacity: int  # as RecordConsumer.capacity
    space_bell: Bell | None  # rung by the consumer's release to a producer waiting on a full ring (likewise)

    @property
    def is_full(self) -> bool:
        """The last claim found no room."""
        ...

    def try_claim(self, length: int) -> memoryview | None:
        """A writable view of ``length`` bytes, or None when full; then ``commit`` or ``abort``."""
        ...

    def commit(self, record_type: int) -> None: ...

    def abort(self) -> None: ...

    def last_committed(self) -> tuple[int, memoryview] | None:
        """The last record a predecessor committed (a restarted producer resumes after it); None
        when empty, and always for a message transport (nothing stays readable)."""
        ...

    def space_freed(self) -> bool:
        """A spin probe for a full output: True once the consumer freed space. A message
        transport has no cursor to spin on: False, and the wait parks on ``space_bell``."""
        ...

    def prepare_wait(self) -> bool:
        """About to sleep on ``space_bell``: False when there is room already."""
        ...

    def end_wait(self) -> None: ...

    def heartbeat(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class PortFactory(Protocol):
    """Another transport for the engine's rings (``[engine] transport = "package.module:NAME"``):
    the supervisor calls :meth:`create` per ring and hands the result (it must pickle: it goes
    through spawn) to both workers, which open their ends with :meth:`consumer` and
    :meth:`producer`. The shared-memory ring needs none of this: it is the built-in ``shm``."""

    def create(self, name: str, capacity: int, max_record: int, mp: object, run_dir: str) -> object: ...

    def close(self, channel: object) -> None: ...

    def consumer(self, channel: object, zmq_ctx: object) -> RecordConsumer: ...

    def producer(self, channel: object, zmq_ctx: object) -> RecordProducer: ...

    def describe(self, channel: object) -> dict: ...
