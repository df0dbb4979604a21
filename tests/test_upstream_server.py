"""The embedded upstream over real HTTP on loopback: a real server on port 0, a real aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from engine_harness import alive, wait_for

from stages.ingest import corpus
from stages.ingest.upstream_server import (
    FAULT_HEADER,
    GARBAGE_LINES,
    Faults,
    UpstreamServer,
    UpstreamServerConfig,
    _parse_args,
    serve_in_process,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_body(**extra: Any) -> dict:
    return {"model": "neuralpipe-echo", "messages": [{"role": "user", "content": "Tell me a story."}], **extra}


def completion_body(**extra: Any) -> dict:
    return {"model": "neuralpipe-echo", "prompt": "Once upon a time", **extra}


def events(raw: bytes) -> list[bytes]:
    """SSE events of a body the server wrote (it always ends events with a blank line)."""
    return [e for e in raw.split(b"\n\n") if e]


def data_events(raw: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in events(raw) if e.startswith(b"data: ")]


def chunks(raw: bytes) -> list[dict]:
    """The JSON chunks of a stream, [DONE] left out."""
    return [orjson.loads(d) for d in data_events(raw) if d != b"[DONE]"]


def chat_text(raw: bytes) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks(raw) if c["choices"])


class Client:
    """A running server and a session talking to it."""

    def __init__(self, server: UpstreamServer, url: str, session: aiohttp.ClientSession) -> None:
        self.server, self.url, self.session = server, url, session

    async def post(self, path: str, body: Any, fault: str | None = None) -> tuple[int, dict, bytes]:
        headers = {FAULT_HEADER: fault} if fault is not None else None
        async with self.session.post(self.url + path, json=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@contextlib.asynccontextmanager
async def serving(**cfg: Any) -> AsyncIterator[Client]:
    server = UpstreamServer(UpstreamServerConfig(**cfg))
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(server, url, session)
    finally:
        await server.stop()


def run(test: Callable[[Client], Awaitable[None]], **cfg: Any) -> None:
    """Run one async test body against a fresh server, under uvloop like the engine."""

    async def main() -> None:
        async with serving(**cfg) as client:
            await test(client)

    uvloop.run(main())


def assert_error(status: int, body: bytes, expected_status: int) -> dict:
    assert status == expected_status
    error = orjson.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    return error


# --------------------------------------------------------------------------- endpoints, shapes


def test_models_lists_the_configured_names() -> None:
    async def body(c: Client) -> None:
        async with c.session.get(c.url + "/v1/models") as resp:
            assert resp.status == 200
            listing = await resp.json()
        assert listing["object"] == "list"
        assert [m["id"] for m in listing["data"]] == ["alpha", "beta"]
        assert all(m["object"] == "model" for m in listing["data"])

    run(body, models=("alpha", "beta"))


def test_chat_stream_has_openai_chunk_shape_role_first_usage_then_done() -> None:
    async def body(c: Client) -> None:
        req = chat_body(stream=True, max_tokens=8, stream_options={"include_usage": True})
        async with c.session.post(c.url + CHAT, json=req) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.read()
        assert data_events(raw)[-1] == b"[DONE]"
        cs = chunks(raw)
        assert all(ch["object"] == "chat.completion.chunk" and ch["model"] == "neuralpipe-echo" for ch in cs)
        assert len({ch["id"] for ch in cs}) == 1 and cs[0]["id"].startswith("chatcmpl-")
        assert cs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = cs[1:-2]
        assert len(content) == 8
        assert all(set(ch["choices"][0]["delta"]) == {"content"} for ch in content)
        assert all(ch["choices"][0]["finish_reason"] is None and ch["usage"] is None for ch in content)
        assert cs[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
        assert cs[-1]["choices"] == []
        assert cs[-1]["usage"]["completion_tokens"] == 8
        assert cs[-1]["usage"]["total_tokens"] == 8 + cs[-1]["usage"]["prompt_tokens"]

    run(body)


def test_chat_stream_without_include_usage_has_no_usage_field() -> None:
    async def body(c: Client) -> None:
        status, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=4))
        assert status == 200
        assert all("usage" not in ch for ch in chunks(raw))
        assert len(chunks(raw)) == 1 + 4 + 1  # role, tokens, finish

    run(body)


def test_completions_stream_shape() -> None:
    async def body(c: Client) -> None:
        status, _, raw = await c.post(COMPLETIONS, completion_body(stream=True, max_tokens=5))
        assert status == 200
        assert data_events(raw)[-1] == b"[DONE]"
        cs = chunks(raw)
        assert all(ch["object"] == "text_completion" and ch["id"].startswith("cmpl-") for ch in cs)
        assert [ch["choices"][0]["finish_reason"] for ch in cs] == [None] * 5 + ["length"]
        assert all(ch["choices"][0]["text"] for ch in cs[:-1])

    run(body)


def test_non_streaming_matches_the_stream_token_for_token() -> None:
    async def body(c: Client) -> None:
        _, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=12))
        status, _, whole = await c.post(CHAT, chat_body(max_tokens=12))
        assert status == 200
        reply = orjson.loads(whole)
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": chat_text(raw)}
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["completion_tokens"] == 12

        status, _, whole = await c.post(COMPLETIONS, completion_body(max_tokens=3))
        reply = orjson.loads(whole)
        assert status == 200 and reply["object"] == "text_completion"
        assert len(corpus.tokenize(reply["choices"][0]["text"])) <= 3  # tokens may merge when joined
        assert reply["usage"]["completion_tokens"] == 3

    run(body)


def test_chat_logprobs_shape() -> None:
    async def body(c: Client) -> None:
        req = chat_body(stream=True, max_tokens=6, logprobs=True, top_logprobs=3)
        _, _, raw = await c.post(CHAT, req)
        content = [ch["choices"][0] for ch in chunks(raw)[1:-1]]
        assert len(content) == 6
        for choice in content:
            (entry,) = choice["logprobs"]["content"]
            assert entry["token"] == choice["delta"]["content"]
            assert entry["logprob"] < 0
            assert bytes(entry["bytes"]).decode() == entry["token"]
            top = entry["top_logprobs"]
            assert len(top) == 3 and top[0]["token"] == entry["token"]
            assert len({t["token"] for t in top}) == 3
            assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
            assert all(set(t) == {"token", "logprob", "bytes"} for t in top)

        _, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=2, logprobs=True))
        assert all(ch["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [] for ch in chunks(raw)[1:-1])
        _, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=2))
        assert all(ch["choices"][0]["logprobs"] is None for ch in chunks(raw))

    run(body)


def test_completions_logprobs_shape() -> None:
    async def body(c: Client) -> None:
        _, _, raw = await c.post(COMPLETIONS, completion_body(stream=True, max_tokens=5, logprobs=2))
        offsets, text = [], ""
        for ch in chunks(raw)[:-1]:
            choice = ch["choices"][0]
            lp = choice["logprobs"]
            assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
            assert lp["tokens"] == [choice["text"]]
            assert lp["token_logprobs"][0] < 0
            assert len(lp["top_logprobs"][0]) == 2 and choice["text"] in lp["top_logprobs"][0]
            assert lp["text_offset"] == [len(text)]
            offsets.append(lp["text_offset"][0])
            text += choice["text"]
        assert len(offsets) == 5

        _, _, whole = await c.post(COMPLETIONS, completion_body(max_tokens=5, logprobs=2))
        lp = orjson.loads(whole)["choices"][0]["logprobs"]
        assert "".join(lp["tokens"]) == text and lp["text_offset"] == offsets

    run(body)


TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "note"}},
]


def test_a_forced_tool_call_streams_as_openai_deltas_and_matches_the_whole_answer() -> None:
    async def body(c: Client) -> None:
        named = {"type": "function", "function": {"name": "note"}}
        req = chat_body(stream=True, max_tokens=6, tools=TOOLS, tool_choice=named)
        status, _, raw = await c.post(CHAT, req)
        assert status == 200
        cs = chunks(raw)
        pieces = [ch["choices"][0]["delta"]["tool_calls"] for ch in cs[1:-1]]
        assert len(pieces) == 6 and all(len(p) == 1 and p[0]["index"] == 0 for p in pieces)
        assert pieces[0][0]["id"].startswith("call_") and pieces[0][0]["type"] == "function"
        assert pieces[0][0]["function"]["name"] == "note"
        assert all(set(p[0]) == {"index", "function"} for p in pieces[1:])
        arguments = "".join(p[0]["function"]["arguments"] for p in pieces)
        assert set(orjson.loads(arguments)) == {"text"}
        assert cs[-1]["choices"][0]["finish_reason"] == "length"

        status, _, whole = await c.post(CHAT, chat_body(max_tokens=6, tools=TOOLS, tool_choice=named))
        message = orjson.loads(whole)["choices"][0]["message"]
        assert message["content"] is None and message["tool_calls"][0]["function"]["arguments"] == arguments

        status, _, whole = await c.post(CHAT, chat_body(max_tokens=5000, tools=TOOLS, tool_choice="required"))
        reply = orjson.loads(whole)["choices"][0]
        assert reply["finish_reason"] == "tool_calls"
        assert reply["message"]["tool_calls"][0]["function"]["name"] == "lookup"
        _, _, whole = await c.post(CHAT, chat_body(max_tokens=4, tools=TOOLS, tool_choice="auto"))
        assert orjson.loads(whole)["choices"][0]["message"]["content"]  # the echo model answers in text

    run(body)


def test_reasoning_effort_streams_thinking_before_the_reply_and_counts_it() -> None:
    async def body(c: Client) -> None:
        status, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=13, reasoning_effort="low"))
        assert status == 200
        deltas = [ch["choices"][0]["delta"] for ch in chunks(raw)[1:-1]]
        assert [set(d) for d in deltas] == [{"reasoning_content"}] * 8 + [{"content"}] * 5
        thought = "".join(d["reasoning_content"] for d in deltas[:8])
        status, _, whole = await c.post(CHAT, chat_body(max_tokens=13, reasoning_effort="low"))
        reply = orjson.loads(whole)
        assert reply["choices"][0]["message"]["reasoning_content"] == thought
        assert reply["choices"][0]["message"]["content"] == "".join(d["content"] for d in deltas[8:])
        assert reply["usage"]["completion_tokens"] == 13
        assert reply["usage"]["completion_tokens_details"] == {"reasoning_tokens": 8}
        _, _, plain = await c.post(CHAT, chat_body(max_tokens=5, reasoning_effort="none"))
        assert "reasoning_content" not in orjson.loads(plain)["choices"][0]["message"]
        # max_tokens bounds the thinking too: cut while thinking, no reply, "length"
        _, _, raw = await c.post(
            CHAT, chat_body(stream=True, max_tokens=5, reasoning_effort="low", tool_choice="required", tools=TOOLS)
        )
        cut = chunks(raw)
        assert [set(ch["choices"][0]["delta"]) for ch in cut[1:-1]] == [{"reasoning_content"}] * 5
        assert cut[-1]["choices"][0]["finish_reason"] == "length"
        status, _, raw = await c.post(CHAT, chat_body(reasoning_effort="deep"))
        assert assert_error(status, raw, 400)["param"] == "reasoning_effort"

    run(body)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [], "tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_tools_get_openai_style_errors(extra: dict, param: str) -> None:
    async def body(c: Client) -> None:
        status, _, raw = await c.post(CHAT, chat_body(**extra))
        assert assert_error(status, raw, 400)["param"] == param

    run(body)


# --------------------------------------------------------------------------- content


def test_same_request_same_tokens_other_seed_or_prompt_other_tokens() -> None:
    async def body(c: Client) -> None:
        async def text(**extra: Any) -> str:
            _, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=20, logprobs=True, **extra))
            return chat_text(raw) + repr([ch["choices"][0]["logprobs"] for ch in chunks(raw)])

        assert await text(seed=1) == await text(seed=1)
        assert await text(seed=1) != await text(seed=2)
        assert await text() != await text(messages=[{"role": "user", "content": "Something else."}])

    run(body)


def test_max_tokens_default_length_stop_and_ignore_eos() -> None:
    async def body(c: Client) -> None:
        async def reply(**extra: Any) -> dict:
            status, _, whole = await c.post(CHAT, chat_body(**extra))
            assert status == 200
            return orjson.loads(whole)

        default = await reply()
        assert default["usage"]["completion_tokens"] <= 64
        assert (await reply(max_completion_tokens=3))["usage"]["completion_tokens"] == 3
        natural = await reply(max_tokens=5000)  # longer than any natural reply
        assert natural["choices"][0]["finish_reason"] == "stop"
        assert corpus.MIN_NATURAL_TOKENS <= natural["usage"]["completion_tokens"] <= corpus.MAX_NATURAL_TOKENS
        forced = await reply(max_tokens=1500, ignore_eos=True)
        assert forced["usage"]["completion_tokens"] == 1500
        assert forced["choices"][0]["finish_reason"] == "length"

    run(body)


def test_corpus_tokens_rejoin_to_the_text() -> None:
    assert "".join(corpus.TOKENS) == corpus.TEXT
    assert len(corpus.TEXT) > 2000 and len(corpus.VOCAB) > 100


# --------------------------------------------------------------------------- validation


def test_bad_requests_get_openai_style_errors() -> None:
    async def body(c: Client) -> None:
        async with c.session.post(c.url + CHAT, data=b"{not json") as resp:
            assert assert_error(resp.status, await resp.read(), 400)["code"] == "invalid_json"
        cases = [
            (CHAT, {"model": "neuralpipe-echo"}, 400, "missing_messages"),
            (CHAT, chat_body(messages=[]), 400, "missing_messages"),
            (CHAT, chat_body(model="gpt-nope"), 404, "model_not_found"),
            (COMPLETIONS, {"model": "neuralpipe-echo"}, 400, "missing_prompt"),
        ]
        for path, req, status, code in cases:
            got_status, _, raw = await c.post(path, req)
            assert assert_error(got_status, raw, status)["code"] == code, req
        bad = [chat_body(max_tokens=0), chat_body(max_tokens=10**9), chat_body(top_logprobs=2), chat_body(n=2)]
        for req in [*bad, chat_body(stream="yes"), chat_body(model=7), ["not", "an", "object"]]:
            got_status, _, raw = await c.post(CHAT, req)
            assert_error(got_status, raw, 400)
        assert c.server.stats.active_streams == 0

    run(body)


def test_bad_config_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        UpstreamServer(UpstreamServerConfig(faults="explode"))
    with pytest.raises(ValueError):
        UpstreamServer(UpstreamServerConfig(models=()))


@pytest.mark.parametrize(
    ("field", "value"),
    [("decode_steps", "yes"), ("stamp_tokens", 1), ("tokens_per_s", "fast"), ("port", 80.5), ("port", True),
     ("models", "m"), ("models", ["m", 3]), ("faults", None), ("keepalive_s", float("nan"))],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(field: str, value: Any) -> None:
    """``params.embedded`` comes from a config file: a string where a flag belongs is no flag."""
    with pytest.raises(ValueError, match=f"^{field}: must be "):
        UpstreamServerConfig(**{field: value})
    assert UpstreamServerConfig(models=["a", "b"]).models == ("a", "b")  # TOML's arrays are lists
    assert UpstreamServerConfig(tokens_per_s=20).tokens_per_s == 20.0


# --------------------------------------------------------------------------- pacing, concurrency


def test_rate_is_roughly_honoured() -> None:
    async def body(c: Client) -> None:
        start = time.monotonic()
        _, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=21))
        elapsed = time.monotonic() - start
        assert len(chunks(raw)) == 1 + 21 + 1
        assert 0.18 <= elapsed < 2.0  # 20 intervals of 10 ms after the first token

    run(body, tokens_per_s=100.0)


def test_concurrent_paced_streams_share_the_ticker_and_all_complete() -> None:
    """Every paced stream is served by one timer: many at once, twice over on kept-alive
    connections, each complete and paced."""

    async def body(c: Client) -> None:
        start = time.monotonic()
        for _ in range(2):
            replies = await asyncio.gather(
                *(c.post(CHAT, chat_body(stream=True, max_tokens=11, seed=i)) for i in range(50))
            )
            for status, _, raw in replies:
                assert status == 200 and len(chunks(raw)) == 1 + 11 + 1
                assert data_events(raw)[-1] == b"[DONE]"
        assert time.monotonic() - start >= 2 * 0.09  # 10 intervals of 10 ms per round
        assert c.server.stats.tokens_sent == 2 * 50 * 11 and c.server.stats.active_streams == 0

    run(body, tokens_per_s=100.0)


def _send_phases(decode_steps: bool) -> list[float]:
    """Two streams at 20 tokens/s started 25 ms apart (half a step): each token's send time (its
    stamped text) as its distance in ms from the first token's on the 50 ms clock, 0..25."""
    step_ns, stamps = 50_000_000, []

    async def body(c: Client) -> None:
        async def one(i: int) -> list[int]:
            await asyncio.sleep(i * 0.025)
            _, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=5, seed=i))
            return [
                int(ch["choices"][0]["delta"]["content"])
                for ch in chunks(raw)
                if ch["choices"] and ch["choices"][0]["delta"].get("content")
            ]

        stamps.extend(await asyncio.gather(one(0), one(1)))

    run(body, tokens_per_s=20.0, stamp_tokens=True, decode_steps=decode_steps)
    first = stamps[0][0]
    return [min((t - first) % step_ns, -(t - first) % step_ns) / 1e6 for stream in stamps for t in stream]


