"""Ingest's read path taken apart (issue 11): the SSE fast path agrees with the full parser, the
chunk decoder raises nothing but UpstreamError on hostile chunks, and a stream's token credit
takes from its client's bucket what it uses and no more."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.protocol.toolcalls import read_piece
from shm.batch import Kind
from stages.ingest.openai_client import Tokens, UpstreamError, _ChunkDecoder
from stages.ingest.ratelimit import TokenBucket, TokenCredit
from stages.ingest.sse import SSEParser


def test_an_event_line_in_one_read_names_the_data_of_the_next():
    """``event: error`` and its data in two reads: the data is an "error" event (the fast path
    took it for a "message" before)."""
    parser = SSEParser()
    parser.feed(b": opened\n")
    assert parser.feed(b"event: error\n") == []
    assert parser.feed_plain(b'data: {"x": 1}\n\n') is None
    events = parser.feed(b'data: {"x": 1}\n\n')
    assert [(e.event, e.data) for e in events] == [("error", '{"x": 1}')]
    assert parser.feed_plain(b"data: y\n\n") == [b"y"]  # dispatched: the fast path is open again


@pytest.mark.parametrize(
    ("chat", "chunk"),
    [
        (True, b'{"choices": [{"delta": "text"}]}'),
        (True, b'{"choices": [{"delta": {"content": 7}}]}'),
        (True, b'{"choices": [{"delta": {"content": ["a"]}}]}'),
        (False, b'{"choices": [{"text": 3}]}'),
        (True, b'{"choices": [{"delta": {"content": "a"}, "logprobs": {"content": 5}}]}'),
        (True, b'{"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [5]}}]}'),
        (
            True,
            b'{"choices":[{"delta":{"content":"a"},"logprobs":{"content":[{"token":"a","top_logprobs":[3]}]}}]}',
        ),
        (
            True,
            b'{"choices":[{"delta":{"content":"ab"},"logprobs":{"content":[{"token":5,"id":1},{"id":2}]}}]}',
        ),
        (False, b'{"choices": [{"text": "a", "logprobs": {"tokens": 5}}]}'),
        (False, b'{"choices": [{"text": "a", "logprobs": {"tokens": [5]}}]}'),
        (False, b'{"choices": [{"text": "a", "logprobs": {"tokens": ["a"], "top_logprobs": [5]}}]}'),
        (False, b'{"choices": [{"text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": 5}}]}'),
    ],
)
def test_a_malformed_chunk_is_an_upstream_error(chat, chunk):
    """Before, each of these escaped as an AttributeError or a TypeError (or, an int token
    text, later at the row): "ingest failed" instead of the upstream's fault named."""
    with pytest.raises(UpstreamError, match="malformed"):
        _ChunkDecoder(chat=chat).decode("message", chunk, Tokens([], [], [], [], 0))


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
_fields = [
    "index", "delta", "content", "text", "logprobs", "finish_reason", "token_ids", "tokens", "top_logprobs",
    "reasoning_content", "reasoning", "tool_calls", "function_call", "function", "name", "arguments", "id", "type",
]  # fmt: skip
_inner = st.dictionaries(st.sampled_from(_fields), _values, max_size=4)
_nested = _inner | st.lists(_inner, max_size=2) | st.dictionaries(st.sampled_from(_fields), _inner, max_size=3)
_choice = st.dictionaries(st.sampled_from(_fields), _values | _nested)
_chunks = st.fixed_dictionaries({}, optional={"choices": st.lists(_choice, max_size=2) | _values, "usage": _values})
# chat deltas of the usual shape with the fields beside the content drawn near-valid
_short = st.text(max_size=6)
_function = st.fixed_dictionaries({}, optional={"name": _short | _values, "arguments": _short | _values})
_piece = st.fixed_dictionaries(
    {}, optional={"index": st.integers(-1, 130) | _values, "id": _short | _values, "function": _function | _values}
)
_delta = st.fixed_dictionaries(
    {},
    optional={
        "content": _short | _values,
        "reasoning_content": _short | _values,
        "reasoning": _short | _values,
        "tool_calls": st.lists(_piece, max_size=3) | _values,
    },
)
_delta_chunks = st.builds(lambda delta: {"choices": [{"index": 0, "delta": delta}]}, _delta)


