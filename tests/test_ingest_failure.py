"""A write that fails inside ingest ends the worker's run (so the supervisor restarts it) instead of
leaving a half-alive worker whose heartbeats stay fresh while every stream hangs (issue 13 item 1);
so does the death of its embedded upstream. The write test runs the stage in this process on a real
ring, with a real upstream over HTTP, the failure itself injected (no valid input makes a write fail
any more: rows are bounded); the upstream test kills the embedded upstream of a real engine."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess

import orjson
import pytest
import uvloop
from engine_harness import chat, first_end, full_config, wait_for
from shm_helpers import make_ring

from engine.clients.consumer import StreamConsumer
from engine.clients.requests import RequestClient
from engine.logs import JsonLogger
from engine.protocol.requests import ingest_endpoint
from engine.stage import WorkerContext
from shm.ring import Producer
from stages.ingest.stage import Ingest
from stages.ingest.upstream_server import UpstreamServer, UpstreamServerConfig


def ingest_context(tmp_path, producer: Producer, url: str, **params) -> WorkerContext:
    """What the runtime hands an ingest stage run in the test's process: ``url`` its one upstream,
    ``producer`` its output ring, no cache."""
    return WorkerContext(
        name="ingest",
        params={"upstreams": [{"name": "up", "base_url": url}], "cache": "", **params},
        inputs=[],
        outputs=[producer],
        log=JsonLogger("ingest", "info", io.BytesIO()),
        runtime_dir=str(tmp_path),
        state_dir=str(tmp_path),
        incarnation=1,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_rows", [1, 64])  # 1: the stream task writes (full batch); 64: the flusher does
def test_a_failed_write_ends_the_run(tmp_path, instance, batch_rows):
    name = f"{instance}-ingest-out"
    with make_ring(name, 1 << 20):
        producer = Producer.attach(name)

        async def main() -> BaseException | None:
            server = UpstreamServer(UpstreamServerConfig(tokens_per_s=50))
            ctx = ingest_context(tmp_path, producer, await server.start(), batch_rows=batch_rows)
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


@pytest.mark.timeout(90)
def test_a_dead_embedded_upstream_restarts_ingest_instead_of_failing_every_request(start_engine):
    """The embedded upstream is ingest's child. Killed (the OOM killer, a crash), nothing noticed:
    every request failed with "no healthy upstream ... down" for as long as the engine ran. Now
    ingest dies with it, so the supervisor restarts ingest, which starts a new one."""
    engine = start_engine(full_config())
    rd = engine.info()["runtime_dir"]
    ingest = engine.worker("ingest")
    (child,) = [
        int(pid)
        for pid in subprocess.run(["pgrep", "-P", str(ingest["pid"])], capture_output=True, text=True).stdout.split()
    ]
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: engine.worker("ingest")["restarts"] > ingest["restarts"], 20, "ingest restarted")
    wait_for(lambda: engine.worker("ingest")["state"] == "running", 20, "ingest running again")
    with StreamConsumer.for_engine(rd) as consumer, RequestClient(ingest_endpoint(rd), timeout_s=5) as client:
        assert consumer.join(10)
        sid = client.submit(chat("after the upstream died", 5, temperature=0.9))
        ending = first_end(consumer, sid)
    assert ending is not None and ending.type == "end", ending
    assert "embedded_upstream_exited" in engine.log()
