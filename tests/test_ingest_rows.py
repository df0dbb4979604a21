"""Ingest's row buffer (stages/ingest/rows.py) over a real ring: what a record carries, what the
writer is told was committed, and the rows that wait (a row cap, large texts, a full ring)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shm_helpers import make_ring

from engine.protocol.streamtable import StreamTable
from shm.batch import BASE_COLUMNS, Kind, TokenBatch, batch_size, top_alternatives, write_header
from shm.naming import segment_name
from shm.ring import Consumer, Producer
from stages.ingest import _rows
from stages.ingest import rows as rows_module
from stages.ingest.rows import RowBuffer
from stages.ingest.stage import Ingest

TOKEN, START, END, ERROR = int(Kind.TOKEN), int(Kind.START), int(Kind.END), int(Kind.ERROR)
REASONING = int(Kind.REASONING)


@pytest.fixture
def ring(instance) -> Iterator[tuple[Producer, Consumer]]:
    name = segment_name(instance, "rows")
    with make_ring(name, 1 << 16) as _, contextlib.ExitStack() as stack:
        producer, consumer = Producer.attach(name), Consumer.attach(name)
        stack.callback(producer.close)
        stack.callback(consumer.close)
        yield producer, consumer


def read_rows(consumer: Consumer) -> list[list[tuple]]:
    """Every record waiting in the ring, as (stream_id, seq, kind, token_id, logprob, recv_ns, text) rows."""
    records = []
    while (record := consumer.try_read()) is not None:
        batch = TokenBatch.decode(record[1])
        columns = (batch.stream_id, batch.seq, batch.kind, batch.token_id, batch.logprob, batch.recv_ns)
        records.append(list(zip(*(c.tolist() for c in columns), batch.texts(), strict=True)))
        del batch, record
    consumer.release()
    return records


@pytest.fixture(params=["compiled", "numpy"])
def fill_path(request, monkeypatch) -> str:
    """Each test that takes it runs with the C fill and again with its numpy reference (the path
    of an install without a C compiler)."""
    if request.param == "numpy":
        monkeypatch.setattr(rows_module, "fill", rows_module.assign_columns)
    return request.param


def test_a_record_holds_the_rows_in_order_and_the_writer_learns_what_it_held(ring, fill_path):
    producer, consumer = ring
    rows = RowBuffer(producer, 64)
    rows.append(7, 0, START, 0, math.nan, 100, b'{"model":"m"}')
    rows.append(7, 1, TOKEN, 11, -0.5, 101, b" hi")
    rows.add_tokens(9, 4, [12, 13], [-1.0, -2.0], 102, [b"a", b""])
    rows.append(7, 2, END, 0, math.nan, 103, b"{}")
    rows.append(9, 6, ERROR, 0, math.nan, 104, b"boom")
    committed = rows.write(64)
    assert len(rows) == 0
    assert committed.stream_id == [7, 7, 9, 9, 7, 9]
    assert committed.seq == [0, 1, 4, 5, 2, 6]
    assert committed.ended == [7, 9]
    assert committed.token_recv_ns == [101, 102, 102]  # TOKEN rows only
    [record] = read_rows(consumer)
    assert [row[:4] for row in record] == [
        (7, 0, START, 0),
        (7, 1, TOKEN, 11),
        (9, 4, TOKEN, 12),
        (9, 5, TOKEN, 13),
        (7, 2, END, 0),
        (9, 6, ERROR, 0),
    ]
    assert [row[4] for row in record][1:4] == [-0.5, -1.0, -2.0] and math.isnan(record[0][4])
    assert [row[6] for row in record] == ['{"model":"m"}', " hi", "a", "", "{}", "boom"]


def test_a_reasoning_models_thinking_rows_are_tokens_to_the_writer_not_ends(ring):
    """Before, every row of a kind above TOKEN was taken for its stream's END (the restart table
    let the stream go at its first piece of thinking)."""
    producer, consumer = ring
    rows = RowBuffer(producer, 64)
    rows.add_tokens(5, 1, [1, 2, 3], [math.nan] * 3, 200, [b"Let", b" me", b"Yes"], [REASONING, REASONING, TOKEN])
    rows.append(5, 4, REASONING, 4, math.nan, 201, b" hm")
    committed = rows.write(64)
    assert committed.ended == [] and committed.token_recv_ns == [200, 200, 200, 201]
    [record] = read_rows(consumer)
    assert [row[2] for row in record] == [REASONING, REASONING, TOKEN, REASONING]


def test_rows_beyond_the_limit_wait_for_the_next_record(ring):
    producer, consumer = ring
    rows = RowBuffer(producer, 64)
    for i in range(5):
        rows.append(i, 0, TOKEN, i, 0.0, i, f"t{i}".encode() * (i + 1))
    first = rows.write(2)
    assert first.stream_id == [0, 1] and first.ended == [] and len(rows) == 3
    second = rows.write(64)
    assert second.stream_id == [2, 3, 4] and len(rows) == 0
    records = read_rows(consumer)
    assert [[row[6] for row in record] for record in records] == [["t0", "t1t1"], ["t2" * 3, "t3" * 4, "t4" * 5]]


def test_large_texts_go_in_fewer_rows_per_record_and_none_is_lost(ring, fill_path):
    producer, consumer = ring
    rows = RowBuffer(producer, 64)
    texts = [bytes([65 + i]) * (rows.max_text // 2) for i in range(6)]
    for i, text in enumerate(texts):
        rows.append(1, i, TOKEN, i, 0.0, i, text)
    written = []
    while len(rows):
        committed = rows.write(64)
        assert committed is not None
        written.append(len(committed.stream_id))
        records = read_rows(consumer)
        assert [row[1] for record in records for row in record] == committed.seq
        assert [row[6].encode() for record in records for row in record] == texts[: len(committed.stream_id)]
        del texts[: len(committed.stream_id)]
    assert max(written) < 6 and sum(written) == 6


def test_a_full_ring_writes_nothing_and_keeps_the_rows(ring):
    producer, consumer = ring
    rows = RowBuffer(producer, 64)
    text = b"x" * 4000
    sent = 0
    while True:
        rows.append(3, sent, TOKEN, 1, 0.0, 5, text)
        if rows.write(64) is None:
            break
        sent += 1
    assert len(rows) == 1  # the row that found the ring full waits
    got = [row[1] for record in read_rows(consumer) for row in record]
    committed = rows.write(64)
    assert committed.seq == [sent] and len(rows) == 0
    assert got + [row[1] for record in read_rows(consumer) for row in record] == list(range(sent + 1))


def test_top_logprobs_go_in_the_record_of_their_row_and_are_then_forgotten(ring, fill_path):
    producer, consumer = ring
    rows = RowBuffer(producer, 64)
    rows.append(4, 0, TOKEN, 1, -0.1, 5, b"a")
    rows.append(4, 1, TOKEN, 2, -0.2, 5, b"b")
    rows.tops[(4, 1)] = (("b", -0.2), ("c", -1.5))
    rows.write(64)
    assert rows.tops == {}
    record = consumer.try_read()
    top = TokenBatch.decode(record[1]).extra["top"]
    assert top_alternatives(top, 0) == () and top_alternatives(top, 1) == (("b", np.float32(-0.2)), ("c", -1.5))
    del top, record
    consumer.release()


class _StateOnly:
    """What Ingest's restart-surviving state needs of a worker context."""

    telemetry = None

    @staticmethod
    def state_array(name: str, dtype: str, shape) -> np.ndarray:
        return np.zeros(shape, dtype)


