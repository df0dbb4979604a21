"""The OpenAI response shapes the gateway writes: streaming chunks (chat and legacy completions),
whole responses, usage, and the error object. Streaming follows what the official client expects
(docs/gateway.md, "Streaming"): one id for every chunk, the role in the first delta, exactly one
chunk with ``finish_reason``, with ``stream_options.include_usage`` one last chunk whose
``choices`` is ``[]`` carrying ``usage`` (``usage: null`` on every other chunk), then ``[DONE]``."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from engine.protocol.openai_errors import ApiError
from engine.protocol.toolcalls import merged_pieces
from shm.batch import TopAlternatives

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def estimate_prompt_tokens(chat: bool, body: dict[str, Any]) -> int:
    """Prompt tokens when the upstream reports none: ~4 characters of English text per token (the
    rule of thumb OpenAI documents) plus, for chat, 3 tokens of framing per message and 3 for the
    reply's priming, as OpenAI's cookbook counts them. An estimate, documented as such."""
    if not chat:
        return _text_tokens(body.get("prompt", ""))
    total = 3
    for message in body.get("messages", ()):
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        total += 3 + _text_tokens(content if isinstance(content, str) else "")
    return total


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prompt_estimated: bool  # the upstream gave no prompt count: ours is an estimate
    cached: bool = False  # served from the engine's cache (no upstream tokens spent)
    reasoning_tokens: int = 0  # of the completion's: a reasoning model's thinking

    def as_dict(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        if self.prompt_estimated:
            usage["neuralpipe"] = {"prompt_tokens_estimated": True}
        return usage


def usage_of(
    upstream: dict[str, Any] | None,
    counted: int,
    estimate: int,
    cached: bool = False,
    reasoning: int = 0,
) -> Usage:
    """The upstream's counts where it gave them (integers >= 0), else the engine's: completion
    tokens counted as token rows (a tool call's pieces and a reasoning model's thinking among
    them, ``reasoning`` of them the thinking's), prompt tokens estimated (:func:`estimate_prompt_tokens`)."""
    upstream = upstream or {}
    prompt, completion = upstream.get("prompt_tokens"), upstream.get("completion_tokens")
    known_prompt = type(prompt) is int and prompt >= 0
    known_completion = type(completion) is int and completion >= 0
    details = upstream.get("completion_tokens_details")
    told = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt if known_prompt else estimate,
        completion if known_completion else counted,
        not known_prompt,
        cached,
        told if known_completion and type(told) is int and 0 <= told <= completion else reasoning,
    )


