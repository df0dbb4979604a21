"""A finished stream as the cache keeps it: the rows' columns as numpy arrays, in seq order.

Row 0 is the START row, the last row the END row. ``offset_ns`` is each row's ``recv_ns`` minus
row 0's, the original pacing a replay may follow; ``text_len`` and ``text`` hold the row texts
(the START row's is replaced on replay). ``extras`` are the appended columns (compute's), kept
with their batch column descriptions so a replay writes them back the same way. A stream's top
logprobs (shm.batch's ``top`` column) come in records of different widths, or in some records
only: they are kept per row and laid out as one column when the stream is finished.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from shm.batch import ExtraColumn, TopAlternatives, encode_tops, top_alternatives, top_rows

_NBYTES = operator.attrgetter("nbytes")

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


class StreamBuilder:
    """Rows of one stream collected batch by batch, until its END row."""

    def __init__(self, model: str, record_type: int) -> None:
        self.model = model
        self.record_type = record_type
        self.next_seq = 0
        self.nbytes = 0
        self.columns: tuple[ExtraColumn, ...] | None = None
        self.chunks: list[tuple[np.ndarray, ...]] = []
        self.texts: list[bytes] = []
        self.tops: list[TopAlternatives] | None = None  # per row, once a record had a ``top`` column

    def add(
        self,
        base: tuple[np.ndarray, ...],
        text: bytes,
        columns: tuple[ExtraColumn, ...],
        arrays: tuple[np.ndarray, ...],
        top: np.ndarray | None = None,
    ) -> bool:
        """Append rows ``base`` = (kind, token_id, logprob, recv_ns, text_len), their appended
        ``columns`` (``arrays``, one each; the ``top`` column apart); False when the columns
        differ from the earlier rows' (the stream cannot be stored whole)."""
        if top is not None or self.tops is not None:
            self._add_tops(top, len(base[0]))
        if self.columns is None:
            self.columns = columns
        elif columns != self.columns:  # the same tuple object, usually (collect.py interns them)
            return False
        chunk = (*base, *arrays)
        self.chunks.append(chunk)
        self.texts.append(text)
        self.next_seq += len(base[0])
        self.nbytes += len(text) + sum(map(_NBYTES, chunk))
        return True

    def _add_tops(self, top: np.ndarray | None, rows: int) -> None:
        if self.tops is None:
            self.tops = [()] * self.next_seq  # the rows before the first record with a top column
        self.tops += [top_alternatives(top, i) for i in range(rows)] if top is not None else [()] * rows
        self.nbytes += top.nbytes if top is not None else 0

    def finish(self) -> StoredStream:
        joined = [np.concatenate(parts) for parts in zip(*self.chunks, strict=True)]
        kind, token_id, logprob, recv_ns, text_len, *extra_arrays = joined
        extras = tuple(zip(self.columns or (), extra_arrays, strict=True))
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
            text=b"".join(self.texts),
            extras=extras,
        )
