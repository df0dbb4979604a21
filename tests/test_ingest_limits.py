"""Hostile upstream input at ingest (issue 13 items 1 and 7): an oversized token or SSE event ends
its own stream with an error; ingest neither wedges nor restarts, and the rows still flow."""

from __future__ import annotations

import pytest
from engine_harness import Engine, wait_for

from engine.clients.requests import RequestClient
from engine.protocol.requests import ingest_endpoint
from stages.ingest.sse import SSEParser

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
