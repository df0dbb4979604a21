"""The bare HTTP/1.1 streaming client of ingest (stages/ingest/http_stream.py) against hand-written
servers on real sockets: framings, split reads, limits, and what it refuses."""

from __future__ import annotations

import asyncio
import socket
import threading
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

    for reply, message in ((endless_head, "response head larger"), (bad_chunk, "malformed response: .*chunk size")):
        with pytest.raises(http_stream.TransportError, match=message):
            post(reply, Collect())
    with pytest.raises(http_stream.TransportError, match=r"no data for 0\.2 s"):
        post(silent, Collect(), idle=0.2)
    with pytest.raises(http_stream.TransportError, match="line break"):
        post(silent, Collect(), headers={"Authorization": "Bearer x\r\nX-Evil: 1"})


def test_ambiguous_framing_is_refused():
    """Framings a proxy and this client could read differently (request smuggling's tools), and a
    chunk size no body can have: httptools refuses them (the hand-written parser took them)."""
    heads = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nTransfer-Encoding: chunked\r\n\r\nb\r\ndata: END\n\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 12\r\n\r\ndata: END\n\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\ndata: END\n\n",
    )
    for raw in heads:

        async def reply(writer: asyncio.StreamWriter, raw: bytes = raw) -> None:
            writer.write(raw)

        with pytest.raises(http_stream.TransportError, match="malformed response") as err:
            post(reply, Collect())
        assert err.value.kind == "lost"