def test_decode_steps_put_every_streams_tokens_on_one_clock() -> None:
    """A batching server writes a token of every stream at the end of each decode step: with
    ``decode_steps`` the second stream's tokens go out with the first's; without, each stream
    keeps its own phase (half a step apart here)."""
    assert max(_send_phases(decode_steps=True)) < 10  # ms off the shared clock (timer slack on a busy machine)
    assert max(_send_phases(decode_steps=False)) > 15


def test_first_token_delay_with_keepalives_meanwhile() -> None:
    async def body(c: Client) -> None:
        start = time.monotonic()
        async with c.session.post(c.url + CHAT, json=chat_body(stream=True, max_tokens=2)) as resp:
            headers_after = time.monotonic() - start
            received = b""
            async for piece in resp.content.iter_any():
                received += piece
                if received.count(b"data: ") >= 2:  # the role chunk, then the first token's
                    break
            first_token_after = time.monotonic() - start
            received += await resp.read()
        assert 0.3 <= first_token_after < 2.0
        assert first_token_after - headers_after >= 0.2  # headers and the role chunk go out at once
        assert events(received).count(b": keep-alive") >= 2
        assert data_events(received)[-1] == b"[DONE]"

    run(body, first_token_delay_s=0.3, keepalive_s=0.08)


