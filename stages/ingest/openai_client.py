"""A streaming client for OpenAI-compatible servers (OpenAI, vLLM, llama.cpp, LM Studio, the
embedded upstream): POST ``/v1/chat/completions`` or ``/v1/completions`` with ``stream: true`` over
aiohttp, SSE parsed incrementally, each chunk decoded into :class:`TokenEvent` records.

    async with aclosing(stream_completion(session, url, body)) as events:
        async for event in events:      # "start", "token"..., then one "end" or one "error"
            ...

Underneath is a flat loop per stream, :func:`relay_completion`: each network read's SSE events
are decoded, column by column, into one :class:`Tokens` handed to a callback (which may return an
awaitable: back-pressure), with no object per event and no generator layer per read. Ingest's
cost per token is that loop (docs/ingest.md); the event iterators here and in the pool are
adapters over it (:func:`batches_of`).

Every upstream failure (HTTP error, llama.cpp's ``error:`` line, malformed JSON, a line that is
not SSE, a stream closed without ``[DONE]``, an idle timeout, a refused connection) ends the
stream with one "error" event; exceptions are left for programming errors. The pool builds on
:func:`relay_completion`, which raises :class:`UpstreamError` instead, so it can retry and fail
over. Closing the iterator early closes the HTTP response, so the upstream sees the disconnect.
The quirks handled, server by server: docs/upstreams.md.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from engine.fdlimit import descriptors_message, out_of_descriptors
from shm.batch import Kind, stable_token_id
from stages.ingest import http_stream
from stages.ingest.sse import SSEParser
from stages.ingest.toolcalls import ToolCallPieces

try:  # the usual read in C (setup.py builds it where a C compiler is); else the Python path alone
    from stages.ingest._chunk import usual_token
except ImportError:  # pragma: no cover - a build without a compiler
    usual_token = None

__all__ = [
    "ENDPOINTS",
    "OneToken",
    "StreamEnd",
    "TokenEvent",
    "TokenSink",
    "Tokens",
    "UpstreamError",
    "batches_of",
    "error_event",
    "raise_after",
    "relay_completion",
    "stream_completion",
    "wait_both",
]

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ERROR_BODY_LIMIT = http_stream.ERROR_BODY_LIMIT
DRAIN_TIMEOUT_S = http_stream.DRAIN_TIMEOUT_S
MAX_EVENT_BYTES = 256 * 1024  # one SSE line or event: a chunk with 20 top logprobs is a few KB
_SNIPPET = 160  # characters of a bad chunk or body quoted in an error message
_VLLM_TOKEN_ID = "token_id:"
_VOCABULARY_IDS = 1 << 31  # upstream token ids a batch takes: 0 .. 2**31 - 1
_TOKEN, _REASONING, _TOOL_CALL = int(Kind.TOKEN), int(Kind.REASONING), int(Kind.TOOL_CALL)
_EVENT_KINDS = {_TOKEN: "token", _REASONING: "reasoning", _TOOL_CALL: "tool_call"}


class UpstreamError(Exception):
    """An upstream failed the request. ``retryable``: another attempt (elsewhere) may succeed
    (transport errors, 5xx, 429, broken streams), unlike a request the upstream rejected (4xx).
    ``before_first_token``: no token of this attempt was delivered, so a retry repeats nothing."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        before_first_token: bool = True,
        status: int | None = None,
        local: bool = False,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.before_first_token = before_first_token
        self.status = status
        # ingest's own trouble (no file descriptor left for a connection): says nothing of the upstream
        self.local = local
        self.retry_after_s: float | None = None  # a 429's or 503's Retry-After: no request to it sooner

    @property
    def client_caused(self) -> bool:
        """The upstream refused this request (4xx other than 408, 425, 429): says nothing of its
        health, so it must not count towards its cool-down."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (408, 425, 429)

    @property
    def health_failure(self) -> bool:
        """A failure that says the upstream is unwell (transport, 5xx, a broken stream); a 429 is
        back-pressure, honoured through Retry-After and back-off, not a reason to take it out."""
        return self.retryable and not self.local and (self.status is None or self.status >= 500)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, per token
class TokenEvent:
    # "start" | "token" | "reasoning" (a reasoning model's thinking) | "tool_call" (a piece of a tool
    # call: text is its JSON, engine/protocol/toolcalls.py) | "end" | "error"
    kind: str
    text: str = ""
    token_id: int = 0
    logprob: float = math.nan
    top_logprobs: tuple[tuple[str, float], ...] = ()
    finish_reason: str | None = None
    usage: dict | None = None
    error: str = ""
    recv_ns: int = 0  # time.monotonic_ns() when the SSE event that carried it was parsed


@dataclass(slots=True)
class Tokens:
    """The tokens of one network read of one stream, column by column."""

    texts: list[str]
    ids: list[int | None]  # the upstream's vocabulary id, None when it gave none
    logprobs: list[float]
    tops: list[tuple[tuple[str, float], ...]]
    recv_ns: int  # time.monotonic_ns() when the read was parsed
    # the row kind (shm.batch.Kind) of the first len(kinds) tokens, those after it TOKEN; None: all
    # TOKEN (the usual read: a content token costs nothing here). REASONING: a reasoning model's
    # thinking; TOOL_CALL: a piece of a tool call (its text the piece's JSON).
    kinds: list[int] | None = None

    def all_kinds(self) -> list[int] | None:
        """Every token's row kind, or None when all are TOKEN."""
        kinds = self.kinds
        return None if kinds is None else kinds + [_TOKEN] * (len(self.texts) - len(kinds))

    def after(self, skip: int) -> Tokens:
        """These tokens without the first ``skip``."""
        kinds = None if self.kinds is None else self.kinds[skip:]
        return Tokens(self.texts[skip:], self.ids[skip:], self.logprobs[skip:], self.tops[skip:], self.recv_ns, kinds)

    @staticmethod
    def single(text: str, recv_ns: int) -> Tokens:
        """One content token with no id, logprob or alternatives: the usual read's."""
        return Tokens([text], [None], [math.nan], [()], recv_ns)

    def upto(self, n: int) -> Tokens:
        """The first ``n`` of these tokens."""
        kinds = None if self.kinds is None else self.kinds[:n]
        return Tokens(self.texts[:n], self.ids[:n], self.logprobs[:n], self.tops[:n], self.recv_ns, kinds)


