"""Ingest's usual read in C (stages/ingest/chunk.c): a read of one ``data:`` event carrying one
content token is decoded in one call, and every read, hostile ones included, gives exactly what the
Python path (SSEParser.feed_plain and _ChunkDecoder.decode, the reference) gives."""

from __future__ import annotations

import json
import math
import time
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.ingest import corpus, openai_client
from stages.ingest.openai_client import MAX_EVENT_BYTES, Tokens, UpstreamError, _BodyReader, _ChunkDecoder
from stages.ingest.sse import SSEParser
from stages.ingest.upstream_server import _Shape, parse_request

usual_token = openai_client.usual_token
pytestmark = pytest.mark.timeout(120)


def test_the_usual_read_is_built():
    # setup.py builds it wherever pip install -e . finds a C compiler (tools/test.sh's machines do)
    assert usual_token is not None, "stages/ingest/chunk.c is not built: pip install -e . with gcc"


def event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chat_chunk(**choice) -> dict:
    """A chunk as OpenAI, vLLM and the embedded upstream send it, ``choice`` changed."""
    base = {"index": 0, "delta": {"content": " hi"}, "logprobs": None, "finish_reason": None}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [base | choice],
    }


def test_the_embedded_upstreams_token_chunks_are_the_usual_read():
    for chat in (True, False):
        body = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
        request = parse_request(body | {"max_tokens": 3, "stream_options": {"include_usage": True}}, chat, ("m",))
        shape = _Shape(request, corpus.sample(request.key, 3, ignore_eos=True))
        token = shape.token(0)
        assert usual_token(token, chat, MAX_EVENT_BYTES) == shape.sample.tokens[0]
        assert usual_token(token, not chat, MAX_EVENT_BYTES) is None  # a chat chunk has no "text", and back
        assert usual_token(shape.head() or shape.token(0)[:-1], chat, MAX_EVENT_BYTES) is None


@pytest.mark.parametrize(
    ("why", "read"),
    [
        ("the role chunk", event(chat_chunk(delta={"role": "assistant", "content": ""}))),
        ("an empty content", event(chat_chunk(delta={"content": ""}))),
        ("a finish reason", event(chat_chunk(finish_reason="stop"))),
        ("logprobs", event(chat_chunk(logprobs={"content": [{"token": " hi", "logprob": -1.0}]}))),
        ("token ids", event(chat_chunk(token_ids=[5]))),
        ("a second choice index", event(chat_chunk(index=1))),
        ("an index that is not an integer", event(chat_chunk(index=0.0))),
        ("a usage", event(chat_chunk() | {"usage": {"prompt_tokens": 1, "completion_tokens": 1}})),
        ("an error", event(chat_chunk() | {"error": {"message": "boom"}})),
        ("reasoning beside the content", event(chat_chunk(delta={"content": "a", "reasoning_content": "b"}))),
        ("a content that is not a string", event(chat_chunk(delta={"content": 7}))),
        ("two choices", event({"choices": [chat_chunk()["choices"][0]] * 2})),
        ("no choices", event({"choices": []})),
        ("a chunk that is not an object", event([1, 2])),
        ("two events", event(chat_chunk()) * 2),
        ("a CR line end", event(chat_chunk()).replace(b"\n", b"\r\n")),
        ("no space after the colon", event(chat_chunk()).replace(b"data: ", b"data:")),
        ("one line end", event(chat_chunk())[:-1]),
        ("a comment before", b": ping\n" + event(chat_chunk())),
        ("not JSON", b"data: {nope\n\n"),
        ("invalid UTF-8", b'data: {"choices":[{"delta":{"content":"\xff"}}]}\n\n'),
        ("too short", b"data: \n\n"),
    ],
)
def test_any_other_read_goes_the_python_way(why, read):
    assert usual_token(read, True, MAX_EVENT_BYTES) is None, why


def test_a_null_usage_and_missing_optional_fields_are_still_the_usual_read():
    assert usual_token(event(chat_chunk() | {"usage": None}), True, MAX_EVENT_BYTES) == " hi"
    assert usual_token(event({"choices": [{"delta": {"content": "x"}}]}), True, MAX_EVENT_BYTES) == "x"
    assert usual_token(event({"choices": [{"text": "y", "index": 0}]}), False, MAX_EVENT_BYTES) == "y"


def test_a_line_longer_than_the_events_limit_goes_the_python_way():
    read = event(chat_chunk())
    assert usual_token(read, True, len(read) - 2) == " hi"
    assert usual_token(read, True, len(read) - 3) is None


def test_wrong_arguments_are_a_type_error():
    with pytest.raises(TypeError, match="usual_token"):
        usual_token("data: x\n\n", True, 10)
    with pytest.raises(TypeError, match="usual_token"):
        usual_token(b"data: x\n\n", True)


def test_an_id_waiting_for_its_blank_line_keeps_the_fast_paths_out():
    """feed_plain (and the C path) leave the parser's last event ID as it is: a read after an
    ``id:`` line is the full parser's, which dispatches the id with the event."""
    parser = SSEParser()
    parser.feed(b"data: a\n\n")
    assert parser.plain
    parser.feed(b"id: 7\n")
    assert not parser.plain
    assert parser.feed_plain(b"data: b\n\n") is None
    assert [e.id for e in parser.feed(b"data: b\n\n")] == ["7"]
    assert parser.last_event_id == "7" and parser.plain


# ---- any read: the same outcome with and without the C path ---------------------------------

# Chunks near the usual one (each field of it may be dropped or changed, one more may come), so
# that most examples differ from it in one or two places: where a fast path would go wrong.
content = st.one_of(st.text(max_size=4), st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2))


