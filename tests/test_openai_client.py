"""The streaming client against real HTTP on loopback: the embedded upstream, and small aiohttp
apps that send what other servers send (vLLM, llama.cpp, LM Studio, error bodies, garbage)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web

from engine.protocol.toolcalls import ToolCallJoiner
from shm.batch import stable_token_id
from stages.ingest.openai_client import TokenEvent, stream_completion
from stages.ingest.upstream_server import UpstreamServer, UpstreamServerConfig

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": 1}
PROMPT = {"prompt": "hi", "max_tokens": 6, "seed": 1}


def run(coro) -> object:
    return uvloop.run(asyncio.wait_for(coro, 30))


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def embedded(**cfg) -> AsyncIterator[tuple[UpstreamServer, str]]:
    server = UpstreamServer(UpstreamServerConfig(**cfg))
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def scripted(*chunks: bytes, status: int = 200, content_type: str = "text/event-stream") -> AsyncIterator[str]:
    """A server that answers every POST with ``chunks``, written one by one, then ends the body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def collect(url: str, body: dict, session: aiohttp.ClientSession | None = None, **kw) -> list[TokenEvent]:
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        async with aclosing(stream_completion(session, url, body, **kw)) as events:
            return [event async for event in events]


def chat_events(*chunks: bytes) -> list[TokenEvent]:
    """The events of a chat request to a server that answers it with ``chunks``."""

    async def scenario():
        async with scripted(*chunks) as url:
            return await collect(url, CHAT)

    return run(scenario())


def sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chat_chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
    return sse({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish, **extra}]})  # fmt: skip


DONE = b"data: [DONE]\n\n"


def tokens(events: list[TokenEvent]) -> list[TokenEvent]:
    return [e for e in events if e.kind == "token"]


def check_shape(events: list[TokenEvent], last: str) -> None:
    """One start first, then tokens (a reasoning model's thinking, a tool call's pieces among them),
    then exactly one end or error."""
    assert events[0].kind == "start"
    assert events[-1].kind == last
    assert all(e.kind in ("token", "reasoning", "tool_call") for e in events[1:-1])
    assert all(e.recv_ns > 0 for e in events)


# ----------------------------------------------------------------------------- the embedded upstream


def test_chat_stream_matches_the_whole_answer_with_logprobs_and_usage():
    body = {**CHAT, "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}

    async def scenario():
        async with embedded() as (_, url), aiohttp.ClientSession() as session:
            events = await collect(url, body, session)
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                whole = await resp.json()
        return events, whole

    events, whole = run(scenario())
    check_shape(events, "end")
    got = tokens(events)
    assert "".join(e.text for e in got) == whole["choices"][0]["message"]["content"]
    expected = whole["choices"][0]["logprobs"]["content"]
    assert [e.logprob for e in got] == [x["logprob"] for x in expected]
    assert [len(e.top_logprobs) for e in got] == [2] * len(got)
    assert got[0].top_logprobs[0] == (
        expected[0]["top_logprobs"][0]["token"],
        expected[0]["top_logprobs"][0]["logprob"],
    )
    assert all(e.token_id == stable_token_id(e.text.encode()) for e in got)  # the server sends no ids
    assert events[-1].finish_reason == "length"
    assert events[-1].usage == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}


def test_completions_stream_decodes_logprob_arrays():
    async def scenario():
        async with embedded() as (_, url):
            return await collect(url, {**PROMPT, "logprobs": 3}, endpoint="completions")

    events = run(scenario())
    check_shape(events, "end")
    got = tokens(events)
    assert len(got) == 6
    assert all(e.logprob < 0 and len(e.top_logprobs) == 3 for e in got)
    assert all(e.top_logprobs[0][0] == e.text for e in got)  # the chosen token is listed first


def test_closed_without_done_is_an_error_after_the_tokens():
    async def scenario():
        async with embedded() as (_, url):
            return await collect(url, CHAT, headers={"X-Neuralpipe-Fault": "no_done"})

    events = run(scenario())
    check_shape(events, "error")
    assert len(tokens(events)) == 6
    assert "without [DONE]" in events[-1].error and "finish_reason 'length'" in events[-1].error