@dataclass(slots=True)
class StreamEnd:
    """How a complete stream ended."""

    finish_reason: str | None
    usage: dict | None
    recv_ns: int


# Called with each read's tokens; returns None, or an awaitable the reader awaits before reading on.
TokenSink = Callable[[Tokens], Awaitable[None] | None]
# The same for the usual read at model speed, one content token with no id, logprob or
# alternatives: its text and receive time, without a Tokens (what that costs is per token).
OneToken = Callable[[str, int], Awaitable[None] | None]


async def wait_both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """What a sink returns when it has two reasons to wait (a rate limit and a full ring)."""
    await first
    await second


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

    def run(sink: TokenSink) -> Awaitable[StreamEnd]:
        return relay_completion(
            session,
            base_url,
            body,
            sink,
            endpoint=endpoint,
            headers=headers,
            connect_timeout_s=connect_timeout_s,
            idle_timeout_s=idle_timeout_s,
        )

    batches = batches_of(run)
    try:
        async for batch in batches:
            for event in batch:
                yield event
    finally:
        await batches.aclose()


def token_events(tokens: Tokens) -> list[TokenEvent]:
    kinds = tokens.all_kinds() or [_TOKEN] * len(tokens.texts)
    return [
        TokenEvent(
            _EVENT_KINDS[kind],
            text,
            token_id if token_id is not None else stable_token_id(text.encode()),
            logprob,
            top,
            recv_ns=tokens.recv_ns,
        )
        for text, token_id, logprob, top, kind in zip(
            tokens.texts, tokens.ids, tokens.logprobs, tokens.tops, kinds, strict=True
        )
    ]


