"""The embedded upstream: an OpenAI-compatible SSE server over real HTTP (aiohttp.web, uvloop).

It replays the built-in corpus (``stages.ingest.corpus``) at a configurable rate and concurrency,
deterministically per request, with fault injection configured globally or per request through
the ``X-Neuralpipe-Fault`` header. It is the upstream ``neuralpipe run`` uses when none is
configured and the load source of the benchmarks. Endpoints, config and faults:
``docs/embedded-upstream.md``.

    server = UpstreamServer(UpstreamServerConfig(tokens_per_s=50))
    url = await server.start()          # "http://127.0.0.1:PORT"
    ...
    await server.stop()

or in its own process: ``proc, url = serve_in_process(cfg)``; ``proc.terminate()`` stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import math
import multiprocessing
import os
import random
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from multiprocessing.connection import Connection
from typing import Any

import orjson
import uvloop
from aiohttp import web

from engine.lifeline import die_with_parent
from engine.protocol.openai_errors import ApiError
from engine.protocol.requests import MOST_REQUEST_BYTES
from engine.write_now import write_now
from stages.ingest import corpus

FAULT_HEADER = "X-Neuralpipe-Fault"
DEFAULT_MAX_TOKENS = 64
MAX_COMPLETION_TOKENS = 131_072  # a reply is built whole before it streams: bound its memory
MAX_TOP_LOGPROBS = 20
# Tokens that are already due (unpaced, or behind schedule) go out in one write, up to this many:
# fewer syscalls, and the stream still yields to the others between writes.
MAX_EVENTS_PER_WRITE = 16
TICK_S = 0.001  # what is due within this goes out at the same tick: streams share ticks and timers
MAX_SENDS_PER_TICK = 1024
WRITE_HIGH_WATER = 64 * 1024  # bytes a client has not read yet beyond which its stream waits
START_TIMEOUT_S = 30.0
MAX_TOKEN_BYTES = 16 << 20  # the token_bytes fault

# Non-SSE lines injected by the `garbage` fault: what misbehaving servers really send (llama.cpp's
# `error:` line, a bare text line, a proxy's HTML). A spec-complete SSE parser ignores all of them.
GARBAGE_LINES = (
    b'error: {"code":500,"message":"injected garbage","type":"server_error"}\n\n',
    b"this line is not server-sent events\n\n",
    b"<html><body>502 Bad Gateway</body></html>\n\n",
)


@dataclass
class UpstreamServerConfig:
    """How the embedded upstream behaves; every field has a default that works out of the box."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (start() returns the URL)
    models: tuple[str, ...] = ("neuralpipe-echo",)
    tokens_per_s: float = 0.0  # per stream; 0 = as fast as possible
    first_token_delay_s: float = 0.0
    max_concurrency: int = 1024  # requests in progress; beyond it: 429 with Retry-After
    keepalive_s: float = 15.0  # SSE comment while a stream waits this long for its next token
    faults: str = ""  # applied to every request, same syntax as the X-Neuralpipe-Fault header
    # each streamed token's text is its send time, f"{time.monotonic_ns()} " (CLOCK_MONOTONIC is
    # system-wide): a benchmark on the same host reads per-token latency through any proxy from it
    stamp_tokens: bool = False
    # every stream's tokens on one clock, as a server batching its streams writes them: one decode
    # step (1 / tokens_per_s) makes a token of each, and they go out together at the step's end
    decode_steps: bool = False

    def __post_init__(self) -> None:
        # params.embedded comes from a config file: each value of its field's type, or an error naming it
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            if kind == "tuple[str, ...]" and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                setattr(self, f.name, tuple(value))
            elif kind == "float" and type(value) in (int, float) and math.isfinite(value):
                setattr(self, f.name, float(value))
            elif not (kind in _TYPES and type(value) is _TYPES[kind]):
                what = {"tuple[str, ...]": "a list of strings", "float": "a finite number"}.get(kind, f"a {kind}")
                raise ValueError(f"{f.name}: must be {what} (got {value!r})")


