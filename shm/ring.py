"""Single-producer single-consumer ring of variable-size records over shared memory.

The owner (the supervisor) creates the segment and its doorbells with :meth:`Ring.create`; one
producer and one consumer attach with :func:`Producer.attach` and :func:`Consumer.attach`.

Producer: ``view = try_claim(n)`` gives ``n`` writable bytes in place or None when the ring is
full; fill it, then ``commit(type)`` publishes it or ``abort()`` forgets it. Consumer:
``try_read()`` gives ``(type, view)`` of the next record in place or None; the views stay valid
until ``release()``, which hands every record read so far back to the producer in one store.

Visibility: a record becomes visible only when the producer stores the new write cursor, after
the record's bytes and header. A producer killed before that leaves nothing visible; the claim
it left is found and counted by :meth:`Ring.unblock`, which a new producer also runs on attach.

Ordering: control words are plain aligned 8-byte loads and stores through a ``memoryview``;
CPython offers no fences, so the ring relies on x86-64's total store order (stores are seen in
program order, loads are not reordered with older loads). The one store-load pair that TSO does
not order, "I am going to sleep" against "new data", is fenced on the sleeper's side with a locked
instruction, and parking has a timeout, so a missed wake-up costs at most ``park_timeout_s`` and
is counted (``lost_wakeups``).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass

from shm import descriptor as d
from shm.doorbell import Doorbell, create_fifo
from shm.naming import check_ring
from shm.segment import attach_segment, close_segment, create_segment, map_readonly, remove_segment
from shm.wait import WaitStrategy, idle

_W_MAGIC = d.word(d.MAGIC_OFFSET)
_W_CAPACITY = d.word(d.CAPACITY_OFFSET)
_W_MAX_RECORD = d.word(d.MAX_RECORD_OFFSET)
_W_CREATED = d.word(d.CREATED_NS_OFFSET)
_W_OWNER = d.word(d.OWNER_PID_OFFSET)
_W_WRITE = d.word(d.WRITE_CURSOR_OFFSET)
_W_READ = d.word(d.READ_CURSOR_OFFSET)
_W_CONSUMER_WAITING = d.word(d.CONSUMER_WAITING_OFFSET)
_W_PRODUCER_WAITING = d.word(d.PRODUCER_WAITING_OFFSET)
_W_PRODUCER_PID = d.word(d.PRODUCER_PID_OFFSET)
_W_PRODUCER_HEARTBEAT = d.word(d.PRODUCER_HEARTBEAT_OFFSET)
_W_RECORDS_WRITTEN = d.word(d.RECORDS_WRITTEN_OFFSET)
_W_BACKPRESSURE = d.word(d.BACKPRESSURE_OFFSET)
_W_DROPS = d.word(d.DROPS_OFFSET)
_W_LAST_RECORD = d.word(d.LAST_RECORD_OFFSET)
_W_CLAIM = d.word(d.CLAIM_OFFSET)
_W_CONSUMER_PID = d.word(d.CONSUMER_PID_OFFSET)
_W_CONSUMER_HEARTBEAT = d.word(d.CONSUMER_HEARTBEAT_OFFSET)
_W_RECORDS_READ = d.word(d.RECORDS_READ_OFFSET)
_W_LOST_WAKEUPS = d.word(d.LOST_WAKEUPS_OFFSET)
_W_UNBLOCKS = d.word(d.UNBLOCKS_OFFSET)

_HDR = d.HEADER_SIZE
_PAD = d.TYPE_PADDING
_LEN_MASK = d.LENGTH_MASK
_TYPE_MIN = d.TYPE_MIN_USER
_TYPE_MAX = d.TYPE_MAX_USER


class RingError(Exception):
    """Misuse of a ring: a second producer or consumer, a bad record type or size."""


class RingCorrupt(RingError):
    """The segment's header or a record header is not a valid ring; the message says which field."""


class RecordTooLarge(RingError):
    """A record larger than the ring's ``max_record``: it could never fit, so waiting is pointless."""


