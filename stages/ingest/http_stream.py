"""One streaming HTTP/1.1 POST over plain TCP, its response body handed to a callback as each
read is parsed: no reader task to wake, no future and no timer per network read.

Reading: every stream socket of an event loop sits in one epoll set of this module's
(:class:`_Reads`), which the loop watches as a single file descriptor. When it is readable,
every stream socket with bytes waiting is read in one pass, one ``recv_into`` each into one
buffer; with a read interval set (:func:`read_in_passes`, ingest's flush window), the next pass
then comes on a timer, at most one per interval, for as long as passes find bytes: under load
the process wakes once per interval for all its streams instead of once or more per socket
(at 100 streams x 100 tokens/s that was ~3,500 wake-ups a second, each a context switch), and a
read may carry the events of several streams' ticks. A lone event after a quiet spell is read at
once. After each pass the ``after_pass`` callback runs (ingest writes its rows then).

The HTTP itself comes from libraries: h11 writes the request (once per request), httptools
(llhttp, in C, as uvicorn uses it) parses the response as each read arrives. aiohttp still
serves https upstreams and the health checks.

    await post_stream(url, payload, headers, reader, connect_timeout_s=5, idle_timeout_s=60)

``reader.feed(body_bytes, recv_ns)`` is called with each read's body bytes (chunked framing
removed) and when they arrived, as ``time.monotonic_ns()``: the start of the pass when the bytes
themselves woke the loop (their arrival, give or take the wake-up), else the start of the
previous pass (they came after it: a latency measured from it is not understated by the wait
for the pass; only bytes left waiting while the reader paused the stream count from its
resumption); it returns None to go on or an awaitable (reading pauses until it is done:
back-pressure), or raises to end the stream; once ``reader.complete`` is true the stream is over
and ``post_stream`` returns. A status other than 200, or a JSON body where a stream was asked
for, raises :class:`HttpError` with the body's first bytes; a transport failure raises
:class:`TransportError`. ``post_stream`` returns as soon as the reader is complete; the
connection then reads the rest of the body (the chunked terminator) and is kept for the next
request to the same host, unless the server closes it or says ``Connection: close`` (a kept
connection found dead before any response byte is retried once on a new one). Redirects are not
followed: a 3xx is an error like any other status.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import urlsplit

import h11
import httptools

__all__ = ["BodyReader", "HttpError", "TransportError", "close_idle", "post_stream", "read_in_passes"]

MAX_HEAD_BYTES = 64 * 1024  # status line and headers (llhttp itself sets no limit)
MAX_IDLE_PER_HOST = 256  # kept connections
DRAIN_TIMEOUT_S = 1.0  # for the rest of a body after the reader is complete ([DONE])
ERROR_BODY_LIMIT = 64 * 1024  # an HTML error page can be large; its first bytes name the problem
READ_BYTES = 256 * 1024  # one recv_into; a socket with more waiting is read again in the same pass
READS_PER_PASS = 4  # per socket: an unpaced stream gets up to 1 MiB a pass, the others their turn


class BodyReader(Protocol):
    complete: bool  # the body says the stream is over (e.g. an SSE "[DONE]")

    def feed(self, body: bytes, recv_ns: int) -> Awaitable[None] | None: ...


class HttpError(Exception):
    """A response that is not a stream: ``status``, ``reason``, ``content_type`` and the first
    bytes of its ``body``."""

    def __init__(
        self, status: int, reason: str, content_type: str, body: bytes, retry_after: str | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status, self.reason, self.content_type, self.body = status, reason, content_type, body
        self.retry_after = retry_after  # the Retry-After header, as sent


class TransportError(Exception):
    """The connection failed: ``kind`` is "connect", "idle", "lost" (cut mid-response) or
    "closed" (the response ended, complete, before the feed had its end); the message says how."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def read_in_passes(interval_s: float, after_pass: Callable[[], None] | None = None) -> None:
    """For the running loop's streams: passes at most once per ``interval_s`` while they find
    bytes (0: a pass whenever a socket is readable), and ``after_pass`` called after each."""
    reads = _reads(asyncio.get_running_loop())
    reads.interval_s, reads.after_pass = interval_s, after_pass


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
        sock = _take_idle(idle)
        reused = sock is not None
        if sock is None:
            sock = await _connect(loop, key, connect_timeout_s)
        stream = _Stream(loop, reader, idle_timeout_s, idle, sock)
        try:
            try:
                await loop.sock_sendall(sock, request)
            except OSError as exc:  # a kept connection the server has closed: before any response byte
                stream.connection_lost(exc)
            await stream.finished
            return
        except TransportError:
            if not reused or stream.head_bytes:  # a new connection, or a response begun: real
                raise
        finally:
            stream.release()  # the caller is done: the connection finishes the body, then is kept or closed


