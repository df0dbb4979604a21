"""Shared helpers for the shm data-plane tests, and the targets of the child processes they spawn.

Children are started with the ``spawn`` method only. Spawn re-imports a target by module name in
the child, so every target lives here, at module level: pytest puts ``tests/`` (which has no
``__init__.py``) on ``sys.path`` for the conftest, and spawn passes the parent's ``sys.path`` on to
the child, so ``import shm_helpers`` works there too. Scripts run with ``subprocess`` (another
process tree) add :data:`TESTS_DIR` to their path themselves.

The records these tests exchange carry a sequence number: the payload is ``payload_length(seq)``
bytes whose first and last 8 bytes are ``seq`` as a little-endian u64, so a torn or misplaced
record cannot pass for a good one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator

from shm import descriptor as d
from shm.ring import Consumer, Producer, Ring
from shm.wait import WaitStrategy

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SPAWN = multiprocessing.get_context("spawn")
RECORD_TYPE = 16  # the smallest user record type
CHILD_HANG_S = 60  # how long a child that waits to be killed waits at most

_U64 = struct.Struct("<Q")


# ---------------------------------------------------------------------------------------------
# waiting with deadlines


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.002) -> None:
    """Poll ``condition`` until it is true; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stop_resource_tracker() -> None:
    """Stop this process tree's ``multiprocessing`` resource tracker and wait until it is gone.

    On its way out the tracker unlinks every segment still registered with it (warning "leaked
    shared_memory"); doing it now, rather than after the interpreter exits, lets a test look at
    /dev/shm afterwards without racing it."""
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()


def _sleep_until_killed() -> None:
    deadline = time.monotonic() + CHILD_HANG_S
    while time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# rings and child processes that never outlive a test


@contextlib.contextmanager
def make_ring(name: str, capacity: int = 1 << 16, **kwargs) -> Iterator[Ring]:
    """Create ring ``name`` and destroy it (segment and doorbells) however the test ends."""
    ring = Ring.create(name, capacity, **kwargs)
    try:
        yield ring
    finally:
        ring.destroy()


@contextlib.contextmanager
def child(target: Callable, *args) -> Iterator[multiprocessing.process.BaseProcess]:
    """Run ``target(*args)`` in a spawned process; SIGKILL and reap it if it is still running
    when the block exits, so no test leaves a process behind."""
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    try:
        yield proc
    finally:
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)


def join_ok(proc: multiprocessing.process.BaseProcess, timeout: float = 20) -> None:
    """Wait for ``proc`` to finish and require a clean exit."""
    proc.join(timeout)
    assert not proc.is_alive(), f"child {proc.pid} still running after {timeout} s"
    assert proc.exitcode == 0, f"child {proc.pid} exited with {proc.exitcode}"


