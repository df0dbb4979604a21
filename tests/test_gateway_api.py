"""The gateway against a real engine (default topology, embedded upstream), through the official
OpenAI client (sync and async) and raw HTTP: streaming and whole answers as OpenAI gives them,
usage, every error status, 100 concurrent streams, the cache header, the columns extension, health
and the discoverable URL. One engine serves the module (tests/gateway_harness.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid

import httpx
import openai
import pytest
from engine_harness import wait_for
from gateway_harness import GatewayEngine, default_topology, serving

MODEL = "neuralpipe-echo"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from serving(tmp_path_factory, "gw", default_topology(gateway="max_body_bytes = 65536\nbody_timeout_s = 1.0"))


@pytest.fixture
def client(gw):
    with openai.OpenAI(base_url=gw.url, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def ask(text: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 12, **fields}


def test_status_json_gives_the_url_and_health_is_ready_with_pas(gw):
    status = json.loads(gw.cli("status", "--json", "--instance", gw.instance).stdout)
    assert status["gateway"]["url"] == gw.url and gw.url.endswith("/v1")
    answer = httpx.get(gw.url.removesuffix("/v1") + "/health", timeout=10)
    assert answer.status_code == 200
    body = answer.json()
    assert body["ready"] is True and body["engine"] == "running" and 0 <= body["pas"]["score"] <= 1


def test_models_lists_the_upstreams_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_404(client, gw):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("org/no-such-model")  # the client sends the slash as %2F
    assert raised.value.body["code"] == "model_not_found" and "org/no-such-model" in raised.value.body["message"]
    answer = httpx.get(gw.url + "/models/org/no-such-model", timeout=10)  # curl's literal slash
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    long = httpx.get(gw.url + "/models/" + "m" * 4000, timeout=10)
    assert long.status_code == 404 and long.json()["error"]["code"] == "model_not_found" and len(long.content) < 300


def test_chat_whole_and_streamed_as_openai_gives_them(client, gw):
    whole = client.chat.completions.create(**ask("whole and streamed", temperature=0))
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(
        client.chat.completions.create(
            **ask("whole and streamed", temperature=0), stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c for c in chunks if c.choices and c.choices[0].finish_reason] == [chunks[-2]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text  # deterministic

    # OpenAI's newer stream option: accepted (the gateway pads no chunk, so there is nothing to turn off)
    options = {"include_usage": True, "include_obfuscation": False}
    assert list(client.chat.completions.create(**ask("options"), stream=True, stream_options=options))[-1].usage

    # null where OpenAI allows it (clients pass None through): "stream": null is a whole answer
    nulls = httpx.post(gw.url + "/chat/completions", json=ask("nulls", stream=None, stream_options=None), timeout=10)
    assert nulls.status_code == 200 and nulls.json()["object"] == "chat.completion"

    # more stop sequences than OpenAI's 4: local servers take them, and editors' completions send them
    stops = ["<|endoftext|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "\n\n\n", "```"]
    assert client.chat.completions.create(**ask("stops"), stop=stops).choices[0].message.content

    long_reply = {**ask("a long answer may be asked for"), "max_tokens": 65_536}  # the echo model stops on its own
    assert client.chat.completions.create(**long_reply).choices[0].finish_reason == "stop"

    newer = {k: v for k, v in ask("newer name").items() if k != "max_tokens"}
    assert client.chat.completions.create(**newer, max_completion_tokens=7).usage.completion_tokens == 7

    no_usage = list(client.chat.completions.create(**ask("no usage asked"), stream=True))
    assert no_usage[-1].choices[0].finish_reason and all(c.usage is None for c in no_usage)


def test_raw_stream_ends_with_done_and_carries_no_non_json_data(gw):
    with httpx.stream("POST", gw.url + "/chat/completions", json=ask("raw", stream=True), timeout=30) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and all(isinstance(json.loads(d), dict) for d in data[:-1])


def test_several_choices_whole_and_streamed_as_openai_gives_them(client):
    """n = 3: three engine streams answered as one response, choices by index; streamed, each
    choice has its role chunk first and one finish chunk, and usage sums the completions."""
    whole = client.chat.completions.create(**ask("three choices", temperature=0, n=3))
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = {c.message.content for c in whole.choices}
    assert len(texts) == 1 and texts.pop()  # temperature 0: the same answer three times
    assert all(c.finish_reason in ("length", "stop") for c in whole.choices)
    assert whole.usage.completion_tokens == 36 and whole.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(
            **ask("three choices", temperature=0, n=3), stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 36
    for index in range(3):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c for c in mine if c.finish_reason] == [mine[-1]]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[0].message.content

    # seeded: distinct choices, the same again on a repeat; the seed's index step stays in int64
    seeded = [client.chat.completions.create(**ask("seeded", n=2, seed=2**63 - 1)) for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]

    legacy = client.completions.create(model=MODEL, prompt="two", max_tokens=5, n=2)
    assert [c.index for c in legacy.choices] == [0, 1] and legacy.usage.completion_tokens == 10


def test_completions_whole_and_streamed(client, gw):
    whole = client.completions.create(model=MODEL, prompt="legacy completions", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text and whole.usage.completion_tokens == 8
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="legacy completions", max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    # a batch of one prompt, as LangChain's OpenAI LLM sends every prompt
    batch = client.completions.create(model=MODEL, prompt=["legacy completions"], max_tokens=8, temperature=0)
    assert batch.choices[0].text == whole.choices[0].text
    several = httpx.post(gw.url + "/completions", json={"model": MODEL, "prompt": ["a", "b"]}, timeout=10)
    assert _error(several, 422)["param"] == "prompt" and "one prompt" in several.json()["error"]["message"]
    # not a completions field, but ingest checks it on every body: refused here, naming it
    tops = httpx.post(gw.url + "/completions", json={"model": MODEL, "prompt": "a", "top_logprobs": []}, timeout=10)
    assert _error(tops, 422)["param"] == "top_logprobs"


def test_a_hundred_concurrent_streams_all_complete(gw):
    """Plain replies, replies that think first and replies that call a tool, side by side: each
    stream whole and in its order."""
    forced = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "lookup"}}}
    kinds = [{}, {"reasoning_effort": "low"}, forced]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str, str, str, str | None, int]:
        stream = await client.chat.completions.create(
            **ask(f"concurrent {i}", max_tokens=20, **kinds[i % 3]),
            stream=True,
            stream_options={"include_usage": True},
        )
        text, thought, arguments, reason, usage = "", "", "", None, 0
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                text += delta.content or ""
                if not text and not arguments:  # thinking comes first, or not at all
                    thought += (delta.model_extra or {}).get("reasoning_content") or ""
                arguments += "".join(call.function.arguments or "" for call in delta.tool_calls or [])
                reason = chunk.choices[0].finish_reason or reason
            elif chunk.usage:
                usage = chunk.usage.completion_tokens
        return i % 3, text, thought, arguments, reason, usage

    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    before = gw.stats("gateway")["completed"]
    results = asyncio.run(run())
    assert all(reason and usage == 20 for _, _, _, _, reason, usage in results)
    assert all(text and not thought and not arguments for kind, text, thought, arguments, _, _ in results if kind == 0)
    assert all(text and thought for kind, text, thought, _, _, _ in results if kind == 1)
    assert all(not text and json.loads(arguments) for kind, text, _, arguments, _, _ in results if kind == 2)
    assert gw.stats("gateway")["completed"] >= before + 100 or _eventually(
        lambda: gw.stats("gateway")["completed"] >= before + 100
    )


def _eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_repeated_deterministic_request_is_a_cache_hit(client):
    body = ask("cache me " + uuid.uuid4().hex, temperature=0)
    first = client.chat.completions.with_raw_response.create(**body)
    assert first.headers["x-neuralpipe-cache"] == "miss"
    second = client.chat.completions.with_raw_response.create(**body)
    assert second.headers["x-neuralpipe-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    streamed = client.chat.completions.with_raw_response.create(**body, stream=True)
    assert streamed.headers["x-neuralpipe-cache"] == "hit"
    assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a text up.",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    }
]


def _joined_tool_calls(chunks) -> dict[int, dict[str, str]]:
    """The tool calls of a stream, its deltas joined by index as OpenAI's stream helpers join them."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    return calls


