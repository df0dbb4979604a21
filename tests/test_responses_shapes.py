"""stages/gateway/responses.py's shaper on its own: the events of a reply with thinking, text and
two tool calls, decoded as a client would (every event valid JSON, sequence numbers in order, each
delta where its item is), and the closing response whole; the request's translation to chat."""

from __future__ import annotations

import orjson
import pytest

from engine.protocol.openai_errors import ApiError
from engine.protocol.toolcalls import piece_text
from stages.gateway.responses import ResponsesShaper, chat_body, validate_responses
from stages.gateway.shapes import Usage
from stages.gateway.validation import Invalid

IMAGE = {"type": "input_image", "image_url": "u"}


def _events(raw: bytes) -> list[dict]:
    out = []
    for block in raw.split(b"\n\n"):
        if block:
            kind, data = block.split(b"\n", 1)
            event = orjson.loads(data.removeprefix(b"data: "))
            assert kind == b"event: " + event["type"].encode()
            out.append(event)
    return out


def test_a_reply_with_thinking_text_and_calls_streams_as_the_responses_api_does():
    shaper = ResponsesShaper(validate_responses({"model": "m", "input": "hi", "tools": [{"type": "function"}]}))
    raw = shaper.role() + shaper.reasoning("let me ") + shaper.reasoning('"think"')
    raw += shaper.content("Hello") + shaper.content(", world\n")
    first = piece_text(0, '{"a": ', call_id="call_a", name="f")
    second = piece_text(1, '{"b": 2}', call_id="call_b", name="g")
    raw += shaper.tool_call_pieces([first, piece_text(0, "1}")]) + shaper.tool_call_pieces([second])
    raw += shaper.finish("tool_calls") + shaper.closing(Usage(7, 9, False, reasoning_tokens=2))
    events = _events(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas: dict[int, str] = {}
    for event in events:
        if event["type"].endswith(".delta"):
            deltas[event["output_index"]] = deltas.get(event["output_index"], "") + event["delta"]
    assert deltas == {0: 'let me "think"', 1: "Hello, world\n", 2: '{"a": 1}', 3: '{"b": 2}'}
    done = events[-1]
    assert done["type"] == "response.completed" and done["response"]["status"] == "completed"
    output = done["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call", "function_call"]
    assert output[0]["content"][0]["text"] == 'let me "think"'
    assert output[1]["content"][0]["text"] == "Hello, world\n"
    assert [(c["call_id"], c["name"], c["arguments"]) for c in output[2:]] == [
        ("call_a", "f", '{"a": 1}'),
        ("call_b", "g", '{"b": 2}'),
    ]
    assert done["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [item["status"] for item in added] == ["in_progress"] * 4 and added[2]["arguments"] == ""


@pytest.mark.parametrize(("finish", "why"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_a_reply_cut_short_is_incomplete_and_says_why(finish, why):
    shaper = ResponsesShaper(validate_responses({"model": "m", "input": "hi"}))
    raw = shaper.role() + shaper.content("cut") + shaper.finish(finish) + shaper.closing(Usage(1, 1, False))
    last = _events(raw)[-1]
    assert last["type"] == "response.incomplete" and last["response"]["incomplete_details"] == {"reason": why}
    shaper.choice("cut", finish)
    assert shaper.whole([], Usage(1, 1, False))["status"] == "incomplete"


def test_a_failure_mid_stream_carries_what_was_written_and_the_error():
    shaper = ResponsesShaper(validate_responses({"model": "m", "input": "hi"}))
    raw = shaper.role() + shaper.content("partial") + shaper.error(ApiError(503, "upstream lost", "server_error"))
    failed = _events(raw)[-1]
    assert failed["type"] == "response.failed" and failed["error"]["message"] == "upstream lost"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["output"][0]["content"][0]["text"] == "partial"


def test_a_request_becomes_the_chat_request_it_asks_for():
    req = validate_responses(
        {
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"role": "developer", "content": "rules"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "at"}, IMAGE]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
            ],
            "max_output_tokens": 50,
            "tools": [{"type": "function", "name": "f", "parameters": {}}],
            "tool_choice": {"type": "function", "name": "f"},
            "reasoning": {"effort": "high"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {}}},
            "seed": 4,
            "store": False,
            "metadata": {"k": "v"},
        }
    )
    body = chat_body(req)
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][2]["content"] == "look"  # one text part: a string, as every template reads
    assert body["messages"][3]["content"] == [
        {"type": "text", "text": "at"},
        {"type": "image_url", "image_url": {"url": "u"}},
    ]
    assert [c["id"] for c in body["messages"][4]["tool_calls"]] == ["c1", "c2"]  # one assistant turn
    assert body["messages"][5] == {"role": "tool", "tool_call_id": "c1", "content": "one"}
    assert body["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert (body["max_tokens"], body["reasoning_effort"], body["seed"]) == (50, "high", 4)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}
    assert "store" not in body and "metadata" not in body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"model": "m", "input": [{"type": "file_search_call"}]}, "input[0]"),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"model": "m"}, "input"),
        ([1, 2], None),
    ],
)
def test_what_is_not_served_is_named(body, param):
    with pytest.raises(Invalid) as refused:
        chat_body(validate_responses(body))
    assert refused.value.param == param
