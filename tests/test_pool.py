"""The upstream pool over real HTTP on loopback: balancing, failover, cool-down, concurrency
limits, the mid-stream policy and cancellation, against embedded upstreams started in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web

from stages.ingest.openai_client import TokenEvent, Tokens, UpstreamError
from stages.ingest.pool import MAX_MODELS_BODY, PoolPolicy, UpstreamConfig, UpstreamPool
from stages.ingest.upstream_server import UpstreamServer, UpstreamServerConfig

POOL_SIDE = ("max_concurrency", "requests_per_s", "tokens_per_s")
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "seed": 3}


def run(coro) -> object:
    return uvloop.run(asyncio.wait_for(coro, 60))


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def servers(*configs: dict) -> AsyncIterator[list[tuple[UpstreamServer, UpstreamConfig]]]:
    """Embedded upstreams named u0, u1, ...; each config may carry pool-side keys (max_concurrency,
    requests_per_s, tokens_per_s)."""
    started = []
    try:
        for i, cfg in enumerate(configs):
            pool_side = {k: cfg.pop(k) for k in POOL_SIDE if k in cfg}
            server = UpstreamServer(UpstreamServerConfig(**cfg))
            started.append((server, UpstreamConfig(f"u{i}", await server.start(), **pool_side)))
        yield started
    finally:
        for server, _ in started:
            await server.stop()


@contextlib.asynccontextmanager
async def pool_of(upstreams: list[UpstreamConfig], **policy) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(upstreams, PoolPolicy(**policy))
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def collect(pool: UpstreamPool, body: dict = CHAT, **kw) -> list[TokenEvent]:
    async with aclosing(pool.stream(body, **kw)) as events:
        return [event async for event in events]


def texts(events: list[TokenEvent]) -> list[str]:
    return [e.text for e in events if e.kind == "token"]


def by_name(pool: UpstreamPool) -> dict[str, dict]:
    return {s["name"]: s for s in pool.snapshot()}


async def hold_streams(pool: UpstreamPool, n: int, release: asyncio.Event) -> list[asyncio.Task]:
    """``n`` streams that each stop at their first token until ``release`` is set."""
    started = 0

    async def one(seed: int) -> list[TokenEvent]:
        nonlocal started
        got = []
        async with aclosing(pool.stream({**CHAT, "seed": seed})) as events:
            async for event in events:
                got.append(event)
                if event.kind == "token" and len(got) == 2:
                    started += 1
                    await release.wait()
        return got

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await wait_until(lambda: started == n)
    return tasks


def test_least_outstanding_spreads_concurrent_streams():
    async def scenario():
        async with servers({}, {}, {}) as ups, pool_of([u for _, u in ups]) as pool:
            release = asyncio.Event()
            tasks = await hold_streams(pool, 9, release)
            outstanding = [s["outstanding"] for s in pool.snapshot()]
            release.set()
            results = await asyncio.gather(*tasks)
            return outstanding, results, pool.snapshot()

    outstanding, results, snapshot = run(scenario())
    assert outstanding == [3, 3, 3]
    assert all(events[-1].kind == "end" for events in results)
    assert [s["outstanding"] for s in snapshot] == [0, 0, 0]
    assert [s["requests"] for s in snapshot] == [3, 3, 3]


def test_round_robin_alternates():
    async def scenario():
        async with servers({}, {}) as ups, pool_of([u for _, u in ups], strategy="round_robin") as pool:
            order = []
            for _ in range(4):
                before = by_name(pool)
                assert (await collect(pool))[-1].kind == "end"
                after = by_name(pool)
                order += [name for name in after if after[name]["requests"] > before[name]["requests"]]
            return order

    assert run(scenario()) == ["u0", "u1", "u0", "u1"]


def test_ewma_prefers_the_upstream_with_the_faster_first_token():
    async def scenario():
        async with (
            servers({"first_token_delay_s": 0.2}, {}) as ups,
            pool_of([u for _, u in ups], strategy="ewma") as pool,
        ):
            for _ in range(5):
                assert (await collect(pool))[-1].kind == "end"
            return by_name(pool)

    snap = run(scenario())
    # Each is tried once while unmeasured, then the fast one takes every request.
    assert snap["u0"]["requests"] == 1 and snap["u1"]["requests"] == 4
    assert snap["u0"]["ewma_latency_s"] > 0.15 > snap["u1"]["ewma_latency_s"]


def test_dead_upstream_fails_over_before_the_first_token():
    async def scenario():
        async with servers({}, {}) as ups, pool_of([u for _, u in ups], health_interval_s=60) as pool:
            await ups[0][0].stop()  # passed its first health check, now refuses connections
            events = await collect(pool)
            return events, by_name(pool)

    events, snap = run(scenario())
    assert events[0].kind == "start" and events[-1].kind == "end"
    assert len(texts(events)) == 8
    assert snap["u0"]["failures"] == 1 and snap["u1"]["requests"] == 1


def test_model_routing():
    async def scenario():
        async with servers({"models": ("m0",)}, {"models": ("m1",)}) as ups:
            configs = [UpstreamConfig(u.name, u.base_url, models=s.cfg.models) for s, u in ups]
            async with pool_of(configs) as pool:
                ok = await collect(pool, {**CHAT, "model": "m1"})
                unknown = await collect(pool, {**CHAT, "model": "m9"})
                return ok, unknown, by_name(pool)

    ok, unknown, snap = run(scenario())
    assert ok[-1].kind == "end" and snap["u1"]["requests"] == 1 and snap["u0"]["requests"] == 0
    assert unknown[-1].error == "no upstream serves model 'm9'"


def test_repeated_failures_cool_down_until_a_health_check_passes():
    state = {"fail": True, "models_ok": True, "probes": 0}

    async def models(_: web.Request) -> web.Response:
        state["probes"] += 1
        return web.json_response({"data": []}, status=200 if state["models_ok"] else 503)

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        if state["fail"]:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}}]}\n\ndata: [DONE]\n\n')
        return resp

    async def scenario():
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = "http://{}:{}".format(*runner.addresses[0][:2])
        policy = {"retries": 0, "failures_to_cool_down": 3, "cool_down_s": 0.3, "health_interval_s": 0.05}
        try:
            async with pool_of([UpstreamConfig("flaky", url)], **policy) as pool:
                failures = [(await collect(pool))[-1].error for _ in range(3)]
                cooling = by_name(pool)["flaky"]
                during = (await collect(pool))[-1].error
                state.update(fail=False, models_ok=False)
                await wait_until(lambda: time.monotonic() > cooling["cooling_down_until"])
                probes = state["probes"]
                await wait_until(lambda: state["probes"] > probes + 1)
                still_out = by_name(pool)["flaky"]["healthy"]
                state["models_ok"] = True
                await wait_until(lambda: by_name(pool)["flaky"]["healthy"])
                return failures, cooling, during, still_out, await collect(pool)
        finally:
            await runner.cleanup()

    failures, cooling, during, still_out, after = run(scenario())
    assert failures == ["upstream 'flaky': HTTP 503 Service Unavailable: busy (gave up after 1 attempts)"] * 3
    assert cooling["healthy"] is False and cooling["cooling_down_until"] > 0 and cooling["failures"] == 3
    # the error names each upstream and its last failure (issue 12 item 9)
    assert during.startswith("no healthy upstream for model None: 'flaky' cooling down for ")
    assert during.endswith("(last failure: HTTP 503 Service Unavailable: busy) (gave up after 1 attempts)")
    assert still_out is False  # the cool-down is over, but no health check has passed yet
    assert texts(after) == ["ok"] and after[-1].kind == "end"


def test_per_upstream_concurrency_limit_holds():
    async def scenario():
        async with (
            servers({"tokens_per_s": 200, "max_concurrency": 2}) as ups,
            pool_of([u for _, u in ups]) as pool,
        ):
            server = ups[0][0]
            peak = 0

            async def one(seed: int) -> list[TokenEvent]:
                nonlocal peak
                got = []
                async for event in pool.stream({**CHAT, "seed": seed}):
                    peak = max(peak, server.stats.active_streams, pool.snapshot()[0]["outstanding"])
                    got.append(event)
                return got

            return await asyncio.gather(*(one(i) for i in range(6))), peak

    results, peak = run(scenario())
    assert all(events[-1].kind == "end" and len(texts(events)) == 8 for events in results)
    assert peak == 2


def test_mid_stream_failure_is_an_error_under_policy_error():
    async def scenario():
        async with servers({"faults": "disconnect_after=3"}, {}) as ups, pool_of([u for _, u in ups]) as pool:
            return await collect(pool, deterministic=True)

    events = run(scenario())
    assert len(texts(events)) == 3
    assert events[-1].kind == "error"
    assert events[-1].error.startswith("upstream 'u0': connection to ")
    assert events[-1].error.endswith("(after 3 tokens; not re-issued: mid_stream policy 'error')")
    assert events[-1].error.count("after 3 tokens") == 1  # said once, in one sentence


@pytest.mark.parametrize("strategy", ["least_outstanding", "round_robin"])
def test_reissue_continues_on_another_upstream_without_duplicates(strategy):
    async def scenario():
        async with servers({"faults": "disconnect_after=3"}, {}) as ups:
            clean = [u for _, u in ups][1:]
            async with pool_of(clean) as reference:
                expected = await collect(reference)
            async with pool_of([u for _, u in ups], strategy=strategy, mid_stream="reissue") as pool:
                reissued = await collect(pool, deterministic=True)
                not_deterministic = await collect(pool)
                return expected, reissued, not_deterministic, by_name(pool)

    expected, reissued, not_deterministic, snap = run(scenario())
    assert [e.kind for e in reissued] == ["start"] + ["token"] * 8 + ["end"]
    assert texts(reissued) == texts(expected)
    assert snap["u0"]["failures"] >= 1
    assert not_deterministic[-1].kind == "error"
    assert "not re-issued: request not deterministic" in not_deterministic[-1].error


def test_cancelling_a_stream_closes_the_upstream_connection_and_frees_the_slot():
    async def scenario():
        async with servers({"tokens_per_s": 50}) as ups, pool_of([u for _, u in ups]) as pool:
            server = ups[0][0]
            stream = pool.stream({**CHAT, "max_tokens": 1000})
            got = [await anext(stream), await anext(stream)]
            busy = pool.snapshot()[0]["outstanding"], server.stats.active_streams
            await stream.aclose()
            await wait_until(lambda: server.stats.active_streams == 0)
            return got, busy, pool.snapshot()[0], server.stats.tokens_sent

    got, busy, snap, sent = run(scenario())
    assert [e.kind for e in got] == ["start", "token"]
    assert busy == (1, 1)
    assert snap["outstanding"] == 0 and snap["failures"] == 0
    assert sent < 100  # the server stopped long before 1000 tokens


def test_cancelling_the_consuming_task_frees_the_slot():
    async def scenario():
        async with servers({"tokens_per_s": 50}) as ups, pool_of([u for _, u in ups]) as pool:
            first = asyncio.Event()

            async def consume() -> None:
                async with aclosing(pool.stream({**CHAT, "max_tokens": 1000})) as events:
                    async for event in events:
                        if event.kind == "token":
                            first.set()

            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await wait_until(lambda: ups[0][0].stats.active_streams == 0)
            # nothing of the stream is left waiting (a read's back-pressure wait on a reader that
            # is gone would wait for ever)
            await wait_until(lambda: not any("_resume_after" in t.get_coro().__qualname__ for t in asyncio.all_tasks()))
            return pool.snapshot()[0]["outstanding"]

    assert run(scenario()) == 0


def test_bad_policy_and_config_values_are_rejected():
    with pytest.raises(ValueError, match="strategy"):
        PoolPolicy(strategy="random")
    with pytest.raises(ValueError, match="mid_stream"):
        PoolPolicy(mid_stream="retry")
    with pytest.raises(ValueError, match="base_url"):
        UpstreamConfig("x", "localhost:8000")
    assert UpstreamConfig("x", "http://h", models=["a"]).models == ("a",)  # type: ignore[arg-type]


def test_reissue_that_diverges_from_what_was_sent_is_an_error():
    def chunk(text: str) -> bytes:
        return b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n' % text.encode()

    def app(*chunks: bytes) -> web.Application:
        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": []})

        async def chat(request: web.Request) -> web.StreamResponse:
            await request.read()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for c in chunks:
                await resp.write(c)
            return resp

        application = web.Application()
        application.router.add_get("/v1/models", models)
        application.router.add_post("/v1/chat/completions", chat)
        return application

    async def scenario():
        runners = [web.AppRunner(app(chunk("a"), chunk("b"))), web.AppRunner(app(chunk("x"), chunk("y")))]
        urls = []
        for runner in runners:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            urls.append("http://{}:{}".format(*runner.addresses[0][:2]))
        try:
            configs = [UpstreamConfig(f"u{i}", url) for i, url in enumerate(urls)]
            async with pool_of(configs, mid_stream="reissue", retries=1) as pool:
                return await collect(pool, deterministic=True)
        finally:
            for runner in runners:
                await runner.cleanup()

    events = run(scenario())
    assert texts(events) == ["a", "b"]  # nothing of the other answer is spliced in
    assert events[-1].kind == "error"
    assert events[-1].error == "upstream 'u1': re-issued request diverged from the tokens already sent at token 0"


def test_upstream_request_rate_waits_for_its_bucket():
    async def scenario():
        async with servers({"requests_per_s": 4}) as ups, pool_of([u for _, u in ups]) as pool:
            began = time.monotonic()
            ends = [(await collect(pool))[-1].kind for _ in range(8)]  # a burst of 4, then 4 per second
            return ends, time.monotonic() - began

    ends, elapsed = run(scenario())
    assert ends == ["end"] * 8
    assert 0.9 <= elapsed < 3.0


def test_upstream_over_its_request_rate_is_skipped_while_another_has_room():
    async def scenario():
        async with servers({"requests_per_s": 1}, {}) as ups, pool_of([u for _, u in ups]) as pool:
            began = time.monotonic()
            for _ in range(6):
                assert (await collect(pool))[-1].kind == "end"
            return by_name(pool), time.monotonic() - began

    snapshot, elapsed = run(scenario())
    assert snapshot["u0"]["requests"] == 1 and snapshot["u1"]["requests"] == 5
    assert elapsed < 0.9  # nobody waited for u0's bucket


def test_upstream_token_rate_slows_its_reads():
    async def scenario():
        async with servers({"tokens_per_s": 100}) as ups, pool_of([u for _, u in ups]) as pool:
            began = time.monotonic()
            events = await collect(pool, {**CHAT, "max_tokens": 150, "ignore_eos": True})
            return events, time.monotonic() - began

    events, elapsed = run(scenario())
    assert len(texts(events)) == 150 and events[-1].kind == "end"
    assert 0.45 <= elapsed < 3.0  # a burst of 100 tokens, then 50 at 100 per second


def test_negative_upstream_rates_are_refused():
    with pytest.raises(ValueError, match="tokens_per_s"):
        UpstreamConfig("u", "http://127.0.0.1:1", tokens_per_s=-1)
    with pytest.raises(ValueError, match="requests_per_s"):
        UpstreamConfig("u", "http://127.0.0.1:1", requests_per_s=-1)


# --------------------------------------------------------------------------- hostile upstreams


@contextlib.asynccontextmanager
async def hostile(script: Callable[[web.StreamResponse], Awaitable[None]]) -> AsyncIterator[UpstreamConfig]:
    """An upstream that answers every chat request with ``script`` writing to its stream."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await script(resp)
            await resp.write_eof()
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield UpstreamConfig("hostile", "http://{}:{}".format(*runner.addresses[0][:2]))
    finally:
        await runner.cleanup()


