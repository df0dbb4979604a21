"""Slow clients against a real gateway, over raw TCP: a request head trickled a byte at a time
(slowloris) is cut ``header_timeout_s`` after the connection opens, however steadily it trickles; a
connection that never sends anything, and an idle keep-alive connection after an answer, are closed
as late; the timer covers only the head, so a body slower than it (within ``body_timeout_s``) is
still answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid

import pytest
from engine_harness import wait_for
from gateway_harness import GatewayEngine, cuts, default_topology

HEADER_TIMEOUT_S = 0.5
CUT_WITHIN_S = 3.0  # header_timeout_s and a loaded 2-core machine's scheduling; today: an hour
SLOW_CLIENTS = 20
SEND_TIMEOUT_S = 2.0
MAX_BACKLOG = 4096


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    engine = GatewayEngine(
        tmp_path_factory.mktemp("gwslow"),
        default_topology(
            gateway=f"header_timeout_s = {HEADER_TIMEOUT_S}\nbody_timeout_s = 5.0\nsend_timeout_s = {SEND_TIMEOUT_S}\n"
            f"max_stream_backlog = {MAX_BACKLOG}"
        ),
        "s" + uuid.uuid4().hex[:10],
    )
    try:
        yield engine.start()
    finally:
        engine.stop()


def address(gw: GatewayEngine) -> tuple[str, int]:
    host, port = gw.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    return host, int(port)


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """Send ``data`` a byte every ``every_s`` until it is sent or the server closes."""
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)
    except ConnectionError:
        pass  # the server cut us: what the test waits for


async def open_until_cut(host: str, port: int, head: bytes, every_s: float) -> tuple[float, bytes]:
    """Seconds from connecting until the server closes the connection, and what it sent before."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    sender = asyncio.create_task(trickle(writer, head, every_s))
    try:
        answer = await asyncio.wait_for(reader.read(), CUT_WITHIN_S + 2)
    except TimeoutError:
        answer = b"<still open>"
    except ConnectionError:
        answer = b""
    elapsed = time.monotonic() - started
    sender.cancel()
    writer.close()
    return elapsed, answer


def test_request_heads_trickled_a_byte_at_a_time_are_cut_after_header_timeout(gw):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * 200  # never ends

    async def run() -> list[tuple[float, bytes]]:
        host, port = address(gw)
        return await asyncio.gather(*(open_until_cut(host, port, head, 0.05) for _ in range(SLOW_CLIENTS)))

    for elapsed, answer in asyncio.run(run()):
        assert answer != b"<still open>", f"a slow head still open after {elapsed:.1f} s"
        assert HEADER_TIMEOUT_S * 0.9 <= elapsed < CUT_WITHIN_S, elapsed  # the trickle did not extend it
        assert answer == b""  # closed without an answer (docs/gateway.md: why no 408)


def test_a_silent_connection_and_an_idle_keep_alive_one_are_closed(gw):
    health = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"

    async def idle_after_an_answer() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(*address(gw))
        writer.write(health)
        status = await reader.readline()
        await reader.readuntil(b"\r\n\r\n")  # the rest of the head: the body follows, then idle
        answered = time.monotonic()
        try:
            await asyncio.wait_for(reader.read(), CUT_WITHIN_S + 2)
        except TimeoutError:
            return status, float("inf")
        finally:
            writer.close()
        return status, time.monotonic() - answered

    async def run() -> tuple[tuple[float, bytes], tuple[bytes, float]]:
        silent = open_until_cut(*address(gw), b"", 0.05)
        return await asyncio.gather(silent, idle_after_an_answer())

    (silent_s, silent_answer), (status, idle_s) = asyncio.run(run())
    assert silent_answer == b"" and HEADER_TIMEOUT_S * 0.9 <= silent_s < CUT_WITHIN_S, silent_s
    assert status.startswith(b"HTTP/1.1 200") and idle_s < CUT_WITHIN_S, (status, idle_s)


