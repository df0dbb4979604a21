"""One streaming HTTP/1.1 POST over plain TCP, its response body handed to a callback from the
connection's ``data_received``: no reader task to wake, no future and no timer per network read.

Ingest's cost per token was mostly aiohttp's per-read machinery (a future, a task wake-up, a read
timer rescheduled, three Python layers) on reads that carry one SSE event each; a bare asyncio
protocol costs about a tenth of it (docs/ingest.md). The HTTP itself comes from libraries: h11
writes the request (once per request), httptools (llhttp, in C, as uvicorn uses it) parses the
response as each read arrives. aiohttp still serves https upstreams and the health checks.

    await post_stream(url, payload, headers, reader, connect_timeout_s=5, idle_timeout_s=60)

``reader.feed(body_bytes)`` is called with each read's body bytes (chunked framing removed); it
returns None to go on or an awaitable (reading pauses until it is done: back-pressure), or raises
to end the stream; once ``reader.complete`` is true the stream is over and ``post_stream`` returns.
A status other than 200, or a
JSON body where a stream was asked for, raises :class:`HttpError` with the body's first bytes; a
transport failure raises :class:`TransportError`. ``post_stream`` returns as soon as the reader is
complete; the connection then reads the rest of the body (the chunked terminator) in the
background and is kept for the next request to the same host, unless the server closes it or
says ``Connection: close`` (a kept connection found dead before any response byte is retried
once on a new one). Redirects are not followed: a 3xx is an error like any other status.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from typing import Protocol
from urllib.parse import urlsplit

import h11
import httptools

from engine.fdlimit import descriptors_message, out_of_descriptors

__all__ = ["BodyReader", "HttpError", "TransportError", "post_stream"]

MAX_HEAD_BYTES = 64 * 1024  # status line and headers (llhttp itself sets no limit)
MAX_IDLE_PER_HOST = 256  # kept connections
DRAIN_TIMEOUT_S = 1.0  # for the rest of a body after the reader is complete ([DONE])
ERROR_BODY_LIMIT = 64 * 1024  # an HTML error page can be large; its first bytes name the problem
READ_BYTES_PER_TURN = 256 * 1024  # read by every stream of a loop in one turn, then timers and tasks run


class BodyReader(Protocol):
    complete: bool  # the body says the stream is over (e.g. an SSE "[DONE]")

    def feed(self, body: bytes) -> Awaitable[None] | None: ...


class HttpError(Exception):
    """A response that is not a stream: ``status``, ``reason``, ``content_type`` and the first
    bytes of its ``body``."""

    def __init__(
        self,
        status: int,
        reason: str,
        content_type: str,
        body: bytes,
        retry_after: str | None = None,
        content_encoding: str = "",
    ) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status, self.reason, self.content_type, self.body = status, reason, content_type, body
        self.retry_after = retry_after  # the Retry-After header, as sent
        self.content_encoding = content_encoding  # a coding other than identity: the body is not text


class TransportError(Exception):
    """The connection failed: ``kind`` is "connect", "idle", "lost" (cut mid-response), "closed"
    (the response ended, complete, before the feed had its end) or "local" (no connection could be
    made because this process has no file descriptor left); the message says how."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def post_stream(
    url: str,
    payload: bytes,
    headers: dict[str, str],
    reader: BodyReader,
    *,
    connect_timeout_s: float,
    idle_timeout_s: float,
) -> None:
    """POST ``payload`` to ``url`` (http only) and feed the response body to ``reader`` until it
    is complete; raise :class:`HttpError` or :class:`TransportError` otherwise."""
    parts = urlsplit(url)
    key = (parts.hostname or "", parts.port or 80)
    request = _request(parts.netloc.rpartition("@")[2], parts.path, parts.query, headers, payload)
    loop = asyncio.get_running_loop()
    idle = _idle_connections(loop, key)
    while True:
        protocol = _Stream(loop, reader, idle_timeout_s, idle, _turn_budget(loop))
        reused = _take_idle(idle)
        if reused is not None:
            reused.set_protocol(protocol)
            protocol.connection_made(reused)
        else:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for returns the connection when a
                # cancel comes as it completes, and the cancelled stream would run on
                async with asyncio.timeout(connect_timeout_s):
                    await loop.create_connection(lambda p=protocol: p, *key)
            except TimeoutError:
                protocol.stop()
                raise TransportError("connect", f"no connection within {connect_timeout_s} s") from None
            except OSError as exc:
                protocol.stop()
                if out_of_descriptors(exc):  # this process's trouble, not the server's
                    raise TransportError("local", descriptors_message(exc)) from None
                raise TransportError("connect", str(exc) or type(exc).__name__) from None
            except BaseException:  # cancelled: no connection left open
                protocol.stop()
                raise
        protocol.transport.write(request)
        try:
            await protocol.finished
            return
        except TransportError:
            if reused is None or protocol.head_bytes:  # a new connection, or a response begun: real
                raise
        finally:
            protocol.release()  # the caller is done: the connection finishes the body, then is kept or closed


