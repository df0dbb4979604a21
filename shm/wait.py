"""Wait strategies: what a ring side does while the ring is empty (consumer) or full (producer).

- ``spin``: re-check the cursor in a tight loop. Lowest latency on a quiet machine, burns a core,
  and collapses under foreign load on a 2-core box.
- ``yield``: spin ``spins`` times, then ``os.sched_yield()`` between checks (~0.5 µs each here;
  ``time.sleep(0)`` would be a ~75 µs timed sleep on CPython 3.11).
- ``block`` (default): spin, yield a little, then park on the ring's FIFO doorbell. The other side
  rings the doorbell only while this side has declared itself asleep, so a busy ring makes no
  system calls. An idle blocked side wakes every ``park_timeout_s`` at most, to refresh its
  heartbeat and to bound the cost of a lost wake-up.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

KINDS = ("spin", "yield", "block")


@dataclass(frozen=True)
class WaitStrategy:
    kind: str = "block"
    spins: int = 200
    yields: int = 20
    park_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"wait strategy {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.spins < 0 or self.yields < 0:
            raise ValueError("wait strategy spins and yields must be >= 0")
        if not 0 < self.park_timeout_s <= 60:
            raise ValueError(f"park_timeout_s {self.park_timeout_s} must be in (0, 60]")

    @property
    def blocks(self) -> bool:
        return self.kind == "block"

    @classmethod
    def named(cls, kind: str) -> WaitStrategy:
        """The stock strategy called ``kind``."""
        if kind == "spin":
            return cls("spin", spins=sys.maxsize, yields=0)
        if kind == "yield":
            return cls("yield", spins=200, yields=sys.maxsize)
        return cls(kind)
