"""A streaming client for OpenAI-compatible servers (OpenAI, vLLM, llama.cpp, LM Studio, the
embedded upstream): POST ``/v1/chat/completions`` or ``/v1/completions`` with ``stream: true`` over
aiohttp, SSE parsed incrementally, each chunk decoded into :class:`TokenEvent` records.

    async with aclosing(stream_completion(session, url, body)) as events:
        async for event in events:      # "start", "token"..., then one "end" or one "error"
            ...

Underneath, events travel in lists, one per network read (:func:`upstream_batches`): a read
often carries several SSE events, and passing each token alone through the generator layers
above (pool attempt, pool stream, the ingest stage) cost more than parsing it.

Every upstream failure (HTTP error, llama.cpp's ``error:`` line, malformed JSON, a line that is
not SSE, a stream closed without ``[DONE]``, an idle timeout, a refused connection) ends the
stream with one "error" event; exceptions are left for programming errors. The pool builds on
:func:`upstream_batches`, which raises :class:`UpstreamError` instead, so it can retry and fail
over. Closing the iterator early closes the HTTP response, so the upstream sees the disconnect.
The quirks handled, server by server: docs/upstreams.md.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from shm.batch import stable_token_id
from stages.ingest.sse import SSEParser

__all__ = [
    "ENDPOINTS",
    "TokenEvent",
    "UpstreamError",
    "error_event",
    "flatten",
    "stream_completion",
    "upstream_batches",
]

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ERROR_BODY_LIMIT = 64 * 1024  # an HTML error page can be large; its first bytes name the problem
DRAIN_TIMEOUT_S = 1.0  # for the rest of a body after [DONE]
_SNIPPET = 160  # characters of a bad chunk or body quoted in an error message
_VLLM_TOKEN_ID = "token_id:"


class UpstreamError(Exception):
    """An upstream failed the request. ``retryable``: another attempt (elsewhere) may succeed
    (transport errors, 5xx, 429, broken streams), unlike a request the upstream rejected (4xx).
    ``before_first_token``: no token of this attempt was delivered, so a retry repeats nothing."""

    def __init__(self, message: str, *, retryable: bool, before_first_token: bool = True, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.before_first_token = before_first_token
        self.status = status


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, per token
class TokenEvent:
    kind: str  # "start" | "token" | "end" | "error"
    text: str = ""
    token_id: int = 0
    logprob: float = math.nan
    top_logprobs: tuple[tuple[str, float], ...] = ()
    finish_reason: str | None = None
    usage: dict | None = None
    error: str = ""
    recv_ns: int = 0  # time.monotonic_ns() when the SSE event that carried it was parsed


async def stream_completion(
    session: aiohttp.ClientSession,
    base_url: str,
    body: dict,
    *,
    endpoint: str = "chat",
    headers: dict | None = None,
    connect_timeout_s: float = 5,
    idle_timeout_s: float = 60,
) -> AsyncIterator[TokenEvent]:
    """One "start", the "token" events, then exactly one "end" or one "error" event."""
    yield TokenEvent("start", recv_ns=time.monotonic_ns())
    batches = upstream_batches(
        session,
        base_url,
        body,
        endpoint=endpoint,
        headers=headers,
        connect_timeout_s=connect_timeout_s,
        idle_timeout_s=idle_timeout_s,
    )
    try:
        async for event in flatten(batches):
            yield event
    except UpstreamError as err:
        yield error_event(str(err))


async def flatten(batches: AsyncIterator[list[TokenEvent]]) -> AsyncIterator[TokenEvent]:
    """The events of a batch iterator one by one (closing it when this one is closed)."""
    async with aclosing(batches):
        async for batch in batches:
            for event in batch:
                yield event


def error_event(message: str) -> TokenEvent:
    """The event that ends a failed stream."""
    return TokenEvent("error", error=message, recv_ns=time.monotonic_ns())


async def upstream_batches(
    session: aiohttp.ClientSession,
    base_url: str,
    body: dict,
    *,
    endpoint: str = "chat",
    headers: dict | None = None,
    connect_timeout_s: float = 5,
    idle_timeout_s: float = 60,
) -> AsyncIterator[list[TokenEvent]]:
    """The "token" events of one request, then its "end" event, in non-empty lists (one per
    network read); every upstream failure raises :class:`UpstreamError` (with
    ``before_first_token`` telling whether a token was yielded)."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, not {endpoint!r}")
    url = base_url.rstrip("/") + ENDPOINTS[endpoint]
    # sock_read bounds every wait for bytes, the response headers included: an idle timeout that
    # a keep-alive comment resets, and no limit on how long a healthy stream may run.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=idle_timeout_s)
    request_headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **(headers or {})}
    decoder = _ChunkDecoder(chat=endpoint == "chat")
    try:
        async with session.post(
            url, data=orjson.dumps({**body, "stream": True}), headers=request_headers, timeout=timeout
        ) as resp:
            await _check_response(resp)
            async for batch in _read_stream(resp, decoder):
                yield batch
    except UpstreamError as err:
        err.before_first_token = decoder.tokens == 0
        raise
    except aiohttp.ConnectionTimeoutError:
        raise _transport_error(
            f"cannot connect to {url}: no connection within {connect_timeout_s} s", decoder
        ) from None
    except (aiohttp.SocketTimeoutError, TimeoutError):
        raise _transport_error(f"idle timeout: no data from {url} for {idle_timeout_s} s", decoder) from None
    except aiohttp.ClientConnectorError as exc:
        raise _transport_error(f"cannot connect to {url}: {exc.os_error or exc}", decoder) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        raise _transport_error(f"connection to {url} lost: {exc}", decoder) from None
    except aiohttp.ClientError as exc:
        raise _transport_error(f"request to {url} failed: {type(exc).__name__}: {exc}", decoder) from None


