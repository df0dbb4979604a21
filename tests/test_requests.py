"""Request validation of the ingest protocol: every bad input is refused with the field named."""

from __future__ import annotations

import orjson
import pytest

from engine.protocol.requests import MAX_REQUEST_BYTES, RequestError, parse_request, validate_body

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def frame(**msg) -> bytes:
    return orjson.dumps(msg)


def test_valid_submit_forces_streaming_and_defaults_to_chat():
    msg = parse_request(frame(type="submit", body={**CHAT, "stream": False}))
    assert msg["endpoint"] == "chat"
    assert msg["body"]["stream"] is True
    assert parse_request(frame(type="submit", body={"prompt": "x"}, endpoint="completions"))["body"]["prompt"] == "x"


def test_long_replies_of_todays_models_may_be_asked_for():
    """Reasoning models write tens of thousands of tokens (gpt-oss and OpenAI's own models allow
    128k): a limit of 32,768 refused such requests and cut such replies."""
    assert validate_body({**CHAT, "max_tokens": 131_072}, "chat")["max_tokens"] == 131_072


def test_an_agents_long_conversation_may_be_sent():
    """An agent's history (a tool call and its result per step) runs to hundreds of messages; the
    request's bytes are bounded anyway (MAX_REQUEST_BYTES)."""
    step = [{"role": "assistant", "content": "call"}, {"role": "tool", "tool_call_id": "c", "content": "ok"}]
    history = [{"role": "user", "content": "go"}, *step * 1000]
    assert len(validate_body({"model": "m", "messages": history}, "chat")["messages"]) == 2001
    with pytest.raises(RequestError, match="at most 4096"):
        validate_body({"model": "m", "messages": history * 3}, "chat")


def test_valid_cancel():
    assert parse_request(frame(type="cancel", stream_id=7))["stream_id"] == 7


@pytest.mark.parametrize(
    ("body", "endpoint", "named"),
    [
        ([], "chat", "body: must be a JSON object"),
        ({"messages": []}, "chat", "body.messages"),
        ({"messages": [{"role": "king", "content": "x"}]}, "chat", "body.messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "chat", "body.messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "chat",
            "body.messages[0].content[0]",
        ),
        ({**CHAT, "max_tokens": 0}, "chat", "body.max_tokens"),
        ({**CHAT, "max_tokens": True}, "chat", "body.max_tokens"),
        ({**CHAT, "max_tokens": 131_073}, "chat", "body.max_tokens"),
        ({**CHAT, "temperature": 3}, "chat", "body.temperature"),
        ({**CHAT, "model": 3}, "chat", "body.model"),
        ({"prompt": ""}, "completions", "body.prompt"),
        (CHAT, "embeddings", "endpoint"),
    ],
)
def test_bad_bodies_name_the_field(body, endpoint, named):
    with pytest.raises(RequestError, match=named.replace("[", r"\[").replace("]", r"\]")):
        validate_body(body, endpoint)


def test_a_long_document_is_bounded_by_the_request_only():
    """A 100k-token document is ~400 KB in one message: before, any content over 256 KiB was refused."""
    long = {"messages": [{"role": "user", "content": "x" * 400_000}]}
    assert validate_body(long, "chat")["messages"] == long["messages"]
    assert parse_request(frame(type="submit", body=long))["body"]["messages"] == long["messages"]
    longer = frame(type="submit", body={"messages": [{"role": "user", "content": "x" * 2_000_000}]})
    with pytest.raises(RequestError, match="exceeds"):
        parse_request(longer)  # the default limit: 1 MiB
    assert parse_request(longer, 4 << 20)["type"] == "submit"  # ingest's max_request_bytes


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"{not json", "not JSON"),
        (b"[1]", "JSON object"),
        (frame(type="launch"), "type"),
        (frame(type="cancel", stream_id="7"), "stream_id"),
        (frame(type="submit", body=CHAT, client=5), "client"),
        (b'"' + b"x" * MAX_REQUEST_BYTES + b'"', "exceeds"),
    ],
)
def test_bad_frames_are_refused(raw, named):
    with pytest.raises(RequestError, match=named):
        parse_request(raw)


def test_model_and_client_names_are_bounded():
    """A 300 KB model name used to be accepted, made a START row larger than the ring's record and
    wedged ingest (issue 13 item 1); every field of a request is bounded."""
    with pytest.raises(RequestError, match=r"body\.model: longer than 256 bytes"):
        parse_request(frame(type="submit", body={**CHAT, "model": "m" * 300_000}))
    with pytest.raises(RequestError, match="client: longer than 256 bytes"):
        parse_request(frame(type="submit", body=CHAT, client="c" * 257))


def test_a_submit_may_carry_the_deadline_its_client_waits_until():
    """``deadline_ns``: CLOCK_MONOTONIC ns, the instant the submitter stops waiting for the reply
    (ingest starts no stream for a submit it reads after it: docs/request-protocol.md)."""
    assert parse_request(frame(type="submit", body=CHAT, deadline_ns=5))["deadline_ns"] == 5
    for bad in (-1, 2**63, True, 1.5, "5", None):
        with pytest.raises(RequestError, match=r"deadline_ns: must be an integer in 0\.\.9223372036854775807"):
            parse_request(frame(type="submit", body=CHAT, deadline_ns=bad))
