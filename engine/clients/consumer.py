"""The consumer client: subscribe to an engine's broadcast and read streams in order, complete, or
ended by an explicit error saying what was lost (docs/wire-format.md, "A consumer, step by step").

    with StreamConsumer.for_engine(runtime_dir) as consumer:           # every stream
        consumer.join()                          # before submitting what it is to follow
        for message in consumer.messages(idle_timeout_s=5):
            ...                                  # start, tokens, end | error; per stream in seq order
        for batch in consumer.batches(idle_timeout_s=5):              # or: whole batches, cheaply
            batch.columns["stream_id"], batch.columns["recv_ns"], batch.texts
    with StreamConsumer.for_engine(runtime_dir, stream=42) as consumer:
        text = "".join(token.text for token in consumer.tokens())   # returns after stream 42 ends

Every stream (wildcard): the client subscribes to the ``all`` topic, where each input record of the
broadcast comes as one batch message placed by its input positions (``at``, ``next``). It delivers
batches in position order; a hole (a batch ZeroMQ dropped at the high-water mark, batches published
by a restarted broadcast before the subscription reached it, a heartbeat whose ``next`` is ahead)
is repaired with a ``batches`` request to the snapshot ROUTER; what the broadcast no longer retains
is declared lost: every stream open at the client then ends with an explicit error (it may have had
rows there), counted in ``lost_streams``. Rows are de-duplicated by (stream, seq) with numpy.

One stream: the client subscribes to the stream's topic, asks the snapshot ROUTER for the stream
from its beginning, merges it with live messages by seq (the ZeroMQ guide's "clone" pattern), and
asks again on a hole or when the stream falls silent. Rows the broadcast no longer retains end the
stream at the client with an explicit error, as does a hole still open after ``MAX_FRUITLESS_ASKS``
answers that brought nothing.

The logic is :class:`ConsumerCore`, which owns no socket (it is fed frames and sends snapshot
requests through a callback), so an event loop can drive it as well: :class:`StreamConsumer` is
that core over blocking sockets.

Both: when nothing (not even a heartbeat) comes from the broadcast for ``engine_timeout_s``, every
open stream ends with an explicit error ("engine unreachable"), counted in ``unreachable``. By
default that is the broadcast's hang timeout (its heartbeats say it: how long it may be silent
before the supervisor restarts it) and MIN_ENGINE_TIMEOUT_S more, at least three heartbeat periods:
a stalled or restarting broadcast loses nothing, and giving up sooner lost streams it delivered.
Silence is counted only while the consumer runs (TICK_GAP_S).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import zmq

from engine.keys import ClientKeys
from engine.protocol import wire
from engine.protocol.endpoints import endpoint
from engine.protocol.seqtable import SeqTable
from shm.batch import ending_rows

RESYNC_S = 1.0  # one stream: silent this long before its end, it is asked for again
ASK_TIMEOUT_S = 2.0  # a snapshot request unanswered this long is sent again
MAX_FRUITLESS_ASKS = 5  # answers in a row that did not close a hole: what is missing is lost
# ticks come every RESYNC_S / 4; a longer gap is time the consumer did not run (stopped, suspended,
# not pumped), which is not the engine's silence: its messages of that time may wait unread
TICK_GAP_S = 1.0
MIN_ENGINE_TIMEOUT_S = 5.0  # beyond the hang timeout: a restarting broadcast is silent for a second or two
MAX_HANG_TIMEOUT_S = 3600.0  # the most of an announced hang timeout a consumer waits for
RECONNECT_IVL_MS = 10  # how soon a socket retries a restarted broadcast's endpoint
MAX_HELD = 10_000  # batches kept ahead of a hole (more are dropped: the repair fetches them)
_FINISHED_KEPT = 100_000  # ended streams remembered, so a late duplicate does not restart one


@dataclass
class Token:
    stream: int
    seq: int
    text: str
    token_id: int
    logprob: float
    recv_ns: int
    columns: dict[str, Any]  # compute's columns (and any other appended ones) of this token


class _Stream:
    __slots__ = ("asked", "asked_at", "fruitless", "next", "pending", "touched")

    def __init__(self) -> None:
        self.next = 0  # the seq expected next
        self.pending: dict[int, wire.Message] = {}  # by first seq: arrived ahead of ``next``
        self.asked = False  # a snapshot request is out
        self.asked_at = 0.0
        self.fruitless = 0  # answers in a row that left a hole as it was
        self.touched = time.monotonic()


class ConsumerCore:
    """The consumer's logic without sockets (sans-IO): feed it what the live and snapshot sockets
    received (:meth:`feed`), run its timers (:meth:`tick`), and it sends snapshot requests through
    ``send_request`` and leaves what is ready to deliver in ``ready_batches`` (every stream) or
    ``ready`` (one stream). :class:`StreamConsumer` drives it with blocking sockets; the gateway
    (stages/gateway/) with an event loop."""

    def __init__(
        self,
        send_request: Callable[[bytes], Any],
        stream: int | None = None,
        encoding: str = "json",
        engine_timeout_s: float | None = None,
    ) -> None:
        """``send_request``: sends one frame on the DEALER connected to the snapshot endpoint."""
        self._send = send_request
        self.only = stream
        self.encoding = encoding
        self.engine_timeout_s = engine_timeout_s
        self.heartbeat_s = 1.0  # until the broadcast announces its own
        self.hang_timeout_s = 0.0  # likewise: its supervisor's hang timeout
        self.last_heard = self.ticked_at = time.monotonic()
        self.heard_live = False  # a live message came: this consumer's subscription is in place
        self.counts = dict.fromkeys(
            ("messages", "batches", "duplicates", "gaps", "snapshots", "malformed", "lost_streams", "unreachable"), 0
        )
        self.counts["lost_positions"] = 0
        self.ready: deque[wire.Message] = deque()
        self.ready_batches: deque[wire.Batch] = deque()
        if stream is None:
            self.seen = SeqTable()  # per stream the next seq delivered; closed once it ended
            self.epoch: int | None = None
            self.expected: int | None = None  # the position of the next batch to deliver
            self.held: dict[int, wire.Batch] = {}  # by ``at``: arrived ahead of ``expected``
            self.asked_at: float | None = None  # a batches request is out since
            self.replay_until = 0  # below this position, batches are history from before the start
            self.fruitless = 0
            self._ask_batches(None)  # the current position: where this consumer starts
        else:
            self.streams: dict[int, _Stream] = {}
            self.finished: OrderedDict[int, None] = OrderedDict()
            self._ask(stream, self._state(stream), "join")  # what of it was published already

    def feed(self, frames: list[bytes], live: bool) -> None:
        """One message from the live socket (``live``) or the snapshot DEALER."""
        self.last_heard = time.monotonic()
        self.heard_live = self.heard_live or live
        if not live and len(frames) == 3 and frames[0] == b"":  # [empty topic, end marker, empty]
            self._reply_end(frames[1])
            return
        try:
            message = wire.decode(frames)
        except wire.WireError:
            self.counts["malformed"] += 1
            return
        if message.type == "heartbeat":
            self._heartbeat(message.header)
        elif isinstance(message, wire.Batch):
            if self.only is None:
                self._accept_batch(message)
        elif self.only is not None and message.stream == self.only:
            self._accept(message)

    @property
    def joined(self) -> bool:
        """Whether every stream submitted from now on reaches this consumer: the broadcast has
        said where it starts (every stream), and a live message came, so its subscription is in
        place (ZeroMQ drops what is published before; the broadcast welcomes each new subscription
        with a heartbeat, so this takes a round trip, not a heartbeat period)."""
        return self.heard_live and (self.only is not None or self.expected is not None)

    def tick(self, now: float) -> None:
        """The timers: repeat unanswered requests, ask again for a silent stream, notice an
        engine gone silent. Call it every RESYNC_S / 4 or so."""
        not_running = now - self.ticked_at - TICK_GAP_S
        if not_running > 0:
            self.last_heard = min(now, self.last_heard + not_running)
        self.ticked_at = now
        if self.only is None:
            self._repair(now)
        else:
            self._resync(now)
        self._check_engine(now)

    def _reply_end(self, raw: bytes) -> None:
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.counts["malformed"] += 1
            return
        if not isinstance(reply, dict):
            self.counts["malformed"] += 1
        elif reply.get("type") == "batches_end" and self.only is None:
            self._batches_end(reply)
        elif reply.get("type") == "snapshot_end" and self.only is not None:
            self._snapshot_end(reply)

    def _heartbeat(self, head: dict[str, Any]) -> None:
        interval = head.get("interval_s")
        if isinstance(interval, int | float) and 0 < interval < 3600:
            self.heartbeat_s = float(interval)
        hang = head.get("hang_timeout_s")
        if isinstance(hang, int | float) and not isinstance(hang, bool) and 0 <= hang <= MAX_HANG_TIMEOUT_S:
            self.hang_timeout_s = float(hang)
        if self.only is None and self._same_epoch(head.get("epoch"), head.get("next")) and self.expected is not None:
            nxt = head.get("next")
            if isinstance(nxt, int) and nxt > self.expected and not self.held and self.asked_at is None:
                self._ask_batches(self.expected)  # the last batches before this heartbeat never came

    # ---- every stream: batches in position order --------------------------------------------

    def _same_epoch(self, epoch: Any, position: Any) -> bool:
        """Whether ``epoch`` is the position space this consumer counts in. A new one (the
        broadcast's positions restarted: a message transport, or a new engine) loses what the old
        one had not delivered: the open streams end, explicitly, and counting starts afresh at
        ``position``."""
        if not isinstance(epoch, int) or epoch == self.epoch:
            return True
        if self.epoch is None:  # the first heard of
            self.epoch = epoch
            return True
        self._end_open("lost: the broadcast's input positions restarted (new epoch); rows may be missing")
        self.epoch, self.held, self.asked_at, self.fruitless = epoch, {}, None, 0
        self.expected = position if isinstance(position, int) else None
        return False

    def _accept_batch(self, batch: wire.Batch) -> None:
        self._same_epoch(batch.epoch, batch.at)
        if self.expected is not None and batch.next <= self.expected:
            self.counts["duplicates"] += batch.rows  # republished after a restart, or repaired twice
            return
        if len(self.held) < MAX_HELD:
            self.held.setdefault(batch.at, batch)
        if self.expected is not None:
            self._deliver_held()

    def _deliver_held(self) -> None:
        while self.expected in self.held:
            batch = self.held.pop(self.expected)
            self.expected, self.fruitless = batch.next, 0
            self._deliver_batch(batch)
        if self.held and self.asked_at is None:
            self._ask_batches(self.expected)  # a hole before the batches held

    def _deliver_batch(self, batch: wire.Batch) -> None:
        self.counts["batches"] += 1
        if batch.at < self.replay_until:
            batch = self._open_streams_only(batch)
        sids, seqs = batch.columns["stream_id"], batch.columns["seq"]
        fresh, gaps = self.seen.admit(sids, seqs)
        self.counts["gaps"] += gaps
        if not fresh.all():
            self.counts["duplicates"] += int(len(fresh) - np.count_nonzero(fresh))
            batch = batch.take(np.flatnonzero(fresh))
        if not batch.rows:
            return
        ends = ending_rows(batch.columns["kind"])
        if ends.any():
            self.seen.close(batch.columns["stream_id"][ends])
        self.ready_batches.append(batch)

    def _open_streams_only(self, batch: wire.Batch) -> wire.Batch:
        """Of a batch from before this consumer started, the rows of the streams it follows from
        their beginning (seq 0 in the history, or known already): not the tails of streams that
        began before the history it was given (they had ended, or their beginning was evicted)."""
        sids, seqs = batch.columns["stream_id"], batch.columns["seq"]
        order, starts = wire.stream_order(sids)
        heads = order[starts]
        follow = [seq == 0 or self.seen.next_of(sid) is not None
                  for sid, seq in zip(sids[heads].tolist(), seqs[heads].tolist(), strict=True)]  # fmt: skip
        if all(follow):
            return batch
        keep = np.empty(len(sids), bool)
        keep[order] = np.repeat(follow, np.diff(np.append(starts, len(sids))))
        return batch.take(np.flatnonzero(keep))

    def _ask_batches(self, start: int | None) -> None:
        self.asked_at = time.monotonic()
        self.counts["snapshots"] += 1
        self._send(orjson.dumps({"type": "batches", "from": start, "encoding": self.encoding}))

    def _batches_end(self, reply: dict[str, Any]) -> None:
        """Every retained batch from where this consumer asked has been offered. A hole still
        open below ``first`` (the oldest position retained) is lost for good."""
        self.asked_at = None
        first, nxt = reply.get("first"), reply.get("next")
        if not self._same_epoch(reply.get("epoch"), nxt):
            return
        if not isinstance(first, int) or not isinstance(nxt, int):
            self.counts["malformed"] += 1
            return
        if self.expected is None:  # the start: where the streams open at the broadcast begin
            open_from = reply.get("open_from")
            self.expected = min([open_from if isinstance(open_from, int) else nxt, nxt, *self.held])
            self.replay_until = nxt
        if reply.get("more"):
            self._ask_batches(self.expected)
        elif self.expected < first:
            self._lost(first)
        elif self.held and self.expected not in self.held:
            self.fruitless += 1
            if self.fruitless >= MAX_FRUITLESS_ASKS:
                self._lost(min(self.held))
        self._deliver_held()

    def _lost(self, resume: int) -> None:
        """Positions [expected, resume) are not to be had: every open stream may have rows there."""
        self.counts["lost_positions"] += resume - self.expected
        self.expected, self.fruitless = resume, 0
        self.held = {at: b for at, b in self.held.items() if at >= resume}
        self._end_open(f"lost: the broadcast no longer retains what this consumer missed (positions before {resume})")

    def _repair(self, now: float) -> None:
        if self.asked_at is not None and now - self.asked_at >= ASK_TIMEOUT_S:
            self._ask_batches(self.expected)  # unanswered (a broadcast killed with it in flight)

    def _end_open(self, reason: str) -> None:
        """End every stream open at the client with an explicit error row."""
        if self.only is not None:
            if self.only in self.streams:
                self._end_stream(self.only, reason)
            return
        ids = self.seen.open_streams()
        if not len(ids):
            return
        n = len(ids)
        self.counts["lost_streams" if reason.startswith("lost") else "unreachable"] += n
        seqs = np.array([self.seen.next_of(sid) for sid in ids.tolist()], np.uint64)
        self.seen.close(ids)
        columns = {
            "stream_id": ids,
            "seq": seqs,
            "kind": np.full(n, wire.ERROR, np.uint8),
            "token_id": np.zeros(n, np.uint32),
            "logprob": np.full(n, np.nan, np.float32),
            "recv_ns": np.full(n, time.monotonic_ns(), np.int64),
        }
        position = self.expected or 0
        header = {"synthetic": True, "reason": reason}
        self.ready_batches.append(
            wire.Batch(self.epoch or 0, position, position, columns, wire.Texts.from_list([reason] * n), header)
        )

    def _check_engine(self, now: float) -> None:
        timeout = self.engine_timeout_s or max(3 * self.heartbeat_s, self.hang_timeout_s + MIN_ENGINE_TIMEOUT_S)
        if now - self.last_heard >= timeout:
            self.last_heard = now
            self._end_open(f"engine unreachable: nothing from the broadcast for {timeout:g} s")

    # ---- one stream: per-stream messages by seq ---------------------------------------------

    def _state(self, sid: int) -> _Stream:
        state = self.streams.get(sid)
        if state is None:
            state = self.streams[sid] = _Stream()
        return state

    def _accept(self, message: wire.Message) -> None:
        sid = message.stream
        if sid in self.finished:
            self.counts["duplicates"] += 1
            return
        state = self._state(sid)
        state.touched = time.monotonic()
        first, last = message.seq
        if last < state.next or first in state.pending:
            self.counts["duplicates"] += 1
        elif first > state.next:
            state.pending[first] = message
            if not state.asked:
                self._ask(sid, state, "join" if state.next == 0 else "gap")
        else:
            self._deliver(sid, state, message if first == state.next else message.trimmed(state.next))
            while state.pending and sid in self.streams:
                first = min(state.pending)
                if first > state.next:
                    break
                queued = state.pending.pop(first)
                if queued.seq[1] >= state.next:
                    self._deliver(sid, state, queued if first == state.next else queued.trimmed(state.next))

    def _deliver(self, sid: int, state: _Stream, message: wire.Message) -> None:
        state.next = message.seq[1] + 1
        state.fruitless = 0
        self.ready.append(message)
        self.counts["messages"] += 1
        if message.type in ("end", "error"):
            del self.streams[sid]
            self.finished[sid] = None
            if len(self.finished) > _FINISHED_KEPT:
                self.finished.popitem(last=False)

    def _end_stream(self, sid: int, reason: str) -> None:
        state = self.streams[sid]
        self.counts["lost_streams" if reason.startswith("lost") else "unreachable"] += 1
        head = wire.header("error", sid, state.next, state.next, self.encoding, reason=reason, synthetic=True)
        self._deliver(sid, state, wire.Message("error", sid, (state.next, state.next), head))

    def _ask(self, sid: int, state: _Stream, reason: str) -> None:
        """Ask the snapshot ROUTER for the stream from ``state.next``; ``reason`` (join, gap,
        resync, retry) lets the broadcast count the holes consumers saw."""
        state.asked = True
        state.asked_at = time.monotonic()
        self.counts["snapshots"] += 1
        request = {"type": "snapshot", "stream": sid, "from_seq": state.next, "reason": reason}
        self._send(orjson.dumps(request | {"encoding": self.encoding}))

    def _snapshot_end(self, reply: dict[str, Any]) -> None:
        """Everything the broadcast retained has been offered. Rows below what it had published
        when it answered (``published``) that are still missing are lost for good (they were
        retained if they still existed): the stream ends at the client with an explicit error.
        Rows of a hole published after the answer are asked for again, a bounded number of times."""
        sid = reply.get("stream", -1)
        state = self.streams.get(sid)
        if state is None:
            return
        state.asked = False
        state.touched = time.monotonic()
        published = reply.get("published", state.next)
        published = published if isinstance(published, int) else state.next
        if reply.get("more"):
            self._ask(sid, state, "more")
            return
        missing_end = min([published, *state.pending])  # rows below it were published before the answer
        if missing_end > state.next:  # ... and were not in it: no longer retained
            self.counts["gaps"] += missing_end - state.next
            self._end_stream(sid, f"lost: seqs {state.next}..{missing_end - 1} are no longer retained by the broadcast")
        elif state.pending and min(state.pending) > state.next:  # published after the answer: ask again
            state.fruitless += 1
            if state.fruitless >= MAX_FRUITLESS_ASKS:
                self._end_stream(sid, f"lost: seq {state.next} never came after {state.fruitless} requests")
            else:
                self._ask(sid, state, "gap")

    def _resync(self, now: float) -> None:
        """Ask again for a stream silent before its end, and for one whose request got no answer
        (a broadcast killed with the request in flight never answers it)."""
        for sid, state in list(self.streams.items()):
            if state.asked:
                if now - state.asked_at >= ASK_TIMEOUT_S:
                    self._ask(sid, state, "retry")
            elif now - state.touched >= RESYNC_S:
                state.touched = now
                self._ask(sid, state, "resync")


class StreamConsumer(ConsumerCore):
    """The consumer over blocking sockets (module docstring)."""

    def __init__(
        self,
        endpoint: str,
        snapshot_endpoint: str,
        stream: int | None = None,
        rcvhwm: int = 100_000,
        encoding: str = "json",
        engine_timeout_s: float | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        """``curve``: the keys to connect to CURVE tcp endpoints with (engine.keys.load_client_keys)."""
        self.ctx = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sub.setsockopt(zmq.LINGER, 0)
        # a restarted broadcast is found within 10 ms, not zmq's default 100 (docs/recovery.md)
        self.sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        if curve is not None:
            curve.apply(self.sub)
        self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, wire.ALL_TOPIC if stream is None else wire.topic(stream))
        self.sub.setsockopt(zmq.SUBSCRIBE, wire.HEARTBEAT_TOPIC)
        self.snap = self.ctx.socket(zmq.DEALER)
        self.snap.setsockopt(zmq.LINGER, 0)
        self.snap.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        if curve is not None:
            curve.apply(self.snap)
        self.snap.connect(snapshot_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self.poller.register(self.snap, zmq.POLLIN)
        super().__init__(self._send_ask, stream, encoding, engine_timeout_s)

    def _send_ask(self, frame: bytes) -> None:
        """Never blocks: with no pipe to the snapshot ROUTER (one that refused the CURVE handshake
        drops it) a request is not sent, and asked again after ASK_TIMEOUT_S."""
        with contextlib.suppress(zmq.Again):
            self.snap.send(frame, zmq.NOBLOCK)

    @classmethod
    def for_engine(
        cls,
        runtime_dir: str,
        stream: int | None = None,
        binary: bool = False,
        worker: str = "broadcast",
        **options: Any,
    ) -> StreamConsumer:
        """A consumer of the engine whose runtime directory is ``runtime_dir`` (the ``runtime_dir``
        of ``engine.clients.supervisor.find_engine``), over its ipc endpoints."""
        return cls(
            endpoint(runtime_dir, worker, "binary" if binary else ""),
            endpoint(runtime_dir, worker, "snapshot"),
            stream,
            encoding="binary" if binary else "json",
            **options,
        )

    # ---- reading --------------------------------------------------------------------------

    def messages(self, idle_timeout_s: float | None = None) -> Iterator[wire.Message]:
        """Messages in seq order per stream, each once. Returns when the one stream asked for has
        ended, or after ``idle_timeout_s`` without a message (None: never)."""
        idle_since = time.monotonic()
        while True:
            if self.only is None:
                while self.ready_batches:
                    split = self.ready_batches.popleft().stream_messages()
                    self.counts["messages"] += len(split)
                    self.ready.extend(split)
            while self.ready:
                message = self.ready.popleft()
                yield message
                if self.only is not None and message.type in ("end", "error"):
                    return
                idle_since = time.monotonic()
            if idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                return
            self._pump()

    def batches(self, idle_timeout_s: float | None = None) -> Iterator[wire.Batch]:
        """Every stream's rows, one batch per broadcast input record, in position order, each row
        once (``columns``: numpy arrays incl. stream_id, seq, kind, recv_ns; ``texts`` decoded on
        use). A stream ended at the client (lost, engine unreachable) comes as a batch of error
        rows whose ``header`` has ``"synthetic": true``. Returns after ``idle_timeout_s`` without
        a batch (None: never). Every stream only (not with ``stream=``)."""
        if self.only is not None:
            raise ValueError("batches() reads every stream; this consumer follows one (use messages())")
        idle_since = time.monotonic()
        while True:
            while self.ready_batches:
                yield self.ready_batches.popleft()
                idle_since = time.monotonic()
            if idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                return
            self._pump()

    def tokens(self, idle_timeout_s: float | None = None) -> Iterator[Token]:
        """The replies' tokens of :meth:`messages`, one by one (a reasoning model's thinking and a
        tool call's pieces come as ``reasoning`` and ``tool_calls`` messages there, not here)."""
        for message in self.messages(idle_timeout_s):
            if message.type != "tokens":
                continue
            cols = message.columns
            extra = [name for name in cols if name not in wire.BASE_COLUMNS]
            for i, text in enumerate(message.text):
                yield Token(
                    message.stream,
                    int(cols["seq"][i]),
                    text,
                    int(cols["token_id"][i]),
                    float(cols["logprob"][i]),
                    int(cols["recv_ns"][i]),
                    {name: _plain(cols[name][i]) for name in extra},
                )

    def join(self, timeout_s: float = 5.0) -> bool:
        """Wait until :attr:`joined`: call it before submitting the streams this consumer is to
        follow, or one that ends before the subscription is in place may never be seen. False
        if the broadcast did not answer within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.joined:
            if time.monotonic() >= deadline:
                return False
            self._pump()
        return True

    def _pump(self) -> None:
        """Wait a little for the sockets, take what came, and run the timers."""
        events = dict(self.poller.poll(int(RESYNC_S * 250)))
        if self.sub in events:
            self._drain(self.sub, live=True)
        if self.snap in events:
            self._drain(self.snap, live=False)
        self.tick(time.monotonic())

    def _drain(self, sock: zmq.Socket, live: bool) -> None:
        for _ in range(10_000):  # then let the caller deliver what came
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.feed(frames, live)

    # ---- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        self.sub.close(0)
        self.snap.close(0)

    def __enter__(self) -> StreamConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """A numpy scalar or row as a plain Python value (for printing and JSON)."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value
