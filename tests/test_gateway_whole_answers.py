"""Whole (non-streamed) answers are held in the gateway until they end, so one request decided how
much memory and event-loop time the gateway spent on it: an answer of 4 choices x 20,000 tokens with
20 top logprobs each (135 MB of JSON, ~1 GB of RSS) was assembled in one synchronous step of ~5 s,
the gateway missed its heartbeats and the supervisor killed it as hung, cutting every other client.
Now an answer past ``[gateway] max_whole_bytes`` is refused (stream it instead), and the one within
it is assembled off the event loop, and all answers being collected together are bounded by
``max_total_whole_bytes`` (the largest is ended first)."""

from __future__ import annotations

import asyncio
import urllib.request

import orjson
import pytest
from engine_harness import wait_for
from gateway_harness import cuts, default_topology, serving
from openai import AsyncOpenAI, BadRequestError, InternalServerError, OpenAI

pytestmark = pytest.mark.timeout(120)

MODEL = "neuralpipe-echo"
BIG_ANSWER = {"max_tokens": 20000, "logprobs": True, "top_logprobs": 20, "extra_body": {"ignore_eos": True}}


def _engine(tmp_path_factory, name: str, gateway: str, embedded: str = ""):
    # a heartbeat missed for a second is a hung worker: what a blocked event loop meets
    config = default_topology(gateway=gateway, embedded=embedded)
    yield from serving(tmp_path_factory, name, config.replace("heartbeat_timeout_s = 5.0", "heartbeat_timeout_s = 1.0"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    # paced: the answer is still coming when it passes the limit, so there is a stream to cancel
    yield from _engine(tmp_path_factory, "whole-small", "max_whole_bytes = 1048576", "tokens_per_s = 5000")


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    yield from _engine(tmp_path_factory, "whole-large", "max_whole_bytes = 268435456")


@pytest.fixture(scope="module")
def bounded_together(tmp_path_factory):
    # paced: two answers of 1.5 s each, asked at once, are collected side by side
    gateway = "max_whole_bytes = 8388608\nmax_total_whole_bytes = 8388608"
    yield from _engine(tmp_path_factory, "whole-total", gateway, "tokens_per_s = 2000")


def _restarts(engine) -> int:
    return next(w for w in engine.status()["workers"] if w["name"] == "gateway")["restarts"]


def test_an_answer_past_the_limit_is_refused_and_the_gateway_serves_on(small):
    with OpenAI(base_url=small.url, api_key="unused", max_retries=0, timeout=60) as client:
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a lot"}], **BIG_ANSWER)
        error = refused.value.body
        assert error["code"] == "response_too_large" and error["param"] == "stream", error
        assert "1048576" in error["message"] and '"stream": true' in error["message"]
        # its engine stream, no longer wanted (the stats come with the gateway's heartbeats)
        wait_for(lambda: small.stats("gateway")["cancelled"] >= 1, 10, "the stream cancelled")
        wait_for(lambda: cuts(small, "max_whole_bytes") >= 1, 10, "the cut counted in /metrics")
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content
    assert _restarts(small) == 0


def test_a_large_answer_within_the_limit_keeps_the_gateway_alive(large):
    # over plain HTTP: the openai client's objects for 67 MB of JSON take ~10 s here, and the
    # gateway's part is the same for any client
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a lot"}], "n": 2, **BIG_ANSWER}
    body.update(body.pop("extra_body"))
    headers = {"Content-Type": "application/json"}
    asked = urllib.request.Request(f"{large.url}/chat/completions", orjson.dumps(body), headers)
    with urllib.request.urlopen(asked, timeout=60) as answer:
        reply = orjson.loads(answer.read())
    assert [len(choice["logprobs"]["content"]) for choice in reply["choices"]] == [20000, 20000]
    assert len(reply["choices"][0]["logprobs"]["content"][-1]["top_logprobs"]) == 20
    assert _restarts(large) == 0, "the gateway was restarted: its event loop was blocked past its heartbeat"


def test_past_max_total_whole_bytes_the_largest_answer_is_ended_and_the_other_served(bounded_together):
    """Each whole answer was bounded (max_whole_bytes), all of them together not: a hundred clients
    asking for large answers with logprobs held a hundred max_whole_bytes (several times that in
    memory). Two answers of ~5 MB of JSON each, under a total of 8 MiB: the one ahead is ended with
    503 gateway_busy once both together pass it, the other is served whole."""
    engine = bounded_together
    ask = {"max_tokens": 3000, "logprobs": True, "top_logprobs": 20, "extra_body": {"ignore_eos": True}}

    async def both() -> list:
        async with AsyncOpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=60) as client:
            calls = [
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"{i}"}], **ask)
                for i in range(2)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(both())
    ended = [r for r in results if isinstance(r, InternalServerError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(ended) == 1 and len(served) == 1, results
    error = ended[0].body
    assert error["code"] == "gateway_busy" and "max_total_whole_bytes" in error["message"], error
    assert ended[0].response.headers["retry-after"] == "1"
    assert len(served[0].choices[0].logprobs.content) == 3000
    # nothing counted once both ended; the ended answer's engine stream was cancelled
    wait_for(lambda: engine.stats("gateway")["whole_bytes"] == 0, 10, "nothing held once both ended")
    wait_for(lambda: engine.stats("gateway")["cancelled"] >= 1, 10, "the ended answer's stream cancelled")
    wait_for(lambda: cuts(engine, "max_total_whole_bytes") == 1, 10, "the cut counted in /metrics")