def test_connection_cut_mid_stream_is_an_error():
    async def scenario():
        async with embedded() as (_, url):
            return await collect(url, CHAT, headers={"X-Neuralpipe-Fault": "disconnect_after=3"})

    events = run(scenario())
    check_shape(events, "error")
    assert len(tokens(events)) == 3
    assert "lost" in events[-1].error  # the pool adds how many tokens went before (tests/test_pool.py)


def test_injected_llama_cpp_error_line_ends_the_stream_with_its_message():
    async def scenario():
        async with embedded() as (_, url):
            return await collect(url, CHAT, headers={"X-Neuralpipe-Fault": "garbage=1"})

    events = run(scenario())
    check_shape(events, "error")
    assert events[-1].error == "upstream error line: injected garbage"


def test_http_error_status_names_the_status_and_message():
    async def scenario():
        async with embedded() as (_, url):
            return (
                await collect(url, CHAT, headers={"X-Neuralpipe-Fault": "status=503"}),
                await collect(url, {**CHAT, "model": "nope"}),
            )

    unavailable, unknown = run(scenario())
    check_shape(unavailable, "error")
    assert unavailable[-1].error == "HTTP 503 Service Unavailable: injected fault: status 503"
    assert unknown[-1].error.startswith("HTTP 404 Not Found: ") and "nope" in unknown[-1].error


def test_slow_first_byte_beyond_the_idle_timeout_is_an_error_within_it_is_fine():
    slow = {"X-Neuralpipe-Fault": "first_byte_delay_ms=400"}

    async def scenario():
        async with embedded() as (_, url):
            return (
                await collect(url, CHAT, headers=slow, idle_timeout_s=0.1),
                await collect(url, CHAT, headers=slow, idle_timeout_s=5),
            )

    timed_out, fine = run(scenario())
    check_shape(timed_out, "error")
    assert "idle timeout" in timed_out[-1].error
    check_shape(fine, "end")


def test_keepalive_comments_between_tokens_keep_the_stream_alive():
    async def scenario():
        # 5 tokens/s with keep-alives every 50 ms: several comments between tokens, and an idle
        # timeout shorter than the gap between tokens that they reset.
        async with embedded(tokens_per_s=5, keepalive_s=0.05) as (_, url):
            return await collect(url, {**CHAT, "max_tokens": 3}, idle_timeout_s=0.15)

    events = run(scenario())
    check_shape(events, "end")
    assert len(tokens(events)) == 3


def test_connection_refused_is_an_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket is closed

    events = run(collect(f"http://127.0.0.1:{port}", CHAT))
    check_shape(events, "error")
    assert events[-1].error.startswith(f"cannot connect to http://127.0.0.1:{port}/v1/chat/completions")


def test_connections_are_reused_across_streams():
    """Ten streams one after another over one kept connection, counted at the server (the http
    path does not go through the aiohttp session)."""
    peers: set = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = "http://{}:{}".format(*runner.addresses[0][:2])
        try:
            streams = []
            for _ in range(10):
                streams.append(await collect(url, CHAT))
                await asyncio.sleep(0.01)  # the terminator after [DONE] is read, then the connection kept
            return streams
        finally:
            await runner.cleanup()

    streams = run(scenario())
    assert all(events[-1].kind == "end" for events in streams)
    assert len(peers) == 1


def test_closing_the_iterator_closes_the_upstream_response():
    async def scenario():
        async with embedded(tokens_per_s=50) as (server, url), aiohttp.ClientSession() as session:
            got = []
            async with aclosing(stream_completion(session, url, {**CHAT, "max_tokens": 1000})) as events:
                async for event in events:
                    got.append(event)
                    if len(got) == 3:
                        break
            # The server notices when its next write fails: its stream ends long before 1000 tokens.
            await wait_until(lambda: server.stats.active_streams == 0)
            return got, server.stats.tokens_sent

    got, sent = run(scenario())
    assert [e.kind for e in got] == ["start", "token", "token"]
    assert sent < 100