def token_chunk(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n\n'


def test_an_upstream_ignoring_max_tokens_is_cut_at_it():
    """Issue 13 item 7: an upstream sent 1,000,000 tokens for max_tokens 16 and all were delivered."""

    async def flood(resp: web.StreamResponse) -> None:
        for i in range(200):
            await resp.write(token_chunk(f"t{i} "))
        await resp.write(b"data: [DONE]\n\n")

    async def scenario():
        async with hostile(flood) as up, pool_of([up]) as pool:
            return await collect(pool, {**CHAT, "max_tokens": 16})

    events = run(scenario())
    assert texts(events) == [f"t{i} " for i in range(16)]
    assert events[-1].kind == "error" and "more than max_tokens (16)" in events[-1].error


def test_keepalives_without_a_token_end_at_the_first_token_deadline():
    """Issue 13 item 7: keep-alive comments reset the idle timeout, so such an upstream held a slot
    forever; the first token must come within first_token_timeout_s."""

    async def stall(resp: web.StreamResponse) -> None:
        for _ in range(200):
            await resp.write(b": keep-alive\n\n")
            await asyncio.sleep(0.02)

    async def scenario():
        async with hostile(stall) as up, pool_of([up], first_token_timeout_s=0.2, retries=0) as pool:
            began = time.monotonic()
            return await collect(pool), time.monotonic() - began, pool.snapshot()[0]

    events, took, snap = run(scenario())
    assert events[-1].kind == "error" and "no first token within 0.2 s" in events[-1].error
    assert took < 3 and snap["outstanding"] == 0


def test_thinking_or_a_tool_call_is_output_for_the_first_token_deadline():
    """A reasoning model thinks (delta.reasoning_content) and a tool call comes in pieces before any
    content token, if one ever comes: both are the upstream producing, not stalling, so neither may
    end at first_token_timeout_s (the reply was cut and re-run elsewhere)."""

    def delta_chunk(delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"

    async def think(resp: web.StreamResponse) -> None:
        for _ in range(10):
            await resp.write(delta_chunk({"reasoning_content": "hm "}))
            await asyncio.sleep(0.05)
        await resp.write(token_chunk("yes"))
        await resp.write(b"data: [DONE]\n\n")

    async def call(resp: web.StreamResponse) -> None:
        first = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
        await resp.write(delta_chunk({"tool_calls": [first]}))
        for _ in range(10):
            await asyncio.sleep(0.05)
            await resp.write(delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "x"}}]}))
        await resp.write(delta_chunk({}, "tool_calls") + b"data: [DONE]\n\n")

    async def scenario(script):
        async with hostile(script) as up, pool_of([up], first_token_timeout_s=0.2, retries=0) as pool:
            return await collect(pool, {**CHAT, "max_tokens": 100})  # the thinking counts as tokens

    thought = run(scenario(think))
    assert thought[-1].kind == "end" and texts(thought) == ["yes"]
    assert [e.text for e in thought if e.kind == "reasoning"] == ["hm "] * 10
    called = run(scenario(call))
    assert called[-1].kind == "end" and [e.kind for e in called[1:-1]] == ["tool_call"] * 11