def test_tool_calls_whole_and_streamed_and_from_the_cache_as_openai_gives_them(client):
    body = ask("call it " + uuid.uuid4().hex, temperature=0, max_tokens=2000)
    forced = {"type": "function", "function": {"name": "lookup"}}
    whole = client.chat.completions.create(**body, tools=TOOLS, tool_choice=forced)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "lookup" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"text"}
    assert whole.usage.completion_tokens > 0  # the engine's count of the pieces: no usage from the upstream

    streamed = client.chat.completions.with_raw_response.create(
        **body, tools=TOOLS, tool_choice=forced, stream=True, stream_options={"include_usage": True}
    )
    assert streamed.headers["x-neuralpipe-cache"] == "hit"  # the same request: the cache replays the calls
    chunks = list(streamed.parse())
    assert _joined_tool_calls(chunks) == {0: {"id": call.id, "name": "lookup", "arguments": call.function.arguments}}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the official client's stream helper joins the pieces into the same call (a repeated name
    # would come out repeated: it concatenates what each delta carries)
    with client.chat.completions.stream(**body, tools=TOOLS, tool_choice=forced) as stream:
        seen = {event.type for event in stream}
        (helped,) = stream.get_final_completion().choices[0].message.tool_calls
    assert {"tool_calls.function.arguments.delta", "tool_calls.function.arguments.done"} <= seen
    assert (helped.function.name, helped.function.arguments) == ("lookup", call.function.arguments)


