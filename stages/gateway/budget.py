"""One bound on what many requests hold in the gateway together: the tokens waiting for slow
streaming clients (``max_total_backlog``), the whole answers being collected (``max_total_whole_bytes``).
Each request's own bound keeps one request in check; without a shared one a thousand requests
could each hold their whole allowance. Past the limit the request holding the most is cut first:
its client is the furthest behind, or its answer the largest."""

from __future__ import annotations

from typing import Protocol


class Holder(Protocol):
    def overflow(self, bound: str) -> None: ...  # cut: drop what it holds, take no more, say so


class Budget:
    """What each holder holds, against one ``limit``; ``name`` is the key the limit comes from,
    which a cut holder's error names."""

    __slots__ = ("held", "limit", "name", "total")

    def __init__(self, limit: int, name: str) -> None:
        self.limit, self.name = limit, name
        self.total = 0
        self.held: dict[Holder, int] = {}

    def add(self, holder: Holder, amount: int) -> None:
        """``holder`` holds ``amount`` more; past the limit the largest holders are cut."""
        held = self.held
        held[holder] = held.get(holder, 0) + amount
        self.total += amount
        while self.total > self.limit:
            largest = max(held, key=held.__getitem__)
            self.release(largest)
            largest.overflow(self.name)

    def release(self, holder: Holder) -> None:
        """``holder`` holds nothing any more (it was read, or its request ended)."""
        self.total -= self.held.pop(holder, 0)