def test_a_stream_that_never_ends_is_cut_at_its_deadline():
    async def trickle(resp: web.StreamResponse) -> None:
        for i in range(1000):
            await resp.write(token_chunk(f"t{i}"))
            await asyncio.sleep(0.02)

    async def scenario():
        async with hostile(trickle) as up, pool_of([up], stream_timeout_s=0.3) as pool:
            return await collect(pool, {**CHAT, "max_tokens": 10_000})

    events = run(scenario())
    assert 1 <= len(texts(events)) < 100
    assert events[-1].kind == "error" and "stream not done within 0.3 s" in events[-1].error


def test_a_streaming_upstream_whose_health_check_blocks_stays_healthy():
    """Issue 12 item 9: llama-cpp-python's server blocks GET /v1/models while it generates; the
    health check timed out and marked the only upstream down mid-stream. A stream delivering
    tokens proves it healthy (passive health)."""
    generating = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        generating.set()
        for i in range(40):
            await resp.write(token_chunk(f"t{i}"))
            await asyncio.sleep(0.02)
        await resp.write(b"data: [DONE]\n\n")
        generating.clear()
        await resp.write_eof()
        return resp

    async def models(_: web.Request) -> web.Response:
        if generating.is_set():
            await asyncio.sleep(1)  # a serial server: no answer while it generates (past the 0.1 s timeout)
        return web.json_response({"object": "list", "data": []})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        up = UpstreamConfig("serial", "http://{}:{}".format(*runner.addresses[0][:2]))
        try:
            async with pool_of([up], health_interval_s=0.1, health_timeout_s=0.1) as pool:
                first = asyncio.create_task(collect(pool, {**CHAT, "max_tokens": 100}))
                await generating.wait()
                await asyncio.sleep(0.4)  # several health checks time out meanwhile
                healthy = pool.snapshot()[0]["healthy"]
                return healthy, await first
        finally:
            await runner.cleanup()

    healthy, events = run(scenario())
    assert healthy is True
    assert events[-1].kind == "end" and len(texts(events)) == 40


