"""AsyncCountingSource: the counting source as an asyncio stage (the shape ingest has), waiting
for ring space through the doorbell on the event loop. Same params as ``CountingSource``."""

from __future__ import annotations

import asyncio

from engine.stage import AsyncStage, WorkerContext, wait_writable
from engine.validated import ModelRef
from stages.testing import counting


class AsyncCountingSource(AsyncStage):
    Params = ModelRef("stages.testing.params:CountingParams")
    k = 0  # batches emitted so far (resumed from the ring in run)

    async def run(self, ctx: WorkerContext) -> None:
        out = ctx.outputs[0]
        p = self.parse_params(ctx.params)
        streams, batch = p.streams, p.batch
        batches = -(-p.total // batch) if p.total else None
        self.k = counting.resume_index(out, streams, batch)
        pacer = counting.Pacer(p.rate, batch, self.k)
        while not ctx.draining:
            if batches is not None and self.k >= batches:
                await asyncio.sleep(0.05)
                continue
            delay = pacer.wait_s(self.k)
            if delay > 0:
                await asyncio.sleep(delay)
            elif counting.try_emit(out, self.k, streams, batch):
                self.k += 1
            else:
                await wait_writable(out, timeout=0.1)

    def stats(self) -> dict:
        return {"batches": self.k}