def test_over_max_concurrency_is_429_with_retry_after() -> None:
    async def body(c: Client) -> None:
        slow = asyncio.create_task(c.post(CHAT, chat_body(stream=True, max_tokens=2)))
        deadline = time.monotonic() + 5
        while c.server.stats.active_streams < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        status, headers, raw = await c.post(CHAT, chat_body())
        assert assert_error(status, raw, 429)["code"] == "rate_limit_exceeded"
        assert headers["Retry-After"] == "1"
        assert (await slow)[0] == 200
        assert (await c.post(CHAT, chat_body()))[0] == 200  # capacity is back
        assert c.server.stats.rejected == 1

    run(body, max_concurrency=1, first_token_delay_s=0.4)


def test_client_leaving_mid_stream_frees_its_slot() -> None:
    async def body(c: Client) -> None:
        async with c.session.post(c.url + CHAT, json=chat_body(stream=True, max_tokens=500)) as resp:
            await resp.content.readuntil(b"\n\n")
            resp.close()  # drop the connection with the stream still going
        deadline = time.monotonic() + 5
        while c.server.stats.active_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert c.server.stats.active_streams == 0
        assert c.server.stats.tokens_sent < 500

    run(body, tokens_per_s=200.0)


# --------------------------------------------------------------------------- faults


