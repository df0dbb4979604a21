"""The ingest stage as a real worker: requests over its ROUTER, streams from the embedded upstream
over real HTTP, token batches into its ring, verified at the sink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest
from engine_harness import Engine, wait_for

from engine.clients.requests import RequestClient
from engine.protocol.requests import RequestError, ingest_endpoint

CONFIG = """
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 1.0

[supervisor]
backoff_initial_s = 0.01

[workers.ingest]
stage = "ingest"
outputs = ["ingest-relay"]
params.client_requests_per_s = {rps}
params.client_burst = {burst}
params.queue_bound = {queue}
params.embedded = {{ tokens_per_s = {rate} }}

[workers.relay]
stage = "relay"
inputs = ["ingest-relay"]
outputs = ["relay-sink"]

[workers.sink]
stage = "verify"
inputs = ["relay-sink"]
params = {{ streams = 10000 }}
"""


def config(rps: float = 1000, burst: float = 1000, queue: int = 64, rate: float = 0) -> str:
    return CONFIG.format(rps=rps, burst=burst, queue=queue, rate=rate)


@pytest.fixture
def engine(tmp_path, instance):
    engines: list[Engine] = []

    def start(text: str) -> Engine:
        e = Engine(tmp_path, text, instance).start()
        engines.append(e)
        return e

    yield start
    for e in engines:
        e.stop()
        e.kill_all()


def client(engine: Engine) -> RequestClient:
    return RequestClient(ingest_endpoint(engine.info()["runtime_dir"]))


def stage_stats(engine: Engine, name: str) -> dict:
    return engine.worker(name)["stats"]


def chat(text: str, max_tokens: int = 40) -> dict:
    # ignore_eos (a vLLM field the embedded upstream honours): exactly max_tokens tokens
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


@pytest.mark.timeout(90)
def test_concurrent_prompts_arrive_complete_and_in_order(engine):
    e = engine(config())
    n, tokens = 50, 40
    with client(e) as c:
        ids = [c.submit(chat(f"prompt {i}", tokens)) for i in range(n)]
    assert len(set(ids)) == n
    stats = wait_for(lambda: (s := stage_stats(e, "ingest")).get("completed", 0) == n and s, 30, "all streams done")
    assert stats["tokens"] == n * tokens and stats["errors"] == 0
    # every stream: START, its tokens, END, with seq 0.. in order and nothing missing
    sink = wait_for(lambda: (s := stage_stats(e, "sink"))["messages"] == n * (tokens + 2) and s, 20, "sink has all")
    assert sink["gaps"] == 0 and sink["duplicates"] == 0


@pytest.mark.timeout(60)
def test_bad_request_is_rejected_with_the_field_named(engine):
    e = engine(config())
    with client(e) as c, pytest.raises(RequestError, match=r"body.messages\[0\].role"):
        c.submit({"messages": [{"role": "wizard", "content": "x"}]})


@pytest.mark.timeout(60)
def test_cancel_ends_the_stream_with_an_error_row(engine):
    e = engine(config(rate=50))  # slow upstream: the stream is still running when cancelled
    with client(e) as c:
        sid = c.submit(chat("a long one", 1000))
        wait_for(lambda: stage_stats(e, "ingest").get("tokens", 0) > 3, 10, "stream started")
        c.cancel(sid)
        with pytest.raises(RequestError, match="no active stream"):
            c.cancel(sid + 1000)
    stats = wait_for(lambda: (s := stage_stats(e, "ingest"))["cancelled"] == 1 and s, 10, "cancelled")
    assert stats["active"] == 0 and stats["tokens"] < 1000


@pytest.mark.timeout(60)
def test_over_limit_requests_queue_then_are_rejected(engine):
    e = engine(config(rps=0.5, burst=1, queue=2))
    with client(e) as c:
        c.submit(chat("first"))  # takes the one token of the bucket
        c.submit(chat("queued 1"))
        c.submit(chat("queued 2"))
        with pytest.raises(RequestError, match="rate limit"):
            c.submit(chat("one too many"))


@pytest.mark.timeout(60)
def test_a_submit_read_after_its_client_gave_up_starts_no_stream(engine):
    """Submits wait in the sockets while ingest is stalled (stopped here, as a long GC pause or a
    swapped-out process would); their clients time out meanwhile. Read later, each once started a
    stream (and an upstream request) that nobody followed; now one past its deadline is dropped."""
    e = engine(config())
    pid = e.worker("ingest")["pid"]

    def all_three_read() -> dict | None:
        stats = stage_stats(e, "ingest")
        return stats if stats["accepted"] + stats.get("expired", 0) >= 3 else None

    with RequestClient(ingest_endpoint(e.info()["runtime_dir"]), timeout_s=0.15) as c, client(e) as patient:
        for connected in (c, patient):  # before the stall (a message to a peer not yet greeted dies with its socket)
            with pytest.raises(RequestError, match="no active stream"):
                connected.cancel(1)
        os.kill(pid, signal.SIGSTOP)  # under the heartbeat timeout: not taken for a hung worker
        try:
            for i in range(2):
                with pytest.raises(TimeoutError):
                    c.submit(chat(f"given up {i}"))
        finally:
            os.kill(pid, signal.SIGCONT)
        patient.submit(chat("still waited for"))
        stats = wait_for(all_three_read, 20, "the three submits read")
    assert (stats["accepted"], stats.get("expired")) == (1, 2), stats
    assert e.worker("ingest")["restarts"] == 0


@pytest.mark.timeout(90)
def test_killed_ingest_ends_open_streams_with_an_explicit_error(engine):
    e = engine(config(rate=20))
    with client(e) as c:
        c.submit(chat("slow", 1000))
    wait_for(lambda: stage_stats(e, "ingest").get("tokens", 0) > 2, 10, "stream running")
    old = e.worker("ingest")
    os.kill(old["pid"], signal.SIGKILL)
    wait_for(lambda: (w := e.worker("ingest"))["restarts"] == 1 and w["state"] == "running", 20, "ingest restarted")
    wait_for(lambda: '"event":"stream_lost_on_restart"' in e.log(), 10, "lost stream reported")
    sink = wait_for(lambda: (s := stage_stats(e, "sink"))["batches"] > 0 and s, 10, "sink")
    assert sink["duplicates"] == 0


@pytest.mark.timeout(60)
def test_submit_cli_prints_a_stream_id(engine):
    e = engine(config())
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "submit", "hello", "--max-tokens", "5", "--json"],
        env=e.env(),
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout)["stream_id"] >= 1
