"""The snapshot ROUTER's requests and replies (docs/wire-format.md, "Snapshots"), bounded: at most
``REQUESTS_PER_CYCLE`` requests are read per duty cycle, each client (ZeroMQ identity) gets
``CLIENT_RATE`` requests per second (burst ``CLIENT_BURST``; more are dropped unanswered and
counted: its client asks again later), and a reply carries at most ``REPLY_BATCHES`` batches (the
end marker then says where to continue). So a flood of requests costs a bounded share of each
cycle and cannot starve publishing or heartbeats.

Requests (one JSON frame):
    {"type": "snapshot", "stream": id, "from_seq": n, "encoding": "json"|"binary", "reason": ...}
        the stream's messages from seq n, built from the retained batches, then ``snapshot_end``
    {"type": "batches", "from": position | null, "encoding": ...}
        the retained batch messages whose ``next`` is beyond ``from``, then ``batches_end``
        (``from`` null: only ``batches_end``, with the current position and ``open_from``, where
        the retained rows of the streams not ended yet begin: where a new consumer starts)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from engine.protocol import wire
from engine.protocol.seqtable import SeqTable
from stages.broadcast.retention import Retention

REQUESTS_PER_CYCLE = 64
CLIENT_RATE = 200.0
CLIENT_BURST = 400.0
MAX_CLIENTS = 10_000
REPLY_BATCHES = 2048
MAX_REQUEST_BYTES = 4096

Send = Callable[[list[bytes]], None]


class Snapshots:
    def __init__(self, retention: Retention, published: SeqTable, epoch: int, counts: dict[str, int]) -> None:
        self.retention = retention
        self.published = published
        self.epoch = epoch
        self.counts = counts
        self.buckets: OrderedDict[bytes, list[float]] = OrderedDict()  # identity -> [tokens, when]

    def admit(self, identity: bytes, now: float) -> bool:
        """Take one request from the client's bucket; False when it is over its rate."""
        bucket = self.buckets.pop(identity, None) or [CLIENT_BURST, now]
        bucket[0] = min(CLIENT_BURST, bucket[0] + (now - bucket[1]) * CLIENT_RATE)
        bucket[1] = now
        self.buckets[identity] = bucket  # most recent last: the least recent is evicted first
        if len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        if bucket[0] < 1:
            self.counts["snapshots_refused"] += 1
            return False
        bucket[0] -= 1
        return True

    def answer(self, identity: bytes, raw: bytes, next_position: int, send: Send) -> None:
        request = _parse(raw)
        if isinstance(request, str):
            self.counts["snapshots_bad"] += 1
            send([identity, b"", _dumps({"type": "snapshot_end", "error": request}), b""])
            return
        self.counts["snapshots"] += 1
        encoding = request["encoding"]
        if request["type"] == "batches":
            self._batches(identity, request["from"], encoding, next_position, send)
            return
        if request.get("reason") == "gap":
            self.counts["gap_refills"] += 1
        self._stream(identity, request["stream"], request["from_seq"], encoding, send)

    def _batches(self, identity: bytes, start: int | None, encoding: str, next_position: int, send: Send) -> None:
        kept = [] if start is None else self.retention.since(start)
        more = len(kept) > REPLY_BATCHES
        for entry in kept[:REPLY_BATCHES]:
            if encoding == "binary":
                send([identity, *entry.frames])
            else:
                send([identity, *wire.encode_batch(wire.decode(list(entry.frames)), "json")])
        first = self.retention.first
        end = {
            "type": "batches_end",
            "epoch": self.epoch,
            "from": start,
            "open_from": self.retention.open_from(next_position) if start is None else None,
            "first": first if first is not None else next_position,  # the oldest position still retained
            "next": kept[REPLY_BATCHES - 1].next if more else next_position,  # continue from here
            "more": more,
        }
        send([identity, b"", _dumps(end), b""])

    def _stream(self, identity: bytes, sid: int, from_seq: int, encoding: str, send: Send) -> None:
        entries = self.retention.of_stream(sid)
        first_seq = None
        more = len(entries) > REPLY_BATCHES
        for entry in entries[:REPLY_BATCHES]:
            batch = wire.decode(list(entry.frames))
            rows = np.flatnonzero(batch.columns["stream_id"] == sid)
            if first_seq is None and len(rows):
                first_seq = int(batch.columns["seq"][rows[0]])
            rows = rows[batch.columns["seq"][rows] >= from_seq]
            if len(rows):
                for message in batch.take(rows).stream_messages():
                    send([identity, *wire.encode_message(message, encoding)])
        published = self.published.next_of(sid)
        if published is None:  # the slot went to a newer stream: what is retained is all that is known
            published = 0
            if entries:
                last = wire.decode(list(entries[-1].frames))
                published = int(last.columns["seq"][last.columns["stream_id"] == sid].max()) + 1
        end = {
            "type": "snapshot_end",
            "stream": sid,
            "complete": first_seq is not None and first_seq <= from_seq,
            "ended": sid in self.retention.ended,
            "published": published,  # the stream's next seq when this was answered
            "more": more,  # only part of it: ask again from where it left off
        }
        send([identity, b"", _dumps(end), b""])


def _parse(raw: bytes) -> dict[str, Any] | str:
    """The request, validated; a string saying what is wrong otherwise."""
    if len(raw) > MAX_REQUEST_BYTES:
        return f"bad request: {len(raw)} bytes (at most {MAX_REQUEST_BYTES})"
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return f"bad request: not JSON: {raw[:80]!r}"
    if not isinstance(request, dict):
        return "bad request: not a JSON object"
    kind = request.get("type", "snapshot")
    encoding = request.get("encoding", "json")
    if encoding not in wire.ENCODINGS:
        return f"bad request: encoding must be one of {', '.join(wire.ENCODINGS)}"
    if kind == "batches":
        start = request.get("from")
        if start is not None and not _uint(start):
            return "bad request: from must be a position (an unsigned integer) or null"
        return {"type": "batches", "from": start, "encoding": encoding}
    if kind != "snapshot":
        return f"bad request: type must be snapshot or batches (got {str(kind)[:40]!r})"
    sid, from_seq = request.get("stream"), request.get("from_seq", 0)
    if not _uint(sid) or not _uint(from_seq):
        return "bad request: stream and from_seq must be unsigned 64-bit integers"
    return {"type": "snapshot", "stream": sid, "from_seq": from_seq, "encoding": encoding,
            "reason": request.get("reason")}  # fmt: skip


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _dumps(fields: dict[str, Any]) -> bytes:
    return orjson.dumps({"v": wire.VERSION, **fields})