def test_a_tool_call_larger_than_a_row_streams_in_pieces_and_answers_whole(client):
    """Before, calls of more than 60 KiB together (what a stream's END row held) ended the stream
    with an error: an agent writing a file through a call lost it. Its pieces are rows now."""
    forced = {"type": "function", "function": {"name": "lookup"}}
    body = ask("a long call " + uuid.uuid4().hex, max_tokens=20_000, tools=TOOLS, tool_choice=forced)
    whole = client.chat.completions.create(**body, extra_body={"ignore_eos": True})
    (call,) = whole.choices[0].message.tool_calls
    assert len(call.function.arguments) > 64 * 1024 and set(json.loads(call.function.arguments)) == {"text"}
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**body, stream=True, extra_body={"ignore_eos": True}))
    (joined,) = _joined_tool_calls(chunks).values()  # a new call id: the upstream names each reply's call anew
    assert joined["name"] == "lookup" and joined["arguments"] == call.function.arguments
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) > 1  # streamed, not at the end


def test_several_choices_each_carry_their_tool_calls(client):
    forced = {"type": "function", "function": {"name": "lookup"}}
    body = ask("two calls", seed=7, n=2, max_tokens=2000, tools=TOOLS, tool_choice=forced)
    whole = client.chat.completions.create(**body)
    calls = [choice.message.tool_calls for choice in whole.choices]
    assert [choice.index for choice in whole.choices] == [0, 1] and all(len(c) == 1 for c in calls)
    assert calls[0][0].function.arguments != calls[1][0].function.arguments  # seeds 7 and 8: two samples
    chunks = list(client.chat.completions.create(**body, stream=True))
    for index, (call,) in enumerate(calls):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        assert _joined_tool_calls(mine)[0]["arguments"] == call.function.arguments