@dataclass(frozen=True)
class RingHeader:
    """A consistent-enough snapshot of a ring's header, for inspection and metrics."""

    name: str
    capacity: int
    max_record: int
    drop_when_full: bool
    created_ns: int
    owner_pid: int
    write_cursor: int
    read_cursor: int
    producer_pid: int
    producer_heartbeat_ns: int
    consumer_pid: int
    consumer_heartbeat_ns: int
    records_written: int
    records_read: int
    backpressure_events: int
    drops: int
    lost_wakeups: int
    unblocks: int
    consumer_waiting: bool
    producer_waiting: bool
    pending_claim: bool
    doorbell_dir: str

    @property
    def used(self) -> int:
        return self.write_cursor - self.read_cursor

    @property
    def occupancy(self) -> float:
        return self.used / self.capacity


def validate_header(name: str, q: memoryview, size: int) -> None:
    """Raise :class:`RingCorrupt` naming the first field of the header that is not sane."""
    if size < _HDR + d.MIN_CAPACITY:
        raise RingCorrupt(f"ring {name!r}: segment of {size} bytes is smaller than a ring header")
    if q[_W_MAGIC] != d.MAGIC:
        raise RingCorrupt(f"ring {name!r}: bad magic {q[_W_MAGIC]:#018x}, not a neuralpipe ring")
    version = q[d.word(d.VERSION_OFFSET)] & 0xFFFFFFFF
    if version != d.LAYOUT_VERSION:
        raise RingCorrupt(f"ring {name!r}: layout version {version}, this build reads {d.LAYOUT_VERSION}")
    capacity = q[_W_CAPACITY]
    if capacity < d.MIN_CAPACITY or capacity & (capacity - 1) or capacity + _HDR > size:
        raise RingCorrupt(f"ring {name!r}: capacity {capacity} is not a power of two fitting {size} bytes")
    max_record = q[_W_MAX_RECORD]
    if not 0 < max_record <= d.default_max_record(capacity) * 2:
        raise RingCorrupt(f"ring {name!r}: max_record {max_record} impossible for capacity {capacity}")
    write, read = q[_W_WRITE], q[_W_READ]
    if write % d.RECORD_ALIGNMENT or read % d.RECORD_ALIGNMENT:
        raise RingCorrupt(f"ring {name!r}: cursors not 8-byte aligned (write={write}, read={read})")
    if not read <= write <= read + capacity:
        raise RingCorrupt(f"ring {name!r}: cursors out of order (write={write}, read={read}, capacity={capacity})")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a pid recorded in a ring header; 0 means none). A zombie (exited,
    not yet reaped by its parent) still answers ``kill(pid, 0)`` but will never touch a ring again."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, IndexError):
        return False


