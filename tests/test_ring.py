"""Ring unit tests in one process: claim/commit/read, the full-ring policies, misuse, counters."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
from shm_helpers import RECORD_TYPE, make_ring

from shm import descriptor as d
from shm.naming import segment_name
from shm.ring import Consumer, Producer, RecordTooLarge, Ring, RingError, read_header
from shm.wait import WaitStrategy


@pytest.fixture
def name(instance: str) -> str:
    return segment_name(instance, "ring")


def fill(producer: Producer, length: int) -> int:
    """Commit records of ``length`` bytes until the ring is full; how many fitted."""
    count = 0
    while (view := producer.try_claim(length)) is not None:
        view[:] = bytes([count & 0xFF]) * length
        producer.commit(RECORD_TYPE)
        count += 1
    return count


def test_create_writes_a_valid_header(name: str) -> None:
    with make_ring(name, 8192) as ring:
        h = read_header(name)
        assert (h.capacity, h.max_record) == (8192, d.default_max_record(8192))
        assert h.owner_pid == os.getpid()
        assert (h.write_cursor, h.read_cursor, h.used, h.occupancy) == (0, 0, 0, 0.0)
        assert h.doorbell_dir == ring.doorbell_dir and os.path.isdir(h.doorbell_dir)
        assert not h.drop_when_full and not h.pending_claim
        assert abs(h.created_ns - time.time_ns()) < 60e9
        assert os.path.getsize(f"/dev/shm/{name}") == d.segment_size(8192)


def test_destroy_removes_segment_and_doorbells(name: str) -> None:
    ring = Ring.create(name, 4096)
    bells = [os.path.join(ring.doorbell_dir, name + suffix) for suffix in (".data", ".space")]
    assert all(os.path.exists(path) for path in bells)
    ring.destroy()
    assert not os.path.exists(f"/dev/shm/{name}")
    assert not any(os.path.exists(path) for path in bells)
    assert not os.path.exists(ring.doorbell_dir)  # a private doorbell dir goes with the ring


def test_shared_doorbell_dir_is_kept(name: str, tmp_path) -> None:
    with make_ring(name, 4096, doorbell_dir=str(tmp_path)) as ring:
        assert ring.doorbell_dir == str(tmp_path)
        assert sorted(os.listdir(tmp_path)) == [name + ".data", name + ".space"]
    assert os.listdir(tmp_path) == [] and tmp_path.is_dir()


@pytest.mark.parametrize(
    ("capacity", "max_record", "match"),
    [
        (4095, None, "power of two"),
        (2048, None, "power of two"),
        (6144, None, "power of two"),
        (4096, 0, "max_record"),
        (4096, 2 * d.default_max_record(4096) + 1, "max_record"),
    ],
)
def test_create_rejects_bad_geometry(name: str, capacity: int, max_record: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Ring.create(name, capacity, max_record=max_record)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_create_existing_name_fails_and_leaves_nothing(name: str, tmp_path, monkeypatch) -> None:
    with make_ring(name, 4096) as ring:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a private doorbell dir goes
        with pytest.raises(FileExistsError):
            Ring.create(name, 4096)
        assert list(tmp_path.iterdir()) == []  # the failed create's doorbell dir was removed
        assert read_header(name).capacity == 4096  # the existing ring is untouched
        assert ring.header().owner_pid == os.getpid()


def test_round_trip_in_place(name: str) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        assert consumer.try_read() is None
        view = producer.try_claim(5)
        view[:] = b"hello"
        assert consumer.try_read() is None  # claimed but not committed: invisible
        producer.commit(RECORD_TYPE + 7)
        record_type, payload = consumer.try_read()
        assert (record_type, bytes(payload)) == (RECORD_TYPE + 7, b"hello")
        assert ring.header().write_cursor == d.record_size(5) == 16
        assert ring.header().read_cursor == 0  # not released yet
        consumer.release()
        assert ring.header().read_cursor == 16
        assert consumer.try_read() is None


def test_zero_length_and_max_length_records(name: str) -> None:
    with make_ring(name, 4096), Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        assert producer.try_claim(0) is not None
        producer.commit(RECORD_TYPE)
        big = bytes(range(256)) * (producer.max_record // 256) + b"x" * (producer.max_record % 256)
        assert producer.write(big, RECORD_TYPE + 1)
        first, second = consumer.try_read(), consumer.try_read()
        assert (first[0], len(first[1])) == (RECORD_TYPE, 0)
        assert (second[0], bytes(second[1])) == (RECORD_TYPE + 1, big)


def test_abort_publishes_nothing(name: str) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        producer.try_claim(100)[:4] = b"torn"
        assert ring.header().pending_claim
        producer.abort()
        assert not ring.header().pending_claim
        assert consumer.try_read() is None
        assert producer.write(b"next", RECORD_TYPE)
        assert bytes(consumer.try_read()[1]) == b"next"


def test_rewind_rereads_unreleased_records(name: str) -> None:
    with make_ring(name, 4096), Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        for payload in (b"a", b"b", b"c"):
            producer.write(payload, RECORD_TYPE)
        assert bytes(consumer.try_read()[1]) == b"a"
        consumer.release()
        assert [bytes(consumer.try_read()[1]) for _ in range(2)] == [b"b", b"c"]
        consumer.rewind()
        assert [bytes(consumer.try_read()[1]) for _ in range(2)] == [b"b", b"c"]
        assert consumer.try_read() is None


def test_release_to_keeps_the_records_read_after_the_mark(name: str) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        for payload in (b"a", b"b", b"c"):
            producer.write(payload, RECORD_TYPE)
        consumer.try_read()
        mark = consumer.position
        consumer.try_read()
        consumer.try_read()
        consumer.release_to(mark, 1)
        assert ring.header().read_cursor == mark
        consumer.rewind()  # as a restarted consumer would: b and c are still there
        assert [bytes(consumer.try_read()[1]) for _ in range(2)] == [b"b", b"c"]
        with pytest.raises(RingError, match="outside the read but unreleased"):
            consumer.release_to(mark - 8, 1)


def test_wrap_pads_the_tail(name: str) -> None:
    """A record that does not fit before the end of the data area starts again at 0; the gap is
    padding that the consumer skips and the producer's space accounting includes."""
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        assert fill(producer, 1000) == 4  # 4 x 1008 bytes = 4032: 64 bytes left before the end
        for _ in range(4):
            consumer.try_read()
        consumer.release()
        assert producer.write(b"w" * 100, RECORD_TYPE)  # 64 bytes of padding, then at 0
        h = ring.header()
        assert h.write_cursor == 4032 + 64 + d.record_size(100)
        record_type, payload = consumer.try_read()
        assert (record_type, bytes(payload)) == (RECORD_TYPE, b"w" * 100)
        consumer.release()
        assert ring.header().read_cursor == h.write_cursor