def test_a_conversation_with_tool_calls_and_results_is_answered(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"text": "x"}'}}
    messages = [
        {"role": "user", "content": "look x up"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x is 42"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=5)
    assert reply.choices[0].message.content and reply.choices[0].message.tool_calls is None


def test_a_reasoning_models_thinking_is_relayed_whole_streamed_and_from_the_cache(client):
    """llama.cpp, vLLM and LM Studio stream a reasoning model's thinking as delta.reasoning_content
    (vLLM's newer name: reasoning); the gateway relays it under both names, before the content."""
    body = ask("think " + uuid.uuid4().hex, temperature=0, max_tokens=14, reasoning_effort="low")
    whole = client.chat.completions.create(**body)
    message = whole.choices[0].message
    thought = message.model_extra["reasoning_content"]
    assert thought and message.model_extra["reasoning"] == thought and message.content
    assert whole.usage.completion_tokens == 8 + 6  # the upstream's count: thinking included
    assert whole.usage.completion_tokens_details.reasoning_tokens == 8

    streamed = client.chat.completions.with_raw_response.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    assert streamed.headers["x-neuralpipe-cache"] == "hit"  # the cache replays the thinking too
    chunks = [c for c in streamed.parse() if c.choices]
    deltas = [c.choices[0].delta.model_extra for c in chunks]
    thinking = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    assert "".join(thinking) == thought and [d["reasoning"] for d in deltas if "reasoning" in d] == thinking
    content = [i for i, c in enumerate(chunks) if c.choices[0].delta.content]
    last_thought = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
    assert content and last_thought < content[0]  # thinking first, as the upstream sent it
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content

    fresh = ask("think again " + uuid.uuid4().hex, max_tokens=19, reasoning_effort="medium")
    usage = list(client.chat.completions.create(**fresh, stream=True, stream_options={"include_usage": True}))[-1]
    assert usage.usage.completion_tokens == 16 + 3
    # logprobs are the reply's tokens' (the thinking has none)
    scored = client.chat.completions.create(**fresh, logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert len(content) == 3 and "".join(t.token for t in content) == scored.choices[0].message.content


def test_columns_extension_and_logprobs(client):
    whole = client.chat.completions.create(
        **ask("columns"), logprobs=True, extra_body={"neuralpipe": {"columns": ["conf", "hilbert"]}}
    )
    columns = whole.choices[0].model_extra["neuralpipe"]["columns"]
    assert len(columns["conf"]) == len(columns["hilbert"]) == 12 and all(len(xy) == 2 for xy in columns["hilbert"])
    assert len(whole.choices[0].logprobs.content) == 12
    assert "".join(t.token for t in whole.choices[0].logprobs.content) == whole.choices[0].message.content
    conf = []
    for chunk in client.chat.completions.create(
        **ask("columns"), stream=True, extra_body={"neuralpipe": {"columns": ["conf"]}}
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            conf += chunk.choices[0].model_extra["neuralpipe"]["columns"]["conf"]
    assert len(conf) == 12 and all(0 <= c <= 1 for c in conf)
    with pytest.raises(openai.BadRequestError, match="no column 'nope'"):
        client.chat.completions.create(**ask("columns"), extra_body={"neuralpipe": {"columns": ["nope"]}})


def _error(answer: httpx.Response, status: int) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps(ask("x", max_tokens="5")).encode(), 422, "max_tokens"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 422, "messages"),
        (
            json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(),
            422,
            "messages[0].content",
        ),
        (
            json.dumps({"model": MODEL, "messages": [{"role": "user", "content": None}]}).encode(),
            422,
            "messages[0].content",
        ),
        (
            json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            422,
            "messages[0].role",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 422, "model"),
        (json.dumps(ask("x", n=17)).encode(), 422, "n"),
        (json.dumps(ask("x", max_tokens=131_073)).encode(), 422, "max_tokens"),
        (json.dumps(ask("x", stream="yes")).encode(), 422, "stream"),
        (json.dumps(ask("x", stop=["s"] * 65)).encode(), 422, "stop"),
        (json.dumps(ask("x", n=0)).encode(), 422, "n"),
        (json.dumps(ask("x", temperature=3)).encode(), 422, "temperature"),
        (json.dumps(ask("x", seed=2**64 - 1, n=2)).encode(), 422, "seed"),  # int64, as OpenAI's
        (json.dumps(ask("x", top_logprobs=3)).encode(), 400, "top_logprobs"),  # without logprobs: true
        (json.dumps(ask("x", model="no-such-model")).encode(), 404, "model"),
    ],
)
def test_bad_requests_get_the_openai_error_object(gw, body, status, param):
    error = _error(httpx.post(gw.url + "/chat/completions", content=body, timeout=10), status)
    assert error["param"] == param


def test_unknown_model_raises_not_found_in_the_client(client):
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.chat.completions.create(**ask("x", model="no-such-model"))


def test_oversize_bodies_routes_and_methods(gw):
    big = json.dumps(ask("x" * 100_000)).encode()
    assert _error(httpx.post(gw.url + "/chat/completions", content=big, timeout=10), 413)["code"] == "request_too_large"

    def chunked():
        yield big[:1000]
        yield big[1000:]

    _error(httpx.post(gw.url + "/chat/completions", content=chunked(), timeout=10), 413)  # no Content-Length
    _error(httpx.get(gw.url + "/chat/completions", timeout=10), 405)
    _error(httpx.get(gw.url + "/nothing-here", timeout=10), 404)
    # no cors_origins (the default): a browser's preflight is refused as before, with no CORS headers
    browser = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    preflight = httpx.options(gw.url + "/chat/completions", headers=browser, timeout=10)
    _error(preflight, 405)
    assert not [h for h in preflight.headers if h.lower().startswith("access-control-")]


def test_a_body_that_never_arrives_whole_is_408_not_a_hang(gw):
    host, port = gw.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\":")  # fmt: skip
        started = time.monotonic()
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 408") and '"request_timeout"' in answer
    assert time.monotonic() - started < 5