async def read_until_cut(resp: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    received = b""
    try:
        async for piece in resp.content.iter_any():
            received += piece
    except aiohttp.ClientPayloadError as exc:
        return received, exc
    return received, None


def test_fault_disconnect_after_cuts_the_stream() -> None:
    async def body(c: Client) -> None:
        headers = {FAULT_HEADER: "disconnect_after=10"}
        async with c.session.post(c.url + CHAT, json=chat_body(stream=True), headers=headers) as resp:
            assert resp.status == 200
            received, error = await read_until_cut(resp)
        assert error is not None
        assert len(chunks(received)) == 1 + 10
        assert b"[DONE]" not in received
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await c.post(CHAT, chat_body(max_tokens=20), fault="disconnect_after=10")
        assert c.server.stats.faults_injected == 2

    run(body)


def test_fault_status_answers_with_error_and_retry_after() -> None:
    async def body(c: Client) -> None:
        status, headers, raw = await c.post(CHAT, chat_body(stream=True), fault="status=503")
        assert assert_error(status, raw, 503)["type"] == "server_error"
        assert headers["Retry-After"] == "1"
        async with c.session.get(c.url + "/v1/models", headers={FAULT_HEADER: "status=500"}) as resp:
            assert_error(resp.status, await resp.read(), 500)

    run(body)


def test_fault_first_byte_delay_holds_back_the_headers() -> None:
    async def body(c: Client) -> None:
        start = time.monotonic()
        headers = {FAULT_HEADER: "first_byte_delay_ms=300"}
        async with c.session.post(c.url + CHAT, json=chat_body(stream=True, max_tokens=2), headers=headers) as resp:
            assert time.monotonic() - start >= 0.3
            assert data_events(await resp.read())[-1] == b"[DONE]"

    run(body)


def test_fault_garbage_lines_are_interleaved_and_the_stream_is_intact() -> None:
    async def body(c: Client) -> None:
        status, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=6), fault="garbage=3")
        assert status == 200
        garbage = [e + b"\n\n" for e in events(raw) if not e.startswith(b"data: ")]
        assert garbage == list(GARBAGE_LINES)
        assert len(chunks(raw)) == 1 + 6 + 1 and data_events(raw)[-1] == b"[DONE]"

    run(body)


