"""The gateway's view of the broadcast: every stream, on the event loop, through the consumer
client's own logic (engine.clients.consumer.ConsumerCore: positions, repair, de-duplication, and
an explicit error for whatever can no longer be had), handed out by stream id.

One subscription serves every request (topic ``all`` on the binary socket, which the broadcast
builds whatever else is subscribed, so following costs the broadcast nothing extra). A request
registers its stream id once ingest has accepted it and reads that stream's messages (start,
tokens, end | error; engine/protocol/wire.py; a batch's run of a stream's tokens as
:class:`Tokens`) from its :class:`Inbox`, or takes them as they are routed while it waits
(``Inbox.wait``'s ``direct``). Rows can arrive before the
accepted reply is read, so while submits are in flight, messages of streams nobody registered yet
that started meanwhile are kept for a little while (bounded) and handed over on registration.

A follower of one stream (``stream=N``; a browser feed of one stream) subscribes to that stream's
topic and gets it from its beginning (the snapshot join), the same way :class:`StreamConsumer` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from engine.clients.consumer import RESYNC_S, ConsumerCore
from engine.protocol import wire
from engine.protocol.endpoints import endpoint
from shm.batch import TOP_COLUMN
from stages.gateway.budget import Budget

RCVHWM = 1_000_000  # batch messages queued for the gateway before ZeroMQ drops (then repaired)
RECONNECT_IVL_MS = 10
DRAIN_LIMIT = 1000  # messages read per socket per wake-up: then the others' turn
ORPHAN_STREAMS = 4096  # streams whose rows came before their accepted reply was read
ORPHAN_TTL_S = 10.0
ORPHAN_MESSAGES = 10_000  # kept per such stream; beyond, it is dropped (then lost: an explicit error)
# every such stream's kept messages together (texts, columns and a little for the objects); past
# it the oldest streams go: the newest is the likeliest to be the submit awaiting its reply
ORPHAN_BYTES = 8 << 20
_MESSAGE_OVERHEAD = 256
# runs of tokens an inbox keeps with their whole batch (every stream's rows) when its request
# reads columns; past them a run waiting takes a copy of its own rows' columns (Inbox.put)
PINNED_BATCHES = 8
SOCKETS = 2  # a follower's ZeroMQ sockets (SUB and DEALER), all on zmq.Context.instance()
SOCKETS_SPARE = 16  # the context's room beyond the followers reserved


class Inbox:
    """One stream's messages, in seq order, for the request that follows it."""

    __slots__ = (
        "_backlog",
        "_deadline",
        "_loop",
        "_timer",
        "_timer_at",
        "_wait_s",
        "_waiter",
        "direct",
        "max_rows",
        "messages",
        "on_overflow",
        "overflowed",
        "rows",
        "wants_columns",
    )

    def __init__(self) -> None:
        self.messages: deque[wire.Message | Tokens] = deque()
        # rows waiting (a token each, or an event): past max_rows (0: no bound), or past the
        # gateway's backlog while this inbox holds the most, the inbox drops what it holds and
        # takes no more, and on_overflow is called once (a client reading slower than its stream
        # comes would otherwise hold the rest of the answer here)
        self.rows = 0
        self.max_rows = 0
        self.on_overflow: Callable[[], None] | None = None
        self.overflowed = ""  # the key of the bound that cut it ("" while not cut)
        self._backlog: Budget | None = None  # the gateway's bound on every stream's waiting rows
        # whether the request reads its tokens' columns (logprobs, compute's columns); a waiting
        # run of tokens keeps only what will be read of its batch, never every stream's rows
        self.wants_columns = True
        self._waiter: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()
        # the follower of the stream while it waits: takes a message at once (True) or leaves it
        # queued (False); it spares a task wake-up per token (Completions._stream)
        self.direct: Callable[[wire.Message | Tokens], bool] | None = None
        # one timer, re-armed only when it fires early, rather than a timer per wait (per token)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._wait_s = 0.0

    def bound(self, max_rows: int, backlog: Budget, on_overflow: Callable[[], None]) -> None:
        """Hold at most ``max_rows`` rows, and count them in the gateway's ``backlog``."""
        self.max_rows, self.on_overflow, self._backlog = max_rows, on_overflow, backlog
        if self.rows:
            backlog.add(self, self.rows)

    def put(self, message: wire.Message | Tokens) -> None:
        if self.overflowed:
            return
        if self.direct is not None and not self.messages and self.direct(message):
            self._deadline = self._loop.time() + self._wait_s  # delivered: the wait starts again
            return
        if type(message) is Tokens and (not self.wants_columns or len(self.messages) >= PINNED_BATCHES):
            message.detach(self.wants_columns)
        self.messages.append(message)
        rows = len(message.text) if message.type in wire.TOKEN_TYPES else 1
        self.rows += rows
        if self._backlog is not None:
            if self.rows > self.max_rows:
                self.overflow("max_stream_backlog")
            else:
                self._backlog.add(self, rows)  # past its limit the fullest inbox overflows, maybe this one
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def overflow(self, bound: str) -> None:
        """Drop what is held, take no more, and say so (once); ``bound`` names the key that cut it."""
        self.overflowed = bound
        self.take()
        self._backlog = None
        if self.on_overflow is not None:
            self.on_overflow()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take(self) -> deque[wire.Message | Tokens]:
        """Every message waiting, in order; the inbox is empty after."""
        if self._backlog is not None:
            self._backlog.release(self)
        messages, self.messages, self.rows = self.messages, deque(), 0
        return messages

    async def wait(self, timeout_s: float, direct: Callable[[wire.Message | Tokens], bool] | None = None) -> bool:
        """Until a message is there (True) or ``timeout_s`` passed without one (False); meanwhile
        ``direct`` (if given) is offered each message first; True at once once overflowed."""
        if self.messages or self.overflowed:
            return True
        self._wait_s = timeout_s
        self._deadline = self._loop.time() + timeout_s
        if self._timer is None or self._timer_at > self._deadline:
            self._arm()
        waiter = self._waiter = self._loop.create_future()
        self.direct = direct
        try:
            await waiter
        finally:
            self._waiter = self.direct = None
        return bool(self.messages or self.overflowed)

    def close(self) -> None:
        """No more messages will be read: what is held no longer counts in the backlog."""
        self._cancel_timer()
        if self._backlog is not None:
            self._backlog.release(self)
            self._backlog = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        self._cancel_timer()
        self._timer_at = self._deadline
        self._timer = self._loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return
        if self._loop.time() < self._deadline:  # something came meanwhile: wait on
            self._arm()
        else:
            self._waiter.set_result(None)


