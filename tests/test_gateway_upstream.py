"""The gateway in front of upstreams this test runs itself (the embedded upstream's server, on a
thread of the test process, so its counters can be read): SSE keep-alives while the first token is
slow, a client that disconnects cancels the upstream request at once (the upstream, ingest, the
pool and the gateway each count it), and a failure mid-stream is an error the OpenAI client raises
on, never an empty 200."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid

import httpx
import openai
import pytest
from gateway_harness import GatewayEngine, default_topology

from stages.ingest.upstream_server import UpstreamServer, UpstreamServerConfig


class Upstreams:
    """Embedded-upstream servers on one event loop in a thread of the test process."""

    def __init__(self, *configs: UpstreamServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = [UpstreamServer(cfg) for cfg in configs]
        self.urls = [self._run(server.start()) for server in self.servers]

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        for server in self.servers:
            self._run(server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    upstreams = Upstreams(
        UpstreamServerConfig(models=("slow",), tokens_per_s=20, first_token_delay_s=1.0),
        # paced: unpaced, its three tokens and the cut can come in one read, and the gateway then
        # answers with the error status before any chunk (an error too, but not the one tested)
        UpstreamServerConfig(models=("broken",), tokens_per_s=50, faults="disconnect_after=3"),
        UpstreamServerConfig(models=("stalled",), first_token_delay_s=60, keepalive_s=0.5),  # looks every 0.5 s
    )
    entries = "".join(
        f'\n[[upstreams]]\nname = "{name}"\nbase_url = "{url}"\nmodels = ["{name}"]\n'
        for name, url in zip(("slow", "broken", "stalled"), upstreams.urls, strict=True)
    )
    gateway = "keepalive_s = 0.2\nfirst_token_timeout_s = 3.0"
    # "broken" fails every request on purpose: whether its failures cool it down before the next
    # test depended on how many choices failed before their siblings' cancels (the machine's load)
    pool = 'params.pool = { mid_stream = "error", failures_to_cool_down = 1000 }'
    config = default_topology(gateway=gateway, ingest=pool) + entries
    engine = GatewayEngine(tmp_path_factory.mktemp("gwup"), config, "u" + uuid.uuid4().hex[:10])
    try:
        engine.start()
        yield engine, *upstreams.servers
    finally:
        engine.stop()
        upstreams.close()


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return value


def test_keep_alive_comments_while_the_first_token_is_slow(rig):
    engine = rig[0]
    body = {"model": "slow", "messages": [{"role": "user", "content": "slow start"}], "max_tokens": 3, "stream": True}
    lines = []
    with httpx.stream("POST", engine.url + "/chat/completions", json=body, timeout=30) as answer:
        assert answer.status_code == 200
        lines = [line for line in answer.iter_lines() if line]
    first_content = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)
    assert sum(1 for line in lines[:first_content] if line.startswith(":")) >= 3  # 1 s at keepalive_s = 0.2
    assert lines[-1] == "data: [DONE]"


def test_a_client_that_disconnects_cancels_its_upstream_request(rig):
    engine, slow = rig[:2]
    cancelled_before = slow.stats.cancelled
    ingest_before = engine.stats("ingest")["cancelled"]
    body = {"model": "slow", "messages": [{"role": "user", "content": "long"}], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", engine.url + "/chat/completions", json=body, timeout=30) as answer:
        for line in answer.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # a token arrived: the stream is under way at the upstream; now go away
    disconnected = time.monotonic()
    wait_for(lambda: slow.stats.cancelled > cancelled_before, 5, "the upstream to see its client gone")
    assert time.monotonic() - disconnected < 2.0  # at once, not at the stream's end (20 s away)
    assert slow.stats.active_streams == 0 and slow.stats.tokens_sent < 400
    wait_for(lambda: engine.stats("ingest")["cancelled"] > ingest_before, 5, "ingest to count the cancel")
    wait_for(lambda: engine.stats("gateway")["cancelled"] >= 1, 5, "the gateway to count the cancel")
    wait_for(
        lambda: re.search(r'neuralpipe_upstream_errors_total\{[^}]*kind="cancelled"[^}]*\} [1-9]', engine.metrics()),
        10,
        "the pool's cancelled count in /metrics",
    )


def test_a_whole_request_whose_client_gives_up_is_cancelled_too(rig):
    engine, slow = rig[:2]
    cancelled_before = slow.stats.cancelled
    body = {"model": "slow", "messages": [{"role": "user", "content": "whole"}], "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(engine.url + "/chat/completions", json=body, timeout=1.5)  # the answer is 20 s away
    wait_for(lambda: slow.stats.cancelled > cancelled_before, 5, "the upstream to see its client gone")
    assert slow.stats.active_streams == 0


def test_a_client_gone_cancels_every_choice_of_its_request(rig):
    """n = 3: three upstream requests; the client leaving (streamed after its first tokens, or
    whole while it waits) cancels all three."""
    engine, slow = rig[:2]
    body = {"model": "slow", "messages": [{"role": "user", "content": "three"}], "max_tokens": 400, "n": 3}
    url = engine.url + "/chat/completions"
    before = slow.stats.cancelled
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=10) as answer:
        for line in answer.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # a token came: the client goes away
    wait_for(lambda: slow.stats.cancelled >= before + 3, 5, "the upstream to see three streamed clients gone")
    before = slow.stats.cancelled
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=1.5)  # the answer is 20 s away
    wait_for(lambda: slow.stats.cancelled >= before + 3, 5, "the upstream to see three whole clients gone")
    wait_for(lambda: slow.stats.active_streams == 0, 5, "no upstream request left")


def test_a_failure_of_one_choice_ends_the_response_with_an_error(rig):
    engine = rig[0]
    client = openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "these break"}]
    with pytest.raises(openai.APIError, match="upstream"):
        for _ in client.chat.completions.create(model="broken", messages=messages, max_tokens=20, stream=True, n=2):
            pass
    with pytest.raises(openai.InternalServerError, match="upstream"):
        client.chat.completions.create(model="broken", messages=messages, max_tokens=20, n=2)


def test_a_failure_mid_stream_is_an_error_the_client_raises_on(rig):
    engine = rig[0]
    client = openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "this one breaks"}]
    seen = []
    with pytest.raises(openai.APIError, match="upstream"):
        for chunk in client.chat.completions.create(model="broken", messages=messages, max_tokens=20, stream=True):
            seen.append(chunk)
    with pytest.raises(openai.InternalServerError, match="upstream"):
        client.chat.completions.create(model="broken", messages=messages, max_tokens=20)
    assert seen and seen[0].choices[0].delta.role == "assistant"  # it had begun: a 200, then the error
    wait_for(lambda: engine.stats("gateway")["failed"] >= 2, 5, "the gateway to count both failures")

    events = []  # the Responses API alike: response.failed, with the error the client raises on
    with pytest.raises(openai.APIError, match="upstream"):
        for event in client.responses.create(model="broken", input="this one breaks", stream=True):
            events.append(event.type)
    assert events[:2] == ["response.created", "response.in_progress"]
    with pytest.raises(openai.InternalServerError, match="upstream"):
        client.responses.create(model="broken", input="this one breaks")


def test_no_first_token_in_time_is_an_error_and_the_upstream_request_is_cancelled(rig):
    engine, stalled = rig[0], rig[3]
    client = openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30)
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="no first token within 3 s"):
        for _ in client.chat.completions.create(
            model="stalled", messages=[{"role": "user", "content": "?"}], stream=True
        ):
            pass
    assert 3.0 <= time.monotonic() - started < 10
    wait_for(lambda: stalled.stats.cancelled == 1, 5, "the stalled upstream to see the request closed")
    with pytest.raises(openai.InternalServerError, match="no first token within 3 s"):
        client.chat.completions.create(model="stalled", messages=[{"role": "user", "content": "?"}])