def kill_and_reap(proc: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL ``proc`` and reap it (a zombie's pid still looks alive to ``kill(pid, 0)``)."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------
# sequence-numbered records


def payload_length(seq: int) -> int:
    """8 to 32 bytes, varying with ``seq`` so that records wrap at ever-different positions."""
    return 8 * (1 + seq % 4)


def cursor_after(count: int, capacity: int) -> int:
    """Write cursor after records ``0 .. count-1`` went into an empty ring of ``capacity`` bytes,
    wrap padding included (the layout rules of ``shm.descriptor``)."""
    pos = 0
    for seq in range(count):
        size = d.record_size(payload_length(seq))
        to_end = capacity - pos % capacity
        pos += size if size <= to_end else to_end + size
    return pos


def fill_sequence_record(view: memoryview, seq: int) -> None:
    _U64.pack_into(view, 0, seq)
    _U64.pack_into(view, len(view) - 8, seq)


def check_sequence_record(record: tuple[int, memoryview], expected: int) -> None:
    record_type, view = record
    first, last = _U64.unpack_from(view, 0)[0], _U64.unpack_from(view, len(view) - 8)[0]
    if record_type != RECORD_TYPE or len(view) != payload_length(expected) or first != last or first != expected:
        raise AssertionError(
            f"expected seq {expected} ({payload_length(expected)} bytes, type {RECORD_TYPE}), got type "
            f"{record_type}, {len(view)} bytes, seq {first} ... {last}"
        )


def sequence_of(view: memoryview) -> int:
    return _U64.unpack_from(view, 0)[0]


def write_sequence(producer: Producer, start: int, stop: int, timeout: float | None = None) -> None:
    """Write records ``start .. stop-1`` (waiting for space with the producer's strategy)."""
    claim, commit, fill = producer.claim, producer.commit, fill_sequence_record
    for seq in range(start, stop):
        view = claim(payload_length(seq), timeout)
        if view is None:
            raise AssertionError(f"no space for seq {seq} within {timeout} s")
        fill(view, seq)
        commit(RECORD_TYPE)


def read_sequence(
    consumer: Consumer,
    start: int,
    stop: int,
    timeout: float,
    release_every: int = 64,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Read records ``start .. stop-1`` in order, checking every one, releasing in batches.

    Fails at ``timeout`` seconds, or early when ``alive()`` (the producer) turns false and the
    ring has run dry."""
    deadline = time.monotonic() + timeout
    read, release, check = consumer.read, consumer.release, check_sequence_record
    expected = start
    while expected < stop:
        record = read(0.2)
        if record is None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for seq {expected} (want up to {stop - 1})")
            if alive is not None and not alive() and consumer.try_read() is None:
                raise AssertionError(f"producer gone, seq {expected} never came (want up to {stop - 1})")
            continue
        check(record, expected)
        expected += 1
        if expected % release_every == 0:
            release()
    release()


# ---------------------------------------------------------------------------------------------
# child process targets (module level, so that spawn can import them)


def produce_sequence(name: str, start: int, stop: int, wait_kind: str = "block") -> None:
    """Attach a producer with the stock ``wait_kind`` strategy and write ``start .. stop-1``."""
    with Producer.attach(name, WaitStrategy.named(wait_kind)) as producer:
        write_sequence(producer, start, stop, timeout=30)


def produce_random_sizes(name: str, count: int, seed: int) -> None:
    """Write ``count`` records of pseudo-random sizes up to the ring's ``max_record``, each
    filled with one byte value, with their index in the record type (see :func:`random_record`)."""
    with Producer.attach(name) as producer:
        for i in range(count):
            record_type, payload = random_record(seed, i, producer.max_record)
            assert producer.write(payload, record_type, timeout=30), f"record {i} timed out"


def random_record(seed: int, i: int, max_record: int) -> tuple[int, bytes]:
    """Record ``i`` of the random-size stream ``seed``: sizes spread over 0..max_record."""
    length = (i * 2654435761 + seed) % (max_record + 1)
    if i % 3 == 0:
        length %= 24  # plenty of tiny ones too
    return RECORD_TYPE + i % 1000, bytes([(i + seed) & 0xFF]) * length


def produce_then_die(name: str, count: int, torn_length: int | None, ready) -> None:
    """Write ``count`` records; unless ``torn_length`` is None, claim one more of that many bytes
    (waiting for space) and fill half of it with what looks like seq ``count``; then set
    ``ready`` and wait to be SIGKILLed."""
    producer = Producer.attach(name)
    write_sequence(producer, 0, count, timeout=30)
    if torn_length is not None:
        view = producer.claim(torn_length, timeout=30)
        assert view is not None
        view[: torn_length // 2] = bytes(torn_length // 2)
        _U64.pack_into(view, 0, count)
    ready.set()
    _sleep_until_killed()


def resume_sequence(name: str, stop: int) -> None:
    """A restarted producer: find where the last one stopped (``last_committed``) and write on
    to ``stop``."""
    with Producer.attach(name) as producer:
        last = producer.last_committed()
        start = 0 if last is None else sequence_of(last[1]) + 1
        del last  # the view is valid only until the next claim
        write_sequence(producer, start, stop, timeout=30)


def consume_then_die(name: str, released: int, held: int, ready, conn) -> None:
    """Read and release ``released`` records, read ``held`` more without releasing them, send
    the seqs seen through ``conn``, set ``ready`` and wait to be SIGKILLed."""
    consumer = Consumer.attach(name)
    seen = []
    for i in range(released + held):
        record = consumer.read(10)
        assert record is not None
        seen.append(sequence_of(record[1]))
        if i + 1 == released:
            consumer.release()
    conn.send(seen)
    ready.set()
    _sleep_until_killed()


def attach_and_hold(name: str, role: str, ready, stop) -> None:
    """Attach as ``role`` ("producer"/"consumer"), set ``ready``, detach cleanly on ``stop``."""
    side = Producer.attach(name) if role == "producer" else Consumer.attach(name)
    try:
        ready.set()
        stop.wait(CHILD_HANG_S)
    finally:
        side.close()


def attach_and_exit(name: str, role: str) -> None:
    """Attach as ``role``, move one record (write seq 0, or read and release one), exit normally."""
    if role == "producer":
        with Producer.attach(name) as producer:
            write_sequence(producer, 0, 1, timeout=10)
    else:
        with Consumer.attach(name) as consumer:
            read_sequence(consumer, 0, 1, timeout=10)


def create_ring_and_die(name: str, doorbell_dir: str, ready) -> None:
    """Create ring ``name`` (this process owns it), set ``ready`` and wait to be SIGKILLed."""
    Ring.create(name, 4096, doorbell_dir=doorbell_dir)
    ready.set()
    _sleep_until_killed()


def claim_when_full(name: str, length: int, park_timeout_s: float, conn) -> None:
    """Block (doorbell strategy, a long park timeout) in ``claim`` on a full ring; when it
    succeeds send ``time.monotonic()`` (CLOCK_MONOTONIC, comparable across processes)."""
    wait = WaitStrategy("block", spins=100, yields=10, park_timeout_s=park_timeout_s)
    with Producer.attach(name, wait) as producer:
        view = producer.claim(length, timeout=30)
        woke = time.monotonic()
        assert view is not None
        view[:] = bytes(length)
        view.release()
        producer.commit(RECORD_TYPE)
        conn.send(woke)


def read_when_empty(name: str, park_timeout_s: float, conn) -> None:
    """Block (doorbell strategy, a long park timeout) in ``read`` on an empty ring; send the
    record's bytes and ``time.monotonic()`` when it arrives."""
    wait = WaitStrategy("block", spins=100, yields=10, park_timeout_s=park_timeout_s)
    with Consumer.attach(name, wait) as consumer:
        record = consumer.read(timeout=30)
        woke = time.monotonic()
        assert record is not None
        conn.send((record[0], bytes(record[1]), woke))
        consumer.release()


def stable_token_ids(tokens: list[bytes]) -> list[int]:
    from shm.batch import stable_token_id

    return [stable_token_id(token) for token in tokens]


def call_and_send(function: Callable, args: tuple, conn) -> None:
    """Send ``function(*args)`` through ``conn`` (``function`` must be importable)."""
    conn.send(function(*args))