async def batches_of(run: Callable[[TokenSink], Awaitable[StreamEnd]]) -> AsyncIterator[list[TokenEvent]]:
    """The events of a stream that ``run(sink)`` relays, one list per read: "token" events, then
    one "end" (``run`` returned) or "error" (it raised :class:`UpstreamError`). ``run`` goes on in
    a task of its own, in step with this iterator (the next read only once the reader asks for
    more, as a generator would); closing the iterator cancels it."""
    queue: asyncio.Queue = asyncio.Queue(1)

    async def deliver(tokens: Tokens) -> None:
        await queue.put(token_events(tokens))
        await queue.join()  # until the reader has taken it and come back for more

    async def relay() -> None:
        try:
            end = await run(deliver)
            await queue.put(
                [
                    TokenEvent(
                        "end",
                        finish_reason=end.finish_reason,
                        usage=end.usage,
                        recv_ns=end.recv_ns,
                    )
                ]
            )
        except UpstreamError as err:
            await queue.put([error_event(str(err))])
        except Exception as exc:  # a programming error: raised to the reader, not lost in the task
            await queue.put(exc)

    task = asyncio.create_task(relay())
    try:
        while True:
            batch = await queue.get()
            if isinstance(batch, Exception):
                raise batch
            yield batch
            if batch[-1].kind in ("end", "error"):
                return
            queue.task_done()
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def error_event(message: str) -> TokenEvent:
    """The event that ends a failed stream."""
    return TokenEvent("error", error=message, recv_ns=time.monotonic_ns())


async def relay_completion(
    session: aiohttp.ClientSession,
    base_url: str,
    body: dict,
    sink: TokenSink,
    *,
    one_token: OneToken | None = None,
    endpoint: str = "chat",
    headers: dict | None = None,
    connect_timeout_s: float = 5,
    idle_timeout_s: float = 60,
) -> StreamEnd:
    """Stream one request: ``sink`` gets the tokens of each read (``one_token``, where given,
    those of a read of one plain content token); returns how it ended. Every upstream failure
    raises :class:`UpstreamError` (``before_first_token`` tells whether a sink got a token: a
    reasoning model's thinking and a tool call's pieces come as tokens too)."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, not {endpoint!r}")
    url = base_url.rstrip("/") + ENDPOINTS[endpoint]
    # sock_read bounds every wait for bytes, the response headers included: an idle timeout that
    # a keep-alive comment resets, and no limit on how long a healthy stream may run.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=idle_timeout_s)
    # identity: the plain path reads the body as it comes (a request without Accept-Encoding
    # accepts any coding, so a compressing proxy could gzip the stream)
    request_headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "Accept-Encoding": "identity",
        **(headers or {}),
    }
    decoder = _ChunkDecoder(chat=endpoint == "chat")
    reader = _BodyReader(decoder, sink, one_token)
    payload = orjson.dumps({**body, "stream": True})
    if url.startswith("http://"):  # the fast path: a bare protocol, no aiohttp per read
        try:
            await http_stream.post_stream(
                url,
                payload,
                request_headers,
                reader,
                connect_timeout_s=connect_timeout_s,
                idle_timeout_s=idle_timeout_s,
            )
        except UpstreamError as err:
            err.before_first_token = decoder.tokens == 0
            raise
        except http_stream.HttpError as err:
            if err.content_encoding:
                raise _encoded_error(err.status, err.reason, err.content_encoding) from None
            raise _status_error(err.status, err.reason, err.content_type, err.body, err.retry_after) from None
        except http_stream.TransportError as err:
            raise _connection_error(err, url, connect_timeout_s, idle_timeout_s, decoder) from None
        return reader.end
    return await _relay_aiohttp(session, url, payload, request_headers, timeout, reader, decoder)


async def _relay_aiohttp(
    session: aiohttp.ClientSession,
    url: str,
    payload: bytes,
    request_headers: dict,
    timeout: aiohttp.ClientTimeout,
    reader: _BodyReader,
    decoder: _ChunkDecoder,
) -> StreamEnd:
    """The aiohttp path (https). Redirects are not followed, as on the plain path: a 307 to
    another origin would re-send the request body, and the upstream's headers, to it."""
    connect_timeout_s, idle_timeout_s = timeout.sock_connect, timeout.sock_read
    try:
        async with session.post(
            url, data=payload, headers=request_headers, timeout=timeout, allow_redirects=False
        ) as resp:
            await _check_response(resp)
            return await _relay_body(resp, reader)
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
        if out_of_descriptors(exc):
            raise _local_error(url, descriptors_message(exc)) from None
        raise _transport_error(f"cannot connect to {url}: {exc.os_error or exc}", decoder) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        # aiohttp's own text ("400, message='Not enough data...'") names no HTTP status: leave it out
        raise _transport_error(f"connection to {url} lost mid-response", decoder) from None
    except aiohttp.ClientError as exc:
        raise _transport_error(f"request to {url} failed: {type(exc).__name__}: {exc}", decoder) from None


