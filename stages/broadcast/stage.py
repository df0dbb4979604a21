"""Broadcast: the last stage. Publishes what reaches it on XPUB sockets (engine/protocol/wire.py, wire format
version 2, docs/wire-format.md) and serves what it retained on a snapshot ROUTER.

Per input record it publishes ONE batch message on the topic ``all`` (every stream's rows of the
record, built once per encoding that has a subscriber), placed by the record's input positions
(``at``, ``next``: a consumer sees any hole), and per-stream messages only for the streams whose
exact topic someone subscribed to. It keeps the recent batch messages (bounded by bytes and age)
and answers per-stream snapshots (a late joiner, a gap) and ``batches`` requests (a wildcard
consumer repairing a hole in the positions) from them (stages/broadcast/snapshots.py).

Params (all optional):
    endpoints        extra endpoints: [{url = "tcp://127.0.0.1:5556", encoding = "json" | "binary"}]
                     (always bound: ipc broadcast.sock (json) and broadcast-binary.sock (binary)
                     in the runtime directory)
    snapshot_url     an extra endpoint for the snapshot ROUTER (always: broadcast-snapshot.sock),
                     served by a ROUTER socket of its own (CURVE is per socket, the ipc one has none)
    curve            CURVE on every tcp endpoint: only clients whose public key is allow-listed
                     get anything (engine/keys.py, docs/security.md); required for a tcp endpoint
                     beyond loopback (false)
    keys_dir         the CURVE keys directory (default: engine.keys.default_keys_dir())
    sndhwm           messages queued per subscriber before ZeroMQ drops for it (10000)
    retention_bytes  memory for the published batch messages kept for snapshots, their index
                     and bookkeeping included (64 MiB)
    retention_s      how long a published batch is kept (300)
    heartbeat_s      a heartbeat message every this many seconds (1.0), and one at once when a
                     subscription comes (the subscriber's sign that it is in place)
    latency_budget_ms  a batch is within budget when it is published this soon after its first
                     row's recv_ns (50; the ``batches_within_budget`` egress count of PAS)

Stats (with every heartbeat; ``messages``, ``gaps``, ``duplicates``, ``batches`` and
``batches_within_budget`` are the engine's egress numbers for PAS, meaning what they meant in
format version 1): ``messages`` the per-stream messages the published rows make (per stream a run
of tokens, or one start, end or error row), ``tokens``, ``duplicates`` rows dropped as already
published, ``gaps`` rows missing in a stream's input sequence, ``batches`` records published,
``subscriptions`` seen (``subscription_junk``: frames that were no subscription), ``snapshots``
requests served (``snapshots_refused``: over a client's rate), ``gap_refills`` requests a
consumer sent because it saw a hole, ``evicted`` retained batches.

Rows already published (by stream id and seq) are dropped: after a restart of a stage before this
one, what comes again is not published twice. The next seq per stream lives in a restart-surviving
state array, updated as each record is published.

A message handed to ZeroMQ is not on the wire yet, so a SIGKILL can lose what was just published,
and what a subscriber lagging a little still has queued in the socket. Input records are therefore
released only HOLD_S after they were published (sooner when they hold a quarter of the input ring),
and a restarted broadcast publishes the records it finds unreleased again, at the same positions
and without the de-duplication: a consumer drops what it already has by position (and by seq).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import zmq

from engine.keys import CurveServer
from engine.protocol import wire
from engine.protocol.seqtable import SLOTS, SeqTable
from engine.stage import SocketTurns, Stage, WorkerContext
from engine.validated import ModelRef
from shm.batch import TokenBatch, ending_rows, event_rows
from stages.broadcast.retention import Retention
from stages.broadcast.snapshots import REQUESTS_PER_CYCLE, Snapshots
from stages.broadcast.subscriptions import Subscriptions

HOLD_S = 0.5  # how long published records stay unreleased: what a restarted broadcast publishes again
SUBSCRIPTION_MESSAGES_PER_CYCLE = 1024  # (un)subscriptions read per duty cycle
SOCKETS_EVERY_S = 0.01  # while records flow, subscriptions and snapshot requests are read this often
SNAPSHOT_SNDHWM = 100_000  # reply messages queued per snapshot client
SNAPSHOT_RCVHWM = 1000  # requests queued per snapshot client; ZeroMQ drops beyond it
_OPEN_KEPT = 100_000  # streams remembered as open, for the heartbeat's active_streams
_EVENTS, _POLLIN, _SNDMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SNDMORE)
_SEND = zmq.backend.Socket.send  # the compiled send that zmq.Socket.send ends in


class _Publisher:
    __slots__ = ("encoding", "sock", "subs")

    def __init__(self, sock: zmq.Socket, encoding: str) -> None:
        self.sock = sock
        self.encoding = encoding
        self.subs = Subscriptions()


class Broadcast(Stage):
    Params = ModelRef("stages.broadcast.params:BroadcastParams")
    # what close() may meet before start() made it (a start that failed part way)
    zmq: zmq.Context | None = None
    curve: CurveServer | None = None
    published: SeqTable | None = None

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        p = self.parse_params(ctx.params)
        self.inp = ctx.inputs[0]
        self.zmq = zmq.Context()
        endpoints = [  # (url, encoding): the two ipc ones, then the configured ones
            (ctx.endpoint(), "json"),
            (ctx.endpoint("binary"), "binary"),
            *((e.url, e.encoding) for e in p.endpoints),
        ]
        # CURVE is a socket's option, so each tcp endpoint has a socket of its own (extra live
        # endpoints always have; the snapshot_url gets its own ROUTER)
        self.curve = CurveServer(self.zmq, p.keys_dir) if p.curve else None
        self.publishers: list[_Publisher] = []
        for url, encoding in endpoints:
            sock = self.zmq.socket(zmq.XPUB)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, so they can be counted per topic
            sock.setsockopt(zmq.SNDHWM, p.sndhwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 4096)  # what subscribers send: (un)subscriptions, a topic each
            self._bind(sock, url)
            self.publishers.append(_Publisher(sock, encoding))
        self.router = self._snapshot_router(ctx.endpoint("snapshot"))
        self.routers = [self.router]
        if p.snapshot_url:
            self.routers.append(self._snapshot_router(p.snapshot_url))
        self.heartbeat_s = p.heartbeat_s
        self.budget_ns = int(p.latency_budget_ms * 1e6)
        # slot -> (stream id + 1, next seq to publish); survives restarts of this worker
        self.published = SeqTable(ctx.state_array("published", "u8", (SLOTS, 2)))
        self.epoch = self._epoch(ctx)
        self.retention = Retention(p.retention_bytes, p.retention_s)
        self.counts = dict.fromkeys(
            (
                *("messages", "tokens", "duplicates", "gaps", "batches", "batches_within_budget"),
                *("streams_ended", "snapshots", "snapshots_refused", "snapshots_bad", "gap_refills", "republished"),
            ),
            0,
        )
        self.snapshots = Snapshots(self.retention, self.published, self.epoch, self.counts)
        self.open_streams: OrderedDict[int, None] = OrderedDict()
        self.last_heartbeat = 0.0
        self.next_subscriptions = 0.0
        self.idle = True  # the last duty cycle did nothing: the next one may follow a park
        self.serving = SocketTurns(SOCKETS_EVERY_S)
        # (read position, records read before it since the previous mark, when published)
        self.unreleased: deque[tuple[int, int, float]] = deque()
        # records a killed predecessor left unreleased end here: publish them again, all of them
        self.backlog_end = self.inp.position + self.inp.available()
        self.released = self.inp.position  # where the records held unreleased begin
        self.hold_limit = self.inp.capacity // 4 or None  # records held past this are released sooner
        self.next_position = self.inp.position  # ``next`` of the last batch published (or republished)
        ctx.log.info(
            "broadcast_ready",
            endpoints=[url for url, _ in endpoints],
            epoch=self.epoch,
            **(self.curve.describe() if self.curve else {}),
        )

    def _bind(self, sock: zmq.Socket, url: str) -> None:
        if self.curve is not None and url.startswith("tcp://"):
            self.curve.secure(sock)
        sock.bind(url)

    def _snapshot_router(self, url: str) -> zmq.Socket:
        router = self.zmq.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        router.setsockopt(zmq.SNDHWM, SNAPSHOT_SNDHWM)
        router.setsockopt(zmq.RCVHWM, SNAPSHOT_RCVHWM)
        router.setsockopt(zmq.MAXMSGSIZE, 1 << 16)  # requests are small JSON objects
        self._bind(router, url)
        return router

    def _epoch(self, ctx: WorkerContext) -> int:
        """Names the space the positions count in: the same across restarts of this worker over a
        shared-memory ring (its cursors outlive the worker), a new one where positions restart
        (a message transport counts records from 0 in each incarnation)."""
        state = ctx.state_array("epoch", "u8", (1,))
        if int(state[0]) == 0 or not self.inp.durable:
            state[0] = int.from_bytes(os.urandom(6), "little") | 1  # < 2**48: exact in any JSON reader
        return int(state[0])

    def pollables(self) -> list[Any]:
        # a subscription wakes an idle broadcast: each new one is welcomed with a heartbeat at once,
        # the subscriber's proof that what is published from then on reaches it (ConsumerCore.joined)
        return [*self.routers, *(pub.sock for pub in self.publishers)]

    def idle_timeout_s(self) -> float:
        return min(self.heartbeat_s, HOLD_S) if self.unreleased else self.heartbeat_s

    # ---- the duty cycle -------------------------------------------------------------------

    def do_work(self) -> int:
        now = time.monotonic()
        heartbeat_due = now - self.last_heartbeat >= self.heartbeat_s
        available = self.inp.available()
        # subscriptions matter to what is published and to the welcome: read them before
        # publishing, at most every SOCKETS_EVERY_S while records flow (each socket asked costs a
        # system call), and when a park woke an idle broadcast (not on the turn after a publish)
        if heartbeat_due or (self.idle if not available else now >= self.next_subscriptions):
            heartbeat_due = self._read_subscriptions() or heartbeat_due
            self.next_subscriptions = now + SOCKETS_EVERY_S
        handled = self._serve(now) if self.serving.due(now, available) else 0  # engine.stage.SocketTurns
        if self.unreleased:
            self._release_sent(now)
        read = self._publish_records() if available else 0
        if heartbeat_due:
            self._heartbeat(now)
        self.serving.turn_done(bool(handled or read))
        self.idle = not (handled or read)
        return handled + read

    def keep_alive(self) -> None:
        """Paused: nothing is published, but subscribers still hear the broadcast is alive (they
        end every open stream after a few silent heartbeat periods)."""
        now = time.monotonic()
        if now - self.last_heartbeat >= self.heartbeat_s:
            self._heartbeat(now)

    def _heartbeat(self, now: float) -> None:
        self.last_heartbeat = now
        frames = wire.encode_heartbeat(
            time.monotonic_ns(),
            len(self.open_streams),
            self.epoch,
            self.next_position,
            self.heartbeat_s,
            self.ctx.hang_timeout_s,
        )
        for pub in self.publishers:
            _send(pub.sock, frames)
        self.retention.expire(now)

    def _publish_records(self) -> int:
        """Publish up to 64 input records; how many."""
        read = 0
        while read < 64:
            republish = self.inp.position < self.backlog_end
            at = self.inp.position
            record = self.inp.try_read()
            if record is None:
                break
            _, view = record
            batch = TokenBatch.decode(view)
            self._publish(batch, at, self.inp.position, republish)
            del batch
            view.release()
            read += 1
        if read:
            self.unreleased.append((self.inp.position, read, time.monotonic()))
        return read

    def _release_sent(self, now: float) -> None:
        """Release the records published at least HOLD_S ago, and the oldest while the held ones
        take more than a quarter of the ring (its capacity and position in the same unit, shm.ports)."""
        limit = self.hold_limit
        position, records = -1, 0
        while self.unreleased and (
            now - self.unreleased[0][2] >= HOLD_S or (limit and self.inp.position - self.released > limit)
        ):
            position, count, _ = self.unreleased.popleft()
            records += count
            self.released = position
        if records:
            self.inp.release_to(position, records)

    # ---- publishing -----------------------------------------------------------------------

    def _publish(self, record, at: int, nxt: int, republish: bool) -> None:
        """One input record: its batch message (and per-stream messages where subscribed)."""
        n = record.rows
        fresh, gaps = self.published.admit(record.stream_id, record.seq, not republish)
        kept = int(np.count_nonzero(fresh))
        self.counts["duplicates"] += n - kept
        self.counts["gaps"] += gaps
        if republish:
            self.counts["republished"] += n
        # the ring's memory itself, no copy: the record is released HOLD_S after this returns, and
        # nothing published keeps a column (the messages are bytes; retention indexes its stream ids)
        columns = {name: getattr(record, name) for name in wire.BATCH_COLUMNS} | record.extra
        texts = wire.Texts(record.text.tobytes(), record.text_end)
        if kept < n:
            rows = np.flatnonzero(fresh)
            columns = {name: values[rows] for name, values in columns.items()}
            texts = texts.take(rows)
        batch = wire.Batch(self.epoch, at, nxt, columns, texts, {"encoding": "binary"})
        kinds = columns["kind"].tobytes()
        tokens = kinds.count(wire.TOKEN)  # one C loop, no temporary array
        plain = tokens == kept  # the usual batch: the replies' tokens only
        ended = () if plain else self._events(batch)
        binary = wire.encode_batch(batch, "binary")
        json_frames = None
        for pub in self.publishers:
            if pub.subs.wants_batches:
                if pub.encoding == "binary":
                    _send(pub.sock, binary)
                else:
                    json_frames = json_frames or wire.encode_batch(batch, "json")
                    _send(pub.sock, json_frames)
        if kept:
            self._publish_streams(batch)
        streams = list(dict.fromkeys(columns["stream_id"].tolist()))  # each once, in order of first row
        self.retention.add(at, nxt, binary, streams, ended)
        self.next_position = nxt
        self._count(batch, record, len(streams), plain)

    def _events(self, batch: wire.Batch) -> tuple[int, ...]:
        """Rewrite start and end rows' texts to their documented fields (a start row carries the
        cache's key inside the engine); track open streams; the streams this batch ends."""
        kinds = batch.columns["kind"]
        events = np.flatnonzero(event_rows(kinds))
        if not len(events):
            return ()
        texts = list(batch.texts)
        sids = batch.columns["stream_id"]
        ended = []
        for i in events.tolist():
            kind, sid = int(kinds[i]), int(sids[i])
            texts[i] = wire.event_text(kind, texts[i])
            if kind == wire.START:
                self.open_streams[sid] = None
                if len(self.open_streams) > _OPEN_KEPT:
                    self.open_streams.popitem(last=False)
            else:
                self.open_streams.pop(sid, None)
                ended.append(sid)
        batch.text = wire.Texts.from_list(texts)
        return tuple(ended)

    def _publish_streams(self, batch: wire.Batch) -> None:
        """Per-stream messages, for the streams some subscriber asked for by their exact topic."""
        wanted = [pub for pub in self.publishers if pub.subs.streams]
        if not wanted:
            return
        present = set(batch.columns["stream_id"].tolist())
        messages: dict[int, list[wire.Message]] = {}
        frames: dict[tuple[int, str], list[tuple[bytes, bytes, bytes]]] = {}
        for pub in wanted:
            for sid in present.intersection(pub.subs.streams):
                if sid not in messages:
                    rows = np.flatnonzero(batch.columns["stream_id"] == sid)
                    messages[sid] = batch.take(rows).stream_messages()
                key = (sid, pub.encoding)
                if key not in frames:
                    frames[key] = [wire.encode_message(m, pub.encoding) for m in messages[sid]]
                for message in frames[key]:
                    _send(pub.sock, message)

    def _count(self, batch: wire.Batch, record, streams: int, plain: bool) -> None:
        """Count the batch, its token rows (a reply's and its thinking's) and the per-stream
        messages its rows make (of ``streams`` streams; ``plain``: token rows only)."""
        counts = self.counts
        counts["batches"] += 1
        if record.rows and time.monotonic_ns() - int(record.recv_ns[0]) <= self.budget_ns:
            counts["batches_within_budget"] += 1
        if not batch.rows:
            return
        if plain:  # token rows only (most records): one message per stream
            counts["messages"] += streams
            counts["tokens"] += batch.rows
        else:
            order, _ = wire.stream_order(batch.columns["stream_id"])
            kinds = batch.columns["kind"]
            s, k = batch.columns["stream_id"][order], kinds[order]
            e = event_rows(k)
            # the per-stream messages these rows make: a new one where the stream or the kind changes or at an event row
            counts["messages"] += 1 + int(np.count_nonzero((s[1:] != s[:-1]) | (k[1:] != k[:-1]) | e[1:] | e[:-1]))
            counts["tokens"] += batch.rows - int(np.count_nonzero(e))
            counts["streams_ended"] += int(np.count_nonzero(ending_rows(kinds)))
        self.ctx.telemetry.observe_since_ns(
            "neuralpipe_stage_latency_seconds", batch.columns["recv_ns"], stage="broadcast"
        )

    # ---- subscriptions and snapshots ------------------------------------------------------

    def _read_subscriptions(self) -> bool:
        """Count (un)subscriptions, without blocking and bounded; whether one was added (to be
        welcomed with a heartbeat: one per duty cycle however many came)."""
        before = sum(pub.subs.counts["subscriptions"] for pub in self.publishers)
        for pub in self.publishers:
            for _ in range(SUBSCRIPTION_MESSAGES_PER_CYCLE):
                try:
                    frame = pub.sock.recv(zmq.NOBLOCK) if _readable(pub.sock) else None
                except zmq.Again:
                    frame = None
                if frame is None:
                    break
                pub.subs.feed(frame)
        return sum(pub.subs.counts["subscriptions"] for pub in self.publishers) > before

    def _serve(self, now: float) -> int:
        """Answer snapshot requests, without blocking and bounded."""
        served = 0
        share = REQUESTS_PER_CYCLE // len(self.routers)
        for router in self.routers:  # each its share, so a flood on one starves no other
            for _ in range(share):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK) if _readable(router) else None
                except zmq.Again:
                    frames = None
                if frames is None:
                    break
                served += 1
                if len(frames) < 2 or not self.snapshots.admit(frames[0], now):
                    continue
                self.snapshots.answer(frames[0], frames[-1], self.next_position, router.send_multipart)
        self.serving.asked(now, served >= share)
        return served

    # ---- hooks ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        subs = [pub.subs.counts for pub in self.publishers]
        tel, counts = self.ctx.telemetry, self.counts  # metrics from the counters kept anyway
        tel.total("neuralpipe_tokens_total", counts["tokens"], stage="broadcast")
        tel.total("neuralpipe_broadcast_messages_total", counts["messages"])
        tel.total("neuralpipe_broadcast_drops_total", counts["duplicates"])
        tel.total("neuralpipe_broadcast_gap_refills_total", counts["snapshots"])
        tel.set(
            "neuralpipe_broadcast_subscribers", sum(p.subs.everything + len(p.subs.streams) for p in self.publishers)
        )
        return {
            **self.counts,
            "evicted": self.retention.evicted,
            "subscriptions": sum(c["subscriptions"] for c in subs),
            "subscription_junk": sum(c["junk"] for c in subs),
            "subscriptions_refused": sum(c["refused"] for c in subs),
            "retained_batches": len(self.retention.batches),
            "retained_streams": self.retention.streams(),
            "retained_bytes": self.retention.bytes,
            "position": self.next_position,
        }

    def close(self) -> None:
        if self.published is not None:
            self.published.state.flush()
        if self.curve is not None:
            self.curve.stop()
        if self.zmq is not None:
            self.zmq.destroy(linger=1000)  # a clean stop sends what is queued (a dead subscriber: 1 s at most)
            self.inp.release()


def _readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock``: asked before each receive because a receive that
    finds nothing costs an exception and two system calls more (do_work runs twice per record).
    Plain ints: pyzmq's constants are enum flags, and ``&`` on them costs more than the call."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def _send(sock: zmq.Socket, frames: tuple[bytes, bytes, bytes]) -> None:
    """``sock.send_multipart(frames)`` through pyzmq's own send, without the layer over it that
    checks each frame's type and passes keywords (3 µs of 4 per message; the frames are bytes)."""
    _SEND(sock, frames[0], _SNDMORE)
    _SEND(sock, frames[1], _SNDMORE)
    _SEND(sock, frames[2])
