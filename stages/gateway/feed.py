"""The browser feed: ``GET /v1/feed`` upgrades to a WebSocket that carries the broadcast in its
JSON form (docs/wire-format.md), one text message per broadcast message:
``{"topic": ..., "header": {...}, "payload": {...} | null}``. ``?stream=all`` (the default):
every stream's batch messages, from the moment of connecting; ``?stream=N``: stream N's own
messages (start, tokens, end | error) from its beginning, then the socket closes (1000).

Each connection has a bounded queue (``feed_queue`` messages): a browser that reads slower than the
engine writes is dropped with close code 1013 and a reason, and never slows the others or the
gateway (docs/gateway.md, "Browser feed")."""

from __future__ import annotations

import asyncio
import contextlib

import zmq
from aiohttp import WSCloseCode, WSMsgType, web

from engine.clients import FIRST_MESSAGE_WAIT_S
from engine.protocol import wire
from engine.protocol.openai_errors import ApiError
from stages.gateway.follower import BroadcastFollower

PING_S = 20.0  # WebSocket pings: a dead browser is noticed, proxies keep the socket
CLOSE_GRACE_S = 2.0  # a dropped browser's close frame waits this long behind what it has not read
CLOSE_TOO_SLOW = WSCloseCode.TRY_AGAIN_LATER  # 1013
CLOSE_NO_INPUT = WSCloseCode.POLICY_VIOLATION  # 1008: the feed is one way
NO_INPUT_REASON = b"the feed takes no messages; it only sends"
NO_INPUT_CLOSE_S = 0.25  # how long such a browser's close frame is waited for
CLOSE_NO_SUCH_STREAM = 4404  # (private use, RFC 6455 7.4.2) nothing of the stream came
COUNTS = ("feeds", "feeds_dropped", "feeds_refused", "feeds_closed_for_input", "feeds_unheard")


def feed_text(frames: tuple[bytes, bytes, bytes]) -> str:
    """One broadcast message (JSON encoding) as one WebSocket text message."""
    topic, header, payload = frames
    body = payload if payload else b"null"
    return (b'{"topic":"' + topic + b'","header":' + header + b',"payload":' + body + b"}").decode()


class Feed:
    """One browser's WebSocket and its bounded queue."""

    def __init__(self, ws: web.WebSocketResponse, bound: int) -> None:
        self.ws = ws
        self.bound = bound
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(bound)
        self.dropped = False
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # set when dropped
        self.heard = False  # a feed of one stream: something of it came
        self.unheard_reason = ""  # set when nothing of it came in time: the close's reason

    def offer(self, text: str | None) -> None:
        """Queue ``text`` (None: the end); a full queue drops this browser."""
        if self.dropped:
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.dropped = True
            self.queue = asyncio.Queue()  # the sender stops at once: nothing more is sent to it
            self.queue.put_nowait(None)
            self.gone.set_result(None)

    async def send(self) -> None:
        while (text := await self.queue.get()) is not None:
            await self.ws.send_str(text)
        if self.dropped:
            reason = f"too slow: more than {self.bound} messages queued; reconnect"
            await self.ws.close(code=CLOSE_TOO_SLOW, message=reason.encode()[:120])
        elif self.unheard_reason:
            await self.ws.close(code=CLOSE_NO_SUCH_STREAM, message=self.unheard_reason.encode()[:120])
        else:
            await self.ws.close()

    def end_unheard(self, stream: int, waited_s: float) -> None:
        """Nothing of the stream came within ``waited_s``: end the feed, saying so."""
        if not self.heard and not self.dropped:
            self.unheard_reason = f"nothing of stream {stream} within {waited_s:g} s: no such stream, or not retained"
            self.offer(None)