def test_fault_no_done_ends_after_the_last_chunk() -> None:
    async def body(c: Client) -> None:
        status, _, raw = await c.post(CHAT, chat_body(stream=True, max_tokens=3), fault="no_done")
        assert status == 200
        assert b"[DONE]" not in raw
        assert chunks(raw)[-1]["choices"][0]["finish_reason"] == "length"

    run(body)


def test_global_faults_apply_to_every_request_and_the_header_overrides() -> None:
    async def body(c: Client) -> None:
        assert (await c.post(CHAT, chat_body()))[0] == 503
        assert (await c.post(CHAT, chat_body(), fault="status=429"))[0] == 429
        status, _, raw = await c.post(CHAT, chat_body(), fault="bogus=1")
        assert assert_error(status, raw, 400)["param"] == FAULT_HEADER

    run(body, faults="status=503")


def test_fault_probability_zero_injects_nothing() -> None:
    async def body(c: Client) -> None:
        for _ in range(5):
            assert (await c.post(CHAT, chat_body(max_tokens=2), fault="p=0"))[0] == 200
        assert c.server.stats.faults_injected == 0

    run(body, faults="status=500")


def test_fault_spec_parsing() -> None:
    faults = Faults.parse(" disconnect_after=10, first_byte_delay_ms=500,status=503,garbage=3,no_done,p=0.5 ")
    assert faults == Faults(503, 0.5, 10, 3, True, 0.5)
    assert faults.kinds() == ["status", "first_byte_delay_s", "disconnect_after", "garbage", "no_done"]
    assert Faults.parse("status=503").merged(Faults.parse("garbage=1")) == Faults(status=503, garbage=1)
    for bad in ("status=200", "garbage=-1", "p=2", "no_such=1", "status", "garbage=x"):
        with pytest.raises(ValueError, match="bad fault"):
            Faults.parse(bad)


