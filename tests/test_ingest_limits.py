"""Hostile upstream input at ingest (issue 13 items 1 and 7): an oversized token or SSE event ends
its own stream with an error; ingest neither wedges nor restarts, and the rows still flow."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import uvloop
from engine_harness import Engine, wait_for
from shm_helpers import make_ring
from test_ingest_failure import ingest_context
from test_ingest_rows import read_rows
from test_pool import hostile

from engine.clients.requests import RequestClient
from engine.protocol.requests import ingest_endpoint
from shm.batch import Kind
from shm.ring import Consumer, Producer
from stages.ingest.sse import SSEParser
from stages.ingest.stage import Ingest

CONFIG = """
[engine]
heartbeat_interval_s = 0.1

[workers.ingest]
stage = "ingest"
outputs = ["ingest-sink"]
params.client_requests_per_s = 1000
params.client_burst = 1000
params.pool = {{ retries = 1, backoff_initial_s = 0.01 }}
params.embedded = {{ faults = "{faults}" }}

[workers.sink]
stage = "verify"
inputs = ["ingest-sink"]
"""


@pytest.fixture
def engine(tmp_path, instance):
    engines: list[Engine] = []

    def start(faults: str) -> Engine:
        engines.append(Engine(tmp_path, CONFIG.format(faults=faults), instance).start())
        return engines[-1]

    yield start
    for e in engines:
        e.stop()
        e.kill_all()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "token_bytes",
    [
        100_000,  # fits the SSE limits, not a row: refused at the row (before: a batch over the ring's record)
        1_000_000,  # over the SSE event limit: refused while parsing
    ],
)
def test_an_oversized_token_ends_its_stream_and_ingest_goes_on(engine, token_bytes):
    e = engine(f"token_bytes={token_bytes}")
    streams = 5
    with RequestClient(ingest_endpoint(e.info()["runtime_dir"])) as c:
        for i in range(streams):
            c.submit({"messages": [{"role": "user", "content": f"p{i}"}], "max_tokens": 8})
    stats = wait_for(lambda: (s := e.worker("ingest")["stats"]).get("errors", 0) == streams and s, 30, "errors")
    assert stats["completed"] == 0 and stats["active"] == 0
    # every stream's START and ERROR rows reach the sink: nothing wedged
    sink = wait_for(lambda: (s := e.worker("sink")["stats"])["messages"] == 2 * streams and s, 20, "the sink")
    assert sink["gaps"] == 0
    assert e.worker("ingest")["restarts"] == 0


def test_sse_parser_limit_stops_a_line_without_end_and_drops_it():
    parser = SSEParser(stop_at_unknown=True, max_event=1000)
    for _ in range(100):
        assert parser.feed(b"x" * 100) == []
        if parser.overflow:
            break
    assert parser.overflow == "a line longer than 1000 bytes"
    assert parser.feed(b"\n\ndata: after\n\n") == []  # nothing after it is parsed


def test_sse_parser_limit_stops_an_event_of_many_data_lines():
    parser = SSEParser(max_event=1000)
    assert parser.feed(b"data: " + b"y" * 500 + b"\n") == []
    assert parser.feed(b"data: " + b"y" * 500 + b"\n") == []
    assert parser.overflow == "an event longer than 1000 characters"
    unlimited = SSEParser()
    unlimited.feed(b"data: " + b"y" * 5000 + b"\n")
    assert [e.data for e in unlimited.feed(b"\n")] == ["y" * 5000]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [100_000, 65_536])
def test_a_token_too_large_for_a_row_in_one_read_ends_its_stream(tmp_path, instance, size):
    """The read at model speed (one event, one plain token) goes to the stage's one-token sink,
    which refuses a token larger than a row as the Tokens way does: the stream ends with an error
    row that names the size, the row before it kept. The upstream here shares ingest's event loop,
    so its event is in the socket whole when ingest reads: one read. (65,536 bytes fit a row.)"""

    def event(text: str) -> bytes:
        return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"

    async def answer(resp) -> None:
        await resp.write(event("first"))
        await asyncio.sleep(0.05)  # each event a read of its own
        await resp.write(event("x" * size))
        await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")

    name = f"{instance}-ingest-out"
    with make_ring(name, 1 << 20):
        producer, consumer = Producer.attach(name), Consumer.attach(name)

        async def main() -> dict:
            async with hostile(answer) as up:
                stage = Ingest()
                try:
                    await stage.setup(ingest_context(tmp_path, producer, up.base_url))
                    run = asyncio.create_task(stage.run(stage.ctx))
                    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
                    submit = orjson.dumps({"type": "submit", "body": body})
                    assert stage._handle(b"client", submit)["type"] == "accepted"
                    deadline = asyncio.get_running_loop().time() + 20
                    while stage.counts["completed"] + stage.counts["errors"] == 0:
                        assert asyncio.get_running_loop().time() < deadline, "the stream did not end"
                        await asyncio.sleep(0.01)
                    await stage._flush_all()
                    run.cancel()
                    return dict(stage.counts)
                finally:
                    stage.close()

        try:
            counts = uvloop.run(main())
            rows = [row for record in read_rows(consumer) for row in record]
        finally:
            producer.close()
            consumer.close()
    kinds = [row[2] for row in rows]
    if size > 65_536:
        assert counts["errors"] == 1 and counts["completed"] == 0
        assert kinds == [Kind.START, Kind.TOKEN, Kind.ERROR] and rows[1][6] == "first"
        assert rows[2][6] == f"upstream sent a token of {size} bytes; at most 65536 fit a row"
    else:
        assert counts["completed"] == 1 and kinds == [Kind.START, Kind.TOKEN, Kind.TOKEN, Kind.END]
        assert len(rows[2][6]) == size