_TYPES = {"str": str, "int": int, "bool": bool}  # exactly: True is no port number


@dataclass
class UpstreamStats:
    requests: int = 0
    active_streams: int = 0  # requests in progress, streaming or not
    tokens_sent: int = 0
    faults_injected: int = 0  # one per fault kind applied to a request
    rejected: int = 0  # 429s over max_concurrency
    cancelled: int = 0  # streams whose client closed the connection before their end


def _error_response(err: ApiError) -> web.Response:
    # Clients back off on these; tell them for how long, as real servers do.
    headers = err.headers() or ({"Retry-After": "1"} if err.status in (429, 503) else None)
    return web.Response(body=err.encoded(), status=err.status, content_type="application/json", headers=headers)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Faults:
    """Parsed fault spec: comma-separated ``key=value`` items and flags (docs/embedded-upstream.md)."""

    status: int | None = None  # answer with this HTTP status and an error body
    first_byte_delay_s: float = 0.0  # wait before sending anything, headers included
    disconnect_after: int | None = None  # close the connection after this many tokens
    garbage: int = 0  # non-SSE lines injected before the first N tokens
    no_done: bool = False  # end the stream without `data: [DONE]`
    p: float = 1.0  # probability that a request gets these faults
    token_bytes: int = 0  # the first token is this many bytes ("x" repeated): an oversized token

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """Parse ``"disconnect_after=10,garbage=3,no_done"``; ValueError names the bad item."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            try:
                values.update(_parse_fault_item(key, raw.strip(), bool(sep)))
            except ValueError as exc:
                raise ValueError(f"bad fault {item!r}: {exc}") from None
        return cls(**values)

    def merged(self, override: Faults) -> Faults:
        """These faults with every field ``override`` sets (differs from the default) replacing ours."""
        default = Faults()
        changes = {k: v for k, v in asdict(override).items() if v != getattr(default, k)}
        return replace(self, **changes)

    def kinds(self) -> list[str]:
        """The fault kinds this spec injects (p is not one)."""
        default = Faults()
        return [k for k, v in asdict(self).items() if k != "p" and v != getattr(default, k)]


def _parse_fault_item(key: str, raw: str, has_value: bool) -> dict[str, Any]:
    if key == "no_done":
        return {"no_done": True}
    parse = _VALUE_FAULTS.get(key)
    if parse is None:
        raise ValueError("unknown fault")
    if not has_value:
        raise ValueError("expected key=value")
    return parse(raw)


def _status(raw: str) -> dict[str, Any]:
    status = int(raw)
    if not 400 <= status <= 599:
        raise ValueError("status must be 400..599")
    return {"status": status}


def _probability(raw: str) -> dict[str, Any]:
    p = float(raw)
    if not 0.0 <= p <= 1.0:
        raise ValueError("p must be 0..1")
    return {"p": p}


def _non_negative(value: float) -> Any:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


_VALUE_FAULTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "status": _status,
    "first_byte_delay_ms": lambda raw: {"first_byte_delay_s": _non_negative(float(raw)) / 1000},
    "disconnect_after": lambda raw: {"disconnect_after": _non_negative(int(raw))},
    "garbage": lambda raw: {"garbage": _non_negative(int(raw))},
    "token_bytes": lambda raw: {"token_bytes": min(_non_negative(int(raw)), MAX_TOKEN_BYTES)},
    "p": _probability,
}


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class GenRequest:
    """A validated chat or completions request, reduced to what shapes the reply."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    logprobs: bool
    top_logprobs: int
    ignore_eos: bool
    prompt_tokens: int
    key: bytes
    tool: str | None = None  # the function the reply calls (tool_choice made it), else a text reply
    thinking: int = 0  # reasoning tokens written before the reply (reasoning_effort), within max_tokens


