"""The cache's parts without processes: key and policy, LRU by bytes with TTL, the collector of
passing streams, replay batches, and snapshots (round trip, corrupt, foreign, atomic)."""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
import uuid

import numpy as np
import orjson
import pytest
import zmq

from engine.logs import JsonLogger
from engine.protocol.cache import CacheProtocolError, parse_request
from engine.protocol.cachekey import cache_key, check_policy, key_for, producer_id
from engine.stage import WorkerContext
from shm.batch import BatchColumns, ExtraColumn, Kind, TokenBatch, batch_size, write_batch
from shm.naming import segment_name
from shm.ring import Consumer, Producer, Ring
from stages.cache.collect import Collector
from stages.cache.replay import Replay
from stages.cache.snapshot import SnapshotError, read_snapshot, write_snapshot
from stages.cache.stage import Cache
from stages.cache.store import LruStore

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8}


# ---- key and policy ------------------------------------------------------------------------


def test_key_ignores_what_cannot_change_the_tokens_and_canonicalises():
    same = [
        CHAT,
        {**CHAT, "stream": True, "user": "bob", "temperature": 0.0},
        {
            **CHAT,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
        },
        dict(reversed(list(CHAT.items()))),
    ]
    assert len({cache_key(b) for b in same}) == 1
    different = [{**CHAT, "max_tokens": 9}, {**CHAT, "top_k": 5}, {**CHAT, "model": "n"}]
    assert cache_key(CHAT) not in {cache_key(b) for b in different}
    assert cache_key(CHAT, "chat") != cache_key(CHAT, "completions")


def test_key_of_a_body_with_any_json_number_is_made():
    """An integral float was written as the integer whatever its size: 1e19 or 1e300 became an
    integer no JSON encoder here writes (orjson: 64 bits), and the request failed in ingest
    (``TypeError: Integer exceeds 64-bit range``, a 503) though any field may hold such a number."""
    for huge in (1.8446744073709552e19, -1e19, 1e300, 2.0**53 + 2):
        key = cache_key({**CHAT, "temperature": 0, "response_format": huge})
        assert len(key) == 32 and key != cache_key(CHAT)
    # integral floats that are exact integers are still one key with the integer
    assert cache_key({**CHAT, "seed": 2.0**53}) == cache_key({**CHAT, "seed": 2**53})


def test_key_names_the_producer_so_another_upstream_never_gets_its_answer():
    llama = producer_id([{"base_url": "http://127.0.0.1:8080", "models": ["tiny"]}])
    embedded = producer_id([{"embedded": ["neuralpipe-echo"]}])
    assert cache_key(CHAT, "chat", llama) != cache_key(CHAT, "chat", embedded)
    # the same set in another order is the same producer
    a, b = {"base_url": "http://a", "models": []}, {"base_url": "http://b", "models": ["m"]}
    assert producer_id([a, b]) == producer_id([b, a]) != producer_id([a])


def test_policy_deterministic_all_off():
    hot = {**CHAT, "temperature": 0.7}
    assert key_for(CHAT, "chat", "deterministic", "p") and key_for({**hot, "seed": 1}, "chat", "deterministic", "p")
    assert key_for(hot, "chat", "deterministic", "p") is None
    assert key_for(hot, "chat", "all", "p") and key_for(CHAT, "chat", "off", "p") is None
    with pytest.raises(ValueError, match="cache_policy"):
        check_policy("sometimes")


def test_protocol_names_the_bad_field():
    with pytest.raises(CacheProtocolError, match="stream_id"):
        parse_request(orjson.dumps({"type": "lookup", "key": "k", "stream_id": -1, "deadline_ns": 0}))
    with pytest.raises(CacheProtocolError, match="type"):
        parse_request(orjson.dumps({"type": "launch"}))


# ---- the LRU --------------------------------------------------------------------------------


class Sized:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_lru_evicts_least_recently_used_within_the_byte_budget():
    store = LruStore(max_bytes=100, ttl_s=60)
    for key in "abc":
        assert store.put(key, Sized(30))
    assert store.get("a") is not None  # a is now the most recent: b goes first
    store.put("d", Sized(30))
    assert "b" not in store and {"a", "c", "d"} <= {k for k, _, _ in store.items()}
    assert store.bytes == 90 and store.counts["evictions"] == 1
    assert not store.put("huge", Sized(101)) and store.counts["too_large"] == 1


