"""A finished stream as the cache keeps it: the rows' columns as numpy arrays, in seq order.

Row 0 is the START row, the last row the END row. ``offset_ns`` is each row's ``recv_ns`` minus
row 0's, the original pacing a replay may follow; ``text_len`` and ``text`` hold the row texts
(the START row's is replaced on replay). ``extras`` are the appended columns (compute's), kept
with their batch column descriptions so a replay writes them back the same way. A stream's top
logprobs (shm.batch's ``top`` column) come in records of different widths, or in some records
only: they are kept per row and laid out as one column when the stream is finished.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from shm.batch import ExtraColumn, TopAlternatives, encode_tops, top_alternatives, top_rows

# What an entry holds beyond its arrays' and text's bytes, counted in the byte bound: the key, the
# store's slot and tuple, this object, the base arrays' numpy headers (ENTRY_OVERHEAD), and each
# appended column's array and pair (EXTRA_OVERHEAD). CPython 3.11 and numpy 2, measured with
# tracemalloc (tests/test_cache_units.py checks the sum): an entry of compute's 7 columns holds
# ~2.6 KiB besides its data, which for short replies is most of it (512 was counted before).
ENTRY_OVERHEAD = 1270
EXTRA_OVERHEAD = 210

# The base arrays, in snapshot order: (attribute, dtype).
BASE_ARRAYS = (("kind", "u1"), ("token_id", "<u4"), ("logprob", "<f4"), ("offset_ns", "<i8"), ("text_len", "<u4"))


@dataclass
class StoredStream:
    model: str
    record_type: int
    kind: np.ndarray
    token_id: np.ndarray
    logprob: np.ndarray
    offset_ns: np.ndarray
    text_len: np.ndarray
    text: bytes
    extras: tuple[tuple[ExtraColumn, np.ndarray], ...] = ()

    def __post_init__(self) -> None:
        self.text_off = np.zeros(len(self.kind) + 1, dtype=np.int64)
        np.cumsum(self.text_len, out=self.text_off[1:])
        self.nbytes = (
            ENTRY_OVERHEAD
            + EXTRA_OVERHEAD * len(self.extras)
            + len(self.text)
            + self.text_off.nbytes
            + sum(getattr(self, name).nbytes for name, _ in BASE_ARRAYS)
            + sum(array.nbytes for _, array in self.extras)
        )

    @property
    def rows(self) -> int:
        return len(self.kind)

    def arrays(self) -> list[np.ndarray]:
        """Every array, in snapshot order: the base ones, the text, then the extras."""
        return [
            *(getattr(self, name) for name, _ in BASE_ARRAYS),
            np.frombuffer(self.text, dtype=np.uint8),
            *(array for _, array in self.extras),
        ]


# The rows of a stream being collected, one record per row: the base arrays' columns (with the
# rows' recv_ns, made offsets when the stream is finished), then each appended column as a field
# "x<i>" (its name may be anything compute chose).
_BASE_FIELDS = tuple(("recv_ns" if name == "offset_ns" else name, dtype) for name, dtype in BASE_ARRAYS)
FIRST_ROOM = 16  # rows a new stream has room for before its table first doubles
BUILDER_OVERHEAD = 800  # a stream being collected, besides its rows: its objects, the collector's slot


@functools.lru_cache(maxsize=256)  # records repeat their appended columns: the same tuple each time
def row_dtype(columns: tuple[ExtraColumn, ...]) -> np.dtype:
    """The structured dtype of a collected row with the appended ``columns``."""
    extra = [(f"x{i}", c.dtype, (c.width,)) if c.width > 1 else (f"x{i}", c.dtype) for i, c in enumerate(columns)]
    return np.dtype([*_BASE_FIELDS, *extra])


class StreamBuilder:
    """Rows of one stream collected batch by batch, until its END row: copied into one table of
    rows that grows by doubling, so a stream holds about its rows' bytes. (It kept a view per
    record and column before: ~1.7 KB for each row of a stream that gets one row a record, 30
    times the row, and ``max_stream_bytes`` counted only the row.)"""

    def __init__(self, model: str, record_type: int) -> None:
        self.model = model
        self.record_type = record_type
        self.next_seq = 0  # rows so far
        self.nbytes = BUILDER_OVERHEAD
        self.columns: tuple[ExtraColumn, ...] | None = None
        self.table: np.ndarray | None = None  # row_dtype(columns), room for more rows
        self.text = bytearray()
        self.top_bytes = 0
        self.tops: list[TopAlternatives] | None = None  # per row, once a record had a ``top`` column

    def add(
        self, rows: np.ndarray, text: bytes, columns: tuple[ExtraColumn, ...], top: np.ndarray | None = None
    ) -> bool:
        """Append ``rows`` (of :func:`row_dtype` ``(columns)``; the ``top`` column apart) and their
        texts; False when the columns differ from the earlier rows' (the stream cannot be stored
        whole)."""
        n = len(rows)
        if top is not None or self.tops is not None:
            self._add_tops(top, n)
        if self.columns is None:
            self.columns = columns
        elif columns != self.columns:  # the same tuple object, usually (collect.py interns them)
            return False
        at, table = self.next_seq, self.table
        if table is None:
            table = self.table = np.empty(max(n, FIRST_ROOM), rows.dtype)
        elif at + n > len(table):
            grown = np.empty(max(2 * len(table), at + n), rows.dtype)
            grown[:at] = table[:at]
            table = self.table = grown
        table[at : at + n] = rows
        self.text += text
        self.next_seq = at + n
        self.nbytes = BUILDER_OVERHEAD + table.nbytes + len(self.text) + self.top_bytes
        return True

    def _add_tops(self, top: np.ndarray | None, rows: int) -> None:
        if self.tops is None:
            self.tops = [()] * self.next_seq  # the rows before the first record with a top column
        self.tops += [top_alternatives(top, i) for i in range(rows)] if top is not None else [()] * rows
        self.top_bytes += top.nbytes if top is not None else 0

    def finish(self) -> StoredStream:
        filled = self.table[: self.next_seq]
        kind, token_id, logprob, recv_ns, text_len = (filled[name].copy() for name, _ in _BASE_FIELDS)
        extras = tuple((column, filled[f"x{i}"].copy()) for i, column in enumerate(self.columns or ()))
        if self.tops is not None and any(self.tops):  # one ``top`` column over the whole stream
            rows = top_rows(self.tops)
            array = np.zeros((len(self.tops), rows.column.width), dtype=np.uint8)
            encode_tops(array, rows)
            extras += ((rows.column, array),)
        return StoredStream(
            model=self.model,
            record_type=self.record_type,
            kind=kind,
            token_id=token_id,
            logprob=logprob,
            offset_ns=recv_ns - recv_ns[0],
            text_len=text_len,
            text=bytes(self.text),
            extras=extras,
        )
