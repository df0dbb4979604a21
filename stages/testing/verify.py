"""VerifyingSink: the end of the test pipeline. Checks that every stream's sequence numbers
arrive complete and in order, drops duplicates (what upstream stages re-send after a restart),
and measures end-to-end latency from each batch's ``recv_ns``.

Its state (next expected sequence per stream, counters) lives in ``ctx.state_array``, written
before the input is released, so a sink killed at any point resumes without miscounting.

Params: ``streams`` (largest stream id + 1 it accepts, 4096), ``latency_budget_ms`` (50),
``progress_every_s`` (2; how often it logs ``sink_progress``).
Stats (sent with heartbeats, and the engine's egress numbers for PAS): ``messages`` tokens
delivered once, ``duplicates`` tokens dropped as already seen, ``gaps`` tokens missing,
``batches``, ``batches_within_budget``, ``foreign`` rows with a stream id out of range.
"""

from __future__ import annotations

import time

import numpy as np

from engine.stage import Stage, WorkerContext
from engine.validated import ModelRef
from shm.batch import TokenBatch

_COUNTERS = ("messages", "duplicates", "gaps", "batches", "batches_within_budget", "foreign")


class VerifyingSink(Stage):
    Params = ModelRef("stages.testing.params:VerifyParams")

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        self.inp = ctx.inputs[0]
        p = self.parse_params(ctx.params)
        self.streams = p.streams
        self.budget_ns = int(p.latency_budget_ms * 1e6)
        self.next_seq = ctx.state_array("next_seq", "u8", self.streams)
        self.counts = ctx.state_array("counts", "u8", len(_COUNTERS))
        self.progress_every_s = p.progress_every_s
        self._progress = (time.monotonic(), int(self.counts[0]))

    def do_work(self) -> int:
        handled = 0
        while handled < 64:
            record = self.inp.try_read()
            if record is None:
                break
            _, view = record
            self.check(TokenBatch.decode(view))
            view.release()
            handled += 1
        self.inp.release()  # after the state above is written: a restart never double counts
        self._report_progress()
        return handled

    def _report_progress(self) -> None:
        """Log delivered tokens and their rate now and then, so a person sees tokens flowing."""
        now = time.monotonic()
        since, before = self._progress
        if now - since < self.progress_every_s:
            return
        delivered = int(self.counts[0])
        self._progress = (now, delivered)
        self.ctx.log.info(
            "sink_progress",
            tokens=delivered,
            tokens_per_s=round((delivered - before) / (now - since)),
            gaps=int(self.counts[2]),
            duplicates_dropped=int(self.counts[1]),
        )

    def check(self, batch) -> None:
        counts, next_seq = self.counts, self.next_seq
        now = time.monotonic_ns()
        counts[3] += 1
        if batch.rows and now - int(batch.recv_ns[0]) <= self.budget_ns:
            counts[4] += 1
        for stream in np.unique(batch.stream_id):
            if stream >= self.streams:
                counts[5] += int(np.count_nonzero(batch.stream_id == stream))
                continue
            seqs = batch.seq[batch.stream_id == stream]
            expected = int(next_seq[stream])
            fresh = seqs[seqs >= expected]
            counts[1] += len(seqs) - len(fresh)
            if len(fresh):
                # in order and complete means fresh == expected, expected + 1, ...
                counts[2] += int(fresh[-1]) + 1 - expected - len(fresh)
                counts[0] += len(fresh)
                next_seq[stream] = int(fresh[-1]) + 1

    def stats(self) -> dict:
        return dict(zip(_COUNTERS, (int(c) for c in self.counts), strict=True))

    def close(self) -> None:
        for array in (getattr(self, "next_seq", None), getattr(self, "counts", None)):
            if array is not None:
                array.flush()
