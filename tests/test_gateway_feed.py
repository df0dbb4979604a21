"""The browser feed's bounds, over real WebSockets to the gateway's feed server (aiohttp, in this
process): a browser that reads nothing is dropped with close code 1013 and a reason once its queue
is full, while another browser of the same feed gets every message, in order. The broadcast side is
replaced by batches made here (the live feed over a real engine: tests/test_gateway_api.py)."""

from __future__ import annotations

import asyncio
import json
import types

import aiohttp
import numpy as np
from aiohttp import web

from engine.protocol import wire
from stages.gateway.feed import CLOSE_TOO_SLOW, FeedHub

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


async def scenario() -> tuple[list[int], int | None, str, dict]:
    follower = types.SimpleNamespace(listeners=set())
    hub = FeedHub(follower, "/nonexistent", bound=16)
    app = web.Application()

    async def feed(request: web.Request) -> web.WebSocketResponse:
        return await hub.serve(request, None)

    app.router.add_get("/feed", feed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/feed"
    try:
        async with aiohttp.ClientSession() as session:
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
                for listener in tuple(follower.listeners):
                    listener(batch(i))
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
    finally:
        await runner.cleanup()


def test_a_slow_browser_is_dropped_and_never_slows_the_others():
    seqs, close_code, reason, counts = asyncio.run(scenario())
    assert seqs == list(range(BATCHES))  # the reading browser: everything, in order
    assert close_code in (CLOSE_TOO_SLOW, None) and counts["feeds_dropped"] == 1
    if close_code == CLOSE_TOO_SLOW:  # its close frame got through (else it was cut: nothing read)
        assert "too slow: more than 16 messages queued" in reason
