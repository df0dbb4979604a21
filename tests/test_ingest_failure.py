"""A write that fails inside ingest ends the worker's run (so the supervisor restarts it) instead of
leaving a half-alive worker whose heartbeats stay fresh while every stream hangs (issue 13 item 1).
The stage runs in this process on a real ring, with a real upstream over HTTP; the failure itself
is injected (no valid input makes a write fail any more: rows are bounded)."""

from __future__ import annotations

import asyncio
import io

import orjson
import pytest
import uvloop
from shm_helpers import make_ring

from engine.logs import JsonLogger
from engine.stage import WorkerContext
from shm.ring import Producer
from stages.ingest.stage import Ingest
from stages.ingest.upstream_server import UpstreamServer, UpstreamServerConfig


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_rows", [1, 64])  # 1: the stream task writes (full batch); 64: the flusher does
def test_a_failed_write_ends_the_run(tmp_path, instance, batch_rows):
    name = f"{instance}-ingest-out"
    with make_ring(name, 1 << 20):
        producer = Producer.attach(name)
        log = io.BytesIO()

        async def main() -> BaseException | None:
            server = UpstreamServer(UpstreamServerConfig(tokens_per_s=50))
            url = await server.start()
            ctx = WorkerContext(
                name="ingest",
                params={"upstreams": [{"name": "up", "base_url": url}], "cache": "", "batch_rows": batch_rows},
                inputs=[],
                outputs=[producer],
                log=JsonLogger("ingest", "info", log),
                runtime_dir=str(tmp_path),
                state_dir=str(tmp_path),
                incarnation=1,
            )
            stage = Ingest()
            try:
                await stage.setup(ctx)
                run = asyncio.create_task(stage.run(ctx))

                def refused(limit: int) -> bool:
                    raise RuntimeError("injected: the ring refused a write")

                stage._write = refused
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
                assert stage._handle(b"client", orjson.dumps({"type": "submit", "body": body}))["type"] == "accepted"
                done, _ = await asyncio.wait({run}, timeout=10)
                return run.exception() if done else None
            finally:
                stage.close()
                await server.stop()

        try:
            failure = uvloop.run(main())
        finally:
            producer.close()
    assert isinstance(failure, RuntimeError) and "injected" in str(failure)  # the runtime logs it and exits
