"""Watch the batches passing through the cache and collect the streams it may store.

A stream is collected when its START row (seq 0) carries a ``cache_key`` and is not itself a
replay (``cached`` false). Rows are taken in seq order; a row already taken (a batch re-sent after
an upstream stage's restart) is skipped, a missing one makes the stream unstorable. On END the
stream is finished and handed back; on ERROR (an upstream error, a cancel, a lost stream) it is
dropped. A stream first seen without its START (this worker restarted mid-stream) is never
collected. Streams growing past ``max_stream_bytes`` are dropped.
"""

from __future__ import annotations

import functools

import numpy as np

from engine.protocol.rows import read_start
from shm.batch import TOP_COLUMN, BatchColumns, ExtraColumn, Kind
from stages.cache.stream import StoredStream, StreamBuilder, row_dtype

_START, _END, _ERROR = int(Kind.START), int(Kind.END), int(Kind.ERROR)


class Collector:
    def __init__(self, max_stream_bytes: int, max_open: int = 4096) -> None:
        self.max_stream_bytes = max_stream_bytes
        self.max_open = max_open
        self.open: dict[int, tuple[str, StreamBuilder]] = {}  # stream id -> (key, builder)
        self._open_ids = np.zeros(0, dtype=np.uint64)
        self.counts = {"collected": 0, "discarded": 0, "incomplete": 0, "too_large": 0, "untracked": 0}

    def observe(self, batch: BatchColumns, record_type: int) -> list[tuple[str, StoredStream]]:
        """Take the rows of collected streams from ``batch``; the streams it finished, with keys."""
        if _START in batch.kind.tobytes():  # one C scan: most records hold no START row
            self._open_started(batch, record_type)
        if not self.open:
            return []
        rows = np.flatnonzero(np.isin(batch.stream_id, self._open_ids))
        if not len(rows):
            return []
        rows = rows[np.argsort(batch.stream_id[rows], kind="stable")]  # grouped by stream, in batch order
        taken = _Taken(batch, rows)
        finished = []
        first, n = 0, len(rows)
        while first < n:  # each stream's run of rows
            sid, end = taken.sids[first], first + 1
            while end < n and taken.sids[end] == sid:
                end += 1
            done = self._take(sid, taken, first, end)
            if done is not None:
                finished.append(done)
            first = end
        return finished

    def _open_started(self, batch: BatchColumns, record_type: int) -> None:
        """Begin collecting the streams whose START row (seq 0) the batch holds and carries a
        cache key (not a replay's)."""
        arena = batch.text.tobytes()
        ends = batch.text_end
        for i in np.flatnonzero(batch.kind == _START).tolist():
            sid = int(batch.stream_id[i])
            if batch.seq[i] != 0 or sid in self.open:
                continue  # not a stream's start, or a re-sent START of one already collected
            start = read_start(arena[int(ends[i - 1]) if i else 0 : int(ends[i])])
            model, key, cached = start.model, start.cache_key, start.cached
            if key is None or cached:
                continue
            if len(self.open) >= self.max_open:
                self.counts["untracked"] += 1
                continue
            self.open[sid] = (key, StreamBuilder(model, record_type))
            self._open_ids = np.fromiter(self.open, dtype=np.uint64, count=len(self.open))

    def _take(self, sid: int, taken: _Taken, first: int, end: int) -> tuple[str, StoredStream] | None:
        """Rows ``first:end`` of ``taken``: the stream's, in seq order (as a record holds them)."""
        key, builder = self.open[sid]
        seqs = taken.seqs
        while first < end and seqs[first] < builder.next_seq:
            first += 1  # already taken: a re-sent batch
        if first == end:
            return None
        if seqs[first:end] != list(range(builder.next_seq, builder.next_seq + end - first)):
            return self._close(sid, "incomplete")
        kinds = taken.kinds[first:end]
        if _ERROR in kinds:
            return self._close(sid, "discarded")
        top = None if taken.top is None else taken.top[first:end]
        if not builder.add(taken.table[first:end], b"".join(taken.texts[first:end]), taken.columns, top):
            return self._close(sid, "incomplete")
        if builder.nbytes > self.max_stream_bytes:
            return self._close(sid, "too_large")
        if kinds[-1] != _END:
            return None
        self._close(sid, "collected")
        return key, builder.finish()

    def _close(self, sid: int, outcome: str) -> None:
        del self.open[sid]
        self._open_ids = np.fromiter(self.open, dtype=np.uint64, count=len(self.open))
        self.counts[outcome] += 1


class _Taken:
    """The rows of the collected streams in one batch, copied out of the ring once into one table
    (one gather per column for the whole batch, not one per stream and column): each stream then
    copies its slice of the table, one assignment."""

    __slots__ = ("columns", "kinds", "seqs", "sids", "table", "texts", "top")

    def __init__(self, batch: BatchColumns, rows: np.ndarray) -> None:
        self.sids = batch.stream_id[rows].tolist()
        self.seqs = batch.seq[rows].tolist()
        kinds = batch.kind[rows]
        self.kinds = kinds.tolist()
        arena, ends = batch.text.tobytes(), batch.text_end.tolist()
        self.texts = [arena[ends[row - 1] if row else 0 : ends[row]] for row in rows.tolist()]
        extra = {name: array for name, array in batch.extra.items() if name != TOP_COLUMN}
        self.columns = _columns(tuple((name, array.dtype.str[1:], array.shape[1] if array.ndim > 1 else 1)
                                      for name, array in extra.items()))  # fmt: skip
        table = self.table = np.empty(len(rows), row_dtype(self.columns))
        table["kind"] = kinds
        table["token_id"] = batch.token_id[rows]
        table["logprob"] = batch.logprob[rows]
        table["recv_ns"] = batch.recv_ns[rows]
        table["text_len"] = np.fromiter(map(len, self.texts), np.uint32, len(self.texts))
        for i, array in enumerate(extra.values()):
            table[f"x{i}"] = array[rows]
        top = batch.extra.get(TOP_COLUMN)
        self.top = None if top is None else top[rows]


@functools.lru_cache(maxsize=256)  # records repeat their appended columns: the same objects each time
def _columns(layout: tuple[tuple[str, str, int], ...]) -> tuple[ExtraColumn, ...]:
    return tuple(ExtraColumn(name, dtype, width) for name, dtype, width in layout)