class FeedHub:
    """Every-stream feeds share the gateway's follower: each batch is encoded once, for all."""

    def __init__(
        self,
        follower: BroadcastFollower,
        runtime_dir: str,
        bound: int,
        max_stream_feeds: int,
        stream_wait_s: float = FIRST_MESSAGE_WAIT_S,
    ) -> None:
        """``stream_wait_s``: a feed of one stream of which nothing came this long is closed."""
        self.follower = follower
        self.runtime_dir = runtime_dir
        self.bound = bound
        self.max_stream_feeds = max_stream_feeds
        self.stream_wait_s = stream_wait_s
        self.stream_feeds = 0  # feeds of one stream open, each with a follower of its own
        self.feeds: set[Feed] = set()
        self.counts = dict.fromkeys(COUNTS, 0)
        follower.listeners.add(self._batch)

    def _batch(self, batch: wire.Batch | wire.Message) -> None:
        if not self.feeds or not isinstance(batch, wire.Batch):
            return
        text = feed_text(wire.encode_batch(batch, "json"))
        for feed in self.feeds:
            feed.offer(text)

    async def serve(self, request: web.Request, stream: int | None) -> web.WebSocketResponse:
        own = None if stream is None else self._stream_follower(stream)  # refused before the upgrade
        try:
            return await self._serve(request, own, stream)
        finally:
            if own is not None:
                self.stream_feeds -= 1
                await own.close()

    def _stream_follower(self, stream: int) -> BroadcastFollower:
        if self.stream_feeds >= self.max_stream_feeds:
            raise self._refused(f"max_stream_feeds ({self.max_stream_feeds}) feeds of one stream are open")
        try:
            follower = BroadcastFollower(self.runtime_dir, stream)
        except zmq.ZMQError as exc:  # the process's descriptors ran out, say
            raise self._refused(f"no room for another feed of one stream ({exc})") from None
        self.stream_feeds += 1
        return follower

    def _refused(self, why: str) -> ApiError:
        self.counts["feeds_refused"] += 1
        return ApiError(503, f"{why}; ?stream=all has no such bound", "server_error", "gateway_busy", retry_after="1")

    async def _serve(
        self, request: web.Request, own: BroadcastFollower | None, stream: int | None
    ) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=PING_S, max_msg_size=4096)
        await ws.prepare(request)
        feed = Feed(ws, self.bound)
        self.counts["feeds"] += 1
        loop = asyncio.get_running_loop()
        unheard = None
        if own is None:
            self.feeds.add(feed)
        else:
            own.listeners.add(lambda message: _one_stream(feed, message))
            own.start()
            unheard = loop.call_later(self.stream_wait_s, feed.end_unheard, stream, self.stream_wait_s)
        sender, reader = loop.create_task(feed.send()), loop.create_task(_drain(ws))
        try:
            await asyncio.wait({reader, sender, feed.gone}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and reader.exception() is None and reader.result():
                await self._close_for_input(ws, sender)
            elif feed.dropped and not sender.done():  # its close frame queues behind what it has not read
                try:
                    await asyncio.wait_for(asyncio.shield(sender), CLOSE_GRACE_S)
                except TimeoutError:
                    if request.transport is not None:
                        request.transport.abort()  # a browser that reads nothing: cut, not waited for
        finally:
            if unheard is not None:
                unheard.cancel()
            if feed.unheard_reason:
                self.counts["feeds_unheard"] += 1
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.feeds.discard(feed)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
                await sender
            if feed.dropped:
                self.counts["feeds_dropped"] += 1
        return ws

    async def _close_for_input(self, ws: web.WebSocketResponse, sender: asyncio.Task) -> None:
        """A browser sent a message: the feed is one way, and reading what it sends without bound
        would let one client take the gateway's loop from all the others."""
        self.counts["feeds_closed_for_input"] += 1
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await sender
        # close() reads on until the browser's own close frame: what a flooding client sends is
        # read for NO_INPUT_CLOSE_S at most, then its connection is closed
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            await asyncio.wait_for(ws.close(code=CLOSE_NO_INPUT, message=NO_INPUT_REASON), NO_INPUT_CLOSE_S)


def _one_stream(feed: Feed, message: wire.Batch | wire.Message) -> None:
    if isinstance(message, wire.Message):
        feed.heard = True
        feed.offer(feed_text(wire.encode_message(message, "json")))
        if message.type in ("end", "error"):
            feed.offer(None)


async def _drain(ws: web.WebSocketResponse) -> bool:
    """Wait for the browser's close (False) or its first message (True: the feed takes none)."""
    async for message in ws:
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            return True
        if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            return False
    return False
