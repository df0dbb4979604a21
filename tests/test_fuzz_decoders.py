"""Randomized fuzz of every decoder that reads input from outside a process (issue 13, "Proof"):
each either accepts its input or raises its one documented error type; nothing else escapes.

The default run is derandomized (a fixed seed: the same examples each time) and takes seconds.
A longer run on demand: ``NEURALPIPE_FUZZ_EXAMPLES=20000 python3 -m pytest tests/test_fuzz_decoders.py``.
Inputs are random bytes and, mostly, near-valid messages (known message types and field names
with random values), which reach the checks behind the JSON parse.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import orjson
import pytest
import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, load_config
from engine.protocol import control, wire
from engine.protocol.cache import CacheProtocolError
from engine.protocol.cache import parse_request as parse_cache_request
from engine.protocol.requests import ROLES, RequestError, parse_request
from stages.broadcast.snapshots import _parse as parse_snapshot_request
from stages.ingest.sse import SSEParser

EXAMPLES = int(os.environ.get("NEURALPIPE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=EXAMPLES <= 1000,  # the default run: a fixed seed; a long run explores afresh
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

FIELDS = [
    "type", "body", "endpoint", "client", "stream_id", "token", "key", "deadline_ns", "messages", "prompt",
    "max_tokens", "temperature", "top_p", "top_logprobs", "model", "role", "content", "worker", "pid",
    "incarnation", "pausable", "state", "processed", "stats", "message", "fatal", "params", "stream",
    "from_seq", "from", "encoding", "reason", "v", "seq", "rows", "columns", "epoch", "at", "next",
]  # fmt: skip
TYPES = [
    "submit", "cancel", "lookup", "stats", "clear", "snapshot", "batches", "hello", "ready", "heartbeat",
    "error", "pause", "resume", "drain", "stop", "reconfigure", "status", "shutdown", "start", "tokens",
    "end", "batch",
]  # fmt: skip
EDGE_INTS = [0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**30]

scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from(EDGE_INTS)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from([*TYPES, "chat", "completions", "user", "json", "binary", "running"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | scalars},
    optional={name: json_values for name in FIELDS if name != "type"},
)


def _frame(value: Any) -> bytes:
    return json.dumps(value).encode()  # json, not orjson: integers beyond 64 bits must get through


frames = st.one_of(
    st.binary(max_size=300),
    messages.map(_frame),
    json_values.map(_frame),
    messages.map(_frame).map(lambda b: b[: len(b) // 2]),  # cut short
)


@FUZZ
@given(frames)
def test_ingest_requests(frame):
    try:
        msg = parse_request(frame)
    except RequestError:
        return
    assert msg["type"] in ("submit", "cancel")
    if msg["type"] == "cancel":
        assert 0 <= msg["stream_id"] < 2**63


@FUZZ
@given(frames, st.sampled_from([control.WORKER_TO_SUPERVISOR, control.SUPERVISOR_TO_WORKER, control.CLIENT_REQUESTS]))
def test_control_messages(frame, allowed):
    try:
        msg = control.decode(frame, allowed)
    except control.ProtocolError as exc:
        assert len(str(exc)) < 1000  # a bad message is quoted as an excerpt, never echoed whole
        return
    assert msg["type"] in allowed


@FUZZ
@given(frames)
def test_cache_requests(frame):
    try:
        msg = parse_cache_request(frame)
    except CacheProtocolError:
        return
    if msg["type"] == "lookup":
        assert 0 <= msg["stream_id"] < 2**63 and 0 <= msg["deadline_ns"] < 2**63


@FUZZ
@given(frames)
def test_broadcast_snapshot_and_batches_requests(frame):
    request = parse_snapshot_request(frame)  # documented: the request, or a string saying what is wrong
    assert isinstance(request, str | dict)
    if isinstance(request, dict):
        assert request["type"] in ("snapshot", "batches") and request["encoding"] in wire.ENCODINGS


sse_chunks = st.lists(
    st.binary(max_size=200)
    | st.sampled_from([b"data: ", b"\n", b"\r\n", b"\r", b"\n\n", b"event: x\n", b"id: 1\n", b"retry: 9\n", b":\n"])
    | st.builds(lambda n: b"x" * n, st.integers(0, 5000)),
    max_size=40,
)


@FUZZ
@given(sse_chunks, st.booleans())
def test_sse_parser_never_raises_and_stays_bounded(chunks, plain):
    """The SSE parser documents no error: it takes any bytes; with ``max_event`` what it buffers
    stays bounded (it stops with ``overflow`` instead)."""
    parser = SSEParser(stop_at_unknown=True, max_event=1024)
    for chunk in chunks:
        events = parser.feed_plain(chunk) if plain else parser.feed(chunk)
        if plain and events is None:  # declined (invalid UTF-8): the caller goes on with feed()
            plain = False
            events = parser.feed(chunk)
        assert isinstance(events, list)
        assert parser._partial_size <= 1024 + 5000 or parser.overflow
    parser.close()


def _wire_frames(head: dict, payload: bytes) -> list[bytes]:
    return [b"s1", _frame(head), payload]


wire_heads = st.fixed_dictionaries(
    {"v": st.sampled_from([wire.VERSION, 1, "2"]), "type": st.sampled_from(wire.MESSAGE_TYPES) | scalars},
    optional={name: json_values for name in ("stream", "seq", "encoding", "rows", "columns", "at", "next", "epoch")},
)
wire_payloads = st.binary(max_size=200) | json_values.map(_frame)


@FUZZ
@given(st.one_of(st.lists(st.binary(max_size=100), max_size=4), st.builds(_wire_frames, wire_heads, wire_payloads)))
def test_wire_decode(frames_):
    with contextlib.suppress(wire.WireError):
        wire.decode(frames_)


CONFIG_KEYS = [
    "engine", "supervisor", "ring_defaults", "rings", "workers", "stage", "inputs", "outputs", "params",
    "capacity", "heartbeat_interval_s", "heartbeat_timeout_s", "metrics_host", "metrics_port", "instance",
    "runtime_dir", "strategy", "intensity", "ingest", "cache", "broadcast", "compute", "upstreams", "base_url",
    "max_streams", "batch_rows", "endpoints", "url", "curve", "embedded", "tokens_per_s",
]  # fmt: skip
toml_keys = st.sampled_from(CONFIG_KEYS) | st.text(min_size=1, max_size=8)
toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        ["ingest", "cache", "compute", "broadcast", "verify", "a-b", "http://127.0.0.1:0", "tcp://0.0.0.0:1"]
    )
)
toml_docs = st.recursive(
    st.dictionaries(toml_keys, toml_scalars, max_size=4),
    lambda inner: st.dictionaries(toml_keys, inner | toml_scalars | st.lists(toml_scalars, max_size=3), max_size=5),
    max_leaves=25,
)


@FUZZ
@given(st.one_of(toml_docs.map(tomli_w.dumps), st.text(max_size=300)))
def test_config_from_random_toml(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        load_config(str(path), env={})


@pytest.mark.parametrize("depth", [100, 5000])
def test_config_nesting(tmp_path, depth):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * depth + "]" * depth)
    with pytest.raises(ConfigError):
        load_config(str(path), env={})


RESPONSES_FIELDS = [
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
    "tool_choice", "parallel_tool_calls", "reasoning", "text", "background", "previous_response_id",
    "type", "role", "content", "call_id", "name", "arguments", "output", "image_url", "effort", "format",
    "schema", "text", "store", "include",
]  # fmt: skip
RESPONSES_TYPES = [
    "message", "function_call", "function_call_output", "reasoning", "input_text", "output_text",
    "input_image", "function", "json_schema", "json_object", "web_search", "user", "assistant",
]  # fmt: skip
responses_values = st.recursive(
    scalars | st.sampled_from(RESPONSES_TYPES),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(RESPONSES_FIELDS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)
responses_bodies = st.fixed_dictionaries(
    {"model": st.just("m") | scalars, "input": st.text(max_size=10) | responses_values},
    optional={name: responses_values for name in RESPONSES_FIELDS[2:13]},
)


@FUZZ
@given(responses_bodies | json_values)
def test_responses_requests_become_chat_requests_or_name_the_problem(body):
    """The gateway's Responses API: a body becomes a valid chat request, which ingest accepts, or
    an Invalid naming why."""
    from stages.gateway.responses import chat_body, responses_param, validate_responses
    from stages.gateway.validation import Invalid, upstream_body, validate

    try:
        chat = chat_body(validate_responses(body))
    except Invalid as exc:
        assert exc.message
        return
    try:
        request = validate(chat, chat=True)
    except Invalid as exc:
        assert responses_param(exc).message
        return
    assert chat["model"] == body["model"] and chat["messages"]
    frame = orjson.dumps({"type": "submit", "body": upstream_body(request, chat), "endpoint": "chat"})
    assert parse_request(frame)["body"]["messages"]


CHAT_FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
    "stop", "stream", "stream_options", "include_usage", "logprobs", "top_logprobs", "neuralpipe", "columns",
    "role", "content", "type", "text", "name", "tool_calls", "user", "echo", "presence_penalty",
]  # fmt: skip
chat_values = st.recursive(
    scalars | st.sampled_from([*ROLES, "text", "image_url"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(CHAT_FIELDS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)
chat_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES) | scalars},
        optional={"content": st.text(max_size=10) | chat_values, "name": chat_values},
    ),
    max_size=3,
)
chat_bodies = st.fixed_dictionaries(
    {"model": st.just("m") | scalars, "messages": chat_messages | chat_values},
    optional={name: chat_values for name in CHAT_FIELDS[3:]},
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.just("m") | scalars, "prompt": st.text(max_size=10) | st.lists(st.text(max_size=5)) | chat_values},
    optional={name: chat_values for name in CHAT_FIELDS[3:]},
)


@FUZZ
@example((False, {"model": "m", "prompt": "0", "top_logprobs": []}))  # found by this test: ingest refused it
@given(st.tuples(st.just(True), chat_bodies | json_values) | st.tuples(st.just(False), completion_bodies | json_values))
def test_a_body_the_gateway_accepts_is_one_ingest_accepts(chat_and_body):
    """The gateway's validation and ingest's agree: whatever /v1/chat/completions or /v1/completions
    accepts, the submit it becomes passes ingest's checks (else a client's valid request would
    come back as an engine error instead of a 400 naming its field)."""
    from stages.gateway.validation import Invalid, upstream_body, validate

    chat, sent = chat_and_body
    try:
        body = orjson.loads(_frame(sent))  # as the gateway reads a body
    except orjson.JSONDecodeError:
        return  # a 400 invalid_json before validation
    try:
        request = validate(body, chat)
    except Invalid as exc:
        assert exc.message
        return
    endpoint = "chat" if chat else "completions"
    frame = orjson.dumps({"type": "submit", "body": upstream_body(request, body), "endpoint": endpoint})
    assert parse_request(frame)["body"]["stream"] is True
