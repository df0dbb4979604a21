"""OpenAI's Responses API (``POST /v1/responses``) through a real engine (default topology, the
embedded upstream), with the official client: whole and streamed (the client's own ``stream()``
helper assembles the events), instructions and a conversation with tool calls in ``input``,
function tools, a reasoning model's thinking as a reasoning item, and the errors: what is not
served is named. A failure mid-stream is in tests/test_gateway_upstream.py."""

from __future__ import annotations

import asyncio
import json
import uuid

import openai
import pytest
from gateway_harness import serving

MODEL = "neuralpipe-echo"
ROOM = 4096  # max_output_tokens above any natural reply of the embedded upstream
TOOL = {
    "type": "function",
    "name": "echo",
    "description": "say it back",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from serving(tmp_path_factory, "gwresp")


@pytest.fixture
def client(gw):
    with openai.OpenAI(base_url=gw.url, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.mark.timeout(60)
def test_a_whole_response_has_the_chat_answers_text_and_usage(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "respond whole"}], max_tokens=9, seed=3
    )
    response = client.responses.create(model=MODEL, input="respond whole", max_output_tokens=9, extra_body={"seed": 3})
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.output_text == chat.choices[0].message.content  # the same chat stream underneath
    assert [item.type for item in response.output] == ["message"]
    assert response.usage.output_tokens == chat.usage.completion_tokens == 9
    assert response.usage.total_tokens == response.usage.input_tokens + 9
    truncated = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if truncated else "completed")
    assert (response.incomplete_details is not None) == truncated


@pytest.mark.timeout(60)
def test_a_streamed_response_is_assembled_by_the_clients_stream_helper(client):
    # room for the reply to end of itself ("response.completed"; the client's helper has no final
    # response for a stream cut short, which ends with "response.incomplete" as OpenAI's does)
    whole = client.responses.create(model=MODEL, input="respond streamed", max_output_tokens=ROOM)
    with client.responses.stream(model=MODEL, input="respond streamed", max_output_tokens=ROOM) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text != ""
    assert final.id == events[0].response.id and final.usage.output_tokens == whole.usage.output_tokens > 0


@pytest.mark.timeout(60)
def test_the_async_client_streams_a_response_too(gw):
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0, timeout=30)
        async with client, client.responses.stream(model=MODEL, input="async", max_output_tokens=ROOM) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        return "".join(deltas), final.output_text

    streamed, final = asyncio.run(run())
    assert streamed == final != ""


@pytest.mark.timeout(90)
def test_100_concurrent_streamed_responses_each_complete_with_their_own_items(gw):
    """Plain, thinking and tool-calling replies at once, each stream's events its own."""
    forced = {"type": "function", "name": "echo"}
    extra = [{}, {"reasoning": {"effort": "low"}}, {"tools": [TOOL], "tool_choice": forced}]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, list[str], int, list[int]]:
        stream = await client.responses.create(
            model=MODEL, input=f"concurrent {i} {uuid.uuid4().hex}", max_output_tokens=20, stream=True, **extra[i % 3]
        )
        kinds, sequence = [], []
        async for event in stream:
            sequence.append(event.sequence_number)
            if event.type == "response.output_item.added":
                kinds.append(event.item.type)
            if event.type in ("response.completed", "response.incomplete"):
                tokens = event.response.usage.output_tokens
        return i % 3, kinds, tokens, sequence

    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    expected = {0: ["message"], 1: ["reasoning", "message"], 2: ["function_call"]}
    for kind, items, tokens, sequence in asyncio.run(run()):
        assert items == expected[kind] and tokens == 20 and sequence == list(range(len(sequence)))


@pytest.mark.timeout(60)
def test_logprobs_when_included_streamed_and_whole_as_chat_gives_them(client):
    ask = {"model": MODEL, "input": "with logprobs", "max_output_tokens": 6, "top_logprobs": 2}
    ask["include"] = ["message.output_text.logprobs"]
    whole = client.responses.create(**ask)
    entries = whole.output[0].content[0].logprobs
    messages = [{"role": "user", "content": "with logprobs"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2)
    expected = chat.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in expected]
    assert all(len(e.top_logprobs) == 2 for e in entries)
    with client.responses.stream(**ask) as stream:
        events = list(stream)
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in done.logprobs]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = client.responses.create(model=MODEL, input="without", max_output_tokens=3)
    assert plain.output[0].content[0].logprobs == []


@pytest.mark.timeout(60)
def test_instructions_and_a_conversation_with_tool_calls_in_input(client):
    response = client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "call echo"}]},
            {"type": "function_call", "call_id": "call_1", "name": "echo", "arguments": '{"text": "hi"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "hi"},
            {"type": "reasoning", "id": "rs_1", "summary": []},  # earlier thinking: not sent on
            {"role": "user", "content": "and now?"},
        ],
        tools=[TOOL],
        max_output_tokens=5,
    )
    assert response.output_text and response.usage.output_tokens == 5
    assert response.instructions == "You are terse." and response.tools[0].name == "echo"


@pytest.mark.timeout(60)
def test_a_function_call_whole_and_streamed(client):
    forced, room = {"type": "function", "name": "echo"}, {"max_output_tokens": ROOM}
    whole = client.responses.create(model=MODEL, input="use the tool", tools=[TOOL], tool_choice=forced, **room)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "echo" and calls[0].call_id
    assert set(json.loads(calls[0].arguments)) == {"text"}
    with client.responses.stream(model=MODEL, input="use the tool", tools=[TOOL], tool_choice=forced, **room) as stream:
        events = list(stream)
        final = stream.get_final_response()
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    streamed = next(item for item in final.output if item.type == "function_call")
    assert pieces == done.arguments == streamed.arguments == calls[0].arguments  # one request, one answer
    assert streamed.name == "echo" and streamed.status == "completed"


@pytest.mark.timeout(60)
def test_a_reasoning_models_thinking_is_a_reasoning_item(client):
    response = client.responses.create(
        model=MODEL, input="think first", reasoning={"effort": "low"}, max_output_tokens=20
    )
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text and response.output_text
    assert response.usage.output_tokens_details.reasoning_tokens == 8  # the embedded upstream's "low"
    with client.responses.stream(
        model=MODEL, input="think first", reasoning={"effort": "low"}, max_output_tokens=20
    ) as stream:
        events = list(stream)
    thinking = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thinking == response.output[0].content[0].text


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": [{"type": "computer_call_output"}]}, "input[0]"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
        ({"input": ""}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"background": True}, "background"),
    ],
)
def test_what_is_not_served_or_not_valid_is_named(client, fields, param):
    body = {"model": MODEL, "input": "hello"} | fields
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.post("/responses", body=body, cast_to=object)
    assert refused.value.body["param"] == param and refused.value.body["code"] == "invalid_value"


@pytest.mark.timeout(60)
def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.create(model="no-such-model", input="hello")
    assert refused.value.body["code"] == "model_not_found"
