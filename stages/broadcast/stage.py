"""Broadcast: the last stage. Publishes every stream's rows on XPUB sockets (engine/wire.py,
docs/wire-format.md) and serves the stream so far on a ROUTER (the ZeroMQ guide's "clone"
pattern: a consumer that joins late or sees a gap asks for it and merges it with live messages).

Params (all optional):
    endpoints        extra endpoints: [{url = "tcp://0.0.0.0:5556", encoding = "json" | "binary"}]
                     (always bound: ipc broadcast.sock (json) and broadcast-binary.sock (binary)
                     in the runtime directory)
    snapshot_url     an extra endpoint for the snapshot ROUTER (always: broadcast-snapshot.sock)
    sndhwm           messages queued per subscriber before ZeroMQ drops for it (10000)
    retention_bytes  bytes of published messages kept for snapshots (64 MiB)
    retention_s      how long an ended stream's messages are kept (300)
    heartbeat_s      a heartbeat message when nothing else was published for this long (1.0)
    latency_budget_ms  a batch is within budget when it is published this soon after its first
                     row's recv_ns (50; the ``batches_within_budget`` egress count of PAS)

Stats (with every heartbeat; ``messages``, ``gaps``, ``duplicates``, ``batches`` and
``batches_within_budget`` are the engine's egress numbers for PAS): ``messages`` published,
``tokens``, ``duplicates`` rows dropped as already published, ``gaps`` rows missing in a stream's
input sequence, ``subscriptions`` seen, ``snapshots`` requests served, ``gap_refills`` requests a
consumer sent because it saw a hole (ZeroMQ tells the publisher nothing about messages it drops for
a slow subscriber; this is the part of them the engine can see), ``evicted`` streams.

Rows already published (by stream id and seq) are dropped: after a restart of a stage before this
one, what comes again is not published twice. The next seq per stream lives in a restart-surviving
state array, updated right after each publish.

A message handed to ZeroMQ is not on the wire yet (its I/O thread sends it a moment later), so a
SIGKILL can lose what was just published, and what a subscriber lagging a little still has queued
in the socket. Input records are therefore released only HOLD_S after their messages were
published (sooner when they hold a quarter of the input ring, so the producer never waits on
them), and a restarted broadcast publishes the records it finds unreleased again, without the
de-duplication: after a crash of this stage a subscriber may see a message twice (the consumer
client drops it by seq) rather than miss one.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import orjson
import zmq

from engine import wire
from engine.stage import Stage, WorkerContext
from shm.batch import Kind, TokenBatch
from stages.broadcast import params

HOLD_S = 0.5  # how long published records stay unreleased: what a restarted broadcast publishes again
_SLOTS = 1 << 16  # streams tracked for de-duplication (by stream id modulo); old ones are reused
_ROW_KINDS = {int(Kind.START): "start", int(Kind.END): "end", int(Kind.ERROR): "error"}


class _Retained:
    """The published messages of one stream (JSON encoding), for snapshots."""

    __slots__ = ("bytes", "ended", "messages", "touched")

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes, bytes]] = []
        self.bytes = 0
        self.ended = False
        self.touched = time.monotonic()


class Broadcast(Stage):
    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        p = params.parse(ctx.params)
        self.inp = ctx.inputs[0]
        self.zmq = zmq.Context()
        self.publishers: list[tuple[zmq.Socket, str]] = []
        endpoints = [
            params.Endpoint(ctx.endpoint("broadcast"), "json"),
            params.Endpoint(ctx.endpoint("broadcast-binary"), "binary"),
            *p.endpoints,
        ]
        for endpoint in endpoints:
            sock = self.zmq.socket(zmq.XPUB)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription: counted per socket
            sock.setsockopt(zmq.SNDHWM, p.sndhwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint.url)
            self.publishers.append((sock, endpoint.encoding))
        # subscriptions per publisher: an encoding nobody subscribed to is neither built nor sent
        self.subscribed = [0] * len(self.publishers)
        self.encodings = ["json"]  # always built: snapshots keep the JSON form
        self.snapshots = self.zmq.socket(zmq.ROUTER)
        self.snapshots.setsockopt(zmq.LINGER, 0)
        self.snapshots.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.snapshots.bind(ctx.endpoint("broadcast-snapshot"))
        if p.snapshot_url:
            self.snapshots.bind(p.snapshot_url)
        self.retention_bytes = p.retention_bytes
        self.retention_s = p.retention_s
        self.heartbeat_s = p.heartbeat_s
        self.retained: OrderedDict[int, _Retained] = OrderedDict()
        self.retained_bytes = 0
        # slot -> (stream id + 1, next seq to publish); survives restarts of this worker
        self.published = ctx.state_array("published", "u8", (_SLOTS, 2))
        self.budget_ns = int(p.latency_budget_ms * 1e6)
        self.counts = dict.fromkeys(
            (
                *("messages", "tokens", "duplicates", "gaps", "batches", "batches_within_budget"),
                *("streams_ended", "subscriptions", "snapshots", "gap_refills", "evicted", "republished"),
            ),
            0,
        )
        self.last_publish = time.monotonic()
        # (read position, records read before it since the previous mark, when published)
        self.unreleased: deque[tuple[int, int, float]] = deque()
        # records a killed predecessor left unreleased end here: publish them again, all of them
        self.backlog_end = self.inp.position + self.inp.available()
        self.released = self.inp.position  # where the records held unreleased begin
        ctx.log.info("broadcast_ready", endpoints=[e.url for e in endpoints])

    def pollables(self) -> list[Any]:
        return [self.snapshots, *(sock for sock, _ in self.publishers)]

    def idle_timeout_s(self) -> float:
        return min(self.heartbeat_s, HOLD_S) if self.unreleased else self.heartbeat_s

    # ---- the duty cycle -------------------------------------------------------------------

    def do_work(self) -> int:
        handled = self._serve()
        self._release_sent(time.monotonic())
        read = 0
        while read < 64:
            republish = self.inp.position < self.backlog_end
            record = self.inp.try_read()
            if record is None:
                break
            _, view = record
            batch = TokenBatch.decode(view)
            self._publish_batch(batch, republish)
            self.counts["batches"] += 1
            if batch.rows and time.monotonic_ns() - int(batch.recv_ns[0]) <= self.budget_ns:
                self.counts["batches_within_budget"] += 1
            del batch
            view.release()
            read += 1
        if read:
            self.unreleased.append((self.inp.position, read, time.monotonic()))
        handled += read
        now = time.monotonic()
        if now - self.last_publish >= self.heartbeat_s:
            self._send_all(wire.encode_heartbeat(time.monotonic_ns(), sum(not r.ended for r in self.retained.values())))
            self._expire(now)
        return handled

    def _release_sent(self, now: float) -> None:
        """Release the records published at least HOLD_S ago, and the oldest while the held ones
        take more than a quarter of the ring (message transports have no such bound)."""
        limit = getattr(self.inp, "capacity", 0) // 4 or None
        position, records = -1, 0
        while self.unreleased and (
            now - self.unreleased[0][2] >= HOLD_S or (limit and self.inp.position - self.released > limit)
        ):
            position, count, _ = self.unreleased.popleft()
            records += count
            self.released = position
        if records:
            self.inp.release_to(position, records)

    def _publish_batch(self, batch, republish: bool) -> None:
        texts = batch.texts()
        sids = batch.stream_id
        if batch.rows and sids[0] == sids[-1] and (sids == sids[0]).all():  # one stream: no sort
            self._publish_stream(int(sids[0]), batch, np.arange(batch.rows), texts, republish)
            return
        order = np.argsort(sids, kind="stable")  # rows of a stream keep their order
        bounds = np.flatnonzero(np.diff(sids[order])) + 1
        for rows in np.split(order, bounds):
            self._publish_stream(int(batch.stream_id[rows[0]]), batch, rows, texts, republish)

    def _publish_stream(self, sid: int, batch, rows: np.ndarray, texts: list[str], republish: bool) -> None:
        slot = sid % _SLOTS
        if int(self.published[slot, 0]) != sid + 1:
            self.published[slot] = (sid + 1, 0)
        floor = int(self.published[slot, 1])
        if republish:  # what a killed predecessor published may never have left it
            self.counts["republished"] += int(np.count_nonzero(batch.seq[rows] < floor))
        else:
            fresh = batch.seq[rows] >= floor
            self.counts["duplicates"] += int(len(rows) - np.count_nonzero(fresh))
            rows = rows[fresh]
            if not len(rows):
                return
            # rows of a stream are consecutive: a jump is rows lost before they reached this stage
            self.counts["gaps"] += int(batch.seq[rows[-1]]) + 1 - floor - len(rows)
        kinds = batch.kind[rows]
        # runs of TOKEN rows become one tokens message; START, END, ERROR rows one message each
        tokens = kinds == Kind.TOKEN
        if tokens.all():  # the common case: one run, no split
            runs = [np.arange(len(rows))]
        else:
            runs = np.split(np.arange(len(rows)), np.flatnonzero(np.diff(tokens.astype(np.int8)) != 0) + 1)
        for run in runs:
            if not len(run):
                continue
            if tokens[run[0]]:
                self._publish_tokens(sid, batch, rows[run], texts)
            else:
                for i in run:
                    row = rows[i]
                    self._publish_event(sid, int(kinds[i]), int(batch.seq[row]), texts[row], int(batch.recv_ns[row]))
            self.published[slot, 1] = max(int(self.published[slot, 1]), int(batch.seq[rows[run[-1]]]) + 1)

    def _publish_tokens(self, sid: int, batch, rows: np.ndarray, texts: list[str]) -> None:
        columns = {
            "seq": batch.seq[rows],
            "token_id": batch.token_id[rows],
            "logprob": batch.logprob[rows],
            "recv_ns": batch.recv_ns[rows],
            **{name: values[rows] for name, values in batch.extra.items()},
        }
        row_texts = [texts[i] for i in rows]
        frames = {encoding: wire.encode_tokens(sid, columns, row_texts, encoding) for encoding in self.encodings}
        self._publish(sid, frames, ended=False)
        self.counts["tokens"] += len(rows)

    def _publish_event(self, sid: int, kind: int, seq: int, text: str, recv_ns: int) -> None:
        name = _ROW_KINDS.get(kind, "error")
        if name == "start":
            fields = _json_fields(text, {"model": "", "cached": False})
            fields = {"model": fields.get("model", ""), "cached": bool(fields.get("cached"))}
        elif name == "end":
            fields = _json_fields(text, {"finish_reason": None, "usage": None})
        else:
            fields = {"reason": text}
        fields["recv_ns"] = recv_ns
        frames = {encoding: wire.encode_event(name, sid, seq, encoding, **fields) for encoding in self.encodings}
        self._publish(sid, frames, ended=name != "start")

    def _publish(self, sid: int, frames: dict[str, tuple[bytes, bytes, bytes]], ended: bool) -> None:
        for (sock, encoding), subscribers in zip(self.publishers, self.subscribed, strict=True):
            if subscribers > 0:
                sock.send_multipart(frames[encoding])  # copying small frames beats zero-copy tracking
        self.counts["messages"] += 1
        self.last_publish = time.monotonic()
        self._retain(sid, frames["json"], ended)  # the ipc JSON endpoint is always bound

    def _send_all(self, frames: tuple[bytes, bytes, bytes]) -> None:
        for sock, _ in self.publishers:
            sock.send_multipart(frames)
        self.last_publish = time.monotonic()

    # ---- retention and snapshots ----------------------------------------------------------

    def _retain(self, sid: int, frames: tuple[bytes, bytes, bytes], ended: bool) -> None:
        kept = self.retained.get(sid)
        if kept is None:
            kept = self.retained[sid] = _Retained()
        size = sum(map(len, frames))
        kept.messages.append(frames)
        kept.bytes += size
        kept.ended = kept.ended or ended
        kept.touched = time.monotonic()
        self.retained_bytes += size
        if ended:
            self.counts["streams_ended"] += 1
        while self.retained_bytes > self.retention_bytes and len(self.retained) > 1:
            self._evict(next(iter(self.retained)))

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, kept in self.retained.items() if kept.ended and now - kept.touched > self.retention_s]:
            self._evict(sid)

    def _evict(self, sid: int) -> None:
        kept = self.retained.pop(sid)
        self.retained_bytes -= kept.bytes
        self.counts["evicted"] += 1

    def _serve(self) -> int:
        """Answer snapshot requests and count subscriptions, without blocking."""
        served = 0
        for i, (sock, _) in enumerate(self.publishers):
            while sock.poll(0):
                change = sock.recv()[:1]
                self.subscribed[i] += 1 if change == b"\x01" else -1
                self.counts["subscriptions"] += change == b"\x01"
                self.encodings = sorted(
                    {"json"} | {enc for (_, enc), n in zip(self.publishers, self.subscribed, strict=True) if n > 0}
                )
        while self.snapshots.poll(0):
            frames = self.snapshots.recv_multipart()
            served += 1
            self._answer(frames[0], frames[-1])
        return served

    def _answer(self, identity: bytes, raw: bytes) -> None:
        """A snapshot request ``{"type": "snapshot", "stream": id, "from_seq": n}`` gets the
        retained messages of the stream from that seq on, each as [identity, topic, header,
        payload] (JSON encoding), then ``snapshot_end`` (``complete``: false when the stream's
        beginning is no longer retained)."""
        try:
            request = orjson.loads(raw)
            sid, from_seq = int(request["stream"]), int(request.get("from_seq", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            reply = {"v": wire.VERSION, "type": "snapshot_end", "error": f"bad snapshot request: {raw[:120]!r}"}
            self.snapshots.send_multipart([identity, b"", orjson.dumps(reply), b""])
            return
        self.counts["snapshots"] += 1
        if request.get("reason") == "gap":
            self.counts["gap_refills"] += 1
        kept = self.retained.get(sid)
        messages = kept.messages if kept else []
        for frames in messages:
            if orjson.loads(frames[1])["seq"][1] >= from_seq:
                self.snapshots.send_multipart([identity, *frames])
        first = orjson.loads(messages[0][1])["seq"][0] if messages else None
        slot = sid % _SLOTS
        if int(self.published[slot, 0]) == sid + 1:
            published = int(self.published[slot, 1])
        else:  # the slot went to a newer stream: what is retained is all that is known
            published = orjson.loads(messages[-1][1])["seq"][1] + 1 if messages else 0
        reply = {
            "v": wire.VERSION,
            "type": "snapshot_end",
            "stream": sid,
            "complete": first is not None and first <= from_seq,
            "ended": bool(kept and kept.ended),
            "published": published,  # the stream's next seq when this was answered
        }
        self.snapshots.send_multipart([identity, b"", orjson.dumps(reply), b""])

    # ---- hooks ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if not hasattr(self, "counts"):
            return {}
        return {**self.counts, "retained_streams": len(self.retained), "retained_bytes": self.retained_bytes}

    def close(self) -> None:
        if hasattr(self, "zmq"):
            self.published.flush()
            self.zmq.destroy(linger=1000)  # a clean stop sends what is queued (a dead subscriber: 1 s at most)
            self.inp.release()


def _json_fields(text: str, default: dict[str, Any]) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return default
    return value if isinstance(value, dict) else default