class Shaper:
    """The chunks of one choice of a response, chat (``chat.completion.chunk``) or legacy
    completions (``text_completion``); the other choices' shapers come from :meth:`sibling`."""

    __slots__ = ("_plain", "_prefix", "_thinking", "chat", "created", "id", "include_usage", "index", "model")

    def __init__(self, chat: bool, model: str, include_usage: bool, index: int = 0, of: Shaper | None = None) -> None:
        self.chat = chat
        self.id = of.id if of else ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = of.created if of else int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.index = index
        obj = "chat.completion.chunk" if chat else "text_completion"
        # every chunk starts the same: encoded once (orjson output is canonical JSON, so the
        # spliced chunk is valid JSON)
        head = {"id": self.id, "object": obj, "created": self.created, "model": model, "system_fingerprint": None}
        self._prefix = orjson.dumps(head)[:-1] + b',"choices":['
        # a token chunk without logprobs or extension (nearly every one): the bytes around its text
        around = self._chunk(self._content_choice("\0", None, None)).rsplit(b'"\\u0000"', 1)
        self._plain = (around[0], around[1])
        # a piece of thinking (most of a reasoning model's tokens): the bytes around its text, twice
        head, middle, tail = self._chunk(self._reasoning_choice("\0")).rsplit(b'"\\u0000"', 2)
        self._thinking = (head, middle, tail)

    def sibling(self, index: int) -> Shaper:
        """The shaper of choice ``index`` of the same response (its id and time)."""
        return Shaper(self.chat, self.model, self.include_usage, index, self)

    def _chunk(self, choice: dict[str, Any] | None) -> bytes:
        usage = b',"usage":null' if self.include_usage else b""
        body = orjson.dumps(choice) if choice is not None else b""
        return b"data: " + self._prefix + body + b"]" + usage + b"}\n\n"

    def role(self) -> bytes:
        """The first chunk of a chat stream: the role, empty content (none for completions)."""
        if not self.chat:
            return b""
        delta = {"role": "assistant", "content": ""}
        return self._chunk({"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None})

    def content(self, text: str, logprobs: Any = None, extension: dict[str, Any] | None = None) -> bytes:
        if logprobs is None and extension is None:
            head, tail = self._plain
            return head + orjson.dumps(text) + tail
        return self._chunk(self._content_choice(text, logprobs, extension))

    def _content_choice(self, text: str, logprobs: Any, extension: dict[str, Any] | None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": self.index,
                "delta": {"content": text},
                "logprobs": logprobs,
                "finish_reason": None,
            }
        else:
            choice = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": None}
        if extension is not None:
            choice["neuralpipe"] = extension
        return choice

    def finish(self, reason: str) -> bytes:
        if self.chat:
            return self._chunk({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return self._chunk({"index": self.index, "text": "", "logprobs": None, "finish_reason": reason})

    def reasoning(self, text: str) -> bytes:
        """A piece of a reasoning model's thinking (chat), under both names clients read:
        ``reasoning_content`` (DeepSeek, llama.cpp, LiteLLM) and ``reasoning`` (vLLM, OpenRouter)."""
        head, middle, tail = self._thinking
        encoded = orjson.dumps(text)
        return head + encoded + middle + encoded + tail

    def _reasoning_choice(self, text: str) -> dict[str, Any]:
        delta = {"reasoning_content": text, "reasoning": text}
        return {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}

    def tool_call_pieces(self, texts: list[str]) -> bytes:
        """A run of a chat stream's tool call pieces (engine/protocol/toolcalls.py) as one delta,
        as OpenAI streams them: a client joins each ``index``'s pieces into the call."""
        delta = {"tool_calls": merged_pieces(texts)}
        return self._chunk({"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None})

    def usage_chunk(self, usage: Usage) -> bytes:
        return b"data: " + self._prefix + b'],"usage":' + orjson.dumps(usage.as_dict()) + b"}\n\n"

    def closing(self, usage: Usage) -> bytes:
        """What ends a stream that did not fail: the usage chunk when asked for, then ``[DONE]``."""
        return (self.usage_chunk(usage) if self.include_usage else b"") + DONE

    def error(self, err: ApiError) -> bytes:
        """The event that ends a failed stream: the error object, which the client raises on."""
        return sse(err.body())

    def choice(
        self,
        text: str,
        reason: str,
        logprobs: Any = None,
        extension: dict[str, Any] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        reasoning: str = "",
    ) -> dict[str, Any]:
        """This choice of the non-streaming response (``reasoning``: the thinking, chat only)."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:  # as OpenAI answers a call: content null unless the model also wrote text
                message["content"] = text or None
                message["tool_calls"] = tool_calls
            if reasoning:  # both names, as in the stream (:meth:`reasoning`)
                message["reasoning_content"] = message["reasoning"] = reasoning
            choice: dict[str, Any] = {
                "index": self.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        else:
            choice = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        if extension is not None:
            choice["neuralpipe"] = extension
        return choice

    def whole(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        """The non-streaming response of ``choices`` (:meth:`choice` of each, by index)."""
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage.as_dict(),
        }


def chat_logprobs(texts: list[str], logprobs: list[float], tops: list[TopAlternatives]) -> dict[str, Any]:
    """``logprobs.content`` of a chat chunk: each token's own logprob and its ``top_logprobs``
    (``tops``: the alternatives the ring carried, none when not asked). A token without a logprob
    gets -9999.0 (OpenAI's own "unknown" value) rather than NaN, which is not JSON."""
    return {
        "content": [
            {
                "token": t,
                "logprob": _finite(lp),
                "bytes": list(t.encode()),
                "top_logprobs": [{"token": a, "logprob": _finite(alp), "bytes": list(a.encode())} for a, alp in top],
            }
            for t, lp, top in zip(texts, logprobs, tops, strict=True)
        ],
        "refusal": None,
    }


def completion_logprobs(
    texts: list[str], logprobs: list[float], offset: int, tops: list[TopAlternatives] | None = None
) -> dict[str, Any]:
    """Legacy completions' parallel arrays; ``offset``: characters of text before these tokens;
    ``tops``: each token's alternatives, as ``{token: logprob}`` maps (None: not asked)."""
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [_finite(lp) for lp in logprobs],
        "top_logprobs": None if tops is None else [{a: _finite(alp) for a, alp in top} for top in tops],
        "text_offset": offsets,
    }


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0