def _fence() -> None:
    """A full memory barrier: acquiring an uncontended lock is a locked instruction on x86-64."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


_FENCE_LOCK = threading.Lock()


def _doorbell_paths(doorbell_dir: str, name: str) -> tuple[str, str]:
    """(data, space) FIFO paths: the producer rings ``data``, the consumer rings ``space``."""
    return os.path.join(doorbell_dir, name + ".data"), os.path.join(doorbell_dir, name + ".space")


class _Side:
    """What a producer and a consumer share: the mapping, the header words, the doorbells."""

    role = ""

    def __init__(self, name: str, wait: WaitStrategy) -> None:
        self.name = name
        self.wait = wait
        try:
            self._seg = attach_segment(name)
        except ValueError:  # mmap refuses an empty file
            raise RingCorrupt(f"ring {name!r}: segment of 0 bytes is smaller than a ring header") from None
        buf = self._seg.buf
        q = buf.cast("Q")
        try:
            validate_header(name, q, self._seg.size)
        except RingCorrupt:
            q.release()
            close_segment(self._seg)
            raise
        self._q = q
        self.capacity = q[_W_CAPACITY]
        self.max_record = q[_W_MAX_RECORD]
        self._mask = self.capacity - 1
        self._data = buf[_HDR : _HDR + self.capacity]
        self.drop_when_full = bool(q[d.word(d.FLAGS_OFFSET)] >> 32 & d.FLAG_DROP_WHEN_FULL)
        doorbell_dir = _read_doorbell_dir(buf)
        self.doorbell_dir = doorbell_dir
        self.data_bell: Doorbell | None = None
        self.space_bell: Doorbell | None = None
        if doorbell_dir:
            data_path, space_path = _doorbell_paths(doorbell_dir, name)
            self.data_bell, self.space_bell = Doorbell(data_path), Doorbell(space_path)
        elif wait.blocks:
            _Side.close(self)  # not the subclass's close: that side was never set up
            raise RingError(f"ring {name!r} has no doorbell directory; wait strategy {wait.kind!r} needs one")

    def heartbeat(self) -> None:
        """Record that this side is alive (called from the worker's duty cycle)."""
        raise NotImplementedError

    def header(self) -> RingHeader:
        return _snapshot(self.name, self._q, self._seg.buf)

    def _park(self, flag_word: int, ready, bell: Doorbell, timeout: float) -> None:
        """Sleep on ``bell`` until rung or ``timeout``; the other side rings only while
        ``flag_word`` is set, so the fast path never makes a system call."""
        self.heartbeat()
        self._declare_waiting(flag_word, bell)
        try:
            if ready():
                return
            if not bell.wait(timeout) and self.role == "consumer":
                self.missed_wakeup()
        finally:
            self._q[flag_word] = 0

    def _declare_waiting(self, flag_word: int, bell: Doorbell) -> None:
        """Raise our waiting flag, then forget old rings; the caller then re-checks its ring
        before sleeping. The fence orders the flag store before that check (the one store-load
        pair x86 may reorder); draining here, not after waking, keeps a syscall off the wake path.
        A ring that comes between the drain and the check is harmless: the check sees the data."""
        self._q[flag_word] = 1
        _fence()
        bell.drain()

    def _wait_until(self, ready, flag_word: int, bell: Doorbell | None, deadline: float | None) -> bool:
        """Idle with this ring's wait strategy (:func:`shm.wait.idle`) until ``ready()``; False at
        the deadline."""
        until = math.inf if deadline is None else deadline

        def park(timeout: float) -> None:
            self._park(flag_word, ready, bell, timeout)

        while True:
            if idle(self.wait, ready, park, until):
                return True
            if time.monotonic() >= until:
                return ready()

    def close(self) -> None:
        """Detach from the ring (never unlinks it: the owner does that)."""
        for bell in (self.data_bell, self.space_bell):
            if bell is not None:
                bell.close()
        for view in ("_data", "_q"):
            mv = getattr(self, view, None)
            if mv is not None:
                mv.release()
                setattr(self, view, None)
        close_segment(self._seg)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Producer(_Side):
    """The one writer of a ring. Resumes at the ring's write cursor, so a restarted producer
    continues exactly where the dead one's last commit ended."""

    role = "producer"

    def __init__(self, name: str, wait: WaitStrategy | None = None) -> None:
        super().__init__(name, wait or WaitStrategy())
        q = self._q
        other = q[_W_PRODUCER_PID]
        if other and other != os.getpid() and pid_alive(other):
            _Side.close(self)  # detach only: the live producer's header words are not ours to touch
            raise RingError(f"ring {name!r} already has a live producer (pid {other})")
        if other:
            unblock(q)
        q[_W_PRODUCER_PID] = os.getpid()
        self._pos = q[_W_WRITE]
        self._limit = q[_W_READ] + self.capacity  # the write position may go up to here
        self._capacity_ = self.capacity
        self._claim_header = -1  # header word of the open claim, -1 when none
        self._claim_end = 0  # write cursor after the open claim
        self._claim_length = 0
        self._full = False
        self._records = q[_W_RECORDS_WRITTEN]  # published to the header by heartbeat()
        self.heartbeat()

    @classmethod
    def attach(cls, name: str, wait: WaitStrategy | None = None) -> Producer:
        return cls(name, wait)

    def heartbeat(self) -> None:
        q = self._q
        q[_W_PRODUCER_HEARTBEAT] = time.monotonic_ns()
        q[_W_RECORDS_WRITTEN] = self._records

    def try_claim(self, length: int) -> memoryview | None:
        """``length`` writable bytes in the ring, or None when it is full right now."""
        if self._claim_header >= 0:
            raise RingError(f"ring {self.name!r}: claim while another claim is open; commit or abort it")
        if not 0 <= length <= self.max_record:
            raise RecordTooLarge(
                f"ring {self.name!r}: record of {length} bytes outside [0, max_record {self.max_record}]"
            )
        pos = self._pos
        index = pos & self._mask
        to_end = self._capacity_ - index
        size = (length + 15) & ~7  # record header + payload, 8-aligned
        end = pos + size if size <= to_end else pos + to_end + size  # wrap: pad the tail first
        q = self._q
        if end > self._limit:
            self._limit = q[_W_READ] + self._capacity_
            if end > self._limit:
                if not self._full:
                    self._full = True
                    q[_W_BACKPRESSURE] += 1
                return None
        self._full = False
        if size > to_end:
            q[(_HDR + index) >> 3] = _PAD << 32 | (to_end - 8)
            index = 0
        header = (_HDR + index) >> 3
        q[_W_CLAIM] = pos + 1  # lets the owner see a claim left open by a producer that died
        self._claim_header = header
        self._claim_end = end
        self._claim_length = length
        return self._data[index + 8 : index + 8 + length]

    def commit(self, record_type: int) -> None:
        """Publish the claimed record; it becomes visible to the consumer now."""
        header = self._claim_header
        if header < 0:
            raise RingError(f"ring {self.name!r}: commit without a claim")
        if not _TYPE_MIN <= record_type <= _TYPE_MAX:
            raise RingError(f"record type {record_type} outside [{_TYPE_MIN}, {_TYPE_MAX}]")
        q = self._q
        q[header] = record_type << 32 | self._claim_length
        q[_W_LAST_RECORD] = header
        q[_W_WRITE] = self._pos = self._claim_end
        self._claim_header = -1
        self._records += 1
        if q[_W_CONSUMER_WAITING]:
            self.data_bell.ring()

    def last_committed(self) -> tuple[int, memoryview] | None:
        """``(type, view)`` of the last record committed to this ring by any producer, or None.

        A restarted producer reads back what its predecessor published last (its bytes stay in
        place behind the write cursor until the producer itself wraps over them), e.g. to resume
        a sequence. Valid until the next claim."""
        header = self._q[_W_LAST_RECORD]
        if not header:
            return None
        word = self._q[header]
        index = header * 8 - _HDR
        return word >> 32, self._data[index + 8 : index + 8 + (word & _LEN_MASK)]

    @property
    def is_full(self) -> bool:
        """Whether the last claim found the ring full (the producer is waiting for space)."""
        return self._full

    def space_freed(self) -> bool:
        """Whether the consumer has released space since the last claim found the ring full (one
        load of the read cursor: what an idle worker spins on while this ring is full)."""
        return self._q[_W_READ] + self._capacity_ > self._limit

    def prepare_wait(self) -> bool:
        """For event loops that poll ``space_bell`` with other fds: declare this producer asleep
        until the consumer frees space. Returns False when space was freed meanwhile (do not
        sleep; call :meth:`end_wait`)."""
        self._declare_waiting(_W_PRODUCER_WAITING, self.space_bell)
        return self._q[_W_READ] + self.capacity <= self._limit

    def end_wait(self) -> None:
        self._q[_W_PRODUCER_WAITING] = 0

    def abort(self) -> None:
        """Forget the open claim; nothing was published."""
        if self._claim_header >= 0:
            self._q[_W_CLAIM] = 0
            self._claim_header = -1

    def claim(self, length: int, timeout: float | None = None) -> memoryview | None:
        """Claim with this ring's full-ring policy: wait (block, the default) or drop.

        Returns None when the record was dropped (counted) or ``timeout`` passed while full.
        """
        view = self.try_claim(length)
        if view is not None:
            return view
        if self.drop_when_full:
            self._q[_W_DROPS] += 1
            return None
        claimed: list[memoryview] = []

        def has_space() -> bool:
            if claimed:  # claimed on an earlier check (e.g. the one made while parking)
                return True
            view = self.try_claim(length)
            if view is None:
                return False
            claimed.append(view)
            return True

        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_until(has_space, _W_PRODUCER_WAITING, self.space_bell, deadline)
        return claimed[0] if claimed else None

    def write(self, payload: bytes | memoryview, record_type: int, timeout: float | None = None) -> bool:
        """Copy ``payload`` into one record (claim, fill, commit); False if dropped or timed out."""
        view = self.claim(len(payload), timeout)
        if view is None:
            return False
        view[:] = payload
        view.release()
        self.commit(record_type)
        return True

    def close(self) -> None:
        if getattr(self, "_q", None) is not None:
            self.abort()
            self.heartbeat()
            if self._q[_W_PRODUCER_PID] == os.getpid():
                self._q[_W_PRODUCER_PID] = 0
        super().close()


class Consumer(_Side):
    """The one reader of a ring. Resumes at the ring's read cursor, so records read but not yet
    released by a consumer that died are read again by its successor (never lost)."""

    role = "consumer"
    durable = True  # the cursors live in the segment, past this process (shm.ports.RecordConsumer)

    def __init__(self, name: str, wait: WaitStrategy | None = None) -> None:
        super().__init__(name, wait or WaitStrategy())
        q = self._q
        other = q[_W_CONSUMER_PID]
        if other and other != os.getpid() and pid_alive(other):
            _Side.close(self)  # detach only: the live consumer's header words are not ours to touch
            raise RingError(f"ring {name!r} already has a live consumer (pid {other})")
        q[_W_CONSUMER_PID] = os.getpid()
        self._pos = q[_W_READ]  # position after the last record handed out
        self._previous = -1  # position before it, for unread()
        self._released = self._pos
        self._available = q[_W_WRITE]
        self._unreleased = 0
        self._records = q[_W_RECORDS_READ]  # released records, published by heartbeat()
        self.heartbeat()

    @classmethod
    def attach(cls, name: str, wait: WaitStrategy | None = None) -> Consumer:
        return cls(name, wait)

    def heartbeat(self) -> None:
        q = self._q
        q[_W_CONSUMER_HEARTBEAT] = time.monotonic_ns()
        q[_W_RECORDS_READ] = self._records

    def try_read(self) -> tuple[int, memoryview] | None:
        """``(type, payload view)`` of the next record, or None when none is published yet."""
        pos = self._pos
        if pos >= self._available:
            self._available = self._q[_W_WRITE]
            if pos >= self._available:
                return None
        q = self._q
        index = pos & self._mask
        word = q[(_HDR + index) >> 3]
        record_type = word >> 32
        if record_type == _PAD:
            if index + (word & _LEN_MASK) + 8 != self.capacity:
                raise RingCorrupt(
                    f"ring {self.name!r}: bad padding at position {pos} (length {word & _LEN_MASK}) "
                    "does not end at the end of the data area"
                )
            pos += (word & _LEN_MASK) + 8
            index = 0
            word = q[_HDR >> 3]
            record_type = word >> 32
        length = word & _LEN_MASK
        end = pos + ((length + 15) & ~7)
        # a valid record ends at or before any write cursor value published after its start
        if not _TYPE_MIN <= record_type <= _TYPE_MAX or length > self.max_record or end > self._available:
            raise RingCorrupt(
                f"ring {self.name!r}: bad record header at position {pos} (type {record_type}, length {length}, "
                f"write cursor {self._available})"
            )
        self._previous = self._pos
        self._pos = end
        self._unreleased += 1
        return record_type, self._data[index + 8 : index + 8 + length]

    def unread(self) -> None:
        """Push back the record the last :meth:`try_read` returned (e.g. its output ring was
        full): the next read returns it again. Only the one last record can be pushed back."""
        if self._previous < 0:
            raise RingError(f"ring {self.name!r}: unread without a record read since the last release/unread")
        self._pos = self._previous
        self._previous = -1
        self._unreleased -= 1

    def release(self) -> None:
        """Hand every record read so far back to the producer; their views become invalid."""
        if self._pos == self._released:
            return
        q = self._q
        q[_W_READ] = self._released = self._pos
        self._previous = -1
        self._records += self._unreleased
        self._unreleased = 0
        if q[_W_PRODUCER_WAITING]:
            self.space_bell.ring()

    @property
    def position(self) -> int:
        """The read position: what :meth:`release_to` takes to release the records read before now."""
        return self._pos

    def release_to(self, position: int, records: int) -> None:
        """Release the ``records`` records read before ``position`` (an earlier :attr:`position`)
        and keep those read since: for a consumer whose output is not safe yet when it has read
        on (the broadcast releases what it published only once ZeroMQ has had time to send it)."""
        if not self._released <= position <= self._pos or not 0 <= records <= self._unreleased:
            raise RingError(
                f"ring {self.name!r}: release_to({position}, {records}) outside the read but unreleased "
                f"positions [{self._released}, {self._pos}] ({self._unreleased} records)"
            )
        if position == self._released:
            return
        q = self._q
        q[_W_READ] = self._released = position
        self._previous = -1
        self._records += records
        self._unreleased -= records
        if q[_W_PRODUCER_WAITING]:
            self.space_bell.ring()

    def available(self) -> int:
        """Bytes published by the producer that this consumer has not read yet (0: empty)."""
        return self._q[_W_WRITE] - self._pos

    def rewind(self) -> None:
        """Forget records read but not released; the next read returns the first of them again."""
        self._pos = self._released
        self._previous = -1
        self._unreleased = 0

    def read(self, timeout: float | None = None) -> tuple[int, memoryview] | None:
        """Like :meth:`try_read`, but idle with the ring's wait strategy until a record comes
        or ``timeout`` seconds pass (None: wait for ever)."""
        record = self.try_read()
        if record is not None:
            return record
        deadline = None if timeout is None else time.monotonic() + timeout
        q = self._q

        def has_data() -> bool:
            return q[_W_WRITE] > self._pos

        if not self._wait_until(has_data, _W_CONSUMER_WAITING, self.data_bell, deadline):
            return None
        return self.try_read()

    def prepare_wait(self) -> bool:
        """For event loops that poll ``data_bell`` with other fds: declare this consumer asleep.

        Returns False when data arrived meanwhile (do not sleep; call :meth:`end_wait`)."""
        self._declare_waiting(_W_CONSUMER_WAITING, self.data_bell)
        return self._q[_W_WRITE] <= self._pos

    def end_wait(self) -> None:
        self._q[_W_CONSUMER_WAITING] = 0

    def missed_wakeup(self) -> bool:
        """After a sleep on ``data_bell`` that timed out: True, counted in the header's
        ``lost_wakeups``, when a record was there all the same (its commit did not ring)."""
        if self._q[_W_WRITE] <= self._pos:
            return False
        self._q[_W_LOST_WAKEUPS] += 1
        return True

    def close(self) -> None:
        if getattr(self, "_q", None) is not None:
            self.heartbeat()
            if self._q[_W_CONSUMER_PID] == os.getpid():
                self._q[_W_CONSUMER_PID] = 0
        super().close()


def _read_doorbell_dir(buf: memoryview) -> str:
    raw = bytes(buf[d.DOORBELL_DIR_OFFSET : d.DOORBELL_DIR_OFFSET + d.DOORBELL_DIR_LENGTH])
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _snapshot(name: str, q: memoryview, buf) -> RingHeader:
    write = q[_W_WRITE]
    return RingHeader(
        name=name,
        capacity=q[_W_CAPACITY],
        max_record=q[_W_MAX_RECORD],
        drop_when_full=bool(q[d.word(d.FLAGS_OFFSET)] >> 32 & d.FLAG_DROP_WHEN_FULL),
        created_ns=q[_W_CREATED],
        owner_pid=q[_W_OWNER],
        write_cursor=write,
        read_cursor=q[_W_READ],
        producer_pid=q[_W_PRODUCER_PID],
        producer_heartbeat_ns=q[_W_PRODUCER_HEARTBEAT],
        consumer_pid=q[_W_CONSUMER_PID],
        consumer_heartbeat_ns=q[_W_CONSUMER_HEARTBEAT],
        records_written=q[_W_RECORDS_WRITTEN],
        records_read=q[_W_RECORDS_READ],
        backpressure_events=q[_W_BACKPRESSURE],
        drops=q[_W_DROPS],
        lost_wakeups=q[_W_LOST_WAKEUPS],
        unblocks=q[_W_UNBLOCKS],
        consumer_waiting=bool(q[_W_CONSUMER_WAITING]),
        producer_waiting=bool(q[_W_PRODUCER_WAITING]),
        pending_claim=q[_W_CLAIM] == write + 1,
        doorbell_dir=_read_doorbell_dir(buf),
    )


def unblock(q: memoryview) -> bool:
    """Clear a claim left open by a dead producer; True (and counted) when there was one.

    The claim was never published, so clearing it loses nothing that any consumer saw; the
    producer's successor resumes at the unchanged write cursor and overwrites the torn bytes.
    """
    torn = q[_W_CLAIM] == q[_W_WRITE] + 1
    if torn:
        q[_W_CLAIM] = 0
        q[_W_UNBLOCKS] += 1
    q[_W_PRODUCER_PID] = 0
    q[_W_PRODUCER_WAITING] = 0
    return torn


class Ring:
    """The owner's handle: creates the segment and doorbells, repairs and finally removes them."""

    def __init__(self, name: str, seg, doorbell_dir: str, owns_doorbell_dir: bool) -> None:
        self.name = name
        self._seg = seg
        self._q = seg.buf.cast("Q")
        self.doorbell_dir = doorbell_dir
        self._owns_doorbell_dir = owns_doorbell_dir

    @classmethod
    def create(
        cls,
        name: str,
        capacity: int = 1 << 20,
        *,
        max_record: int | None = None,
        drop_when_full: bool = False,
        doorbell_dir: str | None = None,
    ) -> Ring:
        """Create ring segment ``name`` (a full ``neuralpipe-<instance>-<ring>`` name) with a data
        area of ``capacity`` bytes (a power of two) and its two FIFO doorbells in ``doorbell_dir``
        (a private temporary directory, removed with the ring, when None)."""
        check_ring(name)
        if capacity < d.MIN_CAPACITY or capacity > d.MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"ring capacity {capacity} must be a power of two in [{d.MIN_CAPACITY}, {d.MAX_CAPACITY}]")
        limit = d.default_max_record(capacity) * 2
        if max_record is None:
            max_record = d.default_max_record(capacity)
        if not 0 < max_record <= limit:
            raise ValueError(f"max_record {max_record} must be in [1, {limit}] for capacity {capacity}")
        owns_dir = doorbell_dir is None
        if owns_dir:
            doorbell_dir = tempfile.mkdtemp(prefix="neuralpipe-bells-")
        encoded_dir = os.path.abspath(doorbell_dir).encode()
        if len(encoded_dir) >= d.DOORBELL_DIR_LENGTH:
            raise ValueError(f"doorbell directory path longer than {d.DOORBELL_DIR_LENGTH - 1} bytes")
        for path in _doorbell_paths(doorbell_dir, name):
            create_fifo(path)
        try:
            seg = create_segment(name, d.segment_size(capacity))
        except BaseException:
            if owns_dir:  # e.g. the segment exists: do not leave our private doorbell dir behind
                for path in _doorbell_paths(doorbell_dir, name):
                    os.unlink(path)
                os.rmdir(doorbell_dir)
            raise
        buf = seg.buf
        q = buf.cast("Q")
        q[d.word(d.FLAGS_OFFSET)] = (d.FLAG_DROP_WHEN_FULL if drop_when_full else 0) << 32 | d.LAYOUT_VERSION
        q[_W_CAPACITY] = capacity
        q[_W_MAX_RECORD] = max_record
        q[_W_CREATED] = time.time_ns()
        q[_W_OWNER] = os.getpid()
        buf[d.DOORBELL_DIR_OFFSET : d.DOORBELL_DIR_OFFSET + len(encoded_dir)] = encoded_dir
        q[_W_MAGIC] = d.MAGIC  # last: a ring with a magic is complete
        q.release()
        return cls(name, seg, os.path.abspath(doorbell_dir), owns_dir)

    def header(self) -> RingHeader:
        return _snapshot(self.name, self._q, self._seg.buf)

    def unblock(self) -> bool:
        """Clear a dead producer's open claim (see :func:`unblock`). Refuses while it lives."""
        pid = self._q[_W_PRODUCER_PID]
        if pid and pid_alive(pid):
            raise RingError(f"ring {self.name!r}: producer pid {pid} is alive; unblock only a dead one's claim")
        return unblock(self._q)

    def destroy(self) -> None:
        """Unlink the segment and its doorbells. Attached processes keep their mappings."""
        remove_segment(self.name)
        for path in _doorbell_paths(self.doorbell_dir, self.name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._owns_doorbell_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.doorbell_dir)
        if self._q is not None:
            self._q.release()
            self._q = None
        close_segment(self._seg)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def read_header(name: str) -> RingHeader:
    """Snapshot ring ``name``'s header through a read-only mapping (no attach, no side effects).

    Raises :class:`RingCorrupt` naming the bad field, FileNotFoundError when there is no such ring."""
    try:
        mapping = map_readonly(name)
    except ValueError:  # mmap refuses an empty file: a creator that has not sized it (yet, or ever)
        raise RingCorrupt(f"ring {name!r}: segment of 0 bytes is smaller than a ring header") from None
    try:
        view = memoryview(mapping)
        q = view[: d.HEADER_SIZE].cast("Q") if len(view) >= d.HEADER_SIZE else None
        if q is None:
            view.release()
            raise RingCorrupt(f"ring {name!r}: segment of {len(mapping)} bytes is smaller than a ring header")
        try:
            validate_header(name, q, len(mapping))
            return _snapshot(name, q, view)
        finally:
            q.release()
            view.release()
    finally:
        mapping.close()