def test_the_restart_table_gets_each_streams_last_row_of_a_record_and_ended_streams_leave_it(ring):
    producer, _ = ring
    ingest = Ingest.__new__(Ingest)
    ingest.ctx = _StateOnly()
    ingest._init_state(8)
    rows = RowBuffer(producer, 64)
    a, b = ingest._new_stream_id(), ingest._new_stream_id()
    rows.append(a, 0, START, 0, math.nan, 1, b"{}")
    rows.add_tokens(a, 1, [5, 6, 7], [0.0] * 3, 2, [b"x", b"y", b"z"])
    rows.append(b, 0, START, 0, math.nan, 1, b"{}")
    rows.append(a, 4, TOKEN, 8, 0.0, 3, b"w")
    rows.append(b, 1, END, 0, math.nan, 4, b"{}")
    ingest._committed(rows.write(64))
    assert {sid: int(values[0]) for sid, values in StreamTable(ingest.active.array).left.items()} == {a: 5}


# ---- the record fill in C (stages/ingest/rows.c) against its numpy reference -----------------


def test_the_record_fill_is_built_for_this_batch_format():
    # setup.py builds it wherever pip install -e . finds a C compiler (tools/test.sh's machines do)
    assert rows_module.fill is not rows_module.assign_columns, "stages/ingest/rows.c is not built: pip install -e ."
    assert _rows.COLUMNS == BASE_COLUMNS  # else rows.py would take the numpy path