def test_the_back_off_of_many_failures_stays_within_its_maximum():
    # a large ``retries`` (pool params are not bounded) or a long wait for a file descriptor: 2.0 ** 1100
    # overflowed a float and ended the stream as "ingest failed: OverflowError"
    pool = UpstreamPool([UpstreamConfig("a", "http://127.0.0.1:9")], PoolPolicy(backoff_max_s=2.0))
    assert all(0 < pool._backoff_s(failed) <= 2.0 for failed in (1, 2, 64, 1100, 10**6))


@contextlib.contextmanager
def no_file_descriptor_left():
    """This process out of file descriptors for real: its soft limit lowered to what is open, then
    put back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1, hard))
    held = []
    try:
        with contextlib.suppress(OSError):
            for _ in range(64):
                held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_health_check_without_a_file_descriptor_gives_no_verdict():
    def fresh_connections() -> aiohttp.ClientSession:  # no kept connection: the check must open one
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def scenario():
        async with servers({}) as started:
            pool = UpstreamPool([started[0][1]], PoolPolicy(health_interval_s=3600), fresh_connections)
            await pool.start()
            try:
                upstream = pool._upstreams[0]
                with no_file_descriptor_left():
                    await pool._check(upstream)
                return upstream.healthy, upstream.last_failure
            finally:
                await pool.close()

    healthy, last_failure = run(scenario())
    # ingest's own limit says nothing of the upstream: before, it was taken out of service
    assert healthy, last_failure


@contextlib.asynccontextmanager
async def models_server(models: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """A server whose GET /v1/models is ``models``; its base URL."""
    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield "http://{}:{}".format(*runner.addresses[0][:2])
    finally:
        await runner.cleanup()


def test_a_health_check_answer_is_read_only_up_to_its_limit():
    """A /v1/models answer is untrusted: one that streams without end was read whole into ingest
    (2 GB of RSS within a 5 s health timeout, ad hoc) before the timeout ended it."""
    sent = {"bytes": 0}

    async def models(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"data": [], "pad": "')
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 64 MiB
                await resp.write(b"x" * (1 << 20))
                sent["bytes"] += 1 << 20
        return resp

    async def scenario():
        async with (
            models_server(models) as url,
            pool_of([UpstreamConfig("big", url)], health_interval_s=3600, health_timeout_s=30) as pool,
        ):
            return pool._upstreams[0].healthy, pool._upstreams[0].last_failure

    healthy, failure = run(scenario())
    assert not healthy
    assert failure == f"health check: GET /v1/models answered more than {MAX_MODELS_BODY} bytes", failure
    assert sent["bytes"] < 32 << 20  # the server could not write it all: ingest stopped reading


def test_a_long_model_list_in_many_reads_is_read_whole():
    listing = orjson.dumps({"data": [{"id": f"model-{i}", "pad": "p" * 300} for i in range(3000)]})  # ~1 MB

    async def models(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for at in range(0, len(listing), 1 << 14):
            await resp.write(listing[at : at + (1 << 14)])
        return resp

    async def scenario():
        async with models_server(models) as url, pool_of([UpstreamConfig("long", url)], health_interval_s=3600) as pool:
            return pool._upstreams[0].healthy, pool._upstreams[0].reported_models

    healthy, reported = run(scenario())
    assert healthy and len(reported) == 1024 and reported[0] == "model-0"


# --------------------------------------------------------------------------- the one-token sink
# Each upstream here paced by the server (``servers`` gives tokens_per_s to the pool, whose own
# rate is checked): reads of one token each, so the one-token way is taken where it may be.


@contextlib.asynccontextmanager
async def paced(*upstreams: dict) -> AsyncIterator[UpstreamPool]:
    """A pool over one paced embedded upstream per entry of ``upstreams`` (server keys, and its
    pool-side keys under "pool")."""
    started, configs = [], []
    try:
        for i, entry in enumerate(upstreams):
            server_keys = {k: v for k, v in entry.items() if k != "pool"}
            started.append(UpstreamServer(UpstreamServerConfig(**{"tokens_per_s": 250.0, **server_keys})))
            configs.append(UpstreamConfig(f"u{i}", await started[-1].start(), **entry.get("pool", {})))
        async with pool_of(configs, strategy="round_robin", mid_stream="reissue") as pool:
            yield pool
    finally:
        for server in started:
            await server.stop()


async def relayed(pool: UpstreamPool, body: dict, **kw) -> tuple[list[tuple[str, str]], str]:
    """``pool.relay`` with both sinks, as ingest calls it: each token with the sink that got it,
    and how the stream ended (its finish reason or its error)."""
    got: list[tuple[str, str]] = []

    def sink(tokens: Tokens) -> None:
        got.extend((text, "tokens") for text in tokens.texts)

    def one(text: str, recv_ns: int) -> None:
        got.append((text, "one"))

    try:
        end = await pool.relay(body, sink, one_token=one, **kw)
    except UpstreamError as err:
        return got, str(err)
    return got, end.finish_reason


def test_the_usual_reads_go_to_the_one_token_sink_after_the_first():
    """The first token takes the checked way (time to first token, the whole-stream deadline);
    the reads after it, one plain token each, the one-token sink; the tokens are the stream's."""
    body = {**CHAT, "max_tokens": 30}

    async def scenario():
        async with paced({}) as pool:
            return await collect(pool, body), await relayed(pool, body), by_name(pool)["u0"]

    events, (got, ending), snap = run(scenario())
    assert [text for text, _ in got] == texts(events) and len(got) == 30
    ways = [way for _, way in got]
    assert ways[0] == "tokens" and "one" in ways
    assert ending == "length" and snap["outstanding"] == 0


