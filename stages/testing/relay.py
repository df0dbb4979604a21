"""Relay: copies each record of its input ring to its output ring (a stand-in for a stage that
transforms batches). An input record is released only after its copy is committed, so a relay
killed at any point loses nothing; what it re-sends after a restart the sink drops by sequence."""

from __future__ import annotations

from engine.stage import Stage, WorkerContext
from engine.validated import ModelRef


class Relay(Stage):
    Params = ModelRef("stages.testing.params:RelayParams")

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        self.inp, self.out = ctx.inputs[0], ctx.outputs[0]

    def do_work(self) -> int:
        inp, out = self.inp, self.out
        moved = 0
        while moved < 64:
            record = inp.try_read()
            if record is None:
                break
            record_type, view = record
            target = out.try_claim(len(view))
            if target is None:
                inp.unread()
                break
            target[:] = view
            out.commit(record_type)
            moved += 1
        inp.release()
        return moved
