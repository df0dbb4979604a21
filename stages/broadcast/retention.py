"""What the broadcast keeps of what it published, for snapshots: the batch messages (binary
encoding), one entry per input record, oldest evicted first once over ``max_bytes`` or older than
``max_age_s``; and an index from stream id to the retained batches holding its rows, so a
per-stream snapshot reads only those."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class Retained:
    at: int
    next: int
    frames: tuple[bytes, bytes, bytes]  # the batch message, binary encoding
    streams: list[int]  # the stream ids with rows in it, each once
    ended: tuple[int, ...]  # streams whose end or error row it holds
    size: int
    when: float


class Retention:
    def __init__(self, max_bytes: int, max_age_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.batches: OrderedDict[int, Retained] = OrderedDict()  # by ``at``, in publish order
        self.by_stream: dict[int, deque[int]] = {}  # stream id -> ``at`` of its retained batches
        self.ended: set[int] = set()  # streams whose end or error row is retained
        self.bytes = 0
        self.evicted = 0

    def add(self, at: int, nxt: int, frames: tuple[bytes, bytes, bytes], streams: list[int], ended: tuple) -> None:
        """Keep a published batch; ``streams``: the stream ids with rows in it, each once."""
        if at in self.batches:  # a republished record (after a restart that kept this memory): keep the first
            return
        size = sum(map(len, frames)) + 64
        self.batches[at] = Retained(at, nxt, frames, streams, ended, size, time.monotonic())
        for sid in streams:
            positions = self.by_stream.get(sid)
            if positions is None:
                positions = self.by_stream[sid] = deque()
            positions.append(at)
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
            positions = self.by_stream[sid]
            positions.popleft()
            if not positions:
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
        return min((at[0] for sid, at in self.by_stream.items() if sid not in ended), default=default)

    def of_stream(self, sid: int) -> list[Retained]:
        return [self.batches[at] for at in self.by_stream.get(sid, ())]

    def streams(self) -> int:
        return len(self.by_stream)