def parse_request(body: Any, chat: bool, models: tuple[str, ...]) -> GenRequest:
    """Validate an OpenAI request body; raise ApiError (400/404) saying what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_body")
    model = _optional(body, "model", str, models[0])  # lenient: an echo server needs no model name
    if model not in models:
        raise ApiError(404, f"The model `{model}` does not exist", code="model_not_found", param="model")
    content, prompt_text = _chat_messages(body) if chat else _completion_prompt(body)
    logprobs, top = _chat_logprobs(body) if chat else _completion_logprobs(body)
    if _optional(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    seed = _optional(body, "seed", int, None)
    stream_options = _optional(body, "stream_options", dict, {})
    max_tokens = _max_tokens(body)
    return GenRequest(
        chat=chat,
        model=model,
        stream=_optional(body, "stream", bool, False),
        include_usage=bool(stream_options.get("include_usage", False)),
        max_tokens=max_tokens,
        logprobs=logprobs,
        top_logprobs=top,
        ignore_eos=_optional(body, "ignore_eos", bool, False),
        prompt_tokens=len(corpus.tokenize(prompt_text)),
        key=corpus.request_key(model, content, seed),
        tool=_forced_tool(body) if chat else None,
        thinking=min(_thinking_tokens(body), max_tokens) if chat else 0,  # max_tokens bounds thinking too
    )


# reasoning_effort -> reasoning tokens written before the reply (OpenAI's values; "none" and
# "minimal" think not at all here)
THINKING_TOKENS = {"none": 0, "minimal": 0, "low": 8, "medium": 16, "high": 32}


def _thinking_tokens(body: dict) -> int:
    """How long the echo model thinks: a reasoning model's ``delta.reasoning_content`` comes
    before its content, as llama.cpp and vLLM stream it."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return 0
    if effort not in THINKING_TOKENS:
        raise ApiError(400, f"'reasoning_effort' must be one of {', '.join(THINKING_TOKENS)}", param="reasoning_effort")
    return THINKING_TOKENS[effort]


def _forced_tool(body: dict) -> str | None:
    """The function a chat reply calls: the echo model never decides to call one by itself, so
    only a ``tool_choice`` of "required" (the first tool) or naming a function makes it."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' requires 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "'tools' must be a non-empty array", param="tools")
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, "each tool must be {'type': 'function', 'function': {'name': ...}}", param="tools")
        names.append(function["name"])
    if choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return names[0]
    named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(named, dict) or named.get("name") not in names:
        raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or one of the tools", param="tool_choice")
    return named["name"]


def _optional(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; a JSON `true` is not a valid count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be of type {kind.__name__}", param=name)
    return value


def _chat_messages(body: dict) -> tuple[list, str]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", code="missing_messages", param="messages")
    texts = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message must be an object with a 'role'", param="messages")
        texts.append(_message_text(message.get("content")))
    return messages, "\n".join(texts)


def _message_text(content: Any) -> str:
    """Text of a message: a string, or the text parts of a content-part list (or none)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise ApiError(400, "message 'content' must be a string or an array of parts", param="messages")


def _completion_prompt(body: dict) -> tuple[str, str]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # a batch of one prompt
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", code="missing_prompt", param="prompt")
    return prompt, prompt


def _chat_logprobs(body: dict) -> tuple[bool, int]:
    wanted = _optional(body, "logprobs", bool, False)
    top = _optional(body, "top_logprobs", int, 0)
    if top and not wanted:
        raise ApiError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    return wanted, _top_range(top, "top_logprobs")


def _completion_logprobs(body: dict) -> tuple[bool, int]:
    top = _optional(body, "logprobs", int, None)
    return top is not None, _top_range(top or 0, "logprobs")


def _top_range(top: int, param: str) -> int:
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'{param}' must be 0..{MAX_TOP_LOGPROBS}", param=param)
    return top


