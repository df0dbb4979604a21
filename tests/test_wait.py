"""Waiting: doorbells, blocked producers and consumers woken across processes, event-loop waits."""

from __future__ import annotations

import asyncio
import select
import time

import pytest
import shm_helpers as h
import zmq

from shm import ring as ring_module
from shm.doorbell import Doorbell, create_fifo
from shm.naming import segment_name
from shm.ring import Consumer, Producer
from shm.wait import WaitStrategy

# a park timeout far beyond the wake-up deadlines below: a side that wakes in time was woken by
# the doorbell, not by its own timeout
LONG_PARK = WaitStrategy("block", spins=10, yields=2, park_timeout_s=30)
WAKE_DEADLINE_S = 1.0


@pytest.fixture
def name(instance: str) -> str:
    return segment_name(instance, "ring")


# ---------------------------------------------------------------------------------------------
# the doorbell itself


def test_doorbell_rings_drains_and_times_out(tmp_path) -> None:
    path = str(tmp_path / "bell")
    create_fifo(path)
    create_fifo(path)  # an existing FIFO is reused
    ringer, waiter = Doorbell(path), Doorbell(path)
    try:
        assert not waiter.wait(0)
        started = time.monotonic()
        assert not waiter.wait(0.05)
        assert 0.04 <= time.monotonic() - started < 2
        for _ in range(100_000):  # far beyond the pipe's buffer: ringing never blocks or fails
            ringer.ring()
        assert waiter.wait(0)
        waiter.drain()
        assert not waiter.wait(0)
        assert select.select([waiter.fileno()], [], [], 0)[0] == []
    finally:
        ringer.close()
        waiter.close()
        waiter.close()  # closing twice is harmless
    assert waiter.fd == -1


def test_create_fifo_refuses_a_regular_file(tmp_path) -> None:
    path = tmp_path / "not-a-fifo"
    path.write_bytes(b"")
    with pytest.raises(FileExistsError, match="not a FIFO"):
        create_fifo(str(path))


# ---------------------------------------------------------------------------------------------
# blocked sides woken across processes


@pytest.mark.timeout(60)
def test_blocked_consumer_is_woken_by_commit(name: str) -> None:
    receive, send = h.SPAWN.Pipe(duplex=False)
    with h.make_ring(name, 4096) as ring, Producer.attach(name) as producer:
        with h.child(h.read_when_empty, name, LONG_PARK.park_timeout_s, send) as reader:
            h.wait_for(lambda: ring.header().consumer_waiting, 20, "the consumer to park")
            committed = time.monotonic()
            producer.write(b"wake up", h.RECORD_TYPE + 1)
            assert receive.poll(10), "the consumer never got the record"
            record_type, payload, woke = receive.recv()
            h.join_ok(reader)
        assert (record_type, payload) == (h.RECORD_TYPE + 1, b"wake up")
        assert woke - committed < WAKE_DEADLINE_S
        header = ring.header()
        assert header.read_cursor == header.write_cursor and header.lost_wakeups == 0


@pytest.mark.timeout(60)
def test_blocked_producer_is_woken_by_release(name: str) -> None:
    receive, send = h.SPAWN.Pipe(duplex=False)
    with h.make_ring(name, 4096) as ring, Consumer.attach(name) as consumer:
        with Producer.attach(name) as filler:
            while filler.write(b"f" * 1000, h.RECORD_TYPE, timeout=0):
                pass
        with h.child(h.claim_when_full, name, 1000, LONG_PARK.park_timeout_s, send) as writer:
            h.wait_for(lambda: ring.header().producer_waiting, 20, "the producer to park")
            assert ring.header().backpressure_events == 2  # the filler's full ring, then the child's
            assert bytes(consumer.try_read()[1]) == b"f" * 1000
            released = time.monotonic()
            consumer.release()
            assert receive.poll(10), "the producer never claimed"
            woke = receive.recv()
            h.join_ok(writer)
        assert woke - released < WAKE_DEADLINE_S
        payloads = []
        while (record := consumer.try_read()) is not None:
            payloads.append(bytes(record[1]))
        assert payloads == [b"f" * 1000] * 3 + [bytes(1000)]  # the blocked record came last


# ---------------------------------------------------------------------------------------------
# the sleep/wake race, made deterministic: the other side acts just as this side declares
# itself asleep (right after the flag store, at the fence)


