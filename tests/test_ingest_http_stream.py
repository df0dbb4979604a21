"""The bare HTTP/1.1 streaming client of ingest (stages/ingest/http_stream.py) against hand-written
servers on real sockets: framings, split reads, limits, and what it refuses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from stages.ingest import http_stream


class Collect:
    """A reader that keeps the body and is complete once ``end`` has arrived."""

    def __init__(self, end: bytes = b"END\n\n") -> None:
        self.body, self.end, self.complete = b"", end, False

    def feed(self, body: bytes) -> None:
        self.body += body
        self.complete = self.end in self.body


async def serve(reply: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> tuple[asyncio.AbstractServer, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reply(writer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"


def post(reply: Callable[[asyncio.StreamWriter], Awaitable[None]], reader: Collect, **kw) -> Collect:
    async def main() -> Collect:
        server, url = await serve(reply)
        try:
            await http_stream.post_stream(
                url, b"{}", kw.get("headers", {}), reader, connect_timeout_s=2, idle_timeout_s=kw.get("idle", 2)
            )
            return reader
        finally:
            server.close()

    return uvloop.run(asyncio.wait_for(main(), 10))


def test_chunked_body_split_anywhere_is_reassembled():
    body = b"data: one\n\ndata: END\n\n"
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (body[:7], body[7:]))
        + b"0\r\n\r\n"
    )

    async def reply(writer: asyncio.StreamWriter) -> None:
        for i in range(len(raw)):  # one byte per write: every state of the decoder crosses a read
            writer.write(raw[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    assert post(reply, Collect()).body == body


def test_body_until_close_and_sized_body():
    async def until_close(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: END\n\n")

    async def sized(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\ndata: END\n\nignored")

    assert post(until_close, Collect()).body == b"data: END\n\n"
    assert post(sized, Collect()).body == b"data: END\n\n"


def test_error_status_and_body_and_incomplete_stream():
    async def error(writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 17\r\n\r\n{"error": "busy"}')

    with pytest.raises(http_stream.HttpError) as err:
        post(error, Collect())
    assert (err.value.status, err.value.reason, err.value.body) == (503, "Service Unavailable", b'{"error": "busy"}')

    async def ends_early(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndata: ")

    with pytest.raises(http_stream.TransportError) as cut:
        post(ends_early, Collect())
    assert cut.value.kind == "closed"


def test_hostile_heads_and_chunks_are_refused():
    async def endless_head(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Junk: " + b"j" * 100_000)

    async def bad_chunk(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n")

    async def silent(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    for reply, message in ((endless_head, "response head larger"), (bad_chunk, "bad chunk size")):
        with pytest.raises(http_stream.TransportError, match=message):
            post(reply, Collect())
    with pytest.raises(http_stream.TransportError, match=r"no data for 0\.2 s"):
        post(silent, Collect(), idle=0.2)
    with pytest.raises(http_stream.TransportError, match="line break"):
        post(silent, Collect(), headers={"Authorization": "Bearer x\r\nX-Evil: 1"})