class Tokens:
    """A run of one stream's token rows routed from a batch: what the gateway reads of a tokens
    message (``type``, ``stream``, ``seq``, ``text``), with ``columns`` and ``header`` made only
    when read (most requests ask for neither: the batch's columns are not sliced for them).
    ``type`` is the run's (wire.RUN_TYPES): tokens, or a reasoning model's thinking, or a tool
    call's pieces."""

    __slots__ = ("_batch", "_columns", "_encoding", "_rows", "seq", "stream", "text", "type")

    def __init__(
        self,
        batch: wire.Batch,
        rows: list[int],
        stream: int,
        seq: tuple[int, int],
        text: list[str],
        kind: str = "tokens",
    ) -> None:
        self._batch: wire.Batch | None = batch
        self._rows = rows
        self.stream, self.seq, self.text, self.type = stream, seq, text, kind
        self._columns: dict[str, np.ndarray] | None = None
        self._encoding = ""

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """seq and the other columns of the rows, as in a tokens message (wire.Message)."""
        if self._columns is None:
            if self._batch is None:
                raise RuntimeError("a run of tokens detached without its columns has none to read")
            self._columns = _own_columns(self._batch, self._rows)
        return self._columns

    @property
    def header(self) -> dict[str, Any]:
        encoding = self._encoding or self._batch.header.get("encoding", "binary")
        return wire.header(self.type, self.stream, *self.seq, encoding)

    def detach(self, columns: bool) -> None:
        """Let go of the batch (every stream's rows, which a run waiting for a slow client would
        keep alive), keeping a copy of this run's ``columns`` if they will be read."""
        batch = self._batch
        if batch is None:
            return
        if columns and self._columns is None:
            self._columns = _own_columns(batch, self._rows)
        self._encoding = batch.header.get("encoding", "binary")
        self._batch = None


def _own_columns(batch: wire.Batch, rows: list[int]) -> dict[str, np.ndarray]:
    """The columns of ``rows`` of ``batch`` (copies), as a tokens message has them. The row list
    made an array once, not by each column's indexing (6.7 -> 3.0 µs for a batch's 13 columns)."""
    index = np.array(rows)
    return {name: values[index] for name, values in batch.columns.items() if name not in _NOT_TOKEN_COLUMNS}


_NOT_TOKEN_COLUMNS = frozenset(("stream_id", "kind"))