@given(st.lists(_chunks | _delta_chunks, min_size=1, max_size=4), st.booleans())
@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_the_chunk_decoder_raises_only_upstream_errors(objs, chat):
    """Near-valid chunks of one stream with values of any type (reasoning and tool call fields
    among them): decoded into str texts of known kinds (a tool call's piece readable as one), or
    an UpstreamError."""
    tokens = Tokens([], [], [], [], 0)
    decoder = _ChunkDecoder(chat=chat)
    try:
        for obj in objs:
            decoder.decode("message", json.dumps(obj).encode(), tokens)
    except UpstreamError:
        return
    assert all(isinstance(text, str) for text in tokens.texts)
    assert len(tokens.texts) == len(tokens.ids) == len(tokens.logprobs) == len(tokens.tops)
    kinds = tokens.all_kinds() or [Kind.TOKEN] * len(tokens.texts)
    assert len(kinds) == len(tokens.texts) and set(kinds) <= {Kind.TOKEN, Kind.REASONING, Kind.TOOL_CALL}
    assert all(read_piece(text) for text, kind in zip(tokens.texts, kinds, strict=True) if kind == Kind.TOOL_CALL)


def test_a_credit_takes_ahead_and_gives_back_what_it_did_not_use():
    bucket = TokenBucket(rate=1.0, burst=1000.0, now=0.0)
    credit = TokenCredit(bucket, grant=16)
    assert credit.take(1) is None
    assert bucket._level <= 1000 - 17 + 1e-3  # the token and 16 ahead
    for _ in range(16):
        assert credit.take(1) is None  # from the credit: the bucket is not touched
    assert credit.held == 0
    assert credit.take(3) is None
    credit.close()  # 16 held: back to the bucket
    assert bucket._level == pytest.approx(1000 - 20, abs=0.1)


def test_a_credit_on_a_short_bucket_waits_for_exactly_what_it_needs():
    bucket = TokenBucket(rate=1000.0, burst=32.0)
    credit = TokenCredit(bucket)
    assert credit.grant == 2  # never more than a sixteenth of the burst ahead
    assert bucket.try_take(31.0)
    wait = credit.take(5)  # 1 there (and no 2 ahead): waits for the 5, not for 7
    assert wait is not None
    asyncio.run(wait)
    assert credit.held == 0


def test_a_cancel_as_an_upstream_frees_does_not_take_its_slot():
    """A stream waiting for an upstream (a Retry-After), cancelled as it frees: 3.11's wait_for
    returned the wait's result instead of the cancel, so the cancelled stream took a slot and its
    request went out."""
    from stages.ingest.pool import PoolPolicy, UpstreamConfig, UpstreamPool

    async def main() -> int:
        pool = UpstreamPool([UpstreamConfig(name="u", base_url="http://127.0.0.1:9", max_concurrency=1)], PoolPolicy())
        upstream = pool._upstreams[0]
        upstream.not_before = time.monotonic() + 60  # a Retry-After: the wait has a timeout
        waiting = asyncio.create_task(pool._acquire(None, set()))
        for _ in range(3):
            await asyncio.sleep(0)
        upstream.not_before = 0.0
        pool._notify()  # the upstream is free again ...
        waiting.cancel()  # ... as the waiting stream is cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return upstream.outstanding

    assert asyncio.run(main()) == 0


@pytest.mark.parametrize(
    "chunk",
    [
        b'{"choices": [{"delta": {"content": "a"}, "token_ids": [4294967296]}]}',
        b'{"choices": [{"delta": {"content": "a"}, "token_ids": [-1]}]}',
        b'{"choices": [{"delta": {"content": "a"}, "token_ids": [2147483648]}]}',
        b'{"choices":[{"delta":{"content":"a"},"logprobs":{"content":[{"token":"a","logprob":-1,"id":1099511627776}]}}]}',
        b'{"choices":[{"delta":{"content":"a"},"logprobs":{"content":[{"token":"token_id:99999999999","logprob":-1}]}}]}',
    ],
)
def test_an_upstream_token_id_outside_the_vocabulary_range_is_not_taken(chunk):
    """A batch's token_id is u32, upstream ids below 2**31 (the stable hashes of texts set bit 31).
    Before, an id of 2**32 or more (or negative) failed the record's write: the ingest worker
    restarted and every open stream ended with "ingest restarted". Now the token is named by its
    text, as when the upstream gives no id."""
    tokens = Tokens([], [], [], [], 0)
    _ChunkDecoder(chat=True).decode("message", chunk, tokens)
    assert tokens.texts == ["a"] and tokens.ids == [None]
