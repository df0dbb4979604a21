"""The comparison ring transports of ``neuralpipe bench pipeline``: what else could carry records
between two workers.

``shm`` (the default and the product) is the shared-memory ring of ``shm.ring``: workers get its
:class:`~shm.ring.Producer` and :class:`~shm.ring.Consumer` themselves, with no wrapper, so the
fast path is untouched. ``queue`` (a bounded ``multiprocessing.Queue`` per ring) and ``zmq``
(PUSH/PULL over ``ipc://``) exist for ``neuralpipe bench pipeline``: the same stages over the
obvious alternatives, to show what the rings buy; the engine takes them as a port factory
(``[engine] transport = "neuralpipe_bench.ring_transports:QUEUE"``) and knows nothing else of them.
Their adapters implement the part of the ring
API that stages and the worker runtime use (try_read/unread/release/available,
try_claim/commit/abort/is_full/last_committed, prepare_wait/end_wait, the bells' ``fileno()``).

What the two alternatives do NOT give (docs/configuration.md, ``[engine] transport``):

- crash safety: a record is gone from the transport once the consumer takes it, so records a
  killed consumer had read but not yet passed on are lost (a ring re-delivers from its read
  cursor); a worker killed inside ``multiprocessing.Queue`` can leave its lock held for good;
- resume: ``last_committed()`` is always None (nothing survives its producer);
- inspection: no header, so ``neuralpipe check``, ring metrics, the ring part of PAS and
  ``status`` occupancy are "n/a"; the drop-when-full policy does not apply (producers block).

Records travel as one buffer: an 8-byte little-endian record type, then the payload (so the
payload stays 8-byte aligned for the numpy views of a token batch).
"""

from __future__ import annotations

import collections
import contextlib
import os
import struct
from dataclasses import dataclass
from queue import Empty, Full
from typing import Any

import zmq

from shm.doorbell import Doorbell, create_fifo
from shm.ports import RecordConsumer, RecordProducer
from shm.ring import RecordTooLarge, RingError

# Capacity in bytes becomes a bound in messages for the queue and zmq transports: one message
# per NOMINAL_RECORD bytes of ring capacity (a 64-row token batch is about 3 KiB).
NOMINAL_RECORD = 4096
MIN_SLOTS = 16
PRODUCER_LINGER_MS = 2000  # a draining zmq producer's last records still reach the consumer
_TYPE = struct.Struct("<Q")
_PREFIX = _TYPE.size


@dataclass(frozen=True)
class Channel:
    """A non-shm ring as the supervisor hands it to the two workers (through spawn, so it must
    pickle: a ``multiprocessing.Queue`` may be pickled only then)."""

    kind: str  # "queue" or "zmq"
    name: str  # the ring's name in the topology
    max_record: int
    slots: int  # the bound, in messages (see slots())
    queue: Any = None  # queue: the bounded multiprocessing.Queue
    space_bell: str = ""  # queue: FIFO the consumer rings when it frees space in a full queue
    endpoint: str = ""  # zmq: ipc:// endpoint the consumer binds and the producer connects