def filled(fill, rows: tuple[list, ...]) -> bytes:
    """The record ``fill`` makes of ``rows`` (header by shm.batch.write_header, over 0xAB bytes)."""
    n, text_bytes = len(rows[0]), sum(map(len, rows[6]))
    record = memoryview(bytearray(b"\xab" * batch_size(n, text_bytes)))
    offsets, _ = write_header(record, n, text_bytes)
    with np.errstate(over="ignore"):  # numpy's cast of a double past float's range warns; C's says nothing
        fill(record, offsets, rows)
    return bytes(record)


row = st.tuples(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e300, -1e300, 3.4e38, 1e-50, -0.0]),
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(row, min_size=1, max_size=70))
def test_the_c_fill_writes_the_bytes_numpy_writes(rows):
    columns = tuple(list(column) for column in zip(*rows, strict=True))
    record = filled(rows_module.fill, columns)
    assert record == filled(rows_module.assign_columns, columns)
    batch = TokenBatch.decode(memoryview(record))
    assert batch.stream_id.tolist() == columns[0] and batch.texts() == [
        t.decode("utf-8", "replace") for t in columns[6]
    ]
    del batch


@pytest.mark.parametrize(
    ("column", "value", "error"),
    [
        (0, -1, OverflowError),
        (1, 2**64, OverflowError),
        (2, 256, OverflowError),
        (3, 2**32, OverflowError),
        (5, 2**63, OverflowError),
        (4, [0.5], (TypeError, ValueError)),
        (6, "text", (TypeError, ValueError)),
    ],
)
def test_a_value_a_column_cannot_hold_is_refused_by_both(column, value, error):
    rows = [[1, 2], [3, 4], [TOKEN, TOKEN], [5, 6], [0.5, -0.5], [7, 8], [b"ab", b"c"]]
    rows[column][1] = value
    record = memoryview(bytearray(batch_size(2, 3) + 8))
    offsets, _ = write_header(record, 2, 3)
    for fill in (rows_module.fill, rows_module.assign_columns):
        with pytest.raises(error):
            fill(record, offsets, tuple(rows))


def test_offsets_or_texts_past_the_record_are_refused():
    rows = ([1], [2], [TOKEN], [3], [0.0], [4], [b"abc"])
    record = memoryview(bytearray(batch_size(1, 3)))
    offsets, _ = write_header(record, 1, 3)
    rows_module.fill(record, offsets, rows)
    with pytest.raises(ValueError, match=r"column stream_id at \d+ does not fit the"):
        rows_module.fill(record, (len(record) - 4, *offsets[1:]), rows)
    with pytest.raises(ValueError, match="texts overflow the"):
        rows_module.fill(record, (*offsets[:7], len(record) - 2), rows)
    with pytest.raises(TypeError, match="lists of one length"):
        rows_module.fill(record, offsets, ([1, 2], *rows[1:]))
    with pytest.raises(TypeError, match="8 offsets and 7 row lists"):
        rows_module.fill(record, offsets[:7], rows)
    with pytest.raises((BufferError, TypeError), match=r"read-only|writable"):
        rows_module.fill(bytes(len(record)), offsets, rows)