def _max_tokens(body: dict) -> int:
    value = _optional(body, "max_completion_tokens", int, None)
    value = _optional(body, "max_tokens", int, DEFAULT_MAX_TOKENS) if value is None else value
    if not 1 <= value <= MAX_COMPLETION_TOKENS:
        raise ApiError(400, f"'max_tokens' must be 1..{MAX_COMPLETION_TOKENS}", param="max_tokens")
    return value


# --------------------------------------------------------------------------- response shapes


class _Shape:
    """OpenAI's JSON for one reply, chat (chat.completion[.chunk]) or legacy completions (text_completion)."""

    def __init__(self, req: GenRequest, sample: corpus.Sample) -> None:
        self.req, self.sample = req, sample
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        # Completions' text_offset: characters of completion text before the next token. A shape
        # is either streamed token by token or rendered whole, never both, so one counter does.
        self.offset = 0
        # a tool call's arguments, {"text": <the sample's text>}, one piece per token
        self.call_id = "call_" + uuid.uuid4().hex[:24]
        # the function called; none when thinking took every token max_tokens allowed
        self.tool = req.tool if sample.tokens else None
        self.arguments = _argument_pieces(sample.tokens) if self.tool else []
        # a reasoning model's thinking, before the reply: tokens of a sample of its own
        thinking = corpus.sample(req.key + b"thinking", req.thinking, ignore_eos=True) if req.thinking else None
        self.thinking = thinking.tokens if thinking else ()
        self.tokens = len(self.thinking) + len(sample.tokens)  # the stream's token events

    def _envelope(self, obj: str, choices: list) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.req.model}
        if self.req.chat:
            out["system_fingerprint"] = "fp_neuralpipe"
        out["choices"] = choices
        if self.req.include_usage:  # OpenAI: every chunk has usage (null) when it is asked for
            out["usage"] = None
        return out

    def _chunk(self, choice: dict) -> bytes:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return b"data: " + orjson.dumps(self._envelope(obj, [choice])) + b"\n\n"

    def head(self) -> bytes:
        """The chunk before the first token: the chat role (completions have none)."""
        if not self.req.chat:
            return b""
        return self._chunk(_chat_choice({"role": "assistant", "content": ""}, None, None))

    def token(self, i: int, text: str | None = None) -> bytes:
        """Token ``i``'s chunk, thinking first (its text replaced by ``text`` when given: a fault)."""
        if i < len(self.thinking):
            thought = self.thinking[i] if text is None else text
            return self._chunk(_chat_choice({"reasoning_content": thought}, None, None))
        i -= len(self.thinking)
        tok = self.sample.tokens[i] if text is None else text
        if self.tool:
            return self._chunk(_chat_choice({"tool_calls": [self._call_piece(i, text)]}, None, None))
        if self.req.chat:
            logprobs = {"content": [self._chat_logprob(i)]} if self.req.logprobs else None
            return self._chunk(_chat_choice({"content": tok}, logprobs, None))
        logprobs = self._completion_logprobs(i, i + 1) if self.req.logprobs else None
        return self._chunk({"text": tok, "index": 0, "logprobs": logprobs, "finish_reason": None})

    def _call_piece(self, i: int, text: str | None) -> dict:
        """Token ``i``'s delta of the tool call: the first names it, each carries a piece."""
        piece: dict[str, Any] = {"index": 0}
        if i == 0:
            piece.update(id=self.call_id, type="function")
        piece["function"] = {"arguments": self.arguments[i] if text is None else text}
        if i == 0:
            piece["function"]["name"] = self.tool
        return piece

    @property
    def finish_reason(self) -> str:
        reason = self.sample.finish_reason
        return "tool_calls" if self.tool and reason == "stop" else reason

    def finish(self) -> bytes:
        reason = self.finish_reason
        if self.req.chat:
            return self._chunk(_chat_choice({}, None, reason))
        return self._chunk({"text": "", "index": 0, "logprobs": None, "finish_reason": reason})

    def usage_chunk(self) -> bytes:
        """The extra chunk stream_options.include_usage asks for: no choices, the usage."""
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        chunk = self._envelope(obj, [])
        chunk["usage"] = self.usage()
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def usage(self) -> dict:
        completion = self.tokens  # OpenAI counts the reasoning tokens among the completion's
        prompt = self.req.prompt_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.thinking:
            usage["completion_tokens_details"] = {"reasoning_tokens": len(self.thinking)}
        return usage

    def whole(self) -> dict:
        """The non-streaming response: one chat.completion or text_completion object."""
        n, text = len(self.sample.tokens), "".join(self.sample.tokens)
        if self.tool:
            call = {"id": self.call_id, "type": "function", "function": {"name": self.tool, "arguments": ""}}
            call["function"]["arguments"] = "".join(self.arguments)
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
            obj = "chat.completion"
        elif self.req.chat:
            logprobs = {"content": [self._chat_logprob(i) for i in range(n)]} if self.req.logprobs else None
            message = {"role": "assistant", "content": text}
            choice = {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": self.sample.finish_reason,
            }
            obj = "chat.completion"
        else:
            logprobs = self._completion_logprobs(0, n) if self.req.logprobs else None
            choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": self.sample.finish_reason}
            obj = "text_completion"
        if self.thinking:
            choice["message"]["reasoning_content"] = "".join(self.thinking)
        out = self._envelope(obj, [choice])
        out["usage"] = self.usage()
        return out

    def _at(self, i: int) -> tuple[str, float]:
        return self.sample.tokens[i], self.sample.logprobs[i]

    def _chat_logprob(self, i: int) -> dict:
        tok, lp = self._at(i)
        top = corpus.top_logprobs(self.req.key, i, tok, lp, self.req.top_logprobs)
        return {
            "token": tok,
            "logprob": lp,
            "bytes": list(tok.encode()),
            "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in top],
        }

    def _completion_logprobs(self, start: int, stop: int) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i in range(start, stop):
            tok, lp = self._at(i)
            top = corpus.top_logprobs(self.req.key, i, tok, lp, self.req.top_logprobs)
            out["tokens"].append(tok)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(dict(top))
            out["text_offset"].append(self.offset)
            self.offset += len(tok)
        return out


