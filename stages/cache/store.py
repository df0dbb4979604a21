"""An LRU map bounded by bytes, with a time to live.

Values are anything with an ``nbytes`` attribute (the cache stores :class:`StoredStream`; the
benchmark replays a trace with stand-ins). ``get`` moves a live entry to the most recently used
end; ``put`` evicts from the least recently used end until the new entry fits. An entry larger
than the whole budget is not stored. Expiry uses wall-clock time (``time.time``) because
entries outlive the process in snapshots; an expired entry is dropped when it is next looked up
and by :meth:`purge_expired`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any


class LruStore:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if max_bytes <= 0 or ttl_s <= 0:
            raise ValueError(f"max_bytes and ttl_s must be positive (got {max_bytes}, {ttl_s})")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # key -> (stored_at, value)
        self.counts = {"hits": 0, "misses": 0, "evictions": 0, "expired": 0, "too_large": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Any | None:
        """The live value of ``key`` (now the most recently used), or None; counts a hit or miss."""
        found = self._entries.get(key)
        if found is not None and self.clock() - found[0] >= self.ttl_s:
            self._drop(key)
            self.counts["expired"] += 1
            found = None
        if found is None:
            self.counts["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.counts["hits"] += 1
        return found[1]

    def put(self, key: str, value: Any, stored_at: float | None = None) -> bool:
        """Store ``value`` as the most recently used entry; False when it is larger than the budget."""
        if value.nbytes > self.max_bytes:
            self.counts["too_large"] += 1
            return False
        if key in self._entries:
            self._drop(key)
        while self.bytes + value.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.counts["evictions"] += 1
        self._entries[key] = (self.clock() if stored_at is None else stored_at, value)
        self.bytes += value.nbytes
        return True

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= value.nbytes

    def purge_expired(self) -> int:
        """Drop every expired entry; how many."""
        cutoff = self.clock() - self.ttl_s
        old = [key for key, (stored_at, _) in self._entries.items() if stored_at <= cutoff]
        for key in old:
            self._drop(key)
        self.counts["expired"] += len(old)
        return len(old)

    def clear(self) -> tuple[int, int]:
        """Drop everything; (entries, bytes) dropped."""
        dropped = (len(self._entries), self.bytes)
        self._entries.clear()
        self.bytes = 0
        return dropped

    def items(self) -> Iterator[tuple[str, float, Any]]:
        """(key, stored_at, value), least recently used first."""
        for key, (stored_at, value) in self._entries.items():
            yield key, stored_at, value
