"""The gateway while the engine's workers are killed under it: streams in flight through the gateway
either complete, every token in order, or end with an error the OpenAI client raises on; none stops
short silently or hangs. A killed gateway is restarted by the supervisor and serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import openai
import pytest
from engine_harness import wait_for
from gateway_harness import GatewayEngine, default_topology, serving

MODEL = "neuralpipe-echo"
TOKENS = 60


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    engine = GatewayEngine(
        tmp_path_factory.mktemp("gwkill"), default_topology(embedded="tokens_per_s = 40"), "r" + uuid.uuid4().hex[:10]
    )
    try:
        yield engine.start()
    finally:
        engine.stop()


def worker_pid(engine: GatewayEngine, name: str) -> int:
    return next(w for w in engine.status()["workers"] if w["name"] == name)["pid"]


async def streams_through_a_kill(
    engine: GatewayEngine, victim: str | None, n: int, tokens: int = TOKENS, stall_s: float = 0.0
) -> list[tuple[str, str]]:
    """``n`` streams of TOKENS tokens (1.5 s each); ``victim`` killed with SIGKILL 0.5 s in (with
    ``stall_s``: stopped for that long instead). The embedded upstream's text depends on the request
    only: the same ``n`` without a kill is the reference."""

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"kill {i}"}], "max_tokens": tokens}
        text = ""
        try:
            stream = await client.chat.completions.create(**body, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    if chunk.choices[0].finish_reason:
                        return "complete", text
        except openai.APIError as exc:  # an error event, or (gateway killed) the connection cut
            return "error", str(exc)[:200]
        return "silent", text  # ended without finish_reason and without an error: must never happen

    async with openai.AsyncOpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
        await asyncio.sleep(0.5)
        if victim is not None and stall_s:
            pid = worker_pid(engine, victim)
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(stall_s)
            finally:
                os.kill(pid, signal.SIGCONT)
        elif victim is not None:
            os.kill(worker_pid(engine, victim), signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim", ["broadcast", "compute", "ingest"])
def test_streams_complete_or_fail_loudly_when_a_worker_is_killed(gw, victim):
    before = next(w for w in gw.status()["workers"] if w["name"] == victim)["restarts"]
    results = asyncio.run(streams_through_a_kill(gw, victim, 20))
    reference = asyncio.run(streams_through_a_kill(gw, None, 20))
    assert {kind for kind, _ in reference} == {"complete"}
    assert not [r for r in results if r[0] == "silent"], results
    for (kind, text), (_, whole) in zip(results, reference, strict=True):
        assert kind == "error" or text == whole, (victim, text, whole)  # every token, in order, once
    if victim != "ingest":  # a killed ingest loses its open streams (explicitly); the others lose nothing
        assert all(kind == "complete" for kind, _ in results), results
    deadline = time.monotonic() + 30
    while next(w for w in gw.status()["workers"] if w["name"] == victim)["restarts"] <= before:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_a_killed_gateway_is_restarted_cancels_what_it_left_open_and_serves_again(gw):
    cancelled = gw.stats("ingest")["cancelled"]
    results = asyncio.run(streams_through_a_kill(gw, "gateway", 5, tokens=400))  # 10 s streams
    assert all(kind == "error" for kind, _ in results), results  # the connections were cut: the client says so
    # the restarted gateway cancels the 5 streams its predecessor left open, long before their end
    deadline = time.monotonic() + 8
    while gw.stats("ingest")["cancelled"] < cancelled + 5:
        assert time.monotonic() < deadline, "the streams of the killed gateway were not cancelled"
        time.sleep(0.1)
    deadline = time.monotonic() + 30
    while True:
        url = gw.stats("gateway").get("url")
        try:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=10)
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "back?"}], max_tokens=3
            )
            break
        except (openai.APIConnectionError, TypeError):
            assert time.monotonic() < deadline, "the gateway did not come back"
            time.sleep(0.2)
    assert answer.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A gateway that waits 0.3 s for ingest to take a request (submit_timeout_s), in an engine
    that takes a worker for hung after 8 s without heartbeats (a loaded machine's setting)."""
    config = default_topology(gateway="submit_timeout_s = 0.3", embedded="tokens_per_s = 40")
    yield from serving(
        tmp_path_factory, "tuned", config.replace("heartbeat_timeout_s = 5.0", "heartbeat_timeout_s = 8.0")
    )


@pytest.mark.timeout(60)
def test_requests_refused_while_ingest_stalled_start_nothing_once_it_resumes(tuned):
    """Each request got its 503 while ingest was stalled (stopped here, as a long pause would);
    their submits waited in the sockets meanwhile, and ingest once started every one of them when
    it resumed: streams and upstream requests nobody followed, a stampede after any hiccup."""
    client = openai.OpenAI(base_url=tuned.url, api_key="unused", max_retries=0, timeout=10)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "stall"}], "max_tokens": 5}
    assert client.chat.completions.create(**ask).usage.completion_tokens == 5  # connected before the stall
    ingest = worker_pid(tuned, "ingest")
    os.kill(ingest, signal.SIGSTOP)  # under the heartbeat timeout: not taken for a hung worker
    try:
        for _ in range(3):
            with pytest.raises(openai.APIStatusError, match="did not take the request in time") as refused:
                client.chat.completions.create(**ask)
            assert refused.value.status_code == 503
    finally:
        os.kill(ingest, signal.SIGCONT)
    assert client.chat.completions.create(**ask).usage.completion_tokens == 5

    def settled() -> tuple[dict, int] | None:  # the counts of both, from heartbeats after the last request
        ingest, submitted = tuned.stats("ingest"), tuned.stats("gateway").get("submitted", 0)
        return (ingest, submitted) if ingest["accepted"] + ingest.get("expired", 0) == submitted + 3 else None

    ingest_stats, submitted = wait_for(settled, 20, "the three submits read")
    # every stream ingest started is one the gateway follows; the three it gave up on started nothing
    assert (ingest_stats["accepted"], ingest_stats.get("expired")) == (submitted, 3), ingest_stats


@pytest.mark.timeout(120)
def test_streams_outlive_a_broadcast_stall_shorter_than_the_hang_timeout(tuned):
    """The broadcast stalls for 6 s (stopped here, as a long pause would), under the engine's 8 s
    hang timeout: nothing is restarted and every token comes once it resumes. The gateway, though,
    ended every open stream after 5 s of the broadcast's silence ("engine unreachable"): it now
    waits the engine's hang timeout (announced in the broadcast's heartbeats) and 5 s more."""
    results = asyncio.run(streams_through_a_kill(tuned, "broadcast", 3, tokens=100, stall_s=6.0))
    reference = asyncio.run(streams_through_a_kill(tuned, None, 3, tokens=100))
    assert results == reference and {kind for kind, _ in reference} == {"complete"}, results
    assert next(w for w in tuned.status()["workers"] if w["name"] == "broadcast")["restarts"] == 0
