"""One streaming HTTP/1.1 POST over plain TCP, its response body handed to a callback from the
connection's ``data_received``: no reader task to wake, no future and no timer per network read.

Ingest's cost per token was mostly aiohttp's per-read machinery (a future, a task wake-up, a read
timer rescheduled, three Python layers) on reads that carry one SSE event each; a bare asyncio
protocol costs about a tenth of it (docs/ingest.md). aiohttp still serves https upstreams and the
health checks.

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

__all__ = ["BodyReader", "HttpError", "TransportError", "post_stream"]

MAX_HEAD_BYTES = 64 * 1024  # status line and headers
MAX_IDLE_PER_HOST = 256  # kept connections
DRAIN_TIMEOUT_S = 1.0  # for the rest of a body after the reader is complete ([DONE])
MAX_CHUNK_LINE = 1024  # a chunk-size line (with its extensions)
ERROR_BODY_LIMIT = 64 * 1024  # an HTML error page can be large; its first bytes name the problem


class BodyReader(Protocol):
    complete: bool  # the body says the stream is over (e.g. an SSE "[DONE]")

    def feed(self, body: bytes) -> Awaitable[None] | None: ...


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
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    for name, value in headers.items():  # a line break would smuggle a header (or a request) in
        if "\r" in name + value or "\n" in name + value:
            raise TransportError("connect", f"request header {name[:40]!r} contains a line break")
    host = parts.netloc.rpartition("@")[2]  # never credentials in the Host header
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join([*lines, f"Content-Length: {len(payload)}"]) + "\r\n\r\n").encode("latin-1") + payload
    loop = asyncio.get_running_loop()
    idle = _idle_connections(loop, key)
    while True:
        protocol = _Stream(loop, reader, idle_timeout_s, idle)
        reused = _take_idle(idle)
        if reused is not None:
            reused.set_protocol(protocol)
            protocol.connection_made(reused)
        else:
            try:
                await asyncio.wait_for(loop.create_connection(lambda p=protocol: p, *key), connect_timeout_s)
            except TimeoutError:
                protocol.stop()
                raise TransportError("connect", f"no connection within {connect_timeout_s} s") from None
            except OSError as exc:
                protocol.stop()
                raise TransportError("connect", str(exc) or type(exc).__name__) from None
        protocol.transport.write(request)
        try:
            await protocol.finished
            return
        except TransportError:
            if reused is None or protocol.head != b"":  # a new connection, or a response begun: real
                raise
        finally:
            protocol.release()  # the caller is done: the connection finishes the body, then is kept or closed


_IDLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (host, port) -> transports


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
    """The response: head, then body (chunked, sized or until close), each read fed on at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: BodyReader, idle_timeout_s: float, idle: list) -> None:
        self.loop, self.reader, self.idle_timeout_s, self.idle = loop, reader, idle_timeout_s, idle
        self.keep_alive = True
        self.waiting = False  # a reader's wait is pending: reading is paused
        self.released = False  # the caller is gone: what is left of the body is only drained
        self.finished: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.error: HttpError | None = None  # a response that is not a stream: its body is collected
        self.chunked = False
        self.left = -1  # body bytes still expected by Content-Length; -1: not sized
        self.need = 0  # bytes of the current chunk still to come
        self.skip = 0  # bytes of the CRLF after a chunk still to skip
        self.line = b""  # an unfinished chunk-size line
        self.last_read = loop.time()
        self.watchdog = loop.call_later(idle_timeout_s, self._check_idle)

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        try:
            if self.head is not None:
                data = self._head(data)
                if data is None:
                    return
            body = self._dechunk(data) if self.chunked else self._sized(data)
            if body and not self.finished.done():
                self._body(body)
            if self.left == 0:
                if not self.finished.done() and not self.waiting:
                    self._end_of_body()
                elif self.released:
                    self._park()
        except Exception as exc:  # the feed's verdict (or a framing error) ends the stream
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.watchdog.cancel()
        if self.finished.done():
            return
        if self.head is None and self.left < 0 and not self.chunked:  # body delimited by the close
            self._end_of_body()
            return
        self._fail(TransportError("lost", str(exc) if exc else "the server closed the connection mid-response"))

    # ---- parts of the response

    def _head(self, data: bytes) -> bytes | None:
        """Collect the head; the body bytes after it, or None while it is unfinished."""
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD_BYTES:
                raise TransportError("lost", f"response head larger than {MAX_HEAD_BYTES} bytes")
            self.head = head
            return None
        self.head = None
        status_line, *header_lines = head[:end].decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise TransportError("lost", f"not an HTTP response: {status_line[:80]!r}")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.keep_alive = headers.get("connection", "").lower() != "close"
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not self.chunked and headers.get("content-length", "").isdigit():
            self.left = int(headers["content-length"])
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if code != "200" or content_type == "application/json":  # an error, or a server that ignored stream
            self.error = HttpError(int(code), reason, content_type, b"", headers.get("retry-after"))
        return head[end + 4 :]

    def _sized(self, data: bytes) -> bytes:
        if self.left >= 0:
            data = data[: self.left]
            self.left -= len(data)
        return data

    def _dechunk(self, data: bytes) -> bytes:
        if not (self.need or self.skip or self.line):  # the usual read: whole chunks, one per write
            end = data.find(b"\r\n")
            if 0 < end <= 8:
                try:
                    size = int(data[:end], 16)
                except ValueError:
                    size = -1
                if size > 0 and len(data) == end + size + 4 and data.endswith(b"\r\n"):
                    return data[end + 2 : end + 2 + size]
        pieces, pos, n = [], 0, len(data)
        while pos < n:
            if self.need:
                take = min(self.need, n - pos)
                pieces.append(data[pos : pos + take])
                pos += take
                self.need -= take
                if not self.need:
                    self.skip = 2  # the CRLF that closes the chunk
                continue
            if self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self.line += data[pos:]
                if len(self.line) > MAX_CHUNK_LINE:
                    raise TransportError("lost", "chunk-size line too long")
                break
            line, self.line, pos = self.line + data[pos:end], b"", end + 1
            size = line.split(b";", 1)[0].strip()
            try:
                self.need = int(size, 16)
            except ValueError:
                raise TransportError("lost", f"bad chunk size {size[:20]!r}") from None
            if self.need == 0:
                self.left = 0  # the last chunk: the body is complete (trailers are ignored)
                break
        return b"".join(pieces)

    def _body(self, body: bytes) -> None:
        error = self.error
        if error is not None:
            if len(error.body) < ERROR_BODY_LIMIT:
                error.body += body[: ERROR_BODY_LIMIT - len(error.body)]
            if len(error.body) >= ERROR_BODY_LIMIT:
                self._fail(error)
            return
        wait = self.reader.feed(body)
        if wait is not None:  # back-pressure: read on once the reader's wait is over
            self.waiting = True
            self.transport.pause_reading()
            self.loop.create_task(self._resume_after(wait))
        elif self.reader.complete:
            self._succeed()

    async def _resume_after(self, wait: Awaitable[None]) -> None:
        try:
            await wait
        except BaseException as exc:  # cancelled with its stream, too
            self._fail(exc)
            return
        self.waiting = False
        if self.reader.complete:
            self._succeed()
        elif self.left == 0:
            self._end_of_body()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

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
        elif self.left == 0:
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
        if self.transport is not None:
            self.transport.close()