def test_ttl_expires_on_lookup_and_on_purge():
    now = [1000.0]
    store = LruStore(max_bytes=100, ttl_s=10, clock=lambda: now[0])
    store.put("a", Sized(10))
    store.put("b", Sized(10))
    now[0] += 9.9
    assert store.get("a") is not None
    now[0] += 0.2
    assert store.get("a") is None and store.counts["expired"] == 1 and store.counts["misses"] == 1
    assert store.purge_expired() == 1 and len(store) == 0 and store.bytes == 0


@pytest.mark.parametrize("tokens", [4, 20, 100, 250])
def test_the_byte_budget_bounds_the_memory_the_entries_hold(tokens):
    """Stored streams as the collector makes them, with compute's columns: what ``max_bytes``
    counts is what they hold (tracemalloc). Before, 512 bytes were counted for an entry's objects
    (~2.5 KiB: 13 numpy arrays, the tuples and the entry): short replies held 2-3x the budget."""
    from stages.compute.stage import COLUMNS

    rows = stream_rows(1, "k", tokens)
    batch = make_batch(rows, COLUMNS)
    limit = 1 << 20
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = LruStore(max_bytes=limit, ttl_s=60)
        collector = Collector(max_stream_bytes=1 << 20)
        for i in range(4 * limit // (40 * tokens + 400)):
            ((_, stored),) = collector.observe(batch, 16)
            store.put(f"{i:064x}", stored)  # a key as long as the engine's (a sha256)
        del stored, collector
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.counts["evictions"] > 0 and store.bytes <= limit
    assert 0.8 * store.bytes <= held <= 1.2 * limit, f"{held / store.bytes:.2f} x what is counted"


# ---- collector and replay -------------------------------------------------------------------

EXTRA = (ExtraColumn("conf", "f4"), ExtraColumn("rgba", "u1", 4))


def make_batch(rows: list[tuple[int, int, int, bytes]], extra: tuple[ExtraColumn, ...] = EXTRA) -> BatchColumns:
    """rows: (stream id, seq, kind, text)."""
    return TokenBatch.decode(make_record(rows, extra))


def make_record(rows: list[tuple[int, int, int, bytes]], extra: tuple[ExtraColumn, ...] = EXTRA) -> memoryview:
    """The bytes of a batch record of ``rows`` (stream id, seq, kind, text)."""
    text = b"".join(r[3] for r in rows)
    buf = memoryview(bytearray(batch_size(len(rows), len(text), extra)))
    cols = write_batch(buf, len(rows), len(text), extra)
    cols.stream_id[:] = [r[0] for r in rows]
    cols.seq[:] = [r[1] for r in rows]
    cols.kind[:] = [r[2] for r in rows]
    cols.recv_ns[:] = [1_000_000 * r[1] for r in rows]
    cols.token_id[:] = [r[1] + 100 for r in rows]
    cols.logprob[:] = -0.5
    cols.text_end[:] = np.cumsum([len(r[3]) for r in rows])
    cols.text[:] = np.frombuffer(text, dtype=np.uint8)
    if extra:
        cols.extra["conf"][:] = [r[1] / 10 for r in rows]
        cols.extra["rgba"][:] = [[r[1], 1, 2, 3] for r in rows]
    return buf


def start(key: str | None, cached: bool = False) -> bytes:
    return orjson.dumps({"model": "m", "cached": cached, "cache_key": key})


def stream_rows(sid: int, key: str | None, tokens: int, final: int = Kind.END) -> list[tuple[int, int, int, bytes]]:
    rows = [(sid, 0, Kind.START, start(key))]
    rows += [(sid, i, Kind.TOKEN, f"t{i} ".encode()) for i in range(1, tokens + 1)]
    return [*rows, (sid, tokens + 1, final, b'{"finish_reason":"length","usage":null}')]


def test_collector_keeps_keyed_streams_split_over_batches_and_interleaved():
    a, b = stream_rows(1, "ka", 5), stream_rows(2, "kb", 3)
    c = collector = Collector(max_stream_bytes=1 << 20)
    assert c.observe(make_batch([a[0], b[0], a[1], a[2]]), 16) == []
    assert c.observe(make_batch([a[1], a[2], b[1]]), 16) == []  # a re-sent batch: rows taken once
    done = c.observe(make_batch(a[3:] + b[2:]), 16)
    assert [key for key, _ in done] == ["ka", "kb"]
    s = dict(done)["ka"]
    assert s.rows == 7 and s.kind[0] == Kind.START and s.kind[-1] == Kind.END
    assert list(s.token_id) == [100 + i for i in range(7)] and list(s.offset_ns) == [1_000_000 * i for i in range(7)]
    assert [c.name for c, _ in s.extras] == ["conf", "rgba"] and s.extras[1][1].shape == (7, 4)
    assert collector.counts["collected"] == 2 and not collector.open


def test_streams_being_collected_hold_what_max_stream_bytes_counts():
    """100 streams collected a row a record (100 chats at model speed), with compute's columns:
    what the collector holds is what the streams' ``nbytes`` count (tracemalloc), so
    ``max_stream_bytes`` bounds it. Before, each stream kept a view per record and column: 1.7 KB
    a row, 30 times what was counted (100 streams of 10k tokens: 1.7 GB in the cache worker)."""
    from stages.compute.stage import COLUMNS

    streams, rows = 100, 200
    starts = make_batch([(sid, 0, Kind.START, start(f"k{sid}")) for sid in range(1, streams + 1)], COLUMNS)
    records = [make_batch([(sid, seq, Kind.TOKEN, b"tok ") for sid in range(1, streams + 1)], COLUMNS)
               for seq in range(1, rows + 1)]  # fmt: skip
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        collector = Collector(max_stream_bytes=1 << 30)
        collector.observe(starts, 16)
        for record in records:
            assert collector.observe(record, 16) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = sum(builder.nbytes for _, builder in collector.open.values())
    assert len(collector.open) == streams and held <= 1.3 * counted, f"{held / counted:.1f} x what is counted"
    ((_, stored),) = collector.observe(make_batch([(1, rows + 1, Kind.END, b"{}")], COLUMNS), 16)
    assert stored.rows == rows + 2 and stored.text == start("k1") + b"tok " * rows + b"{}"
    columns = {column.name: array for column, array in stored.extras}
    assert np.allclose(columns["conf"][1:-1], np.arange(1, rows + 1) / 10)
    assert columns["rgba"][1:-1].tolist() == [[seq, 1, 2, 3] for seq in range(1, rows + 1)]


def test_collector_never_stores_errors_gaps_unkeyed_replays_or_streams_seen_without_start():
    c = Collector(max_stream_bytes=1 << 20)
    errored = stream_rows(1, "k1", 3, final=Kind.ERROR)
    gap = stream_rows(2, "k2", 4)
    unkeyed = stream_rows(3, None, 2)
    replayed = [(4, 0, Kind.START, start("k4", cached=True)), *stream_rows(4, "k4", 2)[1:]]
    headless = stream_rows(5, "k5", 2)[1:]
    rows = errored + gap[:2] + gap[3:] + unkeyed + replayed + headless
    assert c.observe(make_batch(rows), 16) == []
    assert c.counts["discarded"] == 1 and c.counts["incomplete"] == 1 and not c.open


def test_replay_renumbers_marks_cached_and_keeps_columns():
    ((key, stored),) = Collector(1 << 20).observe(make_batch(stream_rows(7, "k", 5)), 16)

    class Out:  # the two Producer calls a replay makes, and the record limit it keeps to
        max_record = 1 << 20

        def __init__(self):
            self.records = []

        def try_claim(self, n):
            self.raw = bytearray(n)
            return memoryview(self.raw)

        def commit(self, record_type):
            self.records.append(TokenBatch.decode(memoryview(self.raw)))

    out = Out()
    replay = Replay(42, stored, key, paced=False, now_ns=0)
    while not replay.done:
        assert replay.write(out, batch_rows=3, now_ns=5) > 0
    rows = [(int(b.stream_id[i]), int(b.seq[i]), b.token_text(i)) for b in out.records for i in range(b.rows)]
    assert [r[:2] for r in rows] == [(42, i) for i in range(7)]
    assert orjson.loads(rows[0][2]) == {"model": "m", "cached": True, "cache_key": "k"}
    assert [r[2] for r in rows[1:6]] == [f"t{i} " for i in range(1, 6)]
    assert all((b.recv_ns == 5).all() for b in out.records)
    assert np.concatenate([b.extra["rgba"][:, 0] for b in out.records]).tolist() == list(range(7))


def test_paced_replay_writes_only_rows_that_are_due():
    ((key, stored),) = Collector(1 << 20).observe(make_batch(stream_rows(1, "k", 5)), 16)

    class Out:
        max_record = 1 << 20

        def try_claim(self, n):
            return memoryview(bytearray(n))

        def commit(self, record_type):
            pass

    replay = Replay(9, stored, key, paced=True, now_ns=0)
    assert replay.write(Out(), 64, now_ns=2_500_000) == 3  # rows at 0, 1 and 2 ms
    assert replay.due_ns() == 3_000_000


# ---- snapshots ------------------------------------------------------------------------------


def stored_streams(n: int):
    out = []
    for i in range(n):
        ((key, s),) = Collector(1 << 20).observe(make_batch(stream_rows(i, f"k{i}", 3 + i)), 16)
        out.append((key, 1000.0 + i, s))
    return out


def test_snapshot_round_trip_keeps_order_columns_and_times(tmp_path):
    path = str(tmp_path / "c.snapshot")
    entries = stored_streams(3)
    assert write_snapshot(path, entries)[0] == 3
    back = read_snapshot(path)
    assert [(k, t) for k, t, _ in back] == [(k, t) for k, t, _ in entries]
    for (_, _, a), (_, _, b) in zip(entries, back, strict=True):
        assert a.text == b.text and a.nbytes == b.nbytes
        assert all(np.array_equal(x, y) for x, y in zip(a.arrays(), b.arrays(), strict=True))
    assert os.listdir(tmp_path) == ["c.snapshot"]  # no temporary file left


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"PK\x03\x04 a zip file" + b[16:], "not a neuralpipe cache snapshot"),
        (lambda b: b[:8] + (7).to_bytes(4, "little") + b[12:], "version 7"),
        (lambda b: b[:-10] + bytes(10), "checksum"),
        (lambda b: b[:-1], "file has"),
        (lambda b: b[:64] + b"{}", "header says"),
        (lambda b: b[:5], "shorter than a snapshot header"),
    ],
)
def test_corrupt_or_foreign_snapshot_raises_a_named_error(tmp_path, damage, message):
    path = tmp_path / "c.snapshot"
    write_snapshot(str(path), stored_streams(2))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(str(path))


