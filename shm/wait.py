"""Wait strategies: what a ring side does while the ring is empty (consumer) or full (producer).

- ``spin``: re-check the cursor in a tight loop. Lowest latency on a quiet machine, burns a core,
  and collapses under foreign load on a 2-core box.
- ``yield``: spin ``spins`` times, then ``os.sched_yield()`` between checks (~0.5 µs each here;
  ``time.sleep(0)`` would be a ~75 µs timed sleep on CPython 3.11).
- ``block`` (default): spin, yield a little, then park on the ring's FIFO doorbell. The other side
  rings the doorbell only while this side has declared itself asleep, so a busy ring makes no
  system calls. An idle blocked side wakes every ``park_timeout_s`` at most, to refresh its
  heartbeat and to bound the cost of a lost wake-up.

:func:`idle` is the one implementation of these strategies (after Agrona's BackoffIdleStrategy):
``shm.ring``'s blocking ``read``/``claim`` park on one ring's doorbell through it, and the worker
runtime (engine/worker.py) parks on all its rings' doorbells, its control socket and its stage's
sockets through it. The spin and yield phases only call ``ready`` (for a ring: a load of the other
side's cursor), never a system call.

A :class:`SpinGate` (the worker runtime keeps one per direction) lets a ``block`` spell spin and
yield only while that pays: while most recent spells ended within the spin window. Records paced
milliseconds apart never come within it, and each spell would burn the whole window (tens of µs
of CPU) before parking all the same.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
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
    def eagerest(cls, strategies: list[WaitStrategy]) -> WaitStrategy:
        """One strategy for a side waiting on several rings at once: the most eager of each
        setting (the least blocking kind, the most spins and yields, the shortest park)."""
        if not strategies:
            return PARK_AT_ONCE
        return cls(
            min((w.kind for w in strategies), key=KINDS.index),
            spins=max(w.spins for w in strategies),
            yields=max(w.yields for w in strategies),
            park_timeout_s=min(w.park_timeout_s for w in strategies),
        )

    @classmethod
    def named(cls, kind: str) -> WaitStrategy:
        """The stock strategy called ``kind``."""
        if kind == "spin":
            return cls("spin", spins=sys.maxsize, yields=0)
        if kind == "yield":
            return cls("yield", spins=200, yields=sys.maxsize)
        return cls(kind)


PARK_AT_ONCE = WaitStrategy("block", spins=0, yields=0)
_CLOCK_EVERY = 64  # the clock costs more than a spin: read it on the 1st check and every 64th


class SpinGate:
    """Whether the spin and yield phases of ``block`` spells have been paying off lately.

    A spell *hits* when what it waits for comes within its spin window: found while spinning or
    yielding, or, for a spell that parked, woken no later than the window's length (as last
    measured) after the spell began; so a spell that skipped spinning still tells whether spinning
    would have paid. The gate keeps a moving average of hits over about the last eight spells and
    opens spinning while at least half of them hit. It starts open (the ring keys' behaviour)."""

    WEIGHT = 1 / 8  # of the latest spell in the moving average
    THRESHOLD = 0.5

    __slots__ = ("hit_rate", "window_s")

    def __init__(self) -> None:
        self.hit_rate = 1.0
        self.window_s = 0.0  # how long the last full spin and yield phases took (0: not measured yet)

    @property
    def open(self) -> bool:
        return self.hit_rate >= self.THRESHOLD

    def record(self, hit: bool) -> None:
        self.hit_rate += self.WEIGHT * (hit - self.hit_rate)


def idle(
    wait: WaitStrategy,
    ready: Callable[[], bool],
    park: Callable[[float], object],
    deadline: float,
    gate: SpinGate | None = None,
) -> bool:
    """One idle spell with strategy ``wait``: True as soon as ``ready()``; False at ``deadline``
    (``time.monotonic()``) or after one park, when the caller re-checks what woke it.

    ``ready()`` is called ``spins`` times in a tight loop, then between ``os.sched_yield()`` calls
    (``yields`` times for ``block``, for ever for ``yield``; ``spin`` never yields), then, for
    ``block`` only, ``park(timeout_s)`` sleeps once for at most ``park_timeout_s`` and never past
    ``deadline``. ``park`` must re-check readiness after declaring itself asleep (the other side
    rings only a declared sleeper) and return when woken or at the timeout. With a ``gate``, a
    ``block`` spell skips spinning and yielding while the gate is shut, and tells it how it went."""
    blocks = wait.blocks
    gated = gate is not None and blocks
    spins, until_park = wait.spins, wait.spins + wait.yields
    if gated and not gate.open:
        spins = until_park = 0
    yields = wait.kind != "spin"
    began = time.monotonic() if gated else 0.0
    checks = 0
    while True:
        if ready():
            if gated:
                gate.record(True)  # within the window, or at once
            return True
        checks += 1
        if checks % _CLOCK_EVERY == 1 and time.monotonic() >= deadline:
            return False
        if checks <= spins:
            continue
        if blocks and checks > until_park:
            now = time.monotonic()
            if gated and until_park:
                gate.window_s = now - began
            park(min(wait.park_timeout_s, max(0.0, deadline - now)))
            woke = ready()
            if gated:
                gate.record(woke and time.monotonic() - began <= gate.window_s)
            return woke
        if yields:
            os.sched_yield()
