"""A real upstream: llama.cpp's OpenAI-compatible server (llama-cpp-python's ``server`` extra)
serving a tiny random-weight llama model that ``tools/make_tiny_gguf.py`` writes, driven by the
project's streaming client and pool. Marked ``llamacpp``: ``pytest -m "not llamacpp"`` leaves it
out; without llama-cpp-python it is skipped, except under CI (``CI`` set), where it fails.
Install with ``pip install -e '.[llamacpp]'`` (docs/upstreams.md)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engine.protocol.toolcalls import ToolCallJoiner
from stages.ingest.openai_client import TokenEvent, stream_completion
from stages.ingest.pool import PoolPolicy, UpstreamConfig, UpstreamPool

pytestmark = pytest.mark.llamacpp

_NEEDED = ("llama_cpp", "gguf", "uvicorn", "sse_starlette")
_MISSING = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if _MISSING:
    _WHY = f"needs llama-cpp-python[server] and gguf (missing: {', '.join(_MISSING)}): pip install -e '.[llamacpp]'"
    if os.environ.get("CI"):
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
MODEL_ALIAS = "tiny"
START_TIMEOUT_S = 60
CHAT = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "tell me about rings"}], "max_tokens": 16}


def run(coro) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_tiny_gguf
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return make_tiny_gguf.write(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=0)


@contextlib.contextmanager
def _serving(model_path: Path, tmp_path: Path, *extra: str) -> Iterator[str]:
    """A llama.cpp server on a free loopback port; its base URL. Always stopped (and reaped)."""
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        "2",
        # logprobs need the logits of every position (else llama-cpp-python refuses them).
        "--logits_all",
        "True",
        # Without it a new request cuts the running stream short, with no finish_reason.
        "--interrupt_requests",
        "False",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base_url, tmp_path / "server.log")
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture
def llama_server(model_path: Path, tmp_path: Path) -> Iterator[str]:
    with _serving(model_path, tmp_path) as base_url:
        yield base_url


@pytest.fixture
def llama_tools_server(model_path: Path, tmp_path: Path) -> Iterator[str]:
    """One whose chat format makes tool calls (a grammar forces the named function's JSON)."""
    with _serving(model_path, tmp_path, "--chat_format", "chatml-function-calling") as base_url:
        yield base_url


def _wait_ready(proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(base_url + "/v1/models", timeout=1) as resp:
            if resp.status == 200 and isinstance(json.load(resp).get("data"), list):
                return
        time.sleep(0.1)
    pytest.fail(f"llama.cpp server not ready within {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


async def collect(events) -> list[TokenEvent]:
    async with aclosing(events) as stream:
        return [event async for event in stream]


async def one_stream(base_url: str, body: dict, endpoint: str = "chat") -> list[TokenEvent]:
    async with aiohttp.ClientSession() as session:
        return await collect(stream_completion(session, base_url, body, endpoint=endpoint))


def tokens_of(events: list[TokenEvent]) -> list[TokenEvent]:
    return [e for e in events if e.kind == "token"]


def test_chat_stream_ends_with_finish_reason_and_respects_max_tokens(llama_server: str) -> None:
    events = run(one_stream(llama_server, CHAT))
    assert [e.kind for e in events[:1]] == ["start"]
    assert events[-1].kind == "end", events[-1]
    tokens = tokens_of(events)
    assert 0 < len(tokens) <= CHAT["max_tokens"]
    # The model never samples </s> (tools/make_tiny_gguf.py), so the stream runs to max_tokens.
    assert events[-1].finish_reason == "length"
    assert len(tokens) == CHAT["max_tokens"]
    assert all(t.text for t in tokens)
    assert "".join(t.text for t in tokens).strip()
    if events[-1].usage is not None:  # llama-cpp-python's stream may carry no usage
        assert events[-1].usage["completion_tokens"] == CHAT["max_tokens"]


def test_a_tool_call_streamed_in_pieces_is_assembled_as_the_whole_answer_gives_it(llama_tools_server: str) -> None:
    """llama-cpp-python streams a call as tool_calls pieces that repeat the call's id and name, each
    mirrored by the deprecated function_call: the pieces join into what the whole answer gives."""
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    forced = {"type": "function", "function": {"name": "lookup"}}
    body = {**CHAT, "max_tokens": 12, "temperature": 0, "seed": 1, "tools": [tool], "tool_choice": forced}
    events = run(one_stream(llama_tools_server, body))
    assert events[-1].kind == "end", events[-1]
    assert not tokens_of(events) and events[-1].finish_reason == "tool_calls"
    with urllib.request.urlopen(
        urllib.request.Request(
            llama_tools_server + "/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        ),
        timeout=60,
    ) as answer:
        (whole,) = json.load(answer)["choices"][0]["message"]["tool_calls"]
    joined = ToolCallJoiner()
    for event in events:
        if event.kind == "tool_call":
            joined.add(event.text)
    (call,) = joined.result()
    assert call["function"]["name"] == "lookup" and call["id"].startswith("call_")
    assert call["function"]["arguments"].startswith("{") and call["function"] == whole["function"]


def test_completions_with_logprobs(llama_server: str) -> None:
    body = {"model": MODEL_ALIAS, "prompt": "the river and the", "max_tokens": 8, "logprobs": 3}
    events = run(one_stream(llama_server, body, endpoint="completions"))
    assert events[-1].kind == "end", events[-1]
    assert events[-1].finish_reason == "length"
    tokens = tokens_of(events)
    assert len(tokens) == 8
    for token in tokens:
        assert not math.isnan(token.logprob) and token.logprob <= 0.0, token
        # llama-cpp-python lists the sampled token too when it is not among the top 3
        assert 3 <= len(token.top_logprobs) <= 4, token
        assert all(lp <= 0.0 for _, lp in token.top_logprobs)


def test_chat_logprobs(llama_server: str) -> None:
    body = {**CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    events = run(one_stream(llama_server, body))
    assert events[-1].kind == "end", events[-1]
    tokens = tokens_of(events)
    assert len(tokens) == 6
    assert all(not math.isnan(t.logprob) and t.logprob <= 0.0 for t in tokens), tokens


def test_max_tokens_respected_across_sizes(llama_server: str) -> None:
    async def main() -> list[int]:
        async with aiohttp.ClientSession() as session:
            counts = []
            for n in (1, 5, 40):  # sequential streams over one keep-alive session
                events = await collect(stream_completion(session, llama_server, {**CHAT, "max_tokens": n}))
                assert events[-1].kind == "end", events[-1]
                counts.append(len(tokens_of(events)))
            return counts

    assert run(main()) == [1, 5, 40]


def test_cancel_mid_stream_then_next_request_is_served(llama_server: str) -> None:
    async def main() -> tuple[int, list[TokenEvent], float]:
        async with aiohttp.ClientSession() as session:
            long = {**CHAT, "max_tokens": 3000}  # a few seconds of generation
            got = 0
            async with aclosing(stream_completion(session, llama_server, long)) as events:
                async for event in events:
                    assert event.kind in ("start", "token"), event
                    got += event.kind == "token"
                    if got == 5:
                        break  # closes the response: the server sees the disconnect
            began = time.monotonic()
            nxt = await collect(stream_completion(session, llama_server, {**CHAT, "max_tokens": 8}))
            return got, nxt, time.monotonic() - began

    got, nxt, took = run(main())
    assert got == 5
    assert nxt[-1].kind == "end", nxt[-1]
    assert nxt[-1].finish_reason == "length"
    assert len(tokens_of(nxt)) == 8
    # The server stopped the cancelled generation instead of finishing its 3000 tokens first.
    assert took < 5.0, f"next request took {took:.2f} s"  # 3000 tokens take about 15 s here


async def _vanishing_upstream() -> tuple[web.AppRunner, str]:
    """An upstream that passes the pool's first health check and is then stopped: a closed port."""

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL_ALIAS, "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_pool_fails_over_from_a_closed_port_to_llama_server(llama_server: str) -> None:
    async def main() -> tuple[list[TokenEvent], list[TokenEvent], list[dict], list[dict]]:
        runner, dead_url = await _vanishing_upstream()
        upstreams = [UpstreamConfig("dead", dead_url), UpstreamConfig("llama", llama_server)]
        pool = UpstreamPool(upstreams, PoolPolicy(strategy="round_robin", health_interval_s=60, backoff_initial_s=0.01))
        await pool.start()
        try:
            first = pool.snapshot()
            await runner.cleanup()  # the port is closed now; the pool has not noticed
            events = await collect(pool.stream(CHAT))
            again = await collect(pool.stream(CHAT))
            return events, again, first, pool.snapshot()
        finally:
            await pool.close()

    events, again, first, after = run(main())
    assert [u["healthy"] for u in first] == [True, True]
    for stream in (events, again):
        assert stream[-1].kind == "end", stream[-1]
        assert stream[-1].finish_reason == "length"
        assert len(tokens_of(stream)) == CHAT["max_tokens"]
    dead, llama = after
    assert dead["failures"] >= 1
    assert llama["failures"] == 0 and llama["requests"] >= 2


def test_pool_with_a_closed_port_from_the_start(llama_server: str) -> None:
    async def main() -> tuple[list[TokenEvent], list[dict]]:
        upstreams = [UpstreamConfig("closed", f"http://127.0.0.1:{free_port()}"), UpstreamConfig("llama", llama_server)]
        pool = UpstreamPool(upstreams, PoolPolicy(strategy="round_robin", health_interval_s=60))
        await pool.start()
        try:
            return await collect(pool.stream(CHAT)), pool.snapshot()
        finally:
            await pool.close()

    events, snapshot = run(main())
    assert events[-1].kind == "end", events[-1]
    assert len(tokens_of(events)) == CHAT["max_tokens"]
    assert [u["healthy"] for u in snapshot] == [False, True]