async def _connect(loop: asyncio.AbstractEventLoop, key: tuple[str, int], timeout_s: float) -> socket.socket:
    """A non-blocking TCP socket connected to ``key`` (each address in turn), or TransportError."""
    failure: OSError | None = None
    try:
        async with asyncio.timeout(timeout_s):
            for family, kind, proto, _, address in await loop.getaddrinfo(*key, type=socket.SOCK_STREAM):
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await loop.sock_connect(sock, address)
                    return sock
                except OSError as exc:
                    sock.close()
                    failure = exc
                except BaseException:  # cancelled, or timed out: never a socket left open
                    sock.close()
                    raise
    except TimeoutError:
        raise TransportError("connect", f"no connection within {timeout_s} s") from None
    except OSError as exc:  # the name did not resolve
        failure = exc
    raise TransportError("connect", (str(failure) or type(failure).__name__) if failure else "no address")


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


# ---- connections kept between requests ---------------------------------------------------------

_IDLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (host, port) -> sockets


def _idle_connections(loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> list[socket.socket]:
    return _IDLE.setdefault(loop, {}).setdefault(key, [])


def _take_idle(idle: list[socket.socket]) -> socket.socket | None:
    """The most recently kept connection that is still open and silent (anything from the server
    between requests, its close included, makes a connection unusable)."""
    while idle:
        sock = idle.pop()
        try:
            sock.recv(1, socket.MSG_PEEK)  # b"" (closed) or a byte: not a connection to reuse
        except BlockingIOError:
            return sock
        except OSError:
            pass
        sock.close()
    return None


def close_idle() -> None:
    """Close the running loop's kept connections (an upstream pool closing)."""
    for idle in _IDLE.pop(asyncio.get_running_loop(), {}).values():
        for sock in idle:
            sock.close()


# ---- reading ---------------------------------------------------------------------------------

_READS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> _Reads


def _reads(loop: asyncio.AbstractEventLoop) -> _Reads:
    reads = _READS.get(loop)
    if reads is None:
        reads = _READS[loop] = _Reads(loop)
    return reads


class _Reads:
    """One loop's stream sockets in one epoll set, read in passes (see the module's docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.poller = select.epoll()
        self.streams: dict[int, _Stream] = {}
        self.buffer = bytearray(READ_BYTES)
        self.view = memoryview(self.buffer)
        self.interval_s = 0.0
        self.after_pass: Callable[[], None] | None = None
        self.timer: asyncio.TimerHandle | None = None  # the next pass, while passes find bytes
        self.watching = False  # the loop wakes this on a readable socket
        self.since_ns = 0  # when the last pass began: bytes read in the next one came after it
        self.last_pass = 0.0  # its loop.time()

    def add(self, fd: int, stream: _Stream) -> None:
        self.poller.register(fd, select.EPOLLIN)
        self.streams[fd] = stream
        self._watch()

    def remove(self, fd: int) -> None:
        if self.streams.pop(fd, None) is not None:
            self.poller.unregister(fd)
        if not self.streams and self.watching:
            self.loop.remove_reader(self.poller.fileno())
            self.watching = False

    def pause(self, fd: int) -> None:
        self.poller.modify(fd, 0)

    def resume(self, fd: int) -> None:
        self.poller.modify(fd, select.EPOLLIN)

    def _watch(self) -> None:
        if not self.watching and self.timer is None and self.streams:
            self.loop.add_reader(self.poller.fileno(), self._readable)
            self.watching = True

    def _readable(self) -> None:
        """A socket became readable while no pass was due: read now, or when the interval since
        the last pass is over (the bytes came now: they count from now)."""
        now = time.monotonic_ns()
        if self.interval_s > 0:  # passes on the timer from here on, while they find bytes
            self.loop.remove_reader(self.poller.fileno())
            self.watching = False
            due = self.last_pass + self.interval_s
            if due > self.loop.time():
                self.since_ns = now
                self.timer = self.loop.call_at(due, self._tick)
                return
        self._pass(now)

    def _tick(self) -> None:
        self.timer = None
        self._pass(self.since_ns)

    def _pass(self, since_ns: int) -> None:
        """Read every readable stream socket once (and again while it fills the buffer)."""
        began, self.last_pass = time.monotonic_ns(), self.loop.time()
        ready = self.poller.poll(0)
        streams, buffer, view = self.streams, self.buffer, self.view
        for fd, _ in ready:
            stream = streams.get(fd)
            for _ in range(READS_PER_PASS):
                if stream is None or stream.paused:
                    break
                try:
                    n = stream.sock.recv_into(buffer)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    stream.connection_lost(exc)
                    break
                if not n:
                    stream.connection_lost(None)
                    break
                stream.data_received(view[:n], since_ns)
                if n < READ_BYTES:
                    break
                stream = streams.get(fd)  # the stream may have ended on those bytes
        self.since_ns = began
        try:
            if self.after_pass is not None:
                self.after_pass()
        finally:  # whatever the callback did, the streams are read on
            if ready and self.interval_s > 0 and self.streams:
                self.timer = self.loop.call_at(self.last_pass + self.interval_s, self._tick)
            else:
                self._watch()


# ---- one response ------------------------------------------------------------------------------


class _Stream:
    """The response on one connection, parsed by httptools as each read arrives; the read's body
    bytes are fed on at once. The ``on_*`` methods are httptools' callbacks."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reader: BodyReader,
        idle_timeout_s: float,
        idle: list,
        sock: socket.socket,
    ) -> None:
        self.loop, self.reader, self.idle_timeout_s, self.idle = loop, reader, idle_timeout_s, idle
        self.parser = httptools.HttpResponseParser(self)
        self.keep_alive = False  # httptools' verdict, once the response is complete
        self.waiting = False  # a reader's wait is pending: reading is paused
        self.paused = False
        self.released = False  # the caller is gone: what is left of the body is only drained
        self.finished: asyncio.Future[None] = loop.create_future()
        self.head_bytes = 0  # bytes read until the head was complete
        self.head_done = False
        self.body_done = False  # httptools saw the response's end
        self.sized = False  # Content-Length or Transfer-Encoding: else the body ends at the close
        self.reason = ""
        self.content_type = ""
        self.retry_after: str | None = None
        self.error: HttpError | None = None  # a response that is not a stream: its body is collected
        self.pieces: list[bytes] = []  # the body bytes of the read being parsed
        self.last_read = loop.time()
        self.watchdog = loop.call_later(idle_timeout_s, self._check_idle)
        self.reads = _reads(loop)
        self.sock: socket.socket | None = sock
        self.reads.add(sock.fileno(), self)

    # ---- the socket

    def data_received(self, data: memoryview, recv_ns: int) -> None:
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
                    wait = self.reader.feed(body, recv_ns)
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
        self._close()
        self.watchdog.cancel()
        if self.finished.done():
            return
        if self.head_done and not self.body_done and not self.sized:  # the close ends the body
            # (httptools has no call for "the connection closed", which would say so itself)
            self._end_of_body()
            return
        self._fail(TransportError("lost", str(exc) if exc else "the server closed the connection mid-response"))

    def _pause(self) -> None:
        if self.sock is not None and not self.paused:
            self.paused = True
            self.reads.pause(self.sock.fileno())

    def _resume(self) -> None:
        if self.sock is not None and self.paused:
            self.paused = False
            self.reads.resume(self.sock.fileno())

    def _close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.reads.remove(sock.fileno())
            sock.close()

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

    def on_headers_complete(self) -> None:
        self.head_done = True
        status = self.parser.get_status_code()
        if status != 200 or self.content_type == "application/json":  # an error, or a server that ignored stream
            self.error = HttpError(status, self.reason, self.content_type, b"", self.retry_after)

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
        self._pause()
        self.loop.create_task(self._resume_after(wait))

    async def _resume_after(self, wait: Awaitable[None]) -> None:
        try:
            await wait
        except BaseException as exc:  # cancelled with its stream, too
            self._fail(exc)
            return
        self.waiting = False
        if self.reader.complete:
            self._succeed()
        elif self.body_done:
            self._end_of_body()
        else:
            self._resume()

    def _end_of_body(self) -> None:
        if self.error is not None:
            self._fail(self.error)
        else:
            self._fail(TransportError("closed", "the response ended before the stream did"))

    # ---- ending

    def _check_idle(self) -> None:
        idle = self.loop.time() - self.last_read
        if idle >= self.idle_timeout_s:
            self._fail(TransportError("idle", f"no data for {self.idle_timeout_s:g} s"))
        else:
            self.watchdog = self.loop.call_later(self.idle_timeout_s - idle, self._check_idle)

    def _succeed(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        self._resume()  # the rest of the body: the terminator, then keep it

    def _fail(self, exc: BaseException) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)
        self.stop()

    def release(self) -> None:
        """The caller has its result: keep the connection once its body is read, within
        DRAIN_TIMEOUT_S, else close it."""
        self.released = True
        done = self.finished
        if self.sock is None or not done.done() or done.cancelled() or done.exception() is not None:
            self.stop()
        elif self.body_done:
            self._park()
        else:
            self.watchdog.cancel()
            self.watchdog = self.loop.call_later(DRAIN_TIMEOUT_S, self.stop)

    def _park(self) -> None:
        self.watchdog.cancel()
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.reads.remove(sock.fileno())
        if not self.keep_alive or len(self.idle) >= MAX_IDLE_PER_HOST:
            sock.close()
            return
        self.idle.append(sock)

    def stop(self) -> None:
        self.watchdog.cancel()
        self._close()