# --------------------------------------------------------------------------- own process, CLI


def test_serve_in_process_serves_and_stops_cleanly() -> None:
    proc, url = serve_in_process(UpstreamServerConfig(models=("child-model",)))
    try:

        async def models() -> list[str]:
            async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as resp:
                return [m["id"] for m in (await resp.json())["data"]]

        assert uvloop.run(models()) == ["child-model"]
        assert url.startswith("http://127.0.0.1:")
    finally:
        proc.terminate()
        proc.join(10)
    assert proc.exitcode == 0  # SIGTERM is a clean stop, not a kill


def _serve_and_report(conn: Connection) -> None:
    """Child of the test: start the upstream as its own child, report its pid, wait to be killed."""
    proc, _ = serve_in_process(UpstreamServerConfig())
    conn.send(proc.pid)
    conn.recv()  # never answered: the test SIGKILLs this process


def test_serve_in_process_child_dies_with_its_parent() -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    parent = ctx.Process(target=_serve_and_report, args=(theirs,))
    parent.start()
    try:
        assert ours.poll(30)
        server_pid = ours.recv()
    finally:
        parent.kill()
        parent.join()
    assert wait_for(lambda: not alive(server_pid), 5, "the server to die with its parent")


def test_cli_arguments_make_a_config() -> None:
    cfg = _parse_args(["--port", "9000", "--rate", "25", "--model", "a", "--model", "b", "--faults", "no_done"])
    assert (cfg.port, cfg.tokens_per_s, cfg.models, cfg.faults) == (9000, 25.0, ("a", "b"), "no_done")
    assert _parse_args([]).models == UpstreamServerConfig.models
    assert _parse_args(["--decode-steps"]).decode_steps and not _parse_args([]).decode_steps