def test_try_claim_full_counts_one_backpressure_event_per_episode(name: str) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        assert fill(producer, 1000) == 4
        assert producer.is_full
        assert producer.try_claim(1000) is None and producer.try_claim(1000) is None
        assert ring.header().backpressure_events == 1
        # a smaller record still fits in the 64 bytes before the end: not full any more
        assert producer.try_claim(40) is not None
        producer.commit(RECORD_TYPE)
        assert not producer.is_full
        assert producer.try_claim(1000) is None
        assert producer.is_full and ring.header().backpressure_events == 2
        consumer.try_read()
        consumer.release()
        assert producer.try_claim(1000) is not None
        assert not producer.is_full


def test_record_too_large(name: str) -> None:
    with make_ring(name, 4096, max_record=500), Producer.attach(name) as producer:
        assert producer.max_record == 500
        for call in (producer.try_claim, producer.claim):
            with pytest.raises(RecordTooLarge, match="max_record 500"):
                call(501)
        with pytest.raises(RecordTooLarge):
            producer.try_claim(-1)
        with pytest.raises(RecordTooLarge):
            producer.write(b"x" * 501, RECORD_TYPE)
        assert issubclass(RecordTooLarge, RingError)
        assert producer.try_claim(500) is not None  # the limit itself is fine


def test_max_record_above_default_fits_an_empty_ring(name: str) -> None:
    biggest = 2 * d.default_max_record(4096)
    with make_ring(name, 4096, max_record=biggest), Producer.attach(name) as producer, Consumer.attach(name) as reader:
        for i in range(5):  # every start position, wrapped or not
            assert producer.write(bytes([i]) * biggest, RECORD_TYPE, timeout=1)
            assert bytes(reader.try_read()[1]) == bytes([i]) * biggest
            reader.release()


@pytest.mark.parametrize("record_type", [0, d.TYPE_PADDING, d.TYPE_MIN_USER - 1, d.TYPE_MAX_USER + 1, 1 << 40])
def test_commit_rejects_reserved_types(name: str, record_type: int) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer:
        producer.try_claim(8)
        with pytest.raises(RingError, match="record type"):
            producer.commit(record_type)
        assert ring.header().write_cursor == 0
        producer.commit(d.TYPE_MAX_USER)  # the claim is still open and a valid type commits it
        assert ring.header().write_cursor == 16


def test_commit_without_claim_and_double_claim(name: str) -> None:
    with make_ring(name, 4096), Producer.attach(name) as producer:
        with pytest.raises(RingError, match="commit without a claim"):
            producer.commit(RECORD_TYPE)
        producer.try_claim(8)
        with pytest.raises(RingError, match="another claim is open"):
            producer.try_claim(8)
        producer.abort()
        with pytest.raises(RingError, match="commit without a claim"):
            producer.commit(RECORD_TYPE)


