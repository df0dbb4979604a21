"""Stages for the runtime's readiness, idle-loop and stop tests (importable by engine workers: the
test harness puts this directory on their PYTHONPATH).

``params``: ``start_s`` seconds spent in ``start`` (duty cycle) or awaited in ``setup`` (asyncio),
``fail`` "start" or "setup" to raise there.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from engine.stage import AsyncStage, WorkerContext
from stages.testing.relay import Relay


class SlowRelay(Relay):
    Params = None  # its own params (start_s, fail), read below
    """A relay that takes ``start_s`` to start (or fails to) and counts its ``do_work`` calls."""

    def start(self, ctx: WorkerContext) -> None:
        time.sleep(float(ctx.params.get("start_s", 0)))
        if ctx.params.get("fail") == "start":
            raise RuntimeError("SlowRelay was told to fail in start")
        super().start(ctx)
        self.calls = 0

    def do_work(self) -> int:
        self.calls += 1
        return super().do_work()

    def stats(self) -> dict[str, Any]:
        return {"do_work_calls": getattr(self, "calls", 0)}


class SlowSetupSource(AsyncStage):
    """An asyncio stage whose ``setup`` awaits ``start_s`` (or fails); ``run`` writes nothing."""

    async def setup(self, ctx: WorkerContext) -> None:
        await asyncio.sleep(float(ctx.params.get("start_s", 0)))
        if ctx.params.get("fail") == "setup":
            raise RuntimeError("SlowSetupSource was told to fail in setup")
        self.set_up = True

    async def run(self, ctx: WorkerContext) -> None:
        if not getattr(self, "set_up", False):
            raise RuntimeError("run before setup")
        while not ctx.draining:
            await asyncio.sleep(0.05)


class SlowCleanupSource(AsyncStage):
    """An asyncio stage whose ``run`` never finishes on its own, draining or not (as ingest with a
    stream open), and whose clean-up awaits ``cleanup_s`` (as ingest's last flush does) before it
    writes ``done_path``: the file says the clean-up ran to its end."""

    async def setup(self, ctx: WorkerContext) -> None:
        pass

    async def run(self, ctx: WorkerContext) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(float(ctx.params["cleanup_s"]))
            with open(ctx.params["done_path"], "w") as f:
                f.write("done")
