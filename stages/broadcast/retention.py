"""What the broadcast keeps of what it published, for snapshots: the batch messages (binary
encoding), one entry per input record, oldest evicted first once over ``max_bytes`` or older than
``max_age_s``; and an index from stream id to the retained batches holding its rows, so a
per-stream snapshot reads only those.

``max_bytes`` bounds the memory all of it holds, not only the messages' bytes: a batch also costs
its Python objects and a stream its index entry, which with short streams (a few rows each, a new
set in every batch) were most of it (the broadcast of an engine serving 1,000 short chats a second
held 230 MiB for 64 MiB of retention). The costs below are CPython 3.11's, measured with
tracemalloc; tests/test_broadcast_retention.py checks the total against it."""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass

BATCH_COST = 560  # a Retained, its OrderedDict entry, the frames tuple, the messages' and the streams array's headers
SLOT_COST = 20  # a stream in a batch: its id in ``streams``, its place in the stream's index
STREAM_COST = 380  # a stream's index entry: the dict slot, its _Positions and list, its place in ``ended``


@dataclass(slots=True)
class Retained:
    at: int
    next: int
    frames: tuple[bytes, bytes, bytes]  # the batch message, binary encoding
    streams: array  # the stream ids with rows in it, each once (8 bytes each, not an int object)
    ended: tuple[int, ...]  # streams whose end or error row it holds
    size: int  # what it costs, its share of the streams' index included
    when: float


class _Positions:
    """``at`` of a stream's retained batches, oldest first. A list read from ``head`` on: batches
    go oldest first, so the evicted ones are always at the front (a deque costs ~760 bytes even
    for the one or two batches a short stream has)."""

    __slots__ = ("ats", "head")

    def __init__(self) -> None:
        self.ats: list[int] = []
        self.head = 0

    def popleft(self) -> bool:
        """Forget the oldest; False once none is left."""
        self.head += 1
        if self.head == len(self.ats):
            return False
        if self.head >= 64 and 2 * self.head >= len(self.ats):  # a long stream: drop the front now and then
            del self.ats[: self.head]
            self.head = 0
        return True

    @property
    def first(self) -> int:
        return self.ats[self.head]

    def retained(self) -> list[int]:
        return self.ats[self.head :]


class Retention:
    def __init__(self, max_bytes: int, max_age_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.batches: OrderedDict[int, Retained] = OrderedDict()  # by ``at``, in publish order
        self.by_stream: dict[int, _Positions] = {}  # stream id -> ``at`` of its retained batches
        self.ended: set[int] = set()  # streams whose end or error row is retained
        self.bytes = 0  # what the retained batches and the index cost (see the module's text)
        self.evicted = 0

    def add(self, at: int, nxt: int, frames: tuple[bytes, bytes, bytes], streams: list[int], ended: tuple) -> None:
        """Keep a published batch; ``streams``: the stream ids with rows in it, each once."""
        if at in self.batches:  # a republished record (after a restart that kept this memory): keep the first
            return
        size = sum(map(len, frames)) + BATCH_COST + SLOT_COST * len(streams)
        for sid in streams:
            positions = self.by_stream.get(sid)
            if positions is None:
                positions = self.by_stream[sid] = _Positions()
                size += STREAM_COST  # counted with the batch it came with, and given back with it
            positions.ats.append(at)
        self.batches[at] = Retained(at, nxt, frames, array("Q", streams), ended, size, time.monotonic())
        self.ended.update(ended)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self.batches) > 1:
            self._evict_oldest()

    def expire(self, now: float) -> None:
        while self.batches and now - next(iter(self.batches.values())).when > self.max_age_s:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, kept = self.batches.popitem(last=False)
        self.bytes -= kept.size
        self.evicted += 1
        for sid in kept.streams:
            if not self.by_stream[sid].popleft():
                del self.by_stream[sid]
                self.ended.discard(sid)

    @property
    def first(self) -> int | None:
        """``at`` of the oldest retained batch."""
        return next(iter(self.batches)) if self.batches else None

    def since(self, position: int) -> list[Retained]:
        """The retained batches whose ``next`` is beyond ``position``, oldest first."""
        newer = []
        for kept in reversed(self.batches.values()):  # the recent ones are what is asked for
            if kept.next <= position:
                break
            newer.append(kept)
        return newer[::-1]

    def open_from(self, default: int) -> int:
        """``at`` of the oldest retained batch holding rows of a stream whose end is not retained
        (``default`` when there is none): a consumer starting there sees every open stream whole."""
        ended = self.ended
        return min((at.first for sid, at in self.by_stream.items() if sid not in ended), default=default)

    def of_stream(self, sid: int) -> list[Retained]:
        positions = self.by_stream.get(sid)
        return [self.batches[at] for at in positions.retained()] if positions is not None else []

    def streams(self) -> int:
        return len(self.by_stream)
