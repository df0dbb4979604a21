"""Fault injection: producers and consumers killed with SIGKILL mid-record, corrupt headers."""

from __future__ import annotations

import os

import pytest
import shm_helpers as h

from shm import descriptor as d
from shm.naming import segment_name
from shm.ring import Consumer, Producer, RingCorrupt, RingError, read_header
from shm.segment import attach_segment, close_segment, create_segment, remove_segment
from shm.wait import WaitStrategy

CAPACITY = 4096


@pytest.fixture
def name(instance: str) -> str:
    return segment_name(instance, "ring")


def poke(name: str, offset: int, value: int) -> None:
    """Overwrite the u64 at byte ``offset`` of segment ``name``, behind the ring's back."""
    seg = attach_segment(name)
    words = seg.buf.cast("Q")
    try:
        words[offset >> 3] = value
    finally:
        words.release()
        close_segment(seg)


# ---------------------------------------------------------------------------------------------
# a producer killed mid-record


def _torn_claim_case(wrapped: bool) -> tuple[int, int]:
    """(records before the torn claim, torn claim length): a wrapped claim pads the tail and
    puts its header at the start of the data area, an unwrapped one sits at the cursor."""
    if not wrapped:
        return 10, 100
    for count in range(200, 400):
        to_end = CAPACITY - h.cursor_after(count, CAPACITY) % CAPACITY
        if 16 <= to_end <= 200:
            return count, to_end  # record_size(to_end) = to_end + 8: one slot too many
    raise AssertionError("no wrapping case found")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapped", [False, True], ids=["at-cursor", "wrapped"])
@pytest.mark.parametrize("repair", ["owner-unblocks", "successor-unblocks"])
def test_producer_killed_mid_record(name: str, wrapped: bool, repair: str) -> None:
    count, torn_length = _torn_claim_case(wrapped)
    total = count + 1000
    ready = h.SPAWN.Event()
    with h.make_ring(name, CAPACITY) as ring, Consumer.attach(name) as consumer:
        with h.child(h.produce_then_die, name, count, torn_length, ready) as victim:
            h.read_sequence(consumer, 0, count, timeout=20, alive=victim.is_alive)
            assert ready.wait(20), "the producer never reached its torn claim"
            h.kill_and_reap(victim)

        # the consumer sees nothing of the half-written record
        assert consumer.read(timeout=0.1) is None
        header = ring.header()
        assert header.write_cursor == h.cursor_after(count, CAPACITY)
        if wrapped:
            assert header.write_cursor % CAPACITY + d.record_size(torn_length) > CAPACITY
        assert header.pending_claim and read_header(name).pending_claim
        assert header.producer_pid == victim.pid and header.unblocks == 0

        if repair == "owner-unblocks":
            assert ring.unblock() is True
            assert ring.unblock() is False  # nothing left to clear, nothing counted twice
            header = ring.header()
            assert (header.pending_claim, header.unblocks, header.producer_pid) == (False, 1, 0)

        # a restarted producer reads back where its predecessor stopped and carries on
        with h.child(h.resume_sequence, name, total) as successor:
            h.read_sequence(consumer, count, total, timeout=20, alive=successor.is_alive)
            h.join_ok(successor)
        assert consumer.read(timeout=0.05) is None  # every seq exactly once: none after the last
        header = ring.header()
        assert (header.pending_claim, header.unblocks) == (False, 1)
        assert header.read_cursor == header.write_cursor


@pytest.mark.timeout(60)
def test_producer_killed_between_records_leaves_no_torn_claim(name: str) -> None:
    """Old payload bytes at the write cursor must not pass for an open claim: a producer that
    died between two records needs no unblock, and none is counted."""
    ready = h.SPAWN.Event()
    with h.make_ring(name, CAPACITY) as ring, Consumer.attach(name) as consumer:
        with h.child(h.produce_then_die, name, 500, None, ready) as victim:
            h.read_sequence(consumer, 0, 500, timeout=20, alive=victim.is_alive)
            assert ready.wait(20)
            h.kill_and_reap(victim)
        assert not ring.header().pending_claim
        assert ring.unblock() is False
        with h.child(h.resume_sequence, name, 600) as successor:
            h.read_sequence(consumer, 500, 600, timeout=20, alive=successor.is_alive)
            h.join_ok(successor)
        assert ring.header().unblocks == 0


# ---------------------------------------------------------------------------------------------
# a consumer killed mid-read


@pytest.mark.timeout(60)
def test_consumer_killed_mid_read_resumes_at_read_cursor(name: str) -> None:
    """Records the dead consumer read but never released are delivered again to its successor:
    at-least-once between a crash and the next stage, which drops what it has already seen by
    (stream id, sequence) so the output stays exactly-once. Nothing is lost."""
    released, held, total = 30, 20, 100
    ready = h.SPAWN.Event()
    receive, send = h.SPAWN.Pipe(duplex=False)
    with h.make_ring(name, CAPACITY) as ring, Producer.attach(name) as producer:
        h.write_sequence(producer, 0, total)
        with h.child(h.consume_then_die, name, released, held, ready, send) as victim:
            assert receive.poll(20), "the consumer never reported what it read"
            seen_by_victim = receive.recv()
            assert ready.wait(20)
            h.kill_and_reap(victim)
        assert seen_by_victim == list(range(released + held))
        header = ring.header()
        assert header.read_cursor == h.cursor_after(released, CAPACITY)  # only what was released
        assert header.consumer_pid == victim.pid

        with Consumer.attach(name) as successor:  # the dead pid does not block a successor
            seen_by_successor = []
            while (record := successor.try_read()) is not None:
                seen_by_successor.append(h.sequence_of(record[1]))
            successor.release()
        assert seen_by_successor == list(range(released, total))

        # the next stage's dedup by sequence turns the redelivery into exactly-once
        delivered, last = [], -1
        for seq in seen_by_victim + seen_by_successor:
            if seq > last:
                delivered.append(seq)
                last = seq
        assert delivered == list(range(total))
        assert ring.header().read_cursor == ring.header().write_cursor