def test_drop_policy_counts_drops(name: str) -> None:
    with make_ring(name, 4096, drop_when_full=True) as ring, Producer.attach(name) as producer:
        assert producer.drop_when_full and ring.header().drop_when_full
        assert fill(producer, 1000) == 4
        started = time.monotonic()
        assert producer.claim(1000) is None  # no waiting, even without a timeout
        assert producer.claim(1000, timeout=5) is None
        assert not producer.write(b"x" * 1000, RECORD_TYPE)
        assert time.monotonic() - started < 1
        h = ring.header()
        assert (h.drops, h.backpressure_events) == (3, 1)
        with Consumer.attach(name) as consumer:
            consumer.try_read()
            consumer.release()
        assert producer.claim(1000) is not None
        assert ring.header().drops == 3


@pytest.mark.parametrize("kind", ["spin", "yield", "block"])
def test_block_policy_claim_times_out(name: str, kind: str) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name, WaitStrategy.named(kind)) as producer:
        fill(producer, 1000)
        started = time.monotonic()
        assert producer.claim(1000, timeout=0.2) is None
        assert 0.2 <= time.monotonic() - started < 3
        assert not producer.write(b"x" * 1000, RECORD_TYPE, timeout=0.05)
        h = ring.header()
        assert h.drops == 0 and h.backpressure_events == 1
        assert not h.producer_waiting  # a producer that gave up is not left marked asleep


@pytest.mark.parametrize("kind", ["spin", "yield", "block"])
def test_read_times_out_on_empty_ring(name: str, kind: str) -> None:
    with make_ring(name, 4096) as ring, Consumer.attach(name, WaitStrategy.named(kind)) as consumer:
        started = time.monotonic()
        assert consumer.read(timeout=0.1) is None
        assert 0.1 <= time.monotonic() - started < 3
        assert not ring.header().consumer_waiting


def test_counters_published_by_heartbeat(name: str) -> None:
    with make_ring(name, 4096) as ring:
        with Producer.attach(name) as producer, Consumer.attach(name) as consumer:
            h = ring.header()
            assert (h.producer_pid, h.consumer_pid) == (os.getpid(), os.getpid())
            for i in range(10):
                producer.write(bytes([i]), RECORD_TYPE)
            for _ in range(7):
                consumer.try_read()
            consumer.release()
            consumer.try_read()  # read, not released: not counted
            assert (ring.header().records_written, ring.header().records_read) == (0, 0)
            before = ring.header().producer_heartbeat_ns
            producer.heartbeat()
            consumer.heartbeat()
            h = ring.header()
            assert (h.records_written, h.records_read) == (10, 7)
            assert h.producer_heartbeat_ns >= before > 0 and h.consumer_heartbeat_ns > 0
        h = ring.header()  # closing publishes the counters and frees both roles
        assert (h.producer_pid, h.consumer_pid) == (0, 0)
        assert (h.records_written, h.records_read) == (10, 7)
        with Producer.attach(name) as producer:  # a successor keeps counting from there
            producer.write(b"x", RECORD_TYPE)
        assert ring.header().records_written == 11


def test_last_committed(name: str) -> None:
    with make_ring(name, 4096):
        with Producer.attach(name) as producer:
            assert producer.last_committed() is None
            producer.write(b"first", RECORD_TYPE)
            producer.write(b"second", RECORD_TYPE + 1)
            producer.try_claim(3)[:] = b"abc"  # an aborted claim is not "committed"
        with Producer.attach(name) as successor:
            record_type, view = successor.last_committed()
            assert (record_type, bytes(view)) == (RECORD_TYPE + 1, b"second")


def test_owner_unblock_refuses_while_producer_lives(name: str) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer:
        producer.try_claim(8)
        with pytest.raises(RingError, match="alive"):
            ring.unblock()
        assert ring.header().pending_claim


def test_closing_a_consumer_keeps_unreleased_records(name: str) -> None:
    with make_ring(name, 4096) as ring, Producer.attach(name) as producer:
        for i in range(3):
            producer.write(bytes([i]), RECORD_TYPE)
        with Consumer.attach(name) as consumer:
            consumer.try_read()
            consumer.release()
            consumer.try_read()
        assert ring.header().read_cursor == 16
        with Consumer.attach(name) as successor:
            assert [bytes(successor.try_read()[1]) for _ in range(2)] == [b"\x01", b"\x02"]


def test_wait_strategy_validation() -> None:
    assert WaitStrategy().kind == "block" and WaitStrategy().blocks
    assert WaitStrategy.named("spin").yields == 0 and not WaitStrategy.named("spin").blocks
    assert WaitStrategy.named("yield").kind == "yield"
    for bad in ({"kind": "sleep"}, {"spins": -1}, {"yields": -1}, {"park_timeout_s": 0}, {"park_timeout_s": 61}):
        with pytest.raises(ValueError):
            WaitStrategy(**bad)