# ----------------------------------------------------------------------------- other servers' quirks


def test_lm_studio_style_stream_with_fingerprint_null_content_and_keepalive_comments():
    stream = [
        b": keep-alive\n\n",
        chat_chunk({"role": "assistant", "content": None}, system_fingerprint="fp"),
        b":\n\n",
        chat_chunk({"content": "Hel"}, system_fingerprint="fp"),
        chat_chunk({"content": "lo"}, system_fingerprint="fp"),
        chat_chunk({}, finish="stop", system_fingerprint="fp"),
        DONE,
    ]

    events = chat_events(*stream)
    check_shape(events, "end")
    assert [(e.text, e.token_id) for e in tokens(events)] == [
        ("Hel", stable_token_id(b"Hel")),
        ("lo", stable_token_id(b"lo")),
    ]
    assert math.isnan(tokens(events)[0].logprob)
    assert events[-1].finish_reason == "stop" and events[-1].usage is None


def test_vllm_style_several_tokens_per_delta_token_ids_and_usage_only_last_chunk():
    entries = [{"token": t, "logprob": -0.5, "top_logprobs": [{"token": t, "logprob": -0.5}]} for t in ("a", "b")]
    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    stream = [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "ab"}, logprobs={"content": entries}, token_ids=[7, 8]),
        chat_chunk({"content": "c"}, logprobs={"content": [{"token": "token_id:42", "logprob": -1.0}]}),
        chat_chunk({"content": ""}, finish="length"),
        sse({"id": "c1", "choices": [], "usage": usage}),
        DONE,
    ]

    events = chat_events(*stream)
    check_shape(events, "end")
    assert [(e.text, e.token_id, e.logprob) for e in tokens(events)] == [
        ("a", 7, -0.5),
        ("b", 8, -0.5),
        ("c", 42, -1.0),
    ]
    assert tokens(events)[0].top_logprobs == (("a", -0.5),)
    assert events[-1].finish_reason == "length" and events[-1].usage == usage


def test_tool_call_deltas_are_relayed_as_pieces_in_order_and_join_into_the_calls():
    """vLLM/OpenAI stream a tool call as deltas: the first with its id, type and name, then pieces of
    the arguments; content may come before or beside them. Nothing of it may be dropped: each piece
    is a "tool_call" event (its text the piece's JSON), after the content of its delta."""
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    stream = [
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk({"content": "Checking.", "tool_calls": [first]}),  # both in one delta: neither lost
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}),
        chat_chunk({"content": None, "tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}),
        chat_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "now"}}]}),
        chat_chunk({}, finish="tool_calls"),
        DONE,
    ]

    events = chat_events(*stream)
    check_shape(events, "end")
    assert [e.kind for e in events[1:-1]] == ["token"] + ["tool_call"] * 4
    assert [e.text for e in tokens(events)] == ["Checking."]
    assert events[-1].finish_reason == "tool_calls"
    pieces = [orjson.loads(e.text) for e in events if e.kind == "tool_call"]
    assert pieces[0] == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "lookup", "arguments": ""},
    }
    assert pieces[1] == {"index": 0, "function": {"arguments": '{"q": '}}
    joined = ToolCallJoiner()
    for e in events:
        if e.kind == "tool_call":
            joined.add(e.text)
    assert joined.result() == [
        {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}},
    ]


def test_a_call_id_and_name_repeated_in_every_piece_are_sent_once():
    """llama-cpp-python repeats the call's id and name in every piece: relayed as they came, a client
    that joins pieces (the official client's stream helpers) would read the name ten times over."""
    piece = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": "x"}}
    events = chat_events(*[chat_chunk({"tool_calls": [piece]})] * 3, chat_chunk({}, finish="tool_calls"), DONE)
    pieces = [orjson.loads(e.text) for e in events if e.kind == "tool_call"]
    assert pieces[0]["function"] == {"name": "lookup", "arguments": "x"} and pieces[0]["id"] == "call_a"
    assert pieces[1:] == [{"index": 0, "function": {"arguments": "x"}}] * 2