def test_an_upstream_ignoring_max_tokens_is_cut_at_it_on_the_one_token_way():
    async def flood(resp: web.StreamResponse) -> None:
        for i in range(40):
            await resp.write(token_chunk(f"t{i} "))
            await asyncio.sleep(0.004)  # a read a token
        await resp.write(b"data: [DONE]\n\n")

    async def scenario():
        async with hostile(flood) as up, pool_of([up]) as pool:
            return await relayed(pool, {**CHAT, "max_tokens": 16})

    got, ending = run(scenario())
    assert [text for text, _ in got] == [f"t{i} " for i in range(16)]
    assert "more than max_tokens (16)" in ending


def test_a_reissue_checks_every_token_also_with_a_one_token_sink():
    """Tokens kept for a reissue, and those replayed, never take the unchecked way."""
    body = {**CHAT, "max_tokens": 20}

    async def scenario():
        async with paced({}) as pool:
            expected = await collect(pool, body)
        async with paced({"faults": "disconnect_after=5"}, {}) as pool:
            return expected, await relayed(pool, body, deterministic=True), by_name(pool)["u0"]

    expected, (got, ending), failed = run(scenario())
    assert [text for text, _ in got] == texts(expected) and len(got) == 20 and ending == "length"
    assert {way for _, way in got} == {"tokens"} and failed["failures"] >= 1


def test_an_upstream_token_rate_holds_on_the_one_token_way():
    async def scenario():
        async with paced({"tokens_per_s": 400.0, "pool": {"tokens_per_s": 100}}) as pool:
            began = time.monotonic()
            got, ending = await relayed(pool, {**CHAT, "max_tokens": 150, "ignore_eos": True})
            return got, ending, time.monotonic() - began

    got, ending, elapsed = run(scenario())
    assert len(got) == 150 and ending == "length"
    assert 0.45 <= elapsed < 3.0  # a burst of 100 tokens, then 50 at 100 per second
