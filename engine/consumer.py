"""The consumer client: subscribe to an engine's broadcast and read streams in order, complete.

    with StreamConsumer.for_engine(runtime_dir) as consumer:           # every stream
        for message in consumer.messages(idle_timeout_s=5):
            ...                                  # start, tokens, end | error; per stream in seq order
    with StreamConsumer.for_engine(runtime_dir, stream=42) as consumer:
        text = "".join(token.text for token in consumer.tokens())   # returns after stream 42 ends

It is the ZeroMQ guide's "clone" pattern. Live messages come on a SUB socket; a stream first seen
after its beginning (a consumer that joined late) or with a hole in its sequence numbers (ZeroMQ
dropped for this subscriber at its high-water mark, or the broadcast restarted) is asked for on
the broadcast's snapshot ROUTER, and the retained messages fill it. Duplicates (a re-send after a
restart, a snapshot overlapping live messages) are dropped by seq. A stream that falls silent
before its end is asked for again now and then, which also covers messages published while a new
subscription was still on its way to the publisher. What the broadcast no longer retains is
skipped and counted in ``gaps``.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import zmq

from engine import wire

RESYNC_S = 1.0  # a stream silent this long before its end is asked for again
ASK_TIMEOUT_S = 2.0  # a snapshot request unanswered this long is sent again
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
    __slots__ = ("asked", "asked_at", "next", "pending", "touched")

    def __init__(self) -> None:
        self.next = 0  # the seq expected next
        self.pending: dict[int, wire.Message] = {}  # by first seq: arrived ahead of ``next``
        self.asked = False  # a snapshot request is out
        self.asked_at = 0.0
        self.touched = time.monotonic()


class StreamConsumer:
    def __init__(self, endpoint: str, snapshot_endpoint: str, stream: int | None = None, rcvhwm: int = 100_000) -> None:
        self.ctx = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"" if stream is None else wire.topic(stream))
        self.snap = self.ctx.socket(zmq.DEALER)
        self.snap.setsockopt(zmq.LINGER, 0)
        self.snap.connect(snapshot_endpoint)
        self.only = stream
        self.streams: dict[int, _Stream] = {}
        self.finished: OrderedDict[int, None] = OrderedDict()
        self.ready: deque[wire.Message] = deque()
        self.counts = {"messages": 0, "duplicates": 0, "gaps": 0, "snapshots": 0, "malformed": 0}
        if stream is not None:  # whatever of it was published already comes from the snapshot
            self._ask(stream, self._state(stream), "join")

    @classmethod
    def for_engine(cls, runtime_dir: str, stream: int | None = None, binary: bool = False) -> StreamConsumer:
        """A consumer of the engine whose runtime directory is ``runtime_dir`` (the ``runtime_dir``
        of ``engine.client.find_engine``), over its ipc endpoints."""
        name = "broadcast-binary" if binary else "broadcast"
        return cls(
            f"ipc://{os.path.join(runtime_dir, name)}.sock",
            f"ipc://{os.path.join(runtime_dir, 'broadcast-snapshot')}.sock",
            stream,
        )

    # ---- reading --------------------------------------------------------------------------

    def messages(self, idle_timeout_s: float | None = None) -> Iterator[wire.Message]:
        """Messages in seq order per stream, each once. Returns when the one stream asked for has
        ended, or after ``idle_timeout_s`` without a message (None: never)."""
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.snap, zmq.POLLIN)
        idle_since = time.monotonic()
        while True:
            while self.ready:
                message = self.ready.popleft()
                yield message
                if self.only is not None and message.type in ("end", "error"):
                    return
                idle_since = time.monotonic()
            now = time.monotonic()
            if idle_timeout_s is not None and now - idle_since >= idle_timeout_s:
                return
            events = dict(poller.poll(int(RESYNC_S * 250)))
            if self.sub in events:
                self._drain(self.sub, live=True)
            if self.snap in events:
                self._drain(self.snap, live=False)
            self._resync(time.monotonic())

    def tokens(self, idle_timeout_s: float | None = None) -> Iterator[Token]:
        """The tokens of :meth:`messages`, one by one."""
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

    # ---- ordering, de-duplication, gap repair ---------------------------------------------

    def _drain(self, sock: zmq.Socket, live: bool) -> None:
        while sock.poll(0):
            frames = sock.recv_multipart()
            if not live and frames[0] == b"":
                self._snapshot_end(frames[1])
                continue
            try:
                message = wire.decode(frames)
            except (wire.WireError, orjson.JSONDecodeError, KeyError, ValueError):
                self.counts["malformed"] += 1
                continue
            if message.type != "heartbeat":
                self._accept(message)

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
        self.ready.append(message)
        self.counts["messages"] += 1
        if message.type in ("end", "error"):
            del self.streams[sid]
            self.finished[sid] = None
            if len(self.finished) > _FINISHED_KEPT:
                self.finished.popitem(last=False)

    def _ask(self, sid: int, state: _Stream, reason: str) -> None:
        """Ask the snapshot ROUTER for the stream from ``state.next``; ``reason`` (join, gap,
        resync) lets the broadcast count the holes consumers saw."""
        state.asked = True
        state.asked_at = time.monotonic()
        self.counts["snapshots"] += 1
        self.snap.send(orjson.dumps({"type": "snapshot", "stream": sid, "from_seq": state.next, "reason": reason}))

    def _snapshot_end(self, raw: bytes) -> None:
        """Everything the broadcast retained has been offered. A hole still left below what it
        had published when it answered (``published``) is lost: those rows were retained if they
        still existed. Rows of the hole published after the answer (a live message that came
        ahead of them was published later) are asked for again."""
        reply = orjson.loads(raw)
        sid = reply.get("stream", -1)
        state = self.streams.get(sid)
        if state is None:
            return
        state.asked = False
        state.touched = time.monotonic()
        published = int(reply.get("published", state.next))
        if not state.pending and published > state.next and not reply.get("complete", True):
            # the broadcast published rows this consumer never got and no longer has them (a
            # restart lost its retention): count them, so the hole is not a silent stall
            self.counts["gaps"] += published - state.next
            state.next = published
            return
        if not state.pending or min(state.pending) <= state.next:
            return
        first = min(state.pending)
        lost_end = min(first, int(reply.get("published", first)))
        if lost_end > state.next:
            self.counts["gaps"] += lost_end - state.next
            state.next = lost_end
        if first == state.next:
            self._accept(state.pending.pop(first))
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