def test_reasoning_pieces_are_relayed_as_reasoning_events_before_the_content():
    """llama.cpp, vLLM and LM Studio send a reasoning model's thinking as delta.reasoning_content
    (vLLM's newer name: reasoning): each piece is a "reasoning" event, in order with the tokens."""
    stream = [
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk({"content": None, "reasoning_content": "Let me"}),
        chat_chunk({"reasoning": " think."}),
        chat_chunk({"reasoning_content": " So:", "content": "Yes"}),  # the turn: both in one delta
        chat_chunk({"content": "."}),
        chat_chunk({}, finish="stop"),
        DONE,
    ]

    events = chat_events(*stream)
    check_shape(events, "end")
    kinds_and_texts = [(e.kind, e.text) for e in events[1:-1]]
    assert kinds_and_texts == [
        ("reasoning", "Let me"),
        ("reasoning", " think."),
        ("reasoning", " So:"),
        ("token", "Yes"),
        ("token", "."),
    ]
    # several pieces in one read keep their order and kinds
    one_read = b"".join(stream)
    assert [(e.kind, e.text) for e in chat_events(one_read)[1:-1]] == kinds_and_texts


def test_a_reasoning_piece_that_is_not_text_ends_the_stream_with_an_error():
    events = chat_events(chat_chunk({"reasoning_content": 7}), chat_chunk({}, finish="stop"), DONE)
    check_shape(events, "error")
    assert "reasoning" in events[-1].error


@pytest.mark.parametrize(
    ("delta", "named"),
    [
        ({"tool_calls": {"index": 0}}, "tool_calls"),
        ({"tool_calls": [{"index": "0", "function": {"arguments": "x"}}]}, "tool call index"),
        ({"tool_calls": [{"index": 99999, "function": {"arguments": "x"}}]}, "tool call index"),
        ({"tool_calls": [{"index": 0, "function": {"arguments": 7}}]}, "tool call"),
        ({"tool_calls": [{"index": 0, "function": "lookup"}]}, "tool call"),
        ({"function_call": {"name": "lookup", "arguments": "{}"}}, "function_call"),
    ],
)
def test_a_malformed_or_unsupported_tool_call_ends_the_stream_with_an_error_naming_it(delta, named):
    stream = [chat_chunk({"role": "assistant"}), chat_chunk(delta), chat_chunk({}, finish="tool_calls"), DONE]

    events = chat_events(*stream)
    check_shape(events, "error")
    assert named in events[-1].error


def test_tool_call_arguments_of_any_length_are_relayed():
    """Before, calls of more than 60 KiB together (what a stream's END row held) ended the stream
    with an error: an agent writing a file through a call lost it. Each piece is its own row now."""
    piece = {"index": 0, "function": {"arguments": "x" * 40_000}}
    first = {**piece, "id": "c", "type": "function"}
    stream = [chat_chunk({"tool_calls": [first]}), *[chat_chunk({"tool_calls": [piece]})] * 3]

    events = chat_events(*stream, chat_chunk({}, finish="tool_calls"), DONE)
    check_shape(events, "end")
    assert sum(len(orjson.loads(e.text)["function"]["arguments"]) for e in events[1:-1]) == 160_000


def test_llama_cpp_style_ids_then_error_line_split_across_writes():
    entry = {"id": 1234, "token": " hi", "logprob": -0.1, "bytes": [32, 104, 105], "top_logprobs": []}
    error_line = b'error: {"code":500,"message":"slot crashed","type":"server_error"}\n\n'
    stream = [chat_chunk({"content": " hi"}, logprobs={"content": [entry]}), error_line[:4], error_line[4:]]

    events = chat_events(*stream)
    check_shape(events, "error")
    assert [(e.text, e.token_id) for e in tokens(events)] == [(" hi", 1234)]
    assert events[-1].error == "upstream error line: slot crashed"


