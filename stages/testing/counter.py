"""CountingSource: emits the deterministic token batches of ``counting`` into its output ring.

Params: ``streams`` (4), ``batch`` tokens per batch (16), ``rate`` tokens/s (2000; 0 = as fast
as the ring takes them), ``total`` tokens to emit then idle (0 = for ever).
"""

from __future__ import annotations

from engine.stage import Stage, WorkerContext
from engine.validated import ModelRef
from stages.testing import counting


class CountingSource(Stage):
    Params = ModelRef("stages.testing.params:CountingParams")

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        self.out = ctx.outputs[0]
        p = self.parse_params(ctx.params)
        self.streams, self.batch = p.streams, p.batch
        self.batches = -(-p.total // self.batch) if p.total else None
        self.k = counting.resume_index(self.out, self.streams, self.batch)
        self.pacer = counting.Pacer(p.rate, self.batch, self.k)
        ctx.log.info("source_started", resume_batch=self.k)

    def do_work(self) -> int:
        sent = 0  # batches
        while sent < 64 and not self.ctx.draining:
            if self.batches is not None and self.k >= self.batches:
                break
            if self.pacer.wait_s(self.k) > 0:
                break
            if not counting.try_emit(self.out, self.k, self.streams, self.batch):
                break
            self.k += 1
            sent += 1
        return sent

    def idle_timeout_s(self) -> float | None:
        if self.batches is not None and self.k >= self.batches:
            return None
        return max(0.0, self.pacer.wait_s(self.k))

    def stats(self) -> dict:
        return {"batches": self.k}