@pytest.mark.timeout(20)
def test_a_snapshot_path_that_is_no_regular_file_is_refused_at_once(tmp_path):
    """``params.snapshot_path`` naming a FIFO blocked the cache at start for good; a device such
    as /dev/zero was read until memory ran out."""
    fifo = tmp_path / "c.snapshot"
    os.mkfifo(fifo)
    with pytest.raises(SnapshotError, match="not a regular file but a FIFO"):
        read_snapshot(str(fifo))
    with pytest.raises(SnapshotError, match="not a regular file but a character device"):
        read_snapshot("/dev/zero")


def test_a_snapshot_row_of_an_unknown_kind_is_refused_naming_it(tmp_path):
    """Checksummed, yet not rows this engine writes: a kind 9 would reach every stage on replay."""
    path = str(tmp_path / "c.snapshot")
    entries = stored_streams(1)
    entries[0][2].kind[1] = 9
    write_snapshot(path, entries)
    with pytest.raises(SnapshotError, match="kind 9"):
        read_snapshot(path)


# ---- the stage's duty cycle ----------------------------------------------------------------


def test_requests_are_answered_while_records_flow_back_to_back(tmp_path):
    """A turn with a record waiting does not ask the ROUTER every time (each asking is a system
    call), but one does every SERVE_EVERY_S: records that never let a turn idle starve no lookup."""
    instance = "t" + uuid.uuid4().hex[:10]
    rings = [Ring.create(segment_name(instance, name), 1 << 20) for name in ("in", "out")]
    source, sink = Producer.attach(rings[0].name), Consumer.attach(rings[1].name)
    ctx = WorkerContext("cache", {"snapshot_path": ""}, [Consumer.attach(rings[0].name)],
                        [Producer.attach(rings[1].name)], JsonLogger("cache", "error"), str(tmp_path),
                        str(tmp_path), 0)  # fmt: skip
    stage = Cache()
    stage.start(ctx)
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(ctx.endpoint())
    raw = make_record([(1, 0, Kind.TOKEN, b"x")])
    try:
        client.send_multipart([b"t1", orjson.dumps({"type": "stats"})])
        reply, deadline = None, time.monotonic() + 5
        while reply is None and time.monotonic() < deadline:
            source.try_claim(len(raw))[:] = raw
            source.commit(16)
            assert stage.do_work() >= 1  # a record in every turn: none idle
            while sink.try_read() is not None:
                pass
            sink.release()
            if client.poll(0):
                reply = client.recv_multipart()
        assert reply is not None and reply[0] == b"t1" and orjson.loads(reply[1])["type"] == "stats"
    finally:
        client.close(0)
        stage.close()
        for side in (source, sink, *ctx.inputs, *ctx.outputs):
            side.close()
        for ring in rings:
            ring.destroy()