def _connection_error(
    err: http_stream.TransportError, url: str, connect_timeout_s: float, idle_timeout_s: float, decoder: _ChunkDecoder
) -> UpstreamError:
    if err.kind == "closed":
        return decoder.closed_error()
    if err.kind == "connect":
        return _transport_error(f"cannot connect to {url}: {err}", decoder)
    if err.kind == "local":
        return _local_error(url, str(err))
    if err.kind == "idle":
        return _transport_error(f"idle timeout: no data from {url} for {idle_timeout_s} s", decoder)
    return _transport_error(f"connection to {url} lost: {err}", decoder)


def _local_error(url: str, why: str) -> UpstreamError:
    # retryable: descriptors free up as other streams end (the pool backs off between attempts)
    return UpstreamError(f"ingest cannot open a connection to {url}: {why}", retryable=True, local=True)


def _transport_error(message: str, decoder: _ChunkDecoder) -> UpstreamError:
    # how many tokens were delivered is the pool's to say, once, in the message that ends the stream
    return UpstreamError(message, retryable=True, before_first_token=decoder.tokens == 0)


def _retryable_status(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def _retryable_code(code: Any) -> bool:
    """An error's ``code`` may be an HTTP status (llama.cpp) or a name (OpenAI): only a status
    of a rejected request (4xx) makes it final."""
    return not isinstance(code, int) or _retryable_status(code)


async def _check_response(resp: aiohttp.ClientResponse) -> None:
    """Raise for an HTTP error or a response that is not a stream."""
    if resp.status == 200 and resp.content_type != "application/json":
        return
    try:
        raw = await resp.content.read(ERROR_BODY_LIMIT)
    except aiohttp.ClientError:
        raw = b""
    raise _status_error(resp.status, resp.reason or "", resp.content_type, raw, resp.headers.get("Retry-After"))


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None when absent or
    unreadable (then the pool's own back-off applies)."""
    if not value or len(value) > 64:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _status_error(
    status: int, reason: str, content_type: str, raw: bytes, retry_after: str | None = None
) -> UpstreamError:
    """The error of a response that is not a stream, naming the status and the message of its
    body (OpenAI's ``{"error": {"message"}}``, vLLM's ``{"message"}``, LM Studio's
    ``{"error": "..."}``, text)."""
    if status == 200:  # a JSON answer: a server that ignored "stream": true
        return UpstreamError(f"HTTP 200 without a stream: {_body_message(raw)}", retryable=False, status=200)
    head = f"HTTP {status} {reason}".rstrip()
    message = "redirects are not followed" if 300 <= status < 400 else _body_message(raw)
    err = UpstreamError(f"{head}: {message}" if message else head, retryable=_retryable_status(status), status=status)
    if status in (429, 503):
        err.retry_after_s = retry_after_s(retry_after)
    return err


def _encoded_error(status: int, reason: str, coding: str) -> UpstreamError:
    """A response whose body is compressed though the request asked for ``identity``: not read."""
    head = f"HTTP {status} {reason}".rstrip()
    message = f"{head} with a body in Content-Encoding {coding[:40]!r} (Accept-Encoding: identity was asked)"
    return UpstreamError(message, retryable=status != 200 and _retryable_status(status), status=status)


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


def _text_snippet(data: str | bytes) -> str:
    return _snippet(data if isinstance(data, str) else data.decode("utf-8", "replace"))


def _snippet(text: str) -> str:
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


class _BodyReader:
    """SSE and JSON of one response, a read at a time: each read's events decoded into one
    :class:`Tokens` handed to the sink, or, for a read of one plain content token, its text to
    ``one_token``. ``feed`` returns the sink's awaitable or raises :class:`UpstreamError`;
    ``complete`` once ``[DONE]`` came (``end`` then says how the stream ended)."""

    __slots__ = ("complete", "decoder", "end", "one_token", "parser", "sink")

    def __init__(self, decoder: _ChunkDecoder, sink: TokenSink, one_token: OneToken | None = None) -> None:
        self.decoder, self.sink = decoder, sink
        self.one_token = one_token or self._as_tokens
        self.parser = SSEParser(stop_at_unknown=True, max_event=MAX_EVENT_BYTES)
        self.end: StreamEnd | None = None
        self.complete = False

    def _as_tokens(self, text: str, recv_ns: int) -> Awaitable[None] | None:
        return self.sink(Tokens.single(text, recv_ns))

    def feed(self, chunk: bytes) -> Awaitable[None] | None:
        parser, decoder = self.parser, self.decoder
        if parser.plain and usual_token is not None:
            # the read at model speed: one event, one content token, nothing the decoder keeps
            text = usual_token(chunk, decoder.chat, MAX_EVENT_BYTES)
            if text is not None:
                decoder.tokens += 1
                return self.one_token(text, time.monotonic_ns())
        plain = parser.feed_plain(chunk)  # the usual read: complete data-only events, bytes kept
        if plain is None:
            return self._feed_events(chunk)
        tokens = Tokens([], [], [], [], time.monotonic_ns())  # one read: its events arrived together
        try:
            for data in plain:
                if data == b"[DONE]":
                    self._done(tokens.recv_ns)
                    break
                decoder.decode("message", data, tokens)
        except UpstreamError as exc:
            return self._deliver(tokens, exc)
        if tokens.texts:
            decoder.tokens += len(tokens.texts)
            return self.sink(tokens)
        return None

    def _feed_events(self, chunk: bytes) -> Awaitable[None] | None:
        """A read the full SSE parser takes: other fields, comments, split lines, a line that is
        not SSE (the failure after the events before it)."""
        parser, decoder = self.parser, self.decoder
        tokens = Tokens([], [], [], [], time.monotonic_ns())
        failure = None
        try:
            for event in parser.feed(chunk):
                if event.data == "[DONE]":
                    self._done(tokens.recv_ns)
                    break
                decoder.decode(event.event, event.data, tokens)
        except UpstreamError as exc:
            failure = exc
        if failure is None and not self.complete and parser.unknown_line is not None:
            failure = _unknown_line_error(parser.unknown_line)
        if failure is None and parser.overflow is not None:
            failure = UpstreamError(f"upstream sent {parser.overflow} in its event stream", retryable=True)
        return self._deliver(tokens, failure)

    def _deliver(self, tokens: Tokens, failure: UpstreamError | None) -> Awaitable[None] | None:
        """The read's tokens to the sink, then its failure (raised, or once the sink's wait is over)."""
        wait = None
        if tokens.texts:
            self.decoder.tokens += len(tokens.texts)
            wait = self.sink(tokens)
        if failure is None:
            return wait
        if wait is None:
            raise failure
        return raise_after(wait, failure)  # the tokens before the failure still count: delivered, then it

    def _done(self, recv_ns: int) -> None:
        decoder = self.decoder
        self.end = StreamEnd(decoder.finish_reason, decoder.usage, recv_ns)
        self.complete = True


async def raise_after(wait: Awaitable[None] | None, failure: Exception) -> None:
    """What a sink returns to end the stream with ``failure`` once its ``wait`` (if any) is over."""
    if wait is not None:
        await wait
    raise failure


async def _relay_body(resp: aiohttp.ClientResponse, reader: _BodyReader) -> StreamEnd:
    """The aiohttp path (https): the response body, one read at a time."""
    content = resp.content
    while chunk := await content.readany():
        wait = reader.feed(chunk)
        if wait is not None:
            await wait
        if reader.complete:
            await _drain(resp)
            return reader.end
    raise reader.decoder.closed_error()


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

    __slots__ = ("chat", "finish_reason", "tokens", "tool_calls", "usage")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.tokens = 0  # token events delivered so far
        self.tool_calls = ToolCallPieces()

    def closed_error(self) -> UpstreamError:
        detail = f" (finish_reason {self.finish_reason!r})" if self.finish_reason else ""
        return UpstreamError(
            f"upstream closed the stream without [DONE]{detail}",
            retryable=True,
            before_first_token=self.tokens == 0,
        )

    def decode(self, event_type: str, data: str | bytes, tokens: Tokens) -> None:
        """Add the tokens of one event's JSON chunk to ``tokens``. Written for the usual chunk
        (one choice, a content delta, no logprobs): it costs a dict lookup per field."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            snippet = _text_snippet(data)
            raise UpstreamError(f"malformed JSON chunk from upstream: {snippet!r}", retryable=True) from None
        if type(obj) is not dict:
            raise UpstreamError(
                f"malformed JSON chunk from upstream (not an object): {_text_snippet(data)!r}", retryable=True
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
        choices = obj.get("choices")
        if type(choices) is list and len(choices) == 1 and type(choice := choices[0]) is dict:
            if choice.get("index", 0) != 0:  # the one choice of an n=1 stream, as a rule
                return
        elif (choice := _first_choice(choices)) is None:  # vLLM/OpenAI's usage-only last chunk has "choices": []
            return
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        calls: list[str] = _NO_CALLS  # a tool call's pieces: rows after the delta's content
        if self.chat:
            delta = choice.get("delta") or {}  # LM Studio/Ollama send null
            if type(delta) is not dict:
                raise UpstreamError(f"malformed chunk from upstream: a delta {_text_snippet(data)!r}", retryable=True)
            text = delta.get("content") or ""
            if not text or len(delta) > 1:  # the usual delta is {"content": token}: nothing beside it
                thought, calls = self._beside_content(delta, data)
                if thought:
                    _add_rows(tokens, (thought,), _REASONING)
                if not text and (thought or calls):  # logprobs, if any, are theirs (not relayed)
                    _add_rows(tokens, calls, _TOOL_CALL)
                    return
        else:
            text = choice.get("text") or ""
        if type(text) is not str:
            raise UpstreamError(f"malformed chunk from upstream: a token text {_text_snippet(data)!r}", retryable=True)
        logprobs = choice.get("logprobs")
        if not logprobs and "token_ids" not in choice:  # the usual chunk: one token, or none
            if text:  # not the chat role chunk, a finish chunk, an empty keep-going delta
                tokens.texts.append(text)
                tokens.ids.append(None)
                tokens.logprobs.append(math.nan)
                tokens.tops.append(())
            if calls:
                _add_rows(tokens, calls, _TOOL_CALL)
            return
        try:  # a shape none of the servers sends (a number for a list, a list for an object, ...)
            entries = _chat_logprobs(logprobs) if self.chat else _completion_logprobs(logprobs)
        except (TypeError, AttributeError, LookupError):
            raise UpstreamError(
                f"malformed chunk from upstream: logprobs {_text_snippet(data)!r}", retryable=True
            ) from None
        _add_tokens(tokens, text, entries, choice.get("token_ids"))
        if calls:
            _add_rows(tokens, calls, _TOOL_CALL)

    def _beside_content(self, delta: dict, data: str | bytes) -> tuple[str, list[str]]:
        """What a delta carries besides its content: a reasoning model's thinking and a tool call's
        pieces (their row texts), returned; the deprecated function_call is refused, never dropped."""
        calls = _NO_CALLS
        if (pieces := delta.get("tool_calls")) is not None:
            try:
                calls = self.tool_calls.add(pieces)
            except ValueError as exc:
                snippet = _text_snippet(data)
                raise UpstreamError(f"malformed chunk from upstream: {exc}: {snippet!r}", retryable=True) from None
        elif delta.get("function_call"):
            raise UpstreamError(
                "upstream sent a function_call delta (the deprecated form): this engine relays tool_calls only",
                retryable=False,
            )
        # llama.cpp, LM Studio, DeepSeek: reasoning_content; newer vLLM: reasoning (some send both, alike)
        thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
        if type(thought) is not str:
            raise UpstreamError(
                f"malformed chunk from upstream: a reasoning text {_text_snippet(data)!r}", retryable=True
            )
        return thought, calls


def _first_choice(choices: Any) -> dict | None:
    """Choice 0 (the engine streams n=1; a server interleaving several ignores the others)."""
    if not isinstance(choices, list):
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
            _token(entry.get("token")),
            _float(entry.get("logprob")),
            tuple((_token(top.get("token")), _float(top.get("logprob"))) for top in entry.get("top_logprobs") or ()),
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
            _token(token),
            _float(values[i] if i < len(values) else None),
            tuple((t, _float(lp)) for t, lp in (tops[i] or {}).items()) if i < len(tops) else (),
            _vllm_token_id(token),
        )
        for i, token in enumerate(tokens)
    ]


def _token(value: Any) -> str:
    """A logprob entry's token text ("" for none); TypeError for anything but a string."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"a token text of type {type(value).__name__}")
    return value


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


_NO_CALLS: list[str] = []  # never appended to


def _add_rows(tokens: Tokens, texts: list[str] | tuple[str, ...], kind: int) -> None:
    """Tokens of ``kind`` (REASONING, TOOL_CALL), in order with the content's."""
    if not texts:
        return
    kinds = tokens.kinds
    if kinds is None:
        kinds = tokens.kinds = []
    kinds += [_TOKEN] * (len(tokens.texts) - len(kinds))
    kinds += [kind] * len(texts)
    n = len(texts)
    tokens.texts += texts
    tokens.ids += [None] * n
    tokens.logprobs += [math.nan] * n
    tokens.tops += [()] * n


def _add_tokens(tokens: Tokens, text: str, entries: list[_Entry], token_ids: Any) -> None:
    """One token per logprob entry when the delta has them (vLLM may put several tokens in one
    delta), else one for the whole content delta."""
    if not entries:
        if text:  # not the chat role chunk, a finish chunk, an empty keep-going delta
            ids = token_ids if isinstance(token_ids, list) and len(token_ids) == 1 else None
            tokens.texts.append(text)
            tokens.ids.append(_token_id(None, ids, 0))
            tokens.logprobs.append(math.nan)
            tokens.tops.append(())
        return
    ids = token_ids if isinstance(token_ids, list) and len(token_ids) == len(entries) else None
    texts = [entry[0] for entry in entries]
    if len(entries) == 1 or "".join(texts) != text:
        # The entries do not spell the content (byte tokens, vLLM's "token_id:N" form): the first
        # token carries the whole delta so that the concatenated text stays exact.
        texts = [text] + [""] * (len(entries) - 1)
    for i, (token, logprob, top, upstream_id) in enumerate(entries):
        tokens.texts.append(texts[i])
        token_id = _token_id(upstream_id, ids, i)
        # a token whose text is not the entry's (bytes moved to the first) is named by the entry
        tokens.ids.append(token_id if token_id is not None or texts[i] else stable_token_id(token.encode()))
        tokens.logprobs.append(logprob)
        tokens.tops.append(top)


def _token_id(upstream_id: int | None, ids: list | None, i: int) -> int | None:
    """The upstream's vocabulary id when it gives one (in the logprob entry, or vLLM's
    ``token_ids`` of the choice); None: the reader names the token by its text's stable hash.
    An id outside the batch's vocabulary range (shm/batch.py: below 2**31, the hashes above)
    is not taken: it would collide with a hash, or not fit the record's u32 column at all."""
    if upstream_id is None and ids is not None and isinstance(ids[i], int) and not isinstance(ids[i], bool):
        upstream_id = ids[i]
    if upstream_id is not None and 0 <= upstream_id < _VOCABULARY_IDS:
        return upstream_id
    return None