class BroadcastFollower:
    def __init__(self, runtime_dir: str, stream: int | None = None, worker: str = "broadcast") -> None:
        ctx = zmq.Context.instance()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.sub.connect(endpoint(runtime_dir, worker, "binary"))
        self.sub.setsockopt(zmq.SUBSCRIBE, wire.ALL_TOPIC if stream is None else wire.topic(stream))
        self.sub.setsockopt(zmq.SUBSCRIBE, wire.HEARTBEAT_TOPIC)
        try:
            self.snap = ctx.socket(zmq.DEALER)
        except zmq.ZMQError:  # no room for it: the subscription goes too
            self.sub.close(0)
            raise
        self.snap.setsockopt(zmq.LINGER, 0)
        self.snap.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.snap.connect(endpoint(runtime_dir, worker, "snapshot"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self.core = ConsumerCore(self._send, stream, encoding="binary")
        self.inboxes: dict[int, Inbox] = {}
        self.expecting = 0  # submits whose accepted reply has not been read yet
        self.orphans: OrderedDict[int, _Kept] = OrderedDict()
        self.orphan_bytes = 0  # what self.orphans holds, by _message_bytes
        self.listeners: set[Callable[[wire.Batch | wire.Message], None]] = set()
        self.counts = {"orphans_dropped": 0}
        self.columns: frozenset[str] = frozenset()  # the appended columns (compute's) batches carry
        self._ticker: asyncio.Task | None = None
        # a bug in reading or routing: the gateway fails on it (stage.py), so the supervisor restarts
        # it; a follower that stopped reading would hold every stream open, silent, for good
        self.failure: Exception | None = None

    @staticmethod
    def reserve(followers: int) -> None:
        """Room in the followers' ZeroMQ context for ``followers`` of them at once (libzmq's default
        of 1,023 sockets held ~510). Before the context's first socket: libzmq sizes it then."""
        zmq.Context.instance().set(zmq.MAX_SOCKETS, SOCKETS * followers + SOCKETS_SPARE)

    # ---- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in (self.sub, self.snap):
            self._loop.add_reader(sock.getsockopt(zmq.FD), self._readable)
        self._ticker = self._loop.create_task(self._tick())
        self._readable()  # ZeroMQ's fd is edge-triggered: take what came before the readers

    @property
    def ready(self) -> bool:
        """Requests may come: every stream submitted from now on reaches the gateway (ConsumerCore.joined)."""
        return self.core.joined

    async def close(self) -> None:
        if self._loop is not None:
            for sock in (self.sub, self.snap):
                with contextlib.suppress(ValueError, OSError, zmq.ZMQError):
                    self._loop.remove_reader(sock.getsockopt(zmq.FD))
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self.sub.close(0)
        self.snap.close(0)

    # ---- requests' streams --------------------------------------------------------------------

    @contextlib.contextmanager
    def expecting_one(self):
        """Around a submit: keep rows of unregistered streams until its reply has been read."""
        self.expecting += 1
        try:
            yield
        finally:
            self.expecting -= 1
            if not self.expecting:  # each submit's stream is registered by now: the rest are others'
                self.orphans.clear()
                self.orphan_bytes = 0

    def register(self, stream_id: int, inbox: Inbox | None = None) -> Inbox:
        """``stream_id``'s messages from now on (and any kept for it) into ``inbox`` (shared by
        the streams of one request's choices), or a new one."""
        inbox = self.inboxes[stream_id] = inbox or Inbox()
        kept = self.orphans.pop(stream_id, None)
        if kept is not None:
            self.orphan_bytes -= kept.bytes
            for message in kept.messages:
                inbox.put(message)
        return inbox

    def unregister(self, stream_id: int) -> None:
        inbox = self.inboxes.pop(stream_id, None)
        if inbox is not None:
            inbox.close()

    # ---- reading ------------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        with contextlib.suppress(zmq.Again):  # the repair request is sent again after ASK_TIMEOUT_S
            self.snap.send(frame, zmq.NOBLOCK)
        if self._loop is not None:  # a send can swallow the fd's edge for a reply already queued
            self._loop.call_soon(self._readable)

    def _readable(self, tick: bool = False) -> None:
        """Read what came (from the sockets' readers, a send, the ticker, which runs the consumer's
        timers first: they may send a request); a failure is kept."""
        try:
            if tick:
                self.core.tick(time.monotonic())
            self._read()
        except Exception as exc:
            self.failure = self.failure or exc

    def _read(self) -> None:
        more = False
        for sock, live in ((self.sub, True), (self.snap, False)):
            for _ in range(DRAIN_LIMIT):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:  # closed under us at shutdown
                    return
                self.core.feed(frames, live)
            else:
                more = True
        self._deliver()
        if more and self._loop is not None:
            self._loop.call_soon(self._readable)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_S / 4)
            self._readable(tick=True)

    def _deliver(self) -> None:
        core = self.core
        while core.ready_batches:
            batch = core.ready_batches.popleft()
            # compute's columns; not from a record with ``top`` (only some carry it: the gateway
            # serves it as top_logprobs, not as a column)
            fixed = batch.rows and TOP_COLUMN not in batch.columns
            if fixed and len(batch.columns) != len(self.columns) + len(wire.BATCH_COLUMNS):
                self.columns = frozenset(batch.columns) - frozenset(wire.BATCH_COLUMNS)
            for listener in tuple(self.listeners):
                listener(batch)
            self._route(batch)
        while core.ready:
            message = core.ready.popleft()
            for listener in tuple(self.listeners):
                listener(message)

    def _route(self, batch: wire.Batch) -> None:
        if not self.inboxes and not self.expecting:
            return
        sids = batch.columns["stream_id"].tolist()
        if not self.expecting and self.inboxes.keys().isdisjoint(sids):
            return
        kinds = batch.columns["kind"]
        others = set(np.flatnonzero(kinds != wire.TOKEN).tolist())  # rows that are not the reply's tokens
        seqs, texts = batch.columns["seq"].tolist(), batch.texts
        # while a submit is in flight, the streams that may be its own: those seen starting since
        # (a stream's start row comes after its submit; one begun before is another client's)
        starting = {sids[i] for i in others if kinds[i] == wire.START} if self.expecting else ()
        split: list[int] = []  # rows of streams with a start, end or error, or kept until registered
        for sid, rows in _rows_by_stream(sids).items():
            inbox = self.inboxes.get(sid)
            if inbox is None:
                if self.expecting and (sid in starting or sid in self.orphans):
                    split += rows
                continue
            kind = "tokens" if others.isdisjoint(rows) else _one_run(kinds, rows)
            if kind is not None:  # the usual case: a run of tokens (or of thinking, of a call's pieces)
                inbox.put(Tokens(batch, rows, sid, (seqs[rows[0]], seqs[rows[-1]]), [texts[i] for i in rows], kind))
            else:  # a start, end or error among them, or runs of several kinds: wire's split
                split += rows
        if split:
            self._route_split(batch.take(np.array(split)))

    def _route_split(self, batch: wire.Batch) -> None:
        """The batch's per-stream messages (wire's split), each to its stream or kept as an orphan."""
        now = time.monotonic()
        for message in batch.stream_messages():
            inbox = self.inboxes.get(message.stream)
            if inbox is not None:
                inbox.put(message)
            elif self.expecting:
                self._keep_orphan(message, now)

    def _keep_orphan(self, message: wire.Message, now: float) -> None:
        size = _message_bytes(message)
        if size > ORPHAN_BYTES:  # more than all of them may hold: its stream goes, the others stay
            if message.stream in self.orphans:
                self._drop_orphan(message.stream)
            else:
                self.counts["orphans_dropped"] += 1
            return
        while self.orphans:
            sid, oldest = next(iter(self.orphans.items()))
            if (
                now - oldest.since < ORPHAN_TTL_S
                and len(self.orphans) < ORPHAN_STREAMS
                and self.orphan_bytes + size <= ORPHAN_BYTES
            ):
                break
            self._drop_orphan(sid)
        kept = self.orphans.get(message.stream)
        if kept is None:
            kept = self.orphans[message.stream] = _Kept(now)
        elif len(kept.messages) >= ORPHAN_MESSAGES:
            self._drop_orphan(message.stream)
            return
        kept.messages.append(message)
        kept.bytes += size
        self.orphan_bytes += size

    def _drop_orphan(self, stream_id: int) -> None:
        self.orphan_bytes -= self.orphans.pop(stream_id).bytes
        self.counts["orphans_dropped"] += 1


class _Kept:
    """The messages kept for a stream nobody has registered yet."""

    __slots__ = ("bytes", "messages", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.messages: list[wire.Message] = []
        self.bytes = 0


def _message_bytes(message: wire.Message) -> int:
    """What keeping ``message`` holds, near enough: its texts, its columns, its objects."""
    return _MESSAGE_OVERHEAD + sum(map(len, message.text)) + sum(values.nbytes for values in message.columns.values())


def _one_run(kinds: np.ndarray, rows: list[int]) -> str | None:
    """The message type of ``rows`` when they are all of one kind of token run, else None."""
    first = int(kinds[rows[0]])
    if first not in wire.RUN_TYPES or any(int(kinds[i]) != first for i in rows):
        return None
    return wire.RUN_TYPES[first]


def _rows_by_stream(sids: list[int]) -> dict[int, list[int]]:
    """Each stream's row indices, in row order (a record's rows of a stream are in seq order).
    Plain Python: a record carries a few dozen rows, where numpy's grouping costs more."""
    rows_of: dict[int, list[int]] = {}
    for i, sid in enumerate(sids):
        rows = rows_of.get(sid)
        if rows is None:
            rows_of[sid] = [i]
        else:
            rows.append(i)
    return rows_of
