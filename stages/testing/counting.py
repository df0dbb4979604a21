"""The deterministic token sequence the counting sources emit and the sink verifies.

Batch ``k`` belongs to stream ``k % streams`` and carries that stream's sequence numbers
``(k // streams) * batch`` .. ``+ batch - 1``; token ``seq``'s text is ``b"t<seq> "``. Because
batch ``k`` is a pure function of ``k``, a restarted source finds ``k`` again from the last batch
its predecessor committed (``Producer.last_committed``) and resumes right after it.
"""

from __future__ import annotations

import time

import numpy as np

from shm.batch import RECORD_TYPE, Kind, TokenBatch, batch_size, encode_texts, stable_token_id, write_batch
from shm.ring import Producer


def batch_position(k: int, streams: int, batch: int) -> tuple[int, int]:
    """(stream id, first sequence number) of batch ``k``."""
    return k % streams, (k // streams) * batch


def resume_index(producer: Producer, streams: int, batch: int) -> int:
    """Index of the next batch to emit, after the last one committed to ``producer``'s ring."""
    last = producer.last_committed()
    if last is None:
        return 0
    _, view = last
    columns = TokenBatch.decode(view)
    stream, first = int(columns.stream_id[0]), int(columns.seq[0])
    del columns
    view.release()
    return (first // batch) * streams + stream + 1


def try_emit(producer: Producer, k: int, streams: int, batch: int) -> bool:
    """Write batch ``k`` into the ring in place; False when the ring is full."""
    stream, first = batch_position(k, streams, batch)
    tokens = [b"t%d " % seq for seq in range(first, first + batch)]
    text_bytes = sum(map(len, tokens))
    view = producer.try_claim(batch_size(batch, text_bytes))
    if view is None:
        return False
    columns = write_batch(view, batch, text_bytes)
    columns.stream_id[:] = stream
    columns.seq[:] = np.arange(first, first + batch, dtype=np.uint64)
    columns.kind[:] = Kind.TOKEN
    columns.token_id[:] = [stable_token_id(t) for t in tokens]
    columns.logprob[:] = np.nan
    columns.recv_ns[:] = time.monotonic_ns()
    encode_texts(columns, tokens)
    del columns
    view.release()
    producer.commit(RECORD_TYPE)
    return True


class Pacer:
    """Spreads ``rate`` tokens per second evenly; rate 0 means as fast as the ring takes them."""

    def __init__(self, rate: float, batch: int, already_sent: int) -> None:
        self.interval = batch / rate if rate > 0 else 0.0
        self.origin = time.monotonic() - already_sent * self.interval

    def wait_s(self, k: int) -> float:
        """Seconds until batch ``k`` is due (<= 0: now)."""
        return self.origin + k * self.interval - time.monotonic() if self.interval else 0.0