def test_only_the_head_is_timed_a_body_slower_than_it_is_answered(gw):
    body = json.dumps(
        {"model": "neuralpipe-echo", "messages": [{"role": "user", "content": "slow body"}], "max_tokens": 3}
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )

    async def run() -> tuple[float, bytes]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*address(gw))
        writer.write(head)
        for part in (body[:10], body[10:40], body[40:]):  # 1.5 s of body: 3x header_timeout_s
            await asyncio.sleep(HEADER_TIMEOUT_S)
            writer.write(part)
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return time.monotonic() - started, answer

    elapsed, answer = asyncio.run(run())
    assert elapsed > 3 * HEADER_TIMEOUT_S
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 3


def test_a_stream_read_slower_than_it_comes_is_delivered_whole(gw):
    """A client that reads a fast stream slowly (a phone on a bad network): tokens written straight
    from the follower's routing filled aiohttp's buffer, its write began to drain, and the drain's
    wait was dropped half-awaited: the stream's next write raised "await wasn't used with future",
    the answer was cut and the gateway logged an internal error."""
    body = json.dumps(
        {
            "model": "neuralpipe-echo",
            "messages": [{"role": "user", "content": "read me slowly"}],
            "max_tokens": 900,  # within max_stream_backlog: this client is slow, not too slow
            "logprobs": True,
            "top_logprobs": 20,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )

    async def run() -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's window: small, as on a phone
        sock.connect(address(gw))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(head + body)
        await asyncio.sleep(SEND_TIMEOUT_S / 4)  # reads nothing a while (less than send_timeout_s): buffers fill
        answer = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 30):
            answer += chunk
        writer.close()
        return answer

    failures_before = gw.log().count("gateway_handler_failed")
    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert answer.rstrip().endswith(b"0") and b"data: [DONE]" in answer, answer[-300:]
    assert b'"error"' not in answer
    assert gw.log().count("gateway_handler_failed") == failures_before


def _long_stream_request(content: str, max_tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": "neuralpipe-echo",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "logprobs": True,
            "top_logprobs": 20,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def test_a_client_that_stops_reading_is_closed_after_send_timeout(gw):
    """A client that stops reading a stream (a frozen app, a dead network with the socket still
    open) held its stream, its concurrency slot and the rest of its answer in the gateway for as
    long as it kept the connection: nothing timed a write. Now after send_timeout_s without taking
    a byte its connection is closed and its engine stream cancelled; a client that reads slowly
    but steadily is not (the test above)."""
    before = gw.stats("gateway")
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(address(gw))
        # within max_stream_backlog (that bound is the next test's), past every buffer on the way (~2 MB)
        stalled.sendall(_long_stream_request("then never read", MAX_BACKLOG - 100))
        started = time.monotonic()
        wait_for(lambda: gw.stats("gateway")["active_streams"] == 1, 10, "the stream under way")
        wait_for(lambda: gw.stats("gateway")["active_streams"] == 0, SEND_TIMEOUT_S + 10, "the stalled stream ended")
        ended_after = time.monotonic() - started
        after = gw.stats("gateway")
        stalled.settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # the server aborted: what is unread may go
            while stalled.recv(1 << 20):
                pass  # the connection is closed from the other side: recv ends
    assert ended_after >= SEND_TIMEOUT_S * 0.9, ended_after
    assert after["send_timeouts"] == before.get("send_timeouts", 0) + 1, after
    assert after["cancelled"] == before["cancelled"] + 1, after  # its engine stream, no longer wanted
    assert "gateway_handler_failed" not in gw.log()

    def counted() -> bool:  # the counter reaches /metrics with the gateway's heartbeats
        name = "neuralpipe_gateway_send_timeouts_total"
        lines = [line for line in gw.metrics().splitlines() if line.startswith(name)]
        return bool(lines) and float(lines[0].rsplit(" ", 1)[1]) >= 1

    wait_for(counted, 10, "neuralpipe_gateway_send_timeouts_total in /metrics")


def test_a_client_far_behind_its_stream_gets_an_error_and_the_stream_is_cancelled(gw):
    """A client that reads, but slower than its stream comes (a large answer with top logprobs
    on a slow link): what it had not read yet waited in the gateway, the whole rest of the answer
    (n x max_tokens x top_logprobs: hundreds of MB for one request). Past max_stream_backlog
    tokens waiting, its engine streams are cancelled and the stream ends in an error event."""
    before, before_ingest = gw.stats("gateway"), gw.stats("ingest")["cancelled"]

    async def run() -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address(gw))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(_long_stream_request("far behind", 20000))
        answer, slow_until = b"", time.monotonic() + SEND_TIMEOUT_S / 2
        while chunk := await asyncio.wait_for(reader.read(4096), 30):
            answer += chunk
            if time.monotonic() < slow_until:
                await asyncio.sleep(0.05)  # ~80 kB/s, steadily: never still for send_timeout_s
        writer.close()
        return answer

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"code":"client_too_slow"' in answer and b"data: [DONE]" not in answer, answer[-400:]
    after = gw.stats("gateway")
    assert after["too_slow"] == before["too_slow"] + 1, after
    assert after["send_timeouts"] == before["send_timeouts"]
    wait_for(lambda: gw.stats("ingest")["cancelled"] > before_ingest, 10, "the engine stream cancelled")
    wait_for(lambda: cuts(gw, "max_stream_backlog") >= 1, 10, "the cut counted in /metrics")