def test_refusals_carry_status_and_retry_after():
    async def busy(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nslow")

    async def json_not_stream(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}")

    with pytest.raises(http_stream.HttpError) as err:
        post(busy, Collect())
    assert (err.value.status, err.value.retry_after, err.value.body) == (429, "7", b"slow")
    with pytest.raises(http_stream.HttpError) as err:
        post(json_not_stream, Collect())
    assert (err.value.status, err.value.content_type, err.value.body) == (200, "application/json", b"{}")

    async def upgrade(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nxx")
        await writer.drain()
        await asyncio.sleep(1)  # the connection stays open: the answer must not wait for its close

    with pytest.raises(http_stream.HttpError) as err:
        post(upgrade, Collect())
    assert err.value.status == 101


STREAM = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n%b\r\nb\r\ndata: END\n\n\r\n0\r\n\r\n%b"


@pytest.mark.parametrize(
    ("response", "connections"),
    [
        (STREAM % (b"", b""), 1),  # kept and reused
        (STREAM % (b"Connection: close\r\n", b""), 2),  # the server said no
        (STREAM % (b"", b"HTTP/1.1 200 OK\r\n"), 2),  # more than one response: never reused
    ],
)
def test_request_bytes_and_keep_alive(response: bytes, connections: int):
    """Two requests in a row: what the server reads, and whether the second used the first's
    connection."""
    accepted, requests = [], []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                requests.append(head + await reader.readexactly(length))
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://user:pw@127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions?x=1"
        try:
            for _ in range(2):
                await http_stream.post_stream(
                    url, b'{"a":1}', {"Accept": "text/event-stream"}, Collect(), connect_timeout_s=2, idle_timeout_s=2
                )
                kept, deadline = http_stream._IDLE[loop], loop.time() + 2
                while connections == 1 and not any(kept.values()):  # parked once its terminator is read
                    assert loop.time() < deadline, "the connection was never kept"
                    await asyncio.sleep(0.01)
        finally:
            server.close()
            for writer in accepted:
                writer.close()

    uvloop.run(asyncio.wait_for(main(), 10))
    assert len(accepted) == connections
    port = requests[0].split(b"Host: 127.0.0.1:")[1].split(b"\r\n")[0]
    assert requests[0] == (
        b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%b\r\nAccept: text/event-stream\r\n"
        b"Content-Length: 7\r\n\r\n" % port + b'{"a":1}'
    )


def test_back_pressure_pauses_reading_until_the_wait_is_over():
    events = [b"data: %d\n\n" % i for i in range(20)] + [b"data: END\n\n"]

    class Slow(Collect):
        def feed(self, body: bytes):
            super().feed(body)
            return asyncio.sleep(0.001)  # the reader is busy: no more reads until this is over

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    assert post(reply, Slow()).body == b"".join(events)


def test_fast_upstreams_share_the_event_loop_a_bounded_read_at_a_time():
    """Upstreams that send faster than ingest parses (a big answer with top logprobs, a backlog
    after back-pressure): the event loop read each connection 32 times in a row (libuv's loop for
    one readable socket), 8 MB a connection, ~1 s of parsing on a loaded machine with no timer run:
    ingest missed its heartbeats and was killed as hung, every stream lost. Now a turn of the loop
    reads about READ_BYTES_PER_TURN in all, then timers and other tasks run."""
    streams, body_bytes = 3, 24 << 20
    event = b"data: " + b"x" * 2000 + b"\n\n"
    fed: list[int] = []  # bytes fed by every stream since the last turn of the loop

    class Count:
        def __init__(self) -> None:
            self.complete, self.tail = False, b""

        def feed(self, body: bytes) -> None:
            fed.append(len(body))
            self.tail = (self.tail + body)[-16:]
            self.complete = self.tail.endswith(b"data: END\n\n")

    def server(listener: socket.socket) -> None:
        def answer(conn: socket.socket) -> None:
            with conn:
                conn.recv(65536)  # the request: small, one read
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
                conn.sendall(event * (body_bytes // len(event)) + b"data: END\n\n")

        threads = [threading.Thread(target=answer, args=(listener.accept()[0],)) for _ in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    async def main(url: str) -> int:
        done, most = False, 0

        async def turns() -> None:
            nonlocal most
            while not done:
                most = max(most, sum(fed))
                fed.clear()
                await asyncio.sleep(0)  # one turn of the loop

        ticker = asyncio.create_task(turns())
        await asyncio.gather(
            *(
                http_stream.post_stream(url, b"{}", {}, Count(), connect_timeout_s=2, idle_timeout_s=10)
                for _ in range(streams)
            )
        )
        done = True
        await ticker
        return most

    with socket.create_server(("127.0.0.1", 0)) as listener:
        serving = threading.Thread(target=server, args=(listener,))
        serving.start()
        try:
            port = listener.getsockname()[1]
            most = uvloop.run(asyncio.wait_for(main(f"http://127.0.0.1:{port}/v1/chat/completions"), 60))
        finally:
            serving.join(30)
    # one read a stream at most once the turn's budget is spent (a read is up to 256 KiB)
    assert most <= http_stream.READ_BYTES_PER_TURN + streams * (256 << 10), most


def test_back_pressure_longer_than_the_idle_timeout_is_not_the_servers_silence():
    # ingest stops reading while its output ring is full (a paused or slow compute): the upstream is
    # not silent then, and before, the stream ended as "idle" and the upstream was blamed for it
    events = [b"data: one\n\n", b"data: END\n\n"]

    class Stalled(Collect):
        def feed(self, body: bytes):
            super().feed(body)
            return None if self.complete else asyncio.sleep(0.8)  # the ring full for 0.8 s

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.1)  # the next event comes while ingest is not reading
        writer.write(b"0\r\n\r\n")

    assert post(reply, Stalled(), idle=0.3).body == b"".join(events)


def test_a_server_silent_after_back_pressure_still_times_out():
    class Stalled(Collect):
        def feed(self, body: bytes):
            super().feed(body)
            return asyncio.sleep(0.2)

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # then nothing

    with pytest.raises(http_stream.TransportError, match=r"no data for 0\.3 s"):
        post(reply, Stalled(), idle=0.3)


class FakeTransport(asyncio.Transport):
    """A connection that never gets a byte: where the stream goes once it is connected."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_cancel_as_the_connection_completes_cancels_the_stream():
    """3.11's asyncio.wait_for returns its result when the cancel comes as it completes: the
    connect swallowed the cancel of a stream just connected, which then ran to its end (a cancelled
    request's rows ended with END, tests/test_hostile_sockets.py now and then)."""
    transports: list[FakeTransport] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def create_connection(factory, host, port, **kw):
            protocol, transport = factory(), FakeTransport()
            protocol.connection_made(transport)
            transports.append(transport)
            stream.cancel()  # the cancel comes as the connection completes
            return transport, protocol

        loop.create_connection = create_connection  # a plain asyncio loop lets a test stand in here
        stream = asyncio.create_task(
            http_stream.post_stream("http://127.0.0.1:9/", b"{}", {}, Collect(), connect_timeout_s=2, idle_timeout_s=2)
        )
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(stream), 2)  # before: a timeout, the stream still waiting
        assert stream.cancelled()

    asyncio.run(main())
    assert transports and transports[0].closed