def test_data_chunk_with_an_error_object_is_an_error():
    stream = [chat_chunk({"content": "x"}), sse({"error": {"message": "overloaded", "code": 503}})]

    events = chat_events(*stream)
    check_shape(events, "error")
    assert events[-1].error == "upstream error: overloaded"


def test_event_split_byte_by_byte_still_decodes():
    stream = chat_chunk({"content": "é"}) + b": ping\n\n" + chat_chunk({"content": "!"}) + DONE

    async def scenario():
        async with scripted(*(stream[i : i + 1] for i in range(len(stream)))) as url:
            return await collect(url, CHAT)

    events = run(scenario())
    check_shape(events, "end")
    assert [e.text for e in tokens(events)] == ["é", "!"]


def test_malformed_json_chunk_is_an_error():
    async def scenario():
        async with scripted(chat_chunk({"content": "x"}), b'data: {"choices": [\n\n', DONE) as url:
            return await collect(url, CHAT)

    events = run(scenario())
    check_shape(events, "error")
    assert events[-1].error.startswith("malformed JSON chunk from upstream: ")


def test_garbage_line_is_an_error_naming_it():
    async def scenario():
        async with scripted(chat_chunk({"content": "x"}), b"<html><body>502 Bad Gateway</body></html>\n", DONE) as url:
            return await collect(url, CHAT)

    events = run(scenario())
    check_shape(events, "error")
    assert len(tokens(events)) == 1
    assert events[-1].error == "garbage line in the event stream: '<html><body>502 Bad Gateway</body></html>'"


def test_error_bodies_of_each_server_shape():
    cases = [
        (500, b'{"error": {"message": "boom", "type": "server_error"}}', "HTTP 500 Internal Server Error: boom"),
        (
            400,
            b'{"object": "error", "message": "bad temperature", "code": 400}',
            "HTTP 400 Bad Request: bad temperature",
        ),
        (400, b'{"error": "Model not loaded"}', "HTTP 400 Bad Request: Model not loaded"),
        (502, b"upstream connect error\n", "HTTP 502 Bad Gateway: upstream connect error"),
    ]

    async def scenario():
        found = []
        for status, body, _ in cases:
            async with scripted(body, status=status, content_type="application/json") as url:
                found.append((await collect(url, CHAT))[-1].error)
        return found

    assert run(scenario()) == [expected for _, _, expected in cases]


def test_a_json_answer_to_a_streaming_request_is_an_error():
    async def scenario():
        async with scripted(b'{"choices": []}', content_type="application/json") as url:
            return await collect(url, CHAT)

    events = run(scenario())
    check_shape(events, "error")
    assert events[-1].error.startswith("HTTP 200 without a stream")


@contextlib.asynccontextmanager
async def gzipping(always: bool) -> AsyncIterator[str]:
    """A server that compresses its stream with gzip, as a proxy in front of a model server may
    (RFC 9110: a request without Accept-Encoding accepts any coding): unless the request asked
    for identity, or whatever it asked (``always``)."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        body = chat_chunk({"role": "assistant", "content": "hi"}) + chat_chunk({}, "stop") + DONE
        if always or request.headers.get("Accept-Encoding", "").strip().lower() != "identity":
            headers = {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
            return web.Response(body=gzip.compress(body), headers=headers)
        return web.Response(body=body, headers={"Content-Type": "text/event-stream"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("always", [False, True])
def test_a_compressed_stream_is_never_read_as_text(always):
    """The plain-HTTP path sent no Accept-Encoding, so a compressing proxy could gzip the stream,
    and its bytes were parsed as SSE ("garbage line" at best). It asks for identity now, and a
    body compressed anyway is an error naming its Content-Encoding."""

    async def scenario():
        async with gzipping(always) as url:
            return await collect(url, CHAT)

    events = run(scenario())
    if always:
        check_shape(events, "error")
        assert "Content-Encoding 'gzip'" in events[-1].error, events[-1].error
    else:
        check_shape(events, "end")
        assert [e.text for e in tokens(events)] == ["hi"]