TOTAL_BACKLOG = 8192


@pytest.fixture
def gw_total(tmp_path_factory):
    engine = GatewayEngine(
        tmp_path_factory.mktemp("gwtotal"),
        default_topology(gateway=f"max_stream_backlog = {4 * TOTAL_BACKLOG}\nmax_total_backlog = {TOTAL_BACKLOG}"),
        "t" + uuid.uuid4().hex[:10],
    )
    try:
        yield engine.start()
    finally:
        engine.stop()


def test_past_max_total_backlog_the_client_furthest_behind_is_cut_and_the_others_go_on(gw_total):
    """Each request's backlog was bounded, their sum not: a thousand slow clients held a thousand
    max_stream_backlogs. Past max_total_backlog the stream furthest behind is cut (client_too_slow
    naming the key) and the others are served whole."""
    gw = gw_total
    with socket.socket() as first, socket.socket() as second:
        for sock in (first, second):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(address(gw))
        # 8,000 tokens with 20 top logprobs each: ~3,000 of them fill the buffers on the way, the
        # rest wait in the gateway; the first client is the furthest behind once it holds over half
        first.sendall(_long_stream_request("first, then never read", TOTAL_BACKLOG - 192))
        wait_for(lambda: gw.stats("gateway")["backlog"] > TOTAL_BACKLOG // 2 + 256, 30, "the first client behind")
        second.sendall(_long_stream_request("second, read later", TOTAL_BACKLOG - 192))
        wait_for(lambda: gw.stats("gateway")["too_slow"] == 1, 30, "a client cut")

        def read_all(sock: socket.socket) -> bytes:
            sock.settimeout(30)
            answer = b""
            while chunk := sock.recv(1 << 20):
                answer += chunk
                if answer.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end (the connection is kept)
                    break
            return answer

        cut, whole = read_all(first), read_all(second)
    assert b'"code":"client_too_slow"' in cut and b"max_total_backlog" in cut and b"[DONE]" not in cut, cut[-400:]
    assert whole.count(b'"finish_reason":"length"') == 1 and b"data: [DONE]" in whole and b'"error"' not in whole
    wait_for(lambda: gw.stats("gateway")["backlog"] == 0, 10, "nothing waiting once both ended")
    assert gw.stats("gateway")["too_slow"] == 1
    wait_for(lambda: cuts(gw, "max_total_backlog") == 1, 10, "the cut counted in /metrics")