def _transport_error(message: str, decoder: _ChunkDecoder) -> UpstreamError:
    if decoder.tokens:
        message += f" (after {decoder.tokens} tokens)"
    return UpstreamError(message, retryable=True, before_first_token=decoder.tokens == 0)


def _retryable_status(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def _retryable_code(code: Any) -> bool:
    """An error's ``code`` may be an HTTP status (llama.cpp) or a name (OpenAI): only a status
    of a rejected request (4xx) makes it final."""
    return not isinstance(code, int) or _retryable_status(code)


async def _check_response(resp: aiohttp.ClientResponse) -> None:
    """Raise for an HTTP error, naming the status and the message of its body (OpenAI's
    ``{"error": {"message"}}``, vLLM's ``{"message"}``, LM Studio's ``{"error": "..."}``, text)."""
    if resp.status == 200:
        if resp.content_type == "application/json":  # a server that ignored "stream": true
            raw = await resp.content.read(ERROR_BODY_LIMIT)
            raise UpstreamError(f"HTTP 200 without a stream: {_body_message(raw)}", retryable=False, status=200)
        return
    try:
        raw = await resp.content.read(ERROR_BODY_LIMIT)
    except aiohttp.ClientError:
        raw = b""
    reason = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
    message = _body_message(raw)
    raise UpstreamError(
        f"{reason}: {message}" if message else reason, retryable=_retryable_status(resp.status), status=resp.status
    )


def _body_message(raw: bytes) -> str:
    try:
        return _error_message(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return _snippet(raw.decode("utf-8", "replace").strip())


def _error_message(obj: Any) -> str:
    """The human message of an error object in any of the shapes servers use."""
    if isinstance(obj, dict):
        inner = obj.get("error", obj)
        if isinstance(inner, str):
            return inner
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return _snippet(orjson.dumps(obj).decode())


def _snippet(text: str) -> str:
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


async def _read_stream(resp: aiohttp.ClientResponse, decoder: _ChunkDecoder) -> AsyncIterator[list[TokenEvent]]:
    parser = SSEParser(stop_at_unknown=True)
    async for chunk in resp.content.iter_any():
        # The events before a line that is not SSE or a bad chunk still count: deliver them, then fail.
        events = parser.feed(chunk)
        if events:
            now = time.monotonic_ns()  # one read: every event in it arrived at the same time
            batch: list[TokenEvent] = []
            for event in events:
                if event.data == "[DONE]":
                    batch.append(decoder.end_event(now))
                    yield batch
                    await _drain(resp)
                    return
                try:
                    tokens = decoder.decode(event.event, event.data, now)
                except UpstreamError:
                    if batch:
                        yield batch
                    raise
                decoder.tokens += len(tokens)
                batch += tokens
            if batch:
                yield batch
        if parser.unknown_line is not None:
            raise _unknown_line_error(parser.unknown_line)
    raise decoder.closed_error()


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read what follows ``[DONE]`` (the chunked encoding's terminator): only a response read to
    its end lets the connection go back to the pool for the next request. The stream is complete
    already, so a server that sends on or stalls merely loses its connection."""
    with suppress(aiohttp.ClientError, TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            left = ERROR_BODY_LIMIT
            while left > 0 and not resp.content.at_eof():
                left -= len(await resp.content.readany())


def _unknown_line_error(line: str) -> UpstreamError:
    """The failure a line that is not SSE reports. A spec-complete parser ignores such lines,
    which would hide llama.cpp's ``error: {...}`` line (its way to report a failure mid-stream)
    and a proxy's HTML."""
    name, _, value = line.partition(":")
    if name == "error":  # llama.cpp: `error: {"code": 500, "message": "...", "type": "server_error"}`
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            obj = value.strip()
        code = obj.get("code") if isinstance(obj, dict) else None
        return UpstreamError(f"upstream error line: {_error_message(obj)}", retryable=_retryable_code(code))
    return UpstreamError(f"garbage line in the event stream: {_snippet(line)!r}", retryable=True)


class _ChunkDecoder:
    """Turns the JSON chunks of one stream into token events and remembers what the final
    event reports (finish_reason, usage)."""

    __slots__ = ("chat", "finish_reason", "tokens", "usage")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.tokens = 0  # token events delivered so far

    def end_event(self, recv_ns: int) -> TokenEvent:
        return TokenEvent("end", finish_reason=self.finish_reason, usage=self.usage, recv_ns=recv_ns)

    def closed_error(self) -> UpstreamError:
        detail = f" (finish_reason {self.finish_reason!r})" if self.finish_reason else ""
        return UpstreamError(
            f"upstream closed the stream without [DONE] after {self.tokens} tokens{detail}",
            retryable=True,
            before_first_token=self.tokens == 0,
        )

    def decode(self, event_type: str, data: str, recv_ns: int) -> list[TokenEvent]:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"malformed JSON chunk from upstream: {_snippet(data)!r}", retryable=True) from None
        if not isinstance(obj, dict):
            raise UpstreamError(
                f"malformed JSON chunk from upstream (not an object): {_snippet(data)!r}", retryable=True
            )
        # OpenAI and newer llama.cpp report a failure mid-stream as a data chunk with "error";
        # some servers name the event "error" instead.
        error = obj.get("error")
        if error or event_type == "error":
            code = error.get("code") if isinstance(error, dict) else None
            raise UpstreamError(f"upstream error: {_error_message(obj)}", retryable=_retryable_code(code))
        usage = obj.get("usage")
        if usage:  # OpenAI sends "usage": null in every chunk but the last; vLLM may repeat it
            self.usage = usage
        choice = _first_choice(obj.get("choices"))
        if choice is None:  # vLLM/OpenAI's usage-only last chunk has "choices": []
            return []
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if self.chat:
            text = (choice.get("delta") or {}).get("content") or ""  # LM Studio/Ollama send null
            entries = _chat_logprobs(choice.get("logprobs"))
        else:
            text = choice.get("text") or ""
            entries = _completion_logprobs(choice.get("logprobs"))
        return _token_events(text, entries, choice.get("token_ids"), recv_ns)


def _first_choice(choices: Any) -> dict | None:
    """Choice 0 (the engine streams n=1; a server interleaving several ignores the others)."""
    if not choices:
        return None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


# One logprob entry, the same for both endpoints: (token text, logprob, top_logprobs, upstream id)
_Entry = tuple[str, float, tuple[tuple[str, float], ...], int | None]


def _chat_logprobs(logprobs: Any) -> list[_Entry]:
    """``logprobs.content``: ``[{token, logprob, bytes, top_logprobs: [{token, logprob}], id?}]``;
    llama.cpp adds the vocabulary ``id`` to each entry."""
    if not isinstance(logprobs, dict) or not logprobs.get("content"):
        return []
    return [
        (
            entry.get("token") or "",
            _float(entry.get("logprob")),
            tuple((top.get("token") or "", _float(top.get("logprob"))) for top in entry.get("top_logprobs") or ()),
            _entry_id(entry),
        )
        for entry in logprobs["content"]
    ]


def _completion_logprobs(logprobs: Any) -> list[_Entry]:
    """Legacy completions: parallel arrays ``tokens``, ``token_logprobs``, ``top_logprobs``
    (a list of ``{token: logprob}`` maps, entries may be null)."""
    if not isinstance(logprobs, dict) or not logprobs.get("tokens"):
        return []
    tokens = logprobs["tokens"]
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    return [
        (
            token,
            _float(values[i] if i < len(values) else None),
            tuple((t, _float(lp)) for t, lp in (tops[i] or {}).items()) if i < len(tops) else (),
            _vllm_token_id(token),
        )
        for i, token in enumerate(tokens)
    ]


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _entry_id(entry: dict) -> int | None:
    """llama.cpp's ``id`` (or a ``token_id``) in a chat logprob entry."""
    for key in ("id", "token_id"):
        value = entry.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return _vllm_token_id(entry.get("token") or "")


def _vllm_token_id(token: str) -> int | None:
    """vLLM started with --return-tokens-as-token-ids writes logprob tokens as "token_id:1234"."""
    if token.startswith(_VLLM_TOKEN_ID) and token[len(_VLLM_TOKEN_ID) :].isdigit():
        return int(token[len(_VLLM_TOKEN_ID) :])
    return None


def _token_events(text: str, entries: list[_Entry], token_ids: Any, recv_ns: int) -> list[TokenEvent]:
    """One event per token: per logprob entry when the delta has them (vLLM may put several
    tokens in one delta), else one for the whole content delta."""
    if not entries:
        if not text:
            return []  # the chat role chunk, a finish chunk, an empty keep-going delta
        ids = token_ids if isinstance(token_ids, list) and len(token_ids) == 1 else None
        return [TokenEvent("token", text, _token_id(text, None, ids, 0), recv_ns=recv_ns)]
    ids = token_ids if isinstance(token_ids, list) and len(token_ids) == len(entries) else None
    texts = [entry[0] for entry in entries]
    if len(entries) == 1 or "".join(texts) != text:
        # The entries do not spell the content (byte tokens, vLLM's "token_id:N" form): the first
        # event carries the whole delta so that the concatenated text stays exact.
        texts = [text] + [""] * (len(entries) - 1)
    return [
        TokenEvent(
            "token",
            texts[i],
            _token_id(texts[i] or token, upstream_id, ids, i),
            logprob,
            top,
            recv_ns=recv_ns,
        )
        for i, (token, logprob, top, upstream_id) in enumerate(entries)
    ]


def _token_id(text: str, upstream_id: int | None, ids: list | None, i: int) -> int:
    """The upstream's vocabulary id when it gives one (in the logprob entry, or vLLM's
    ``token_ids`` of the choice), else the stable hash of the token's bytes."""
    if upstream_id is not None:
        return upstream_id
    if ids is not None and isinstance(ids[i], int):
        return ids[i]
    return stable_token_id(text.encode())
