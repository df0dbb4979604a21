"""A source stage for the egress measurement of ``bench/broadcast.py``: records that each hold
``rows`` token rows of ``rows`` different streams (round robin over ``streams``), with two columns
such as compute appends, paced at ``rate`` tokens/s; ``recv_ns`` is stamped right before commit.
Self-contained (engine.stage and shm.batch only), so engines of older checkouts can load it too."""

from __future__ import annotations

import time

import numpy as np

from engine.stage import Stage, WorkerContext
from shm.batch import RECORD_TYPE, ExtraColumn, Kind, batch_size, write_batch

EXTRA = (ExtraColumn("conf", "f4"), ExtraColumn("hilbert", "u2", 2))


class MixedSource(Stage):
    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        self.out = ctx.outputs[0]
        self.streams = int(ctx.params.get("streams", 100))
        self.rows = int(ctx.params.get("rows", 20))
        self.interval = self.rows / float(ctx.params.get("rate", 10_000))
        self.k = 0
        self.origin = time.monotonic()
        self.texts = [b" tok%d" % i for i in range(self.rows)]
        self.text_bytes = sum(map(len, self.texts))
        self.ends = np.cumsum([len(t) for t in self.texts], dtype=np.uint32)
        self.arena = np.frombuffer(b"".join(self.texts), np.uint8)

    def do_work(self) -> int:
        sent = 0
        while sent < 64 and time.monotonic() >= self.origin + self.k * self.interval:
            view = self.out.try_claim(batch_size(self.rows, self.text_bytes, EXTRA))
            if view is None:
                break
            g = self.k * self.rows + np.arange(self.rows, dtype=np.uint64)
            cols = write_batch(view, self.rows, self.text_bytes, EXTRA)
            cols.stream_id[:] = g % np.uint64(self.streams)
            cols.seq[:] = g // np.uint64(self.streams)
            cols.kind[:] = Kind.TOKEN
            cols.token_id[:] = 7
            cols.logprob[:] = -0.25
            cols.text_end[:] = self.ends
            cols.text[:] = self.arena
            cols.extra["conf"][:] = 0.5
            cols.extra["hilbert"][:] = 3
            cols.recv_ns[:] = time.monotonic_ns()
            del cols
            view.release()
            self.out.commit(RECORD_TYPE)
            self.k += 1
            sent += 1
        return sent

    def idle_timeout_s(self) -> float:
        return max(0.0, self.origin + self.k * self.interval - time.monotonic())

    def stats(self) -> dict:
        return {"tokens": self.k * self.rows}
