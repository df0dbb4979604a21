"""Watch the batches passing through the cache and collect the streams it may store.

A stream is collected when its START row (seq 0) carries a ``cache_key`` and is not itself a
replay (``cached`` false). Rows are taken in seq order; a row already taken (a batch re-sent after
an upstream stage's restart) is skipped, a missing one makes the stream unstorable. On END the
stream is finished and handed back; on ERROR (an upstream error, a cancel, a lost stream) it is
dropped. A stream first seen without its START (this worker restarted mid-stream) is never
collected. Streams growing past ``max_stream_bytes`` are dropped.
"""

from __future__ import annotations

import numpy as np

from engine.protocol.rows import read_start
from shm.batch import BatchColumns, ExtraColumn, Kind
from stages.cache.stream import StoredStream, StreamBuilder

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
        arena = batch.text.tobytes()
        sids = batch.stream_id[rows]
        rows = rows[np.argsort(sids, kind="stable")]  # grouped by stream, in batch order within each
        bounds = np.flatnonzero(np.diff(batch.stream_id[rows])) + 1
        finished = []
        for group in np.split(rows, bounds):
            done = self._take(int(batch.stream_id[group[0]]), group, batch, arena)
            if done is not None:
                finished.append(done)
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

    def _take(self, sid: int, rows: np.ndarray, batch: BatchColumns, arena: bytes) -> tuple[str, StoredStream] | None:
        key, builder = self.open[sid]
        seqs = batch.seq[rows]
        rows = rows[seqs >= builder.next_seq]  # already taken: a re-sent batch
        if not len(rows):
            return None
        if not np.array_equal(batch.seq[rows], np.arange(builder.next_seq, builder.next_seq + len(rows))):
            return self._close(sid, "incomplete")
        kinds = batch.kind[rows]
        if _ERROR in kinds:
            return self._close(sid, "discarded")
        ends = batch.text_end.astype(np.int64)
        starts = np.concatenate(([0], ends[:-1]))
        lengths = (ends - starts)[rows]
        text = b"".join(arena[s:e] for s, e in zip(starts[rows].tolist(), ends[rows].tolist(), strict=True))
        extras = tuple(
            (ExtraColumn(name, str(array.dtype.str[1:]), array.shape[1] if array.ndim > 1 else 1), array[rows])
            for name, array in batch.extra.items()
        )
        base = (kinds.copy(), batch.token_id[rows], batch.logprob[rows], batch.recv_ns[rows], lengths.astype(np.uint32))
        if not builder.add(base, text, extras):
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