def test_space_freed_as_the_producer_parks(name: str, monkeypatch) -> None:
    with h.make_ring(name, 4096), Producer.attach(name, LONG_PARK) as producer, Consumer.attach(name) as consumer:
        while producer.try_claim(1000) is not None:
            producer.commit(h.RECORD_TYPE)
        consumer.try_read()
        real_fence = ring_module._fence

        def fence_then_release() -> None:
            real_fence()
            consumer.release()

        monkeypatch.setattr(ring_module, "_fence", fence_then_release)
        started = time.monotonic()
        view = producer.claim(1000, timeout=10)
        assert view is not None
        assert time.monotonic() - started < WAKE_DEADLINE_S
        producer.commit(h.RECORD_TYPE)


def test_data_committed_as_the_consumer_parks(name: str, monkeypatch) -> None:
    with h.make_ring(name, 4096), Producer.attach(name) as producer, Consumer.attach(name, LONG_PARK) as consumer:
        real_fence = ring_module._fence

        def fence_then_commit() -> None:
            real_fence()
            producer.write(b"just in time", h.RECORD_TYPE)

        monkeypatch.setattr(ring_module, "_fence", fence_then_commit)
        started = time.monotonic()
        record = consumer.read(timeout=10)
        assert record is not None and bytes(record[1]) == b"just in time"
        assert time.monotonic() - started < WAKE_DEADLINE_S


class _DeafBell:
    """A doorbell whose wait misses the ring (times out) while the producer commits."""

    def __init__(self, bell: Doorbell, during_wait) -> None:
        self._bell, self._during_wait = bell, during_wait

    def wait(self, timeout_s: float) -> bool:
        self._during_wait()
        return False

    def drain(self) -> None:
        self._bell.drain()

    def close(self) -> None:
        self._bell.close()


def test_missed_wake_up_is_counted(name: str) -> None:
    with (
        h.make_ring(name, 4096) as ring,
        Producer.attach(name) as producer,
        Consumer.attach(name, LONG_PARK) as consumer,
    ):
        consumer.data_bell = _DeafBell(consumer.data_bell, lambda: producer.write(b"late", h.RECORD_TYPE))
        record = consumer.read(timeout=10)
        assert record is not None and bytes(record[1]) == b"late"
        assert ring.header().lost_wakeups == 1


# ---------------------------------------------------------------------------------------------
# waiting from an event loop: prepare_wait(), poll the doorbell fd with other fds, end_wait()


def test_consumer_prepare_wait_with_select(name: str) -> None:
    with h.make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        fd = consumer.data_bell.fileno()
        assert consumer.prepare_wait() is True  # empty: go to sleep
        assert ring.header().consumer_waiting
        assert select.select([fd], [], [], 0)[0] == []
        producer.write(b"one", h.RECORD_TYPE)
        assert select.select([fd], [], [], 5)[0] == [fd]
        consumer.end_wait()
        assert not ring.header().consumer_waiting
        assert bytes(consumer.try_read()[1]) == b"one"
        consumer.release()
        assert consumer.prepare_wait() is True
        assert select.select([fd], [], [], 0)[0] == []  # the old ring was drained before sleeping
        consumer.end_wait()
        producer.write(b"two", h.RECORD_TYPE)
        assert consumer.prepare_wait() is False  # data already there: do not sleep
        consumer.end_wait()
        assert bytes(consumer.try_read()[1]) == b"two"


def test_producer_prepare_wait_with_select(name: str) -> None:
    with h.make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        fd = producer.space_bell.fileno()
        while producer.try_claim(1000) is not None:
            producer.commit(h.RECORD_TYPE)
        assert producer.is_full
        assert producer.prepare_wait() is True
        assert ring.header().producer_waiting
        assert select.select([fd], [], [], 0)[0] == []
        consumer.try_read()
        consumer.release()
        assert select.select([fd], [], [], 5)[0] == [fd]
        producer.end_wait()
        assert not ring.header().producer_waiting
        assert producer.try_claim(1000) is not None
        producer.abort()


