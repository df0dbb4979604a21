"""Token batches: struct-of-arrays records written and read in place in a ring record."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import shm_helpers as h

from shm.batch import (
    BASE_COLUMNS,
    COLUMNS_OFFSET,
    DIRECTORY_OFFSET,
    MAX_EXTRA,
    BatchError,
    ExtraColumn,
    Kind,
    TokenBatch,
    batch_size,
    encode_texts,
    extra_column,
    stable_token_id,
    write_batch,
    write_header,
)
from shm.naming import segment_name
from shm.ring import Consumer, Producer

TOKENS = [b"Hello", b",", b" w\xc3\xb6rld", b" \xe6\x97\xa5\xe6\x9c\xac", b" \xf0\x9f\x99\x82", b"", b"!"]
TEXTS = [t.decode() for t in TOKENS]  # ASCII, 2-, 3- and 4-byte UTF-8, an empty token
EXTRA = (ExtraColumn("conf", "f4"), ExtraColumn("hilbert", "u2", 4))


@pytest.fixture
def name(instance: str) -> str:
    return segment_name(instance, "batches")


def fill_batch(buf: memoryview, tokens: list[bytes], extra=EXTRA):
    rows = len(tokens)
    cols = write_batch(buf, rows, sum(map(len, tokens)), extra)
    cols.stream_id[:] = 7
    cols.seq[:] = np.arange(100, 100 + rows)
    cols.recv_ns[:] = np.arange(rows, dtype=np.int64) * 1_000 + 1_700_000_000_000_000_000
    cols.token_id[:] = [stable_token_id(t) for t in tokens]
    cols.logprob[:] = np.linspace(-2, 0, rows, dtype=np.float32)
    if rows:
        cols.logprob[0] = np.nan  # the upstream gave none
        cols.kind[:] = Kind.TOKEN
        cols.kind[0], cols.kind[-1] = Kind.START, Kind.END
    encode_texts(cols, tokens)
    if extra:
        cols.extra["conf"][:] = np.arange(rows, dtype=np.float32) / 10
        cols.extra["hilbert"][:] = np.arange(rows * 4, dtype=np.uint16).reshape(rows, 4)
    return cols


def test_round_trip_through_a_ring(name: str) -> None:
    size = batch_size(len(TOKENS), sum(map(len, TOKENS)), EXTRA)
    with h.make_ring(name, 1 << 16), Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        view = producer.try_claim(size)
        fill_batch(view, TOKENS)
        producer.commit(h.RECORD_TYPE)
        record_type, payload = consumer.try_read()
        assert record_type == h.RECORD_TYPE and len(payload) == size
        cols = TokenBatch.decode(payload)

        rows = len(TOKENS)
        assert cols.rows == rows
        assert cols.stream_id.tolist() == [7] * rows
        assert cols.seq.tolist() == list(range(100, 100 + rows))
        assert cols.recv_ns[-1] == 1_700_000_000_000_000_000 + (rows - 1) * 1_000
        assert cols.token_id.tolist() == [stable_token_id(t) for t in TOKENS]
        assert np.isnan(cols.logprob[0]) and cols.logprob[-1] == 0
        assert cols.kind.tolist() == [Kind.START] + [Kind.TOKEN] * (rows - 2) + [Kind.END]
        assert cols.texts() == TEXTS
        assert [cols.token_text(i) for i in range(rows)] == TEXTS
        assert cols.text.tobytes() == b"".join(TOKENS)
        assert cols.extra["conf"].dtype == np.float32 and cols.extra["conf"].shape == (rows,)
        np.testing.assert_allclose(cols.extra["conf"], np.arange(rows) / 10, rtol=1e-6)
        assert cols.extra["hilbert"].dtype == np.uint16 and cols.extra["hilbert"].shape == (rows, 4)
        assert cols.extra["hilbert"][2].tolist() == [8, 9, 10, 11]
        for column in (cols.stream_id, cols.seq, cols.recv_ns, cols.token_id, cols.logprob, cols.text_end):
            assert column.ctypes.data % 8 == 0 or column.size == 0


def test_decoded_columns_are_views_of_the_record(name: str) -> None:
    size = batch_size(len(TOKENS), sum(map(len, TOKENS)), EXTRA)
    with h.make_ring(name, 1 << 16), Producer.attach(name) as producer, Consumer.attach(name) as consumer:
        fill_batch(producer.try_claim(size), TOKENS)
        producer.commit(h.RECORD_TYPE)
        _, payload = consumer.try_read()
        raw = np.frombuffer(payload, dtype=np.uint8)
        cols = TokenBatch.decode(payload)
        for column in (cols.seq, cols.token_id, cols.text, cols.extra["conf"], cols.extra["hilbert"]):
            assert np.shares_memory(column, raw)
        # a store through the record's own bytes shows up in the decoded column, and back
        seq_at = cols.seq.ctypes.data - raw.ctypes.data
        struct.pack_into("<Q", payload, seq_at, 999)
        assert cols.seq[0] == 999
        cols.extra["hilbert"][0, 0] = 0xBEEF
        hilbert_at = cols.extra["hilbert"].ctypes.data - raw.ctypes.data
        assert struct.unpack_from("<H", payload, hilbert_at)[0] == 0xBEEF


@pytest.mark.parametrize("extra", [(), EXTRA], ids=["base", "extra"])
def test_zero_rows(extra) -> None:
    buf = memoryview(bytearray(batch_size(0, 0, extra)))
    write_batch(buf, 0, 0, extra)
    cols = TokenBatch.decode(buf)
    assert cols.rows == 0 and cols.texts() == [] and cols.seq.size == 0
    assert {name: col.shape for name, col in cols.extra.items()} == ({"conf": (0,), "hilbert": (0, 4)} if extra else {})
    assert batch_size(0, 0) == COLUMNS_OFFSET


def test_base_columns_are_laid_out_as_the_contract_says() -> None:
    """The views follow BASE_COLUMNS: each column's dtype, in its order, 8-aligned after the one
    before, the text arena last (BatchColumns spells the columns out one by one)."""
    rows, text_bytes = 5, 11
    buf = memoryview(bytearray(batch_size(rows, text_bytes)))
    cols = write_batch(buf, rows, text_bytes)
    base = np.frombuffer(buf, np.uint8)
    at = COLUMNS_OFFSET
    for name, dtype in (*BASE_COLUMNS, ("text", "u1")):
        column = getattr(cols, name)
        assert column.dtype == np.dtype(dtype) and column.ctypes.data - base.ctypes.data == at, name
        assert len(column) == (text_bytes if name == "text" else rows), name
        at = (at + column.nbytes + 7) & ~7


def test_batch_size_is_exact() -> None:
    need = batch_size(len(TOKENS), sum(map(len, TOKENS)), EXTRA)
    assert need % 8 == 0
    fill_batch(memoryview(bytearray(need)), TOKENS)  # fits exactly
    with pytest.raises(BatchError, match="too small"):
        write_batch(memoryview(bytearray(need - 8)), len(TOKENS), sum(map(len, TOKENS)), EXTRA)


def test_write_batch_refuses_too_many_columns() -> None:
    extra = tuple(ExtraColumn(f"c{i}", "u1") for i in range(MAX_EXTRA + 1))
    with pytest.raises(BatchError, match=f"room for {MAX_EXTRA}"):
        write_batch(memoryview(bytearray(4096)), 1, 0, extra)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "", "dtype": "f4"}, "1-8 ASCII"),
        ({"name": "ninechars", "dtype": "f4"}, "1-8 ASCII"),
        ({"name": "ümlaut", "dtype": "f4"}, "1-8 ASCII"),
        ({"name": "x", "dtype": "f2"}, "dtype 'f2'"),
        ({"name": "x", "dtype": "f4", "width": 0}, "width 0"),
        ({"name": "x", "dtype": "f4", "width": 1 << 16}, "width 65536"),
    ],
)
def test_extra_column_validation(kwargs, match: str) -> None:
    with pytest.raises(BatchError, match=match):
        ExtraColumn(**kwargs)


def test_stable_token_id() -> None:
    ids = [stable_token_id(t) for t in TOKENS]
    assert all(i & 0x80000000 and 0 <= i < 1 << 32 for i in ids)  # never an upstream vocabulary id
    assert len(set(ids)) == len(ids)
    assert ids == [stable_token_id(t) for t in TOKENS]
    assert stable_token_id(b"") == 0x80000000 | int.from_bytes(bytes.fromhex("1271cf25"), "little")


@pytest.mark.timeout(60)
def test_stable_token_id_is_the_same_in_another_process() -> None:
    receive, send = h.SPAWN.Pipe(duplex=False)
    with h.child(h.call_and_send, h.stable_token_ids, (TOKENS,), send) as other:
        assert receive.poll(20)
        theirs = receive.recv()
        h.join_ok(other)
    assert theirs == [stable_token_id(t) for t in TOKENS]


def _good_batch() -> memoryview:
    buf = memoryview(bytearray(batch_size(len(TOKENS), sum(map(len, TOKENS)), EXTRA)))
    fill_batch(buf, TOKENS)
    return buf


def _corrupt(buf: memoryview, fmt: str, offset: int, *values) -> memoryview:
    struct.pack_into(fmt, buf, offset, *values)
    return buf


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: _good_batch()[: COLUMNS_OFFSET - 1], "shorter than a batch header"),
        (lambda: _corrupt(_good_batch(), "<I", 0, 0x12345678), "bad batch magic 0x12345678"),
        (lambda: _corrupt(_good_batch(), "<H", 4, 9), "batch version 9"),
        (lambda: _corrupt(_good_batch(), "<H", 6, MAX_EXTRA + 1), f"{MAX_EXTRA + 1} extra columns"),
        (lambda: _corrupt(_good_batch(), "<I", 8, 1_000_000), "1000000 rows .* overruns"),
        (lambda: _corrupt(_good_batch(), "<I", 12, 1 << 20), "1048576 text bytes overruns"),
        (lambda: _good_batch()[:-8], "extra column 1 .*hilbert.* overruns"),
        (lambda: _corrupt(_good_batch(), "<2s", DIRECTORY_OFFSET + 8, b"zz"), "extra column 0 .*conf.*zz"),
        (lambda: _corrupt(_good_batch(), "<I", DIRECTORY_OFFSET + 12, 1 << 30), "extra column 0 .* overruns"),
    ],
    ids=["short", "magic", "version", "extra-count", "rows", "text-bytes", "truncated", "dtype", "offset"],
)
def test_corrupt_batch_header_names_the_problem(make, match: str) -> None:
    with pytest.raises(BatchError, match=match):
        TokenBatch.decode(make())


@pytest.mark.parametrize("dtype", ["u1", "u2", "i8", "f8"])
def test_row_classes_by_kind_whatever_the_column_dtype(dtype: str) -> None:
    """Start/end/error rows, ending rows and known kinds, for the u1 column of every record and
    for what a JSON or hostile message decodes to (other integer widths, negatives, floats)."""
    from shm.batch import ending_rows, event_rows, known_rows

    values = [0, 1, 2, 3, 4, 5, 6, 7, 255] + ([-1, 259, 3.5, 4.0] if dtype in ("i8", "f8") else [])
    values = [v for v in values if dtype == "f8" or float(v).is_integer()]
    kinds = np.array(values, dtype=dtype)
    assert event_rows(kinds).tolist() == [v in (1, 3, 4) for v in values]
    assert ending_rows(kinds).tolist() == [v in (3, 4) for v in values]
    assert known_rows(kinds).tolist() == [v in (1, 2, 3, 4, 5, 6) for v in values]


@pytest.mark.parametrize("extra", [(), EXTRA])
def test_records_that_differ_only_in_their_texts_size_share_one_cached_layout(extra):
    """The layouts were cached by (rows, text bytes): a record's text size differs from the last
    one's nearly every time, so every encode and decode missed and built its offsets anew. Now
    by row count: texts of 100 sizes, one entry; each record still laid out right."""
    from shm import batch

    batch._column_offsets.cache_clear()
    for text_bytes in range(100):
        buf = memoryview(bytearray(batch_size(27, text_bytes, extra)))
        columns = write_batch(buf, 27, text_bytes, extra)
        columns.text[:] = 7
        columns.seq[:] = np.arange(27)
        del columns
        decoded = TokenBatch.decode(buf)
        assert decoded.seq.tolist() == list(range(27)) and bytes(decoded.text) == b"\x07" * text_bytes
        assert set(decoded.extra) == {c.name for c in extra}
        del decoded
    assert batch._column_offsets.cache_info().currsize == 1


def test_write_header_lays_out_what_write_batch_does_and_says_where_each_column_lies():
    """For a writer that fills the columns without views (ingest's compiled fill): each base column
    written through its offset lands where write_batch's view of it lies."""
    rows, text_bytes = 5, 13
    with_views, header_only = (memoryview(bytearray(batch_size(rows, text_bytes, EXTRA))) for _ in range(2))
    columns = write_batch(with_views, rows, text_bytes, EXTRA)
    offsets, directory = write_header(header_only, rows, text_bytes, EXTRA)
    for value, ((name, dtype), offset) in enumerate(zip(BASE_COLUMNS, offsets, strict=False), start=1):
        getattr(columns, name)[:] = value
        np.frombuffer(header_only, dtype, rows, offset)[:] = value
    columns.text[:] = 9
    header_only[offsets[-1] : offsets[-1] + text_bytes] = b"\x09" * text_bytes
    columns.extra["hilbert"][:] = 7
    extra_column(header_only, rows, directory, "hilbert")[:] = 7
    assert extra_column(header_only, rows, directory, "hilbert").shape == (rows, 4)
    del columns
    assert bytes(with_views) == bytes(header_only)