def near(usual: dict, changes: dict) -> st.SearchStrategy[dict]:
    """``usual`` with one of its keys dropped or not, and one of ``changes`` (key -> values), or
    several, applied or none."""
    one_change = [st.builds(lambda value, key=key: {key: value}, values) for key, values in changes.items()]
    return st.builds(
        lambda drop, changed: {k: v for k, v in usual.items() if k not in drop} | changed,
        st.sets(st.sampled_from(sorted(usual)), max_size=1),
        st.one_of(st.just({}), *one_change, st.fixed_dictionaries({}, optional=changes)),
    )


delta = near(
    {"content": " hi"},
    {
        "content": content,
        "role": st.just("assistant"),
        "reasoning_content": st.text(max_size=3),
        "tool_calls": st.just([]),
    },
)
choice = near(
    {"index": 0, "delta": {"content": " hi"}, "text": " hi", "logprobs": None, "finish_reason": None},
    {
        "index": st.sampled_from([0, 1, False, 0.0, "0", 2**70, None]),
        "delta": st.one_of(delta, st.none(), st.text(max_size=2)),
        "text": content,
        "finish_reason": st.sampled_from([None, "", "stop"]),
        "logprobs": st.sampled_from([None, {}, [], {"content": []}, {"content": None}]),
        "token_ids": st.sampled_from([None, [], [1]]),
    },
)
chunk = st.builds(
    lambda obj, choices: {"choices": choices} | obj,  # obj may drop or change the choices
    near(
        {"id": "chatcmpl-1", "object": "chat.completion.chunk"},
        {
            "choices": st.one_of(st.lists(choice, max_size=2), st.none(), choice),
            "usage": st.sampled_from([None, {}, 0, {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}]),
            "error": st.sampled_from([None, "", 0, {"message": "x"}]),
        },
    ),
    st.lists(choice, min_size=1, max_size=1),
)
frame = st.one_of(
    st.just(b"data: %s\n\n"),
    st.sampled_from(
        [
            b"data:%s\n\n",
            b"data: %s\n",
            b"data: %s\r\n\r\n",
            b"data: %s\n\ndata: %s\n\n",
            b": c\ndata: %s\n\n",
        ]
    ),
)
# the standard library's JSON: orjson refuses integers past 64 bits, which an upstream may send
framed = st.builds(
    lambda f, obj: f.replace(b"%s", json.dumps(obj).encode()), frame, st.one_of(chunk, chunk, chunk, st.integers())
)
reads = st.lists(
    st.one_of(
        framed,
        framed,
        framed,
        framed,
        st.binary(max_size=40),
        st.builds(lambda b: b"data: " + b + b"\n\n", st.binary()),
    ),
    min_size=1,
    max_size=4,
)


def outcome(reads: list[bytes], chat: bool, one_token: bool = False) -> list:
    """What a reader makes of ``reads``: each read's tokens, its error, the decoder's state.
    ``one_token``: the reader has a sink for one-token reads too (what ingest gives it); what
    that gets is taken as the Tokens the sink would have had."""
    got = []
    one = (lambda text, recv_ns: got.append(Tokens.single(text, recv_ns)) and None) if one_token else None
    reader = _BodyReader(_ChunkDecoder(chat), lambda tokens: got.append(tokens) and None, one)
    reader.feed(b": opened\n")  # a stream's first read is the full parser's (it may open with a BOM)
    for read in reads:
        try:
            reader.feed(read)
        except UpstreamError as exc:
            got.append(("error", str(exc)))
            break
    decoder = reader.decoder
    tokens = [
        (t.texts, t.ids, [None if math.isnan(x) else x for x in t.logprobs], t.tops, t.kinds)
        if not isinstance(t, tuple)
        else t
        for t in got
    ]
    return [tokens, decoder.finish_reason, decoder.usage, decoder.tokens, reader.complete, reader.parser.last_event_id]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads=reads, chat=st.booleans(), one_token=st.booleans())
def test_every_read_gives_what_the_python_path_gives(reads, chat, one_token):
    with_c = outcome(reads, chat, one_token)
    with mock.patch.object(openai_client, "usual_token", None):
        python = outcome(reads, chat)
    assert with_c == python


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=chunk, chat=st.booleans())
def test_every_chunk_gives_what_the_python_path_gives(obj, chat):
    """One well-framed event: every field of the chunk that the C path looks at, changed."""
    read = b"data: " + json.dumps(obj).encode() + b"\n\n"
    with_c = outcome([read], chat)
    with mock.patch.object(openai_client, "usual_token", None):
        assert with_c == outcome([read], chat)


def test_a_read_of_one_plain_token_goes_to_the_one_token_sink_and_others_to_the_sink():
    """Ingest's sink for the usual read gets its text and receive time; a read of two events
    and a read with a logprob go to the Tokens sink, as before."""
    ones, sunk = [], []
    reader = _BodyReader(_ChunkDecoder(True), sunk.append, lambda text, recv_ns: ones.append((text, recv_ns)))
    reader.feed(b": opened\n")
    event = b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n'
    before = time.monotonic_ns()
    reader.feed(event % b"a")
    reader.feed(event % b"b" + event % b"c")
    logprob = b'"logprobs":{"content":[{"token":"d","logprob":-1}]}'
    reader.feed(b'data: {"choices":[{"index":0,"delta":{"content":"d"},' + logprob + b"}]}\n\n")
    assert [text for text, _ in ones] == ["a"] and before <= ones[0][1] <= time.monotonic_ns()
    assert [t.texts for t in sunk] == [["b", "c"], ["d"]] and sunk[1].logprobs == [-1.0]
    assert reader.decoder.tokens == 4