def slots(capacity: int) -> int:
    """Messages a non-shm ring of ``capacity`` bytes holds."""
    return max(MIN_SLOTS, capacity // NOMINAL_RECORD)


@dataclass(frozen=True)
class MessageTransport:
    """A :class:`shm.ports.PortFactory` over messages: ``queue`` or ``zmq``."""

    kind: str

    def create(self, name: str, capacity: int, max_record: int, mp: Any, run_dir: str) -> Channel:
        """The supervisor's side: make ring ``name`` inside its runtime directory ``run_dir``;
        everything it makes goes with the process or that directory."""
        if self.kind == "queue":
            bell = os.path.join(run_dir, "bells", name + ".space")
            create_fifo(bell)
            bound = slots(capacity)
            return Channel(self.kind, name, max_record, bound, queue=mp.Queue(bound), space_bell=bell)
        endpoint = f"ipc://{os.path.join(run_dir, 'ring-' + name)}.sock"
        return Channel(self.kind, name, max_record, slots(capacity), endpoint=endpoint)

    def close(self, channel: Channel) -> None:
        """The supervisor's side at tear-down (it never puts, so it has no feeder thread to wait for)."""
        if channel.queue is not None:
            channel.queue.close()
            channel.queue.cancel_join_thread()

    def consumer(self, channel: Channel, zmq_ctx: zmq.Context) -> RecordConsumer:
        return QueueConsumer(channel) if self.kind == "queue" else ZmqConsumer(channel, zmq_ctx)

    def producer(self, channel: Channel, zmq_ctx: zmq.Context) -> RecordProducer:
        return QueueProducer(channel) if self.kind == "queue" else ZmqProducer(channel, zmq_ctx)

    def describe(self, channel: Channel) -> dict[str, Any]:
        """A non-shm ring has no header: only what the supervisor made (occupancy and counters n/a)."""
        return {"name": channel.name, "transport": channel.kind, "slots": channel.slots}


QUEUE = MessageTransport("queue")
ZMQ = MessageTransport("zmq")
# what ``neuralpipe bench pipeline --transport`` names, as ``[engine] transport`` references
REFERENCES = {
    "shm": "shm",
    "queue": "neuralpipe_bench.ring_transports:QUEUE",
    "zmq": "neuralpipe_bench.ring_transports:ZMQ",
}


class _Fd:
    """A file descriptor to poll, in the shape of a ring's doorbell (``fileno()``)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class _MessageConsumer:
    """Reads whole messages; keeps those read since the last release so they can be pushed back
    (``unread`` the last one, ``rewind`` all) or released in part (``release_to``). ``position``
    counts records, not bytes."""

    durable = False  # a restarted consumer counts positions from 0 again (shm.ports)

    def __init__(self, channel: Channel) -> None:
        self.name = channel.name
        self.max_record = channel.max_record
        self.capacity = channel.slots  # in messages, the unit of ``position`` (shm.ports)
        self._read: list[tuple[int, memoryview]] = []  # returned by try_read since the last release
        self._back: collections.deque[tuple[int, memoryview]] = collections.deque()  # pushed back
        self.position = 0

    def _receive(self) -> Any:
        """The next message, or None when there is none now."""
        raise NotImplementedError

    def _has_message(self) -> bool:
        raise NotImplementedError

    def try_read(self) -> tuple[int, memoryview] | None:
        if self._back:
            record = self._back.popleft()
        else:
            message = self._receive()
            if message is None:
                return None
            record = (_TYPE.unpack_from(message)[0], memoryview(message)[_PREFIX:])
        self._read.append(record)
        self.position += 1
        return record

    def unread(self) -> None:
        if not self._read:
            raise RingError(f"ring {self.name!r}: unread without a record read since the last release/unread")
        self._back.appendleft(self._read.pop())
        self.position -= 1

    def rewind(self) -> None:
        self._back.extendleft(reversed(self._read))
        self.position -= len(self._read)
        self._read.clear()

    def release(self) -> None:
        self._read.clear()
        self._released()

    def release_to(self, position: int, records: int) -> None:
        """Release the ``records`` records read before ``position`` (the ring's contract)."""
        if not 0 <= records <= len(self._read) or position - records < self.position - len(self._read):
            raise RingError(f"ring {self.name!r}: release_to({position}, {records}) outside what was read")
        del self._read[:records]
        self._released()

    def _released(self) -> None:
        """After a release: what a transport does then (the Queue wakes a producer waiting for room)."""

    def available(self) -> int:
        """Non-zero while a record is waiting (a count of bytes is not known before receiving)."""
        if self._back:
            return sum(len(record[1]) or 1 for record in self._back)
        return int(self._has_message())

    def prepare_wait(self) -> bool:
        return not self._back and not self._has_message()

    def end_wait(self) -> None:
        """Nothing to undo: no waiting flag is shared with the producer."""

    def missed_wakeup(self) -> bool:
        """No header to count lost wake-ups in (and no shared waiting flag to lose one)."""
        return False

    def heartbeat(self) -> None:
        """No header to beat in; liveness is the control plane's."""


class _MessageProducer:
    """Claims fill a private buffer; commit sends it. The space check is made at claim time, and
    this is the only producer, so space seen then is still there at commit; a send refused anyway
    (a zmq peer going away) is kept and sent before the next claim."""

    def __init__(self, channel: Channel) -> None:
        self.name = channel.name
        self.max_record = channel.max_record
        self.capacity = channel.slots  # in messages (shm.ports)
        self._claim: bytearray | None = None
        self._unsent: bytearray | None = None
        self._full = False

    def _has_space(self) -> bool:
        raise NotImplementedError

    def _send(self, message: bytearray) -> bool:
        """Send without blocking; False when the transport refused it."""
        raise NotImplementedError

    def try_claim(self, length: int) -> memoryview | None:
        if self._claim is not None:
            raise RingError(f"ring {self.name!r}: claim while another claim is open; commit or abort it")
        if not 0 <= length <= self.max_record:
            raise RecordTooLarge(
                f"ring {self.name!r}: record of {length} bytes outside [0, max_record {self.max_record}]"
            )
        if self._unsent is not None and self._send(self._unsent):
            self._unsent = None
        self._full = self._unsent is not None or not self._has_space()
        if self._full:
            return None
        self._claim = bytearray(_PREFIX + length)
        return memoryview(self._claim)[_PREFIX:]

    def commit(self, record_type: int) -> None:
        message = self._claim
        if message is None:
            raise RingError(f"ring {self.name!r}: commit without a claim")
        self._claim = None
        _TYPE.pack_into(message, 0, record_type)
        if not self._send(message):
            self._unsent = message

    def abort(self) -> None:
        self._claim = None

    def last_committed(self) -> None:
        """Nothing of a dead producer's records stays readable: a restarted one starts afresh."""
        return None

    @property
    def is_full(self) -> bool:
        return self._full

    def space_freed(self) -> bool:
        """No cursor to spin on: an idle worker parks on ``space_bell`` at once."""
        return False

    def end_wait(self) -> None:
        """Nothing to undo: no waiting flag is shared with the consumer."""

    def heartbeat(self) -> None:
        """No header to beat in; liveness is the control plane's."""


# ---- multiprocessing.Queue ------------------------------------------------------------------------


class QueueConsumer(_MessageConsumer):
    """The reading end of a bounded ``multiprocessing.Queue``. Its data bell is the queue's pipe
    (readable while a message is in it). Taking from a queue seen full rings the producer's space
    bell at the next release: only this consumer takes, so a queue the producer found full stays
    full until then, and the ring is never missed."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self._queue = channel.queue
        self.data_bell = _Fd(self._queue._reader.fileno())  # no public accessor for the pipe
        self.space_bell = Doorbell(channel.space_bell)
        self._freed_full = False

    def _receive(self) -> Any:
        was_full = self._queue.full()
        try:
            message = self._queue.get_nowait()
        except Empty:
            return None
        self._freed_full |= was_full
        return message

    def _has_message(self) -> bool:
        return not self._queue.empty()

    def _released(self) -> None:
        if self._freed_full:
            self._freed_full = False
            self.space_bell.ring()

    def close(self) -> None:
        self.space_bell.close()


class QueueProducer(_MessageProducer):
    """The writing end of a bounded ``multiprocessing.Queue`` (its feeder thread pickles and
    writes each message to the pipe). Sleeps on the space bell its consumer rings."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self._queue = channel.queue
        self.space_bell = Doorbell(channel.space_bell)

    def _has_space(self) -> bool:
        return not self._queue.full()

    def _send(self, message: bytearray) -> bool:
        try:
            self._queue.put_nowait(message)
        except Full:
            return False
        return True

    def prepare_wait(self) -> bool:
        self.space_bell.drain()
        return self._unsent is not None or self._queue.full()

    def close(self) -> None:
        # flush the feeder thread: the worker leaves with os._exit, which would drop its buffer
        self._queue.close()
        self._queue.join_thread()
        self.space_bell.close()


# ---- zmq PUSH/PULL --------------------------------------------------------------------------------


class ZmqConsumer(_MessageConsumer):
    """A PULL socket bound at the ring's ipc endpoint. Its bell is ZMQ_FD, which is edge-triggered:
    ``prepare_wait`` reads ZMQ_EVENTS (which also re-arms the fd) before the caller sleeps."""

    def __init__(self, channel: Channel, ctx: zmq.Context) -> None:
        super().__init__(channel)
        self._sock = ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, channel.slots)
        self._sock.bind(channel.endpoint)
        self.data_bell = _Fd(self._sock.getsockopt(zmq.FD))

    def _receive(self) -> Any:
        try:
            return self._sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def _has_message(self) -> bool:
        return bool(self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def close(self) -> None:
        self._sock.close(0)


class ZmqProducer(_MessageProducer):
    """A PUSH socket connected to the consumer's endpoint; the high-water mark is the bound (a
    full one makes POLLOUT false, which is the ring's "full")."""

    def __init__(self, channel: Channel, ctx: zmq.Context) -> None:
        super().__init__(channel)
        self._sock = ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, PRODUCER_LINGER_MS)
        self._sock.setsockopt(zmq.SNDHWM, channel.slots)
        self._sock.connect(channel.endpoint)
        self.space_bell = _Fd(self._sock.getsockopt(zmq.FD))

    def _has_space(self) -> bool:
        return bool(self._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)

    def _send(self, message: bytearray) -> bool:
        try:
            self._sock.send(message, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def prepare_wait(self) -> bool:
        return self._unsent is not None or not self._has_space()

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.close()
