"""A hostile or overloaded upstream (issue 13 item 8), over real HTTP on loopback: Retry-After is
honoured (and capped), one client's refused requests and 429s do not take the shared upstream out
for the others, and a redirect to another origin is never followed (the request body and the
upstream's headers would go there)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from test_pool import CHAT, collect, pool_of, run, texts, token_chunk

from stages.ingest.openai_client import UpstreamError, _BodyReader, _ChunkDecoder, _relay_aiohttp, retry_after_s
from stages.ingest.pool import PoolPolicy, UpstreamConfig

Answer = Callable[[int, dict], web.StreamResponse | web.Response]


@contextlib.asynccontextmanager
async def upstream(answer: Answer, name: str = "u") -> AsyncIterator[tuple[UpstreamConfig, list[float]]]:
    """An upstream whose n-th chat request (0, 1, ...) is answered by ``answer(n, body)``; yields
    its config and the monotonic times of the requests it received."""
    seen: list[float] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(time.monotonic())
        resp = answer(len(seen) - 1, body)
        if isinstance(resp, web.Response):
            return resp
        await resp.prepare(request)
        for i in range(3):
            await resp.write(token_chunk(f"t{i} "))
        await resp.write(b"data: [DONE]\n\n")
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
        yield UpstreamConfig(name, "http://{}:{}".format(*runner.addresses[0][:2])), seen
    finally:
        await runner.cleanup()


def stream() -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": "text/event-stream"})


def test_a_429_with_retry_after_is_not_retried_sooner():
    """A 429 with Retry-After: 30 was retried 3 times in 0.2 s."""

    def answer(n: int, _: dict):
        return web.Response(status=429, headers={"Retry-After": "1"}) if n == 0 else stream()

    async def scenario():
        async with upstream(answer) as (up, seen), pool_of([up], backoff_initial_s=0.01) as pool:
            return await collect(pool), seen

    events, seen = run(scenario())
    assert texts(events) == ["t0 ", "t1 ", "t2 "]
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.99


def test_retry_after_is_capped():
    def answer(n: int, _: dict):
        return web.Response(status=503, headers={"Retry-After": "100000"}) if n == 0 else stream()

    async def scenario():
        async with upstream(answer) as (up, seen), pool_of([up], retry_after_max_s=0.3) as pool:
            return await collect(pool), seen

    events, seen = run(scenario())
    assert texts(events) == ["t0 ", "t1 ", "t2 "]
    assert 0.29 <= seen[1] - seen[0] < 5


def test_retry_after_parsing():
    assert retry_after_s("30") == 30.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    for bad in (None, "", "-1", "soon", "1e9", "9" * 100, "Wed, 99 Foo 2015"):
        assert retry_after_s(bad) is None


def test_one_clients_refused_requests_and_429s_do_not_cool_the_upstream_for_others():
    """One client's failing requests cooled the shared upstream, so another got "no healthy upstream"."""

    def answer(_: int, body: dict):
        who = body["messages"][0]["content"]
        if who == "bad":
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        if who == "greedy":
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        return stream()

    async def scenario():
        async with upstream(answer) as (up, _), pool_of([up], retries=0, failures_to_cool_down=3) as pool:
            for who in ["bad"] * 5 + ["greedy"] * 5:
                ended = await collect(pool, {**CHAT, "messages": [{"role": "user", "content": who}]})
                assert ended[-1].kind == "error"
            return await collect(pool), pool.snapshot()[0]

    events, snap = run(scenario())
    assert texts(events) == ["t0 ", "t1 ", "t2 "]
    assert snap["healthy"] and snap["client_errors"] == 5 and snap["failures"] == 0


@pytest.mark.parametrize("status", [307, 308, 302])
def test_a_redirect_to_another_origin_is_not_followed(status):
    """A 307 to another origin was followed with the POST (and its headers) re-sent."""

    async def scenario():
        async with upstream(lambda n, b: stream(), "elsewhere") as (other, elsewhere):
            target = other.base_url + "/v1/chat/completions"

            def answer(_: int, __: dict):
                return web.Response(status=status, headers={"Location": target})

            async with upstream(answer) as (up, _):
                # the plain-HTTP path, through the pool
                async with pool_of([up], retries=0) as pool:
                    events = await collect(pool)
                # the aiohttp path (https upstreams), on the same server
                decoder = _ChunkDecoder(chat=True)
                async with aiohttp.ClientSession() as session:
                    with pytest.raises(UpstreamError, match="redirects are not followed"):
                        await _relay_aiohttp(
                            session,
                            up.base_url + "/v1/chat/completions",
                            b"{}",
                            {"Authorization": "Bearer secret"},
                            aiohttp.ClientTimeout(sock_connect=5, sock_read=5),
                            _BodyReader(decoder, lambda tokens: None),
                            decoder,
                        )
            return events, elsewhere

    events, elsewhere = run(scenario())
    assert events[-1].kind == "error" and f"HTTP {status}" in events[-1].error
    assert elsewhere == []  # nothing was re-sent to the other origin


def test_retry_after_max_s_must_be_positive():
    with pytest.raises(ValueError, match="retry_after_max_s"):
        PoolPolicy(retry_after_max_s=0)
