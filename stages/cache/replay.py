"""Write a stored stream into the cache's output ring under a new stream id.

Rows go out in batches of up to ``batch_rows`` with seq ``first_seq``, ``first_seq + 1``, ...
and ``recv_ns`` = the time of the write (so the sink's latency measures the replay, not the
original). The START row's text becomes ``{"model", "cached": true, "cache_key"}``. Paced, row
``i`` is due ``offset_ns[i]`` after the replay began (the original stream's pacing); unpaced,
every row is due at once.
"""

from __future__ import annotations

import time

import numpy as np

from engine.protocol.rows import Start, start_text
from shm.batch import Kind, batch_size, write_batch
from shm.ring import Producer
from stages.cache.stream import StoredStream


class Replay:
    def __init__(
        self, stream_id: int, stream: StoredStream, key: str, paced: bool, first_seq: int = 0, now_ns: int | None = None
    ) -> None:
        self.stream_id = stream_id
        self.stream = stream
        self.paced = paced
        self.first_seq = first_seq
        self.next_row = 0
        self.began_ns = time.monotonic_ns() if now_ns is None else now_ns
        self.start_text = start_text(Start(stream.model, cached=True, cache_key=key))

    @property
    def done(self) -> bool:
        return self.next_row >= self.stream.rows

    @property
    def next_seq(self) -> int:
        return self.first_seq + self.next_row

    def due_ns(self) -> int:
        """When the next row is due (monotonic ns)."""
        if not self.paced:
            return self.began_ns
        return self.began_ns + int(self.stream.offset_ns[self.next_row])

    def write(self, out: Producer, batch_rows: int, now_ns: int) -> int:
        """Write the rows due by ``now_ns`` (at most ``batch_rows``) as one batch; rows written
        (0: none due, or the ring is full)."""
        s, a = self.stream, self.next_row
        b = min(s.rows, a + batch_rows)
        if self.paced:
            b = a + int(np.searchsorted(s.offset_ns[a:b], now_ns - self.began_ns, side="right"))
        if b <= a:
            return 0
        columns_of = tuple(column for column, _ in s.extras)
        while b - a > 1 and batch_size(b - a, int(s.text_off[b] - s.text_off[a]), columns_of) > out.max_record:
            b = a + (b - a) // 2  # wide appended columns (a stream's top logprobs): fewer rows per record
        lengths = s.text_len[a:b].astype(np.int64)
        text = s.text[s.text_off[a] : s.text_off[b]]
        if a == 0 and s.kind[0] == Kind.START:
            text = self.start_text + text[lengths[0] :]
            lengths[0] = len(self.start_text)
        view = out.try_claim(batch_size(b - a, len(text), columns_of))
        if view is None:
            return 0
        columns = write_batch(view, b - a, len(text), columns_of)
        columns.stream_id[:] = self.stream_id
        columns.seq[:] = np.arange(self.first_seq + a, self.first_seq + b, dtype=np.uint64)
        columns.recv_ns[:] = now_ns
        columns.token_id[:] = s.token_id[a:b]
        columns.logprob[:] = s.logprob[a:b]
        columns.kind[:] = s.kind[a:b]
        columns.text_end[:] = np.cumsum(lengths)
        columns.text[:] = np.frombuffer(text, dtype=np.uint8)
        for column, array in s.extras:
            columns.extra[column.name][:] = array[a:b]
        del columns
        view.release()
        out.commit(s.record_type)
        self.next_row = b
        return b - a


def lost_replay_stream(record_type: int) -> StoredStream:
    """A one-row stream: the ERROR row that ends a replay this worker's predecessor left unfinished."""
    reason = b"cache restarted; replay lost"
    return StoredStream(
        model="",
        record_type=record_type,
        kind=np.array([Kind.ERROR], dtype=np.uint8),
        token_id=np.zeros(1, dtype=np.uint32),
        logprob=np.full(1, np.nan, dtype=np.float32),
        offset_ns=np.zeros(1, dtype=np.int64),
        text_len=np.array([len(reason)], dtype=np.uint32),
        text=reason,
    )
