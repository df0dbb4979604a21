"""Two real processes on one ring: a spawned producer, this process as the consumer."""

from __future__ import annotations

import time

import pytest
import shm_helpers as h

from shm.naming import segment_name
from shm.ring import Consumer, Producer, RingError
from shm.wait import WaitStrategy


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("kind", "count"),
    [("spin", 2_000_000), ("yield", 500_000), ("block", 300_000)],
)
def test_millions_of_records_arrive_in_order(instance: str, kind: str, count: int) -> None:
    """Every sequence number arrives once, in order, with its own length and contents, through a
    64 KiB ring that wraps thousands of times; both sides use the ``kind`` wait strategy."""
    name = segment_name(instance, "ring")
    with h.make_ring(name, 1 << 16) as ring, Consumer.attach(name, WaitStrategy.named(kind)) as consumer:
        with h.child(h.produce_sequence, name, 0, count, kind) as producer:
            started = time.monotonic()
            h.read_sequence(consumer, 0, count, timeout=60, release_every=256, alive=producer.is_alive)
            elapsed = time.monotonic() - started
            h.join_ok(producer)
        assert consumer.read(timeout=0.05) is None  # nothing beyond the last seq
        header = ring.header()
        assert header.read_cursor == header.write_cursor > count * 16
        assert header.records_written == count  # published by the producer's close
        assert header.producer_pid == 0
    print(f"{kind}: {count} records in {elapsed:.2f} s ({count / elapsed / 1e6:.2f} M records/s)")


@pytest.mark.timeout(60)
def test_random_sizes_wrap_across_processes(instance: str) -> None:
    """Records of sizes spread over 0..max_record through an 8 KiB ring: constant wrapping and
    padding across processes, every byte checked."""
    name = segment_name(instance, "ring")
    count, seed = 20_000, 7
    with h.make_ring(name, 8192) as ring, Consumer.attach(name) as consumer:
        with h.child(h.produce_random_sizes, name, count, seed) as producer:
            deadline = time.monotonic() + 30
            for i in range(count):
                record = consumer.read(timeout=max(0.0, deadline - time.monotonic()))
                assert record is not None, f"record {i} never came"
                assert (record[0], bytes(record[1])) == h.random_record(seed, i, ring.header().max_record)
                consumer.release()
            h.join_ok(producer)
        assert consumer.try_read() is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_second_live_side_is_refused(instance: str, role: str) -> None:
    name = segment_name(instance, "ring")
    side = Producer if role == "producer" else Consumer
    ready, stop = h.SPAWN.Event(), h.SPAWN.Event()
    with h.make_ring(name, 4096) as ring, h.child(h.attach_and_hold, name, role, ready, stop) as holder:
        assert ready.wait(20), "the first side never attached"
        before = ring.header()
        with pytest.raises(RingError, match=f"already has a live {role} \\(pid {holder.pid}\\)"):
            side.attach(name)
        assert ring.header() == before  # the refused attacher wrote nothing into the live side's words
        assert (before.producer_pid if role == "producer" else before.consumer_pid) == holder.pid
        stop.set()
        h.join_ok(holder)
        with side.attach(name):  # once the first one has detached, a successor is welcome
            header = ring.header()
            assert (header.producer_pid if role == "producer" else header.consumer_pid) > 0