# ---------------------------------------------------------------------------------------------
# corrupt headers and records


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (d.MAGIC_OFFSET, 0, "bad magic"),
        (d.MAGIC_OFFSET, int.from_bytes(b"NPRING\x00\x02", "little"), "bad magic"),
        (d.VERSION_OFFSET, d.LAYOUT_VERSION + 1, f"layout version {d.LAYOUT_VERSION + 1}"),
        (d.CAPACITY_OFFSET, CAPACITY + 8, f"capacity {CAPACITY + 8} is not a power of two"),
        (d.CAPACITY_OFFSET, CAPACITY // 2, f"capacity {CAPACITY // 2}"),
        (d.CAPACITY_OFFSET, CAPACITY * 2, f"capacity {CAPACITY * 2} is not a power of two fitting"),
        (d.MAX_RECORD_OFFSET, 0, "max_record 0"),
        (d.MAX_RECORD_OFFSET, CAPACITY, f"max_record {CAPACITY}"),
        (d.WRITE_CURSOR_OFFSET, 3, "cursors not 8-byte aligned"),
        (d.READ_CURSOR_OFFSET, 4, "cursors not 8-byte aligned"),
        (d.READ_CURSOR_OFFSET, 64, "cursors out of order"),
        (d.WRITE_CURSOR_OFFSET, CAPACITY + 8, "cursors out of order"),
    ],
    ids=[
        "magic-zero",
        "magic-other",
        "version",
        "capacity-not-power-of-two",
        "capacity-too-small",
        "capacity-beyond-segment",
        "max-record-zero",
        "max-record-too-large",
        "write-misaligned",
        "read-misaligned",
        "read-ahead-of-write",
        "write-beyond-capacity",
    ],
)
def test_corrupt_header_is_refused_naming_the_field(name: str, offset: int, value: int, match: str) -> None:
    with h.make_ring(name, CAPACITY):
        poke(name, offset, value)
        for open_ring in (Producer.attach, Consumer.attach, read_header):
            with pytest.raises(RingCorrupt, match=match) as raised:
                open_ring(name)
            assert name in str(raised.value)


def test_segment_smaller_than_a_header_is_refused(name: str) -> None:
    seg = create_segment(name, 512)
    try:
        for open_ring in (Producer.attach, Consumer.attach, read_header):
            with pytest.raises(RingCorrupt, match="smaller than a ring header"):
                open_ring(name)
    finally:
        close_segment(seg)
        remove_segment(name)


def test_empty_segment_is_refused(name: str) -> None:
    """What a creator killed between creating and sizing its segment leaves (and what any
    reader may see for an instant while a ring is being created)."""
    path = f"/dev/shm/{name}"
    open(path, "wb").close()
    try:
        for open_ring in (Producer.attach, Consumer.attach, read_header):
            with pytest.raises(RingCorrupt, match="segment of 0 bytes"):
                open_ring(name)
    finally:
        os.unlink(path)


def test_read_header_of_missing_ring(name: str) -> None:
    with pytest.raises(FileNotFoundError):
        read_header(name)


@pytest.mark.parametrize(
    ("record_header", "match"),
    [
        (d.TYPE_PADDING << 32 | 8, "bad padding at position 16"),  # padding that is not at the tail
        (3 << 32 | 8, "type 3"),
        (0, "type 0"),
        ((d.TYPE_MAX_USER + 1) << 32 | 8, f"type {d.TYPE_MAX_USER + 1}"),
        (h.RECORD_TYPE << 32 | 2000, "length 2000"),
        (h.RECORD_TYPE << 32 | 500, "length 500, write cursor"),  # within max_record, past the data
    ],
    ids=["padding-mid-ring", "reserved-type", "zero", "type-too-large", "length-beyond-max-record", "past-write"],
)
def test_corrupt_record_header_is_refused(name: str, record_header: int, match: str) -> None:
    with h.make_ring(name, CAPACITY), Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        h.write_sequence(producer, 0, 3)
        assert h.sequence_of(consumer.try_read()[1]) == 0
        consumer.release()
        poke(name, d.HEADER_SIZE + d.record_size(h.payload_length(0)), record_header)  # seq 1's header
        with pytest.raises(RingCorrupt, match=match):
            consumer.try_read()


def test_blocking_strategy_needs_a_doorbell_dir(name: str) -> None:
    with h.make_ring(name, CAPACITY) as ring:
        seg = attach_segment(name)
        try:
            start, length = d.DOORBELL_DIR_OFFSET, d.DOORBELL_DIR_LENGTH
            seg.buf[start : start + length] = bytes(length)
        finally:
            close_segment(seg)
        for side in (Producer, Consumer):
            with pytest.raises(RingError, match="no doorbell directory"):
                side.attach(name, WaitStrategy("block"))
            with side.attach(name, WaitStrategy.named("yield")) as attached:
                assert attached.data_bell is None
        header = ring.header()
        assert (header.producer_pid, header.consumer_pid, header.doorbell_dir) == (0, 0, "")


def _mappings_of(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith(f"/dev/shm/{name}") for line in maps)


def test_refused_attach_leaves_no_mapping_behind(name: str) -> None:
    with h.make_ring(name, CAPACITY):
        mapped = _mappings_of(name)
        assert mapped == 1  # the owner's own mapping
        poke(name, d.MAGIC_OFFSET, 0)
        for side in (Producer, Consumer):
            with pytest.raises(RingCorrupt):
                side.attach(name)
        assert _mappings_of(name) == mapped
