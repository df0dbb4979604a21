"""The browser feed's bounds, over real WebSockets to the gateway's feed server (aiohttp, in this
process): a browser that reads nothing is dropped with close code 1013 and a reason once its queue
is full, while another browser of the same feed gets every message, in order. The broadcast side is
replaced by batches made here (the live feed over a real engine: tests/test_gateway_api.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import types
import uuid
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from gateway_harness import GatewayEngine, default_topology

from engine.protocol import wire
from stages.gateway.feed import CLOSE_NO_INPUT, CLOSE_NO_SUCH_STREAM, CLOSE_TOO_SLOW, FeedHub

BATCHES = 300
ROW_TEXT = "x" * 32_768  # 300 batches of ~32 KiB: ~10 MB, more than the sockets buffer between the two


def batch(i: int) -> wire.Batch:
    columns = {
        "stream_id": np.array([1], np.uint64),
        "seq": np.array([i], np.uint64),
        "kind": np.array([wire.TOKEN], np.uint8),
        "token_id": np.array([7], np.uint32),
        "logprob": np.array([-0.5], np.float32),
        "recv_ns": np.array([i], np.int64),
    }
    return wire.Batch(1, i, i + 1, columns, wire.Texts.from_list([ROW_TEXT]))


@contextlib.asynccontextmanager
async def hub_server(bound: int = 16, **options) -> AsyncIterator[tuple[FeedHub, types.SimpleNamespace, str]]:
    """A FeedHub behind a real aiohttp server: (the hub, its stand-in follower, the feed's URL).
    A feed of one stream (``?stream=N``) follows a runtime directory with no engine in it."""
    follower = types.SimpleNamespace(listeners=set())
    hub = FeedHub(follower, "/nonexistent", bound=bound, max_stream_feeds=1, **options)
    app = web.Application()

    async def feed(request: web.Request) -> web.WebSocketResponse:
        return await hub.serve(request, int(request.query["stream"]) if "stream" in request.query else None)

    app.router.add_get("/feed", feed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield hub, follower, f"http://127.0.0.1:{runner.addresses[0][1]}/feed"
    finally:
        await runner.cleanup()


def publish(follower: types.SimpleNamespace, message: wire.Batch) -> None:
    for listener in tuple(follower.listeners):
        listener(message)


async def scenario() -> tuple[list[int], int | None, str, dict]:
    async with hub_server() as (hub, follower, url), aiohttp.ClientSession() as session:
        slow = await session.ws_connect(url, max_msg_size=0)
        fast = await session.ws_connect(url, max_msg_size=0)
        while len(hub.feeds) < 2:
            await asyncio.sleep(0.01)
        seqs: list[int] = []

        async def read_fast() -> None:
            while len(seqs) < BATCHES:
                message = json.loads((await fast.receive(timeout=20)).data)
                seqs.append(message["payload"]["seq"][0])

        reading = asyncio.create_task(read_fast())
        for i in range(BATCHES):
            publish(follower, batch(i))
            await asyncio.sleep(0.002)  # at about the pace the fast browser reads
        await asyncio.wait_for(reading, 30)
        while True:  # now the slow one reads: what was sent before the drop, then the close
            message = await slow.receive(timeout=10)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
        close_code, reason = slow.close_code, str(message.extra or "")
        await fast.close()
        await slow.close()
        return seqs, close_code, reason, dict(hub.counts)


def test_a_slow_browser_is_dropped_and_never_slows_the_others():
    seqs, close_code, reason, counts = asyncio.run(scenario())
    assert seqs == list(range(BATCHES))  # the reading browser: everything, in order
    assert close_code in (CLOSE_TOO_SLOW, None) and counts["feeds_dropped"] == 1
    if close_code == CLOSE_TOO_SLOW:  # its close frame got through (else it was cut: nothing read)
        assert "too slow: more than 16 messages queued" in reason


@pytest.mark.timeout(30)
def test_a_browser_that_sends_messages_is_closed_and_the_others_served():
    """The feed carries the broadcast one way. A client that sent on it was read and ignored
    without bound: four of them sending as fast as they could took ~0.9 of a core in the gateway
    and doubled every other client's stream time. Its first message now closes it (1008)."""

    async def talk() -> tuple[int | None, str, int, dict]:
        async with hub_server() as (hub, follower, url), aiohttp.ClientSession() as session:
            talker = await session.ws_connect(url)
            quiet = await session.ws_connect(url)
            await talker.send_str("hello")
            closing = await talker.receive(timeout=5)
            while len(hub.feeds) > 1:  # its handler ends a moment after the close
                await asyncio.sleep(0.01)
            publish(follower, batch(7))
            seq = json.loads((await quiet.receive(timeout=5)).data)["payload"]["seq"][0]
            await quiet.close()
            return talker.close_code, str(closing.extra or ""), seq, dict(hub.counts)

    close_code, reason, seq, counts = asyncio.run(talk())
    assert close_code == CLOSE_NO_INPUT == 1008
    assert "the feed takes no messages" in reason
    assert seq == 7 and counts["feeds_closed_for_input"] == 1


async def open_stream_feeds(url: str, count: int) -> tuple[int, list[int], dict, int]:
    """Open ``count`` feeds of one stream each at once; then one more, and another after one closed.
    Returns how many opened, the two late answers' statuses, the refusal's error and the feeds open."""
    feed_url = url.replace("http://", "ws://") + "/feed"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        feeds = await asyncio.gather(*(session.ws_connect(f"{feed_url}?stream={i}") for i in range(count)))
        late = []
        try:
            await session.ws_connect(f"{feed_url}?stream={count}")
        except aiohttp.WSServerHandshakeError as exc:
            late.append(exc.status)
        async with session.get(f"{url}/feed?stream={count}", headers={"Upgrade": "websocket"}) as refused:
            error = (await refused.json())["error"]
        await feeds[0].close()
        again = await asyncio.wait_for(_taken_once_free(session, f"{feed_url}?stream={count}"), 10)
        late.append(101)
        still_open = sum(not feed.closed for feed in feeds)
        for feed in (*feeds, again):
            await feed.close()
        return len(feeds), late, error, still_open


async def _taken_once_free(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    """A feed, once the gateway has let go of the one just closed (its handler ends a moment after
    the client's close: until then the slot is still taken, 503)."""
    while True:
        try:
            return await session.ws_connect(url)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 503:
                raise
            await asyncio.sleep(0.02)


@pytest.mark.timeout(120)
def test_feeds_of_one_stream_are_bounded_and_refused_past_it_before_the_upgrade(tmp_path):
    """Each feed of one stream has a subscription of its own (two ZeroMQ sockets): past ~510 of them
    the gateway's ZeroMQ context (1,023 sockets by default) had no room, and each further feed was
    upgraded to a WebSocket that then failed (`ZMQError: Too many open files`, logged as a handler
    failure). Now the gateway makes room for `max_stream_feeds` of them and refuses one more with a
    503 before the upgrade; one closed, the next is taken."""
    engine = GatewayEngine(tmp_path, default_topology(gateway="max_stream_feeds = 600"), "sf" + uuid.uuid4().hex[:8])
    try:
        engine.start()
        opened, late, error, still_open = asyncio.run(open_stream_feeds(engine.url, 600))
        handler_failures = engine.log().count("gateway_handler_failed")
    finally:
        engine.stop()
    assert opened == 600 and still_open == 599 and handler_failures == 0
    assert late == [503, 101]
    assert error["code"] == "gateway_busy" and "max_stream_feeds (600)" in error["message"]


@pytest.mark.timeout(30)
def test_a_feed_of_a_stream_that_never_comes_is_closed_saying_so():
    """A feed of one stream the broadcast has nothing of (no such stream, or one retained no
    longer) waited in silence for good, holding one of the max_stream_feeds slots: that many of
    them refused every other feed of one stream. Now it is closed after ``stream_wait_s`` with a
    reason that names the stream, and its slot is free again."""

    async def unheard() -> tuple[float, int | None, str, dict]:
        async with hub_server(stream_wait_s=0.5) as (hub, _, url), aiohttp.ClientSession() as session:
            started = time.monotonic()
            ws = await session.ws_connect(f"{url}?stream=987654321")
            closing = await ws.receive(timeout=10)
            waited = time.monotonic() - started
            while hub.stream_feeds:  # its handler ends a moment after the close
                await asyncio.sleep(0.01)
            again = await session.ws_connect(f"{url}?stream=1")  # the slot (max_stream_feeds = 1) is free
            await again.close()
            return waited, ws.close_code, str(closing.extra or ""), dict(hub.counts)

    waited, close_code, reason, counts = asyncio.run(unheard())
    assert 0.5 <= waited < 5
    assert close_code == CLOSE_NO_SUCH_STREAM == 4404
    assert "nothing of stream 987654321 within 0.5 s" in reason, reason
    assert counts["feeds_unheard"] == 1