def _argument_pieces(tokens: list[str]) -> list[str]:
    """The JSON text ``{"text": <the tokens joined>}`` cut at the tokens' boundaries: one piece
    per token, which joined are the arguments (each token's text escaped on its own)."""
    pieces = [orjson.dumps(token).decode()[1:-1] for token in tokens]
    pieces[0] = '{"text": "' + pieces[0]
    pieces[-1] += '"}'
    return pieces


def _chat_choice(delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


# --------------------------------------------------------------------------- streaming


class _Emission:
    """One streaming response: what it still has to send and when. The :class:`_Ticker` calls
    :meth:`send` when it is due; each call's bytes go to the response in one write (aiohttp frames
    them as one HTTP chunk), run to completion at once rather than as a task per write."""

    __slots__ = (
        "done",
        "due",
        "faults",
        "i",
        "keepalive_s",
        "last_write",
        "response",
        "shape",
        "stamp",
        "start",
        "stats",
        "transport",
    )

    def __init__(
        self, server: UpstreamServer, request: web.Request, response: web.StreamResponse, shape: _Shape, faults: Faults
    ) -> None:
        loop = asyncio.get_running_loop()
        self.shape, self.faults, self.response = shape, faults, response
        self.transport = request.transport
        self.stats = server.stats
        self.due = server._token_due
        self.keepalive_s = server.cfg.keepalive_s
        self.stamp = server.cfg.stamp_tokens
        self.start = self.last_write = loop.time()
        self.i = 0  # the next token
        self.done: asyncio.Future[bool] = loop.create_future()  # True: the stream ended cleanly
        self._write([shape.head()])

    def next_at(self) -> float:
        """When :meth:`send` has something to do: the next token, or a keep-alive comment."""
        return min(self.due(self.start, self.i), self.last_write + self.keepalive_s)

    def send(self, now: float) -> float | None:
        """Write every token due by ``now`` (up to MAX_EVENTS_PER_WRITE: the other streams' turn
        comes between writes) in one write; when to come back, None once the stream is over."""
        if self.transport is None or self.transport.is_closing():  # the client went away
            self.stats.cancelled += 1
            return self._finish(False)
        if self.transport.get_write_buffer_size() > WRITE_HIGH_WATER:  # the client reads slower
            return now + TICK_S
        shape, faults, out, first = self.shape, self.faults, [], self.i
        tokens = shape.tokens
        while self.i < tokens and len(out) < MAX_EVENTS_PER_WRITE and self.due(self.start, self.i) <= now:
            if self.i == faults.disconnect_after:
                self.stats.tokens_sent += self.i - first
                self._write(out)
                self.transport.close()
                return self._finish(False)
            if self.i < faults.garbage:
                out.append(GARBAGE_LINES[self.i % len(GARBAGE_LINES)])
            if self.i == 0 and faults.token_bytes:
                text = "x" * faults.token_bytes
            else:
                text = f"{time.monotonic_ns()} " if self.stamp else None
            out.append(shape.token(self.i, text))
            self.i += 1
        self.stats.tokens_sent += self.i - first
        if self.i == tokens:
            out.append(shape.finish())
            if shape.req.include_usage:
                out.append(shape.usage_chunk())
            if not faults.no_done:
                out.append(b"data: [DONE]\n\n")
            self._write(out)
            return self._finish(True)
        if not out and now - self.last_write >= self.keepalive_s:
            out.append(b": keep-alive\n\n")
        if out:
            self._write(out)
            self.last_write = now
        return self.next_at()

    def _write(self, events: list[bytes]) -> None:
        data = b"".join(events)
        if data:
            write_now(self.response.write(data))

    def _finish(self, clean: bool) -> None:
        if not self.done.done():
            self.done.set_result(clean)


class _Ticker:
    """Serves every streaming response of the server from one timer: at each tick, each stream
    with a token due (within TICK_S) gets all its due bytes in one write. Streams due close
    together share a tick, so a paced load costs one timer per tick instead of one per token."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._due: list[tuple[float, int, _Emission]] = []  # a heap by time
        self._order = itertools.count()  # ties: first come, first served
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when it fires (uvloop's handles do not say)

    def add(self, emission: _Emission) -> None:
        self._push(emission.next_at(), emission)

    def _push(self, when: float, emission: _Emission) -> None:
        heapq.heappush(self._due, (when, next(self._order), emission))
        if self._timer is None or when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._schedule(when)

    def _schedule(self, when: float) -> None:
        self._timer, self._timer_at = self._loop.call_at(when, self._tick), when

    def _tick(self) -> None:
        self._timer = None
        now = self._loop.time() + TICK_S
        due, later = self._due, []
        for _ in range(MAX_SENDS_PER_TICK):  # then the loop's other work, and the next tick
            if not due or due[0][0] > now:
                break
            _, _, emission = heapq.heappop(due)
            try:
                when = emission.send(now)
            except Exception as exc:  # one broken stream must not stop the others
                if not emission.done.done():
                    emission.done.set_exception(exc)
                continue
            if when is not None:
                later.append((when, emission))
        # One write per stream per tick, even when more is due (unpaced, behind schedule): the
        # loop reads its sockets between ticks, as a stream awaiting its writes would let it.
        for when, emission in later:
            heapq.heappush(due, (when, next(self._order), emission))
        if due:
            self._schedule(due[0][0])


# --------------------------------------------------------------------------- server


class UpstreamServer:
    """The embedded upstream on the running event loop (run it under uvloop)."""

    def __init__(self, cfg: UpstreamServerConfig | None = None) -> None:
        self.cfg = cfg or UpstreamServerConfig()
        if not self.cfg.models:
            raise ValueError("UpstreamServerConfig.models must name at least one model")
        if self.cfg.keepalive_s <= 0 or self.cfg.max_concurrency < 1 or self.cfg.tokens_per_s < 0:
            raise ValueError("keepalive_s and max_concurrency must be positive, tokens_per_s >= 0")
        self.faults = Faults.parse(self.cfg.faults)  # fails here, not on the first request
        self.stats = UpstreamStats()
        self._fault_rng = random.Random(0)  # p is drawn from a fixed sequence: runs are repeatable
        self._runner: web.AppRunner | None = None
        self._ticker: _Ticker | None = None
        self._epoch = 0.0  # the decode clock's first step (loop time), set by start()

    async def start(self) -> str:
        """Listen; return the base URL (``http://127.0.0.1:PORT``)."""
        self._ticker = _Ticker()
        self._epoch = asyncio.get_running_loop().time()
        # a body as large as ingest may send (an image, a long document), as real servers take
        app = web.Application(client_max_size=MOST_REQUEST_BYTES)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        # No access log: one line per request costs more than serving a short stream.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.cfg.host, self.cfg.port).start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _request_faults(self, request: web.Request) -> Faults:
        try:
            faults = self.faults.merged(Faults.parse(request.headers.get(FAULT_HEADER, "")))
        except ValueError as exc:
            raise ApiError(400, str(exc), param=FAULT_HEADER) from None
        if faults.p < 1.0 and self._fault_rng.random() >= faults.p:
            return Faults()
        self.stats.faults_injected += len(faults.kinds())
        return faults

    async def _apply_early_faults(self, faults: Faults) -> None:
        """The faults that hit before any byte of the answer: a slow first byte, an error status."""
        if faults.first_byte_delay_s:
            await asyncio.sleep(faults.first_byte_delay_s)
        if faults.status is not None:
            raise ApiError(faults.status, f"injected fault: status {faults.status}", "server_error", "injected_fault")

    async def _models(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        try:
            await self._apply_early_faults(self._request_faults(request))
        except ApiError as err:
            return _error_response(err)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "neuralpipe"} for m in self.cfg.models]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.stats.requests += 1
        if self.stats.active_streams >= self.cfg.max_concurrency:
            self.stats.rejected += 1
            return _error_response(ApiError(429, "too many concurrent requests", "requests", "rate_limit_exceeded"))
        self.stats.active_streams += 1
        try:
            return await self._serve(request, chat)
        except ApiError as err:
            return _error_response(err)
        finally:
            self.stats.active_streams -= 1

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
        req = parse_request(body, chat, self.cfg.models)
        faults = self._request_faults(request)
        await self._apply_early_faults(faults)
        shape = _Shape(req, corpus.sample(req.key, req.max_tokens - req.thinking, req.ignore_eos))
        if req.stream:
            return await self._stream(request, shape, faults)
        return await self._whole(request, shape, faults)

    def _token_offset_s(self, i: int) -> float:
        """When token ``i`` is due, in seconds after the response started."""
        rate = self.cfg.tokens_per_s
        return self.cfg.first_token_delay_s + (i / rate if rate > 0 else 0.0)

    def _token_due(self, start: float, i: int) -> float:
        """When token ``i`` of a stream that started at ``start`` (loop time) is due: at its own
        pace, or with ``decode_steps`` at the end of the first step of the server's clock after it."""
        due = start + self._token_offset_s(i)
        rate = self.cfg.tokens_per_s
        if not (self.cfg.decode_steps and rate > 0):
            return due
        steps = math.ceil((due - self._epoch) * rate - 1e-9)  # 1e-9: a due time on a step is that step
        return self._epoch + steps / rate

    async def _whole(self, request: web.Request, shape: _Shape, faults: Faults) -> web.StreamResponse:
        """Non-streaming: answer once the paced stream would have ended (or drop the connection)."""
        n = shape.tokens
        await asyncio.sleep(self._token_offset_s(n - 1))
        if faults.disconnect_after is not None and faults.disconnect_after < n:
            _drop_connection(request)
            # Never sent (the connection is gone); aiohttp needs a response to finish the handler.
            return web.Response(status=499)
        self.stats.tokens_sent += n
        return web.json_response(shape.whole(), dumps=_dumps)

    async def _stream(self, request: web.Request, shape: _Shape, faults: Faults) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if request.version >= (1, 1):  # HTTP/1.0 has no chunks: the body ends with the connection
            resp.enable_chunked_encoding()
        await resp.prepare(request)  # a StreamResponse sends its headers here
        emission = _Emission(self, request, resp, shape, faults)
        self._ticker.add(emission)
        if await emission.done:
            with contextlib.suppress(ConnectionResetError):  # the client went away: nothing left to send
                await resp.write_eof()
        return resp


def _drop_connection(request: web.Request) -> None:
    """Close the TCP connection under a response in progress: the client sees the body cut off."""
    if request.transport is not None:
        request.transport.close()


# --------------------------------------------------------------------------- own process, CLI


async def serve(cfg: UpstreamServerConfig, on_ready: Callable[[str], None]) -> None:
    """Run a server until SIGTERM or SIGINT; ``on_ready(url)`` is called once it listens."""
    server = UpstreamServer(cfg)
    url = await server.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    try:
        on_ready(url)
        await stopped.wait()
    finally:
        await server.stop()


def _child_main(cfg: UpstreamServerConfig, parent_pid: int, conn: Connection) -> None:
    die_with_parent(parent_pid)

    def ready(url: str) -> None:
        conn.send(url)
        conn.close()

    uvloop.run(serve(cfg, ready))


def serve_in_process(cfg: UpstreamServerConfig) -> tuple[multiprocessing.Process, str]:
    """Start the server in its own (spawned) process; return it and the base URL once it listens.

    The child dies with this process (PR_SET_PDEATHSIG); ``proc.terminate()`` stops it cleanly."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(cfg, os.getpid(), send), name="neuralpipe-upstream", daemon=True)
    proc.start()
    send.close()  # ours: so recv sees EOF if the child dies before answering
    try:
        if not recv.poll(START_TIMEOUT_S):
            raise RuntimeError(f"embedded upstream did not start within {START_TIMEOUT_S} s")
        url = recv.recv()
    except (EOFError, RuntimeError) as exc:
        proc.kill()
        proc.join()
        raise RuntimeError(f"embedded upstream failed to start (exit code {proc.exitcode})") from exc
    finally:
        recv.close()
    return proc, url


def _parse_args(argv: list[str] | None) -> UpstreamServerConfig:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest.upstream_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=0.0, help="tokens/s per stream (0: as fast as possible)")
    parser.add_argument("--first-token-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--max-concurrency", type=int, default=1024)
    parser.add_argument("--keepalive", type=float, default=15.0, metavar="S")
    parser.add_argument("--model", action="append", dest="models", help="a model name to serve (repeatable)")
    parser.add_argument("--faults", default="", help='e.g. "disconnect_after=10,p=0.1" (docs/embedded-upstream.md)')
    parser.add_argument("--stamp-tokens", action="store_true", help="each token's text is its send time (monotonic ns)")
    parser.add_argument(
        "--decode-steps",
        action="store_true",
        help="every stream's tokens on one clock, as a batching server writes them",
    )
    args = parser.parse_args(argv)
    return UpstreamServerConfig(
        host=args.host,
        port=args.port,
        models=tuple(args.models or UpstreamServerConfig.models),
        tokens_per_s=args.rate,
        first_token_delay_s=args.first_token_delay,
        max_concurrency=args.max_concurrency,
        keepalive_s=args.keepalive,
        faults=args.faults,
        stamp_tokens=args.stamp_tokens,
        decode_steps=args.decode_steps,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = _parse_args(argv)
    uvloop.run(serve(cfg, lambda url: print(f"embedded upstream listening on {url}", flush=True)))


if __name__ == "__main__":
    main()