def test_the_browser_feed_every_stream_then_one_stream_from_its_beginning(gw, client):
    import aiohttp

    feed_url = gw.url + "/feed"

    async def every_stream() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.ws_connect(feed_url + "?stream=all") as ws:
            await asyncio.sleep(0.2)  # subscribed: the gateway's follower is shared, nothing to wait for
            text = (
                (await asyncio.to_thread(client.chat.completions.create, **ask("feed me"))).choices[0].message.content
            )
            rows: dict[int, list] = {}
            while True:
                message = json.loads((await ws.receive(timeout=10)).data)
                assert message["topic"] == "all" and message["header"]["type"] == "batch"
                payload = message["payload"]
                for sid, kind, row_text in zip(payload["stream_id"], payload["kind"], payload["text"], strict=True):
                    rows.setdefault(sid, []).append((kind, row_text))
                    if kind == 3:  # the end row
                        assert "conf" in payload and "hilbert" in payload  # compute's columns, as the broadcast sends
                        return sid, text if "".join(t for k, t in rows[sid] if k == 2) == text else ""

    sid, text = asyncio.run(every_stream())
    assert text

    async def one_stream() -> list[dict]:
        async with aiohttp.ClientSession() as session, session.ws_connect(feed_url + f"?stream={sid}") as ws:
            return [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]

    messages = asyncio.run(one_stream())  # the stream ended already: its whole history, then the close
    assert messages[0]["header"]["type"] == "start" and messages[-1]["header"]["type"] == "end"
    assert "".join(t for m in messages if m["header"]["type"] == "tokens" for t in m["payload"]["text"]) == text
    for junk in ("-3", "9" * 5000, "\u0661\u0662", str(2**63)):  # 5000 digits: beyond int()'s own limit
        bad = httpx.get(feed_url, params={"stream": junk}, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream", junk


def test_choices_past_ingests_capacity_are_refused_and_the_accepted_ones_cancelled(tmp_path):
    """n = 5 against an ingest of 3 streams: 503 engine_busy, and the choices ingest had accepted
    are cancelled, not left streaming for nobody; n = 3 then fits."""
    engine = GatewayEngine(
        tmp_path,
        default_topology(ingest="params.max_streams = 3", embedded="tokens_per_s = 20"),
        "c" + uuid.uuid4().hex[:10],
    )
    try:
        engine.start()
        busy = _error(httpx.post(engine.url + "/chat/completions", json=ask("five", n=5), timeout=30), 503)
        assert busy["code"] == "engine_busy" and "capacity" in busy["message"]

        def settled():
            stats = engine.stats("ingest")
            ended = stats["accepted"] == stats["cancelled"] + stats["completed"]
            return stats["rejected"] >= 1 and stats["active"] == 0 and ended and stats

        stats = wait_for(settled, 10, "the accepted choices to be cancelled")
        assert stats["accepted"] <= 3 and stats["completed"] == 0, stats
        client = openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30)
        assert len(client.chat.completions.create(**ask("three", n=3, max_tokens=2)).choices) == 3
    finally:
        engine.stop()