def test_doorbell_fd_in_a_zmq_poller(name: str) -> None:
    context = zmq.Context()
    control = context.socket(zmq.PULL)
    try:
        control.bind("inproc://control")
        with h.make_ring(name, 4096), Producer.attach(name) as producer, Consumer.attach(name) as consumer:
            poller = zmq.Poller()
            poller.register(control, zmq.POLLIN)
            poller.register(consumer.data_bell.fileno(), zmq.POLLIN)
            assert consumer.prepare_wait()
            assert poller.poll(0) == []
            producer.write(b"via zmq", h.RECORD_TYPE)
            events = dict(poller.poll(5000))
            assert events == {consumer.data_bell.fileno(): zmq.POLLIN}
            consumer.end_wait()
            assert bytes(consumer.try_read()[1]) == b"via zmq"
    finally:
        control.close(linger=0)
        context.term()


async def _readable(fd: int, timeout: float) -> None:
    """Wait in the running loop until ``fd`` is readable."""
    loop = asyncio.get_running_loop()
    rung = loop.create_future()
    loop.add_reader(fd, lambda: rung.done() or rung.set_result(None))
    try:
        await asyncio.wait_for(rung, timeout)
    finally:
        loop.remove_reader(fd)


async def _consume_with_add_reader(consumer: Consumer, count: int) -> int:
    """Read ``count`` seq records from an asyncio loop, sleeping on the doorbell fd in between;
    returns how many times the fd woke the loop."""
    fd = consumer.data_bell.fileno()
    wakes, expected = 0, 0
    while expected < count:
        record = consumer.try_read()
        if record is None:
            if consumer.prepare_wait():
                await _readable(fd, 10)
                wakes += 1
            consumer.end_wait()
            continue
        h.check_sequence_record(record, expected)
        expected += 1
        if expected % 64 == 0:
            consumer.release()
    consumer.release()
    return wakes


@pytest.mark.timeout(60)
def test_doorbell_fd_with_asyncio_add_reader(name: str) -> None:
    count = 5000
    with h.make_ring(name, 4096) as ring, Consumer.attach(name) as consumer:
        with h.child(h.produce_sequence, name, 0, count, "block") as producer:
            wakes = asyncio.run(_consume_with_add_reader(consumer, count))
            h.join_ok(producer)
        assert wakes >= 1  # it started before the producer did, so it slept at least once
        assert consumer.try_read() is None
        assert ring.header().read_cursor == ring.header().write_cursor


class _CountingBell:
    """Counts the waits on a doorbell (and waits for real)."""

    def __init__(self, bell: Doorbell) -> None:
        self._bell, self.waits = bell, 0

    def wait(self, timeout_s: float) -> bool:
        self.waits += 1
        return self._bell.wait(timeout_s)

    def drain(self) -> None:
        self._bell.drain()

    def close(self) -> None:
        self._bell.close()


@pytest.mark.parametrize(("kind", "parks"), [("spin", False), ("yield", False), ("block", True)])
def test_only_the_block_strategy_parks_on_the_doorbell(name: str, kind: str, parks: bool) -> None:
    with h.make_ring(name, 4096), Consumer.attach(name, WaitStrategy.named(kind)) as consumer:
        consumer.data_bell = bell = _CountingBell(consumer.data_bell)
        assert consumer.read(timeout=0.1) is None
        assert (bell.waits > 0) == parks


# ---------------------------------------------------------------------------------------------
# what an idle worker spins on, and lost wake-ups on the asyncio path


def test_cursor_probes_space_freed_and_missed_wakeup(name: str) -> None:
    with h.make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        assert consumer.missed_wakeup() is False  # empty: nothing was missed
        while producer.try_claim(1000) is not None:
            producer.commit(h.RECORD_TYPE)
        assert producer.space_freed() is False
        consumer.try_read()
        assert producer.space_freed() is False  # read, not released: no room yet
        consumer.release()
        assert producer.space_freed() is True
        assert consumer.missed_wakeup() is True  # records waiting: counted
        assert ring.header().lost_wakeups == 1


def test_wait_readable_counts_a_lost_wake_up(name: str, tmp_path) -> None:
    from engine.stage import wait_readable

    deaf = str(tmp_path / "deaf")
    create_fifo(deaf)
    with h.make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        real_bell, consumer.data_bell = consumer.data_bell, Doorbell(deaf)  # rung by nobody

        async def wait() -> bool:
            asyncio.get_running_loop().call_later(0.05, producer.write, b"late", h.RECORD_TYPE)
            return await wait_readable(consumer, timeout=0.5)

        try:
            assert asyncio.run(wait()) is True
        finally:
            consumer.data_bell.close()
            consumer.data_bell = real_bell
        assert ring.header().lost_wakeups == 1
        assert bytes(consumer.try_read()[1]) == b"late"