def _request(host: str, path: str, query: str, headers: dict[str, str], payload: bytes) -> bytes:
    """The request's bytes, by h11 (which refuses a line break or other forbidden byte in a header:
    that would smuggle a header, or a request, in). ``host`` never carries credentials."""
    target = (path or "/") + ("?" + query if query else "")
    fields = [("Host", host), *headers.items(), ("Content-Length", str(len(payload)))]
    client = h11.Connection(h11.CLIENT)
    try:
        head = client.send(h11.Request(method="POST", target=target, headers=fields))
    except h11.LocalProtocolError:  # its message quotes the value, which may be a secret
        raise TransportError(
            "connect", "request not valid HTTP: a header or the URL path has a line break or another byte HTTP forbids"
        ) from None
    return head + client.send(h11.Data(data=payload)) + client.send(h11.EndOfMessage())


_IDLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (host, port) -> transports
_BUDGETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> _TurnBudget


def _turn_budget(loop: asyncio.AbstractEventLoop) -> _TurnBudget:
    budget = _BUDGETS.get(loop)
    if budget is None:
        budget = _BUDGETS[loop] = _TurnBudget(loop)
    return budget


class _TurnBudget:
    """The bytes every stream of one event loop has read in this turn of the loop. libuv reads a
    readable socket up to 32 times in a row before anything else runs: upstreams sending faster
    than ingest parses (a long answer with top logprobs, a backlog after back-pressure) held the
    loop for a second, past the worker's heartbeat. Past READ_BYTES_PER_TURN a stream waits for
    the next turn, as it waits for room in the ring."""

    __slots__ = ("loop", "spent", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.spent, self.waiters = loop, 0, []

    def spend(self, n: int) -> bool:
        """Count a read; whether this turn's budget is spent."""
        if not self.spent:
            self.loop.call_soon(self._next_turn)  # after this turn's reads, before the next turn's timers
        self.spent += n
        return self.spent >= READ_BYTES_PER_TURN

    def next_turn(self) -> asyncio.Future:
        """A future done at the next turn of the loop."""
        waiter = self.loop.create_future()  # one each: a stream stopped meanwhile cancels its own
        self.waiters.append(waiter)
        return waiter

    def _next_turn(self) -> None:
        self.spent = 0
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _idle_connections(loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> list[asyncio.Transport]:
    return _IDLE.setdefault(loop, {}).setdefault(key, [])


def _take_idle(idle: list[asyncio.Transport]) -> asyncio.Transport | None:
    while idle:
        transport = idle.pop()
        if not transport.is_closing():
            return transport
    return None


class _Parked(asyncio.Protocol):
    """A kept connection between requests: anything from the server now ends it."""

    def __init__(self, idle: list[asyncio.Transport], transport: asyncio.Transport) -> None:
        self.idle, self.transport = idle, transport

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport in self.idle:
            self.idle.remove(self.transport)


class _Stream(asyncio.Protocol):
    """The response, parsed by httptools as each read arrives; the read's body bytes are fed on
    at once. The ``on_*`` methods are httptools' callbacks."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reader: BodyReader,
        idle_timeout_s: float,
        idle: list,
        budget: _TurnBudget,
    ) -> None:
        self.loop, self.reader, self.idle_timeout_s, self.idle = loop, reader, idle_timeout_s, idle
        self.budget = budget
        self.parser = httptools.HttpResponseParser(self)
        self.keep_alive = False  # httptools' verdict, once the response is complete
        self.waiting = False  # a reader's wait is pending: reading is paused
        self.pending: asyncio.Future | None = None  # that wait, run as a task of its own
        self.released = False  # the caller is gone: what is left of the body is only drained
        self.finished: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.head_bytes = 0  # bytes read until the head was complete
        self.head_done = False
        self.body_done = False  # httptools saw the response's end
        self.sized = False  # Content-Length or Transfer-Encoding: else the body ends at the close
        self.reason = ""
        self.content_type = ""
        self.content_encoding = ""  # a coding other than identity
        self.retry_after: str | None = None
        self.error: HttpError | None = None  # a response that is not a stream: its body is collected
        self.pieces: list[bytes] = []  # the body bytes of the read being parsed
        self.last_read = loop.time()
        self.watchdog = loop.call_later(idle_timeout_s, self._check_idle)

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                if not self.body_done:
                    raise TransportError("lost", f"malformed response: {exc}") from None
                self.keep_alive = False  # bytes after the response: never reuse the connection
            except httptools.HttpParserUpgrade:  # a 101: what follows is not HTTP (nor a stream)
                self.body_done, self.keep_alive = True, False
            if not self.head_done and self.head_bytes > MAX_HEAD_BYTES:
                raise TransportError("lost", f"response head larger than {MAX_HEAD_BYTES} bytes")
            pieces = self.pieces
            if pieces:
                body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                if self.finished.done():
                    pass
                elif self.error is None:  # the stream's read: to the reader, no call in between
                    wait = self.reader.feed(body)
                    if self.budget.spend(len(body)) and wait is None:
                        wait = self.budget.next_turn()
                    if wait is not None:
                        self._wait_for(wait)
                    elif self.reader.complete:
                        self._succeed()
                else:
                    self._error_body(body)
            if self.body_done:
                if not self.finished.done() and not self.waiting:
                    self._end_of_body()
                elif self.released:
                    self._park()
        except Exception as exc:  # the feed's verdict (or a malformed response) ends the stream
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.watchdog.cancel()
        if self.finished.done():
            return
        if self.head_done and not self.body_done and not self.sized:  # the close ends the body
            # (httptools has no call for "the connection closed", which would say so itself)
            self._end_of_body()
            return
        self._fail(TransportError("lost", str(exc) if exc else "the server closed the connection mid-response"))

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if self.body_done:  # a second response on one request: never reuse the connection
            self.keep_alive = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1").split(";")[0].strip().lower()
        elif name == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self.sized = True
        elif name == b"content-encoding":
            coding = value.decode("latin-1").strip().lower()
            self.content_encoding = "" if coding == "identity" else coding

    def on_headers_complete(self) -> None:
        self.head_done = True
        status = self.parser.get_status_code()
        # an error, a server that ignored stream, or a body compressed though identity was asked
        if status != 200 or self.content_type == "application/json" or self.content_encoding:
            self.error = HttpError(status, self.reason, self.content_type, b"", self.retry_after, self.content_encoding)

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.body_done = True
        self.keep_alive = self.parser.should_keep_alive()

    # ---- the body

    def _error_body(self, body: bytes) -> None:
        """The first ERROR_BODY_LIMIT bytes of a response that is not a stream, for its error."""
        error = self.error
        if len(error.body) < ERROR_BODY_LIMIT:
            error.body += body[: ERROR_BODY_LIMIT - len(error.body)]
        if len(error.body) >= ERROR_BODY_LIMIT:
            self._fail(error)

    def _wait_for(self, wait: Awaitable[None]) -> None:
        """Back-pressure: read on once the reader's wait is over."""
        self.waiting = True
        self.transport.pause_reading()
        # a task of its own at once, kept: a stream stopped meanwhile cancels it (its reader may be
        # gone, and a wait on a reader that is gone never ends)
        self.pending = asyncio.ensure_future(wait)
        self.loop.create_task(self._resume_after(self.pending))

    async def _resume_after(self, wait: asyncio.Future) -> None:
        try:
            await wait
        except BaseException as exc:  # cancelled with its stream, too
            self._fail(exc)
            return
        finally:
            self.pending = None
        self.waiting = False
        if self.reader.complete:
            self._succeed()
        elif self.body_done:
            self._end_of_body()
        elif self.transport is not None and not self.transport.is_closing():
            self.last_read = self.loop.time()  # the server's idle time counts from here
            self.transport.resume_reading()

    def _end_of_body(self) -> None:
        if self.error is not None:
            self._fail(self.error)
        else:
            self._fail(TransportError("closed", "the response ended before the stream did"))

    # ---- ending

    def _check_idle(self) -> None:
        if self.waiting:  # ingest is not reading (back-pressure): the server's silence is not counted
            self.watchdog = self.loop.call_later(self.idle_timeout_s, self._check_idle)
            return
        idle = self.loop.time() - self.last_read
        if idle >= self.idle_timeout_s:
            self._fail(TransportError("idle", f"no data for {self.idle_timeout_s:g} s"))
        else:
            self.watchdog = self.loop.call_later(self.idle_timeout_s - idle, self._check_idle)

    def _succeed(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.resume_reading()  # the rest of the body: the terminator, then keep it

    def _fail(self, exc: BaseException) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)
        self.stop()

    def release(self) -> None:
        """The caller has its result: keep the connection once its body is read, within
        DRAIN_TIMEOUT_S, else close it."""
        self.released = True
        done = self.finished
        if self.transport is None or not done.done() or done.cancelled() or done.exception() is not None:
            self.stop()
        elif self.body_done:
            self._park()
        else:
            self.watchdog.cancel()
            self.watchdog = self.loop.call_later(DRAIN_TIMEOUT_S, self.stop)

    def _park(self) -> None:
        self.watchdog.cancel()
        transport, self.transport = self.transport, None
        if transport is None or transport.is_closing():
            return
        if not self.keep_alive or len(self.idle) >= MAX_IDLE_PER_HOST:
            transport.close()
            return
        transport.set_protocol(_Parked(self.idle, transport))
        self.idle.append(transport)

    def stop(self) -> None:
        self.watchdog.cancel()
        if self.pending is not None:
            self.pending.cancel()
        if self.transport is not None:
            self.transport.close()
