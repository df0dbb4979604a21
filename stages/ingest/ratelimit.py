"""Token buckets: requests and tokens per client identity and per upstream.

A bucket holds up to ``burst`` units and refills at ``rate`` units per second. ``try_take`` never
blocks; a caller that must wait sleeps ``wait_time`` and tries again (the ingest stage does, so the
wait is its bounded queue). Time is ``time.monotonic()`` unless a test passes ``now``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

__all__ = ["KeyedBuckets", "TokenBucket", "TokenCredit", "take", "taking"]


class TokenBucket:
    """``rate`` units per second, at most ``burst`` at once; starts full."""

    __slots__ = ("_level", "_stamp", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be positive (rate={rate}, burst={burst})")
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._stamp = time.monotonic() if now is None else now

    def _refill(self, now: float | None) -> float:
        now = time.monotonic() if now is None else now
        # max(): a clock read earlier than the last one (two callers, injected times) adds nothing.
        self._level = min(self.burst, self._level + max(now - self._stamp, 0.0) * self.rate)
        self._stamp = max(now, self._stamp)
        return self._level

    def try_take(self, n: float = 1.0, now: float | None = None) -> bool:
        """Take ``n`` units if the bucket holds them; False (and nothing taken) otherwise."""
        if self._refill(now) >= n:
            self._level -= n
            return True
        return False

    def give(self, n: float) -> None:
        """Put back ``n`` units taken but not used (never beyond ``burst``)."""
        self._level = min(self.burst, self._level + n)

    def wait_time(self, n: float = 1.0, now: float | None = None) -> float:
        """Seconds until ``n`` units are there (0 if they are now). More than ``burst`` never is:
        ``inf``, so a caller cannot wait forever without noticing."""
        if n > self.burst:
            return float("inf")
        return max(n - self._refill(now), 0.0) / self.rate


async def take(bucket: TokenBucket, n: float) -> None:
    """Take ``n`` units, sleeping while the bucket is short. More than ``burst`` at once is taken
    a burst at a time, so a batch of tokens larger than the burst waits instead of never passing."""
    while n > 0:
        part = min(n, bucket.burst)
        while not bucket.try_take(part):
            await asyncio.sleep(bucket.wait_time(part))
        n -= part


def taking(bucket: TokenBucket, n: float) -> Coroutine[Any, Any, None] | None:
    """None when ``n`` units were taken at once (the usual case, no coroutine made), else the
    :func:`take` to await."""
    if n <= bucket.burst and bucket.try_take(n):
        return None
    return take(bucket, n)


class TokenCredit:
    """A bucket's units taken a few ahead, for a caller that takes a few units very often (an
    ingest stream: its tokens, read by read): the bucket (a clock read and its arithmetic) is
    touched once per ``grant`` units instead of on every take. At most ``grant`` units (and
    never more than a sixteenth of the burst) are held ahead; :meth:`close` puts them back."""

    __slots__ = ("bucket", "grant", "held")

    def __init__(self, bucket: TokenBucket, grant: float = 16.0) -> None:
        self.bucket = bucket
        self.grant = min(grant, bucket.burst / 16)
        self.held = 0.0

    def take(self, n: float) -> Coroutine[Any, Any, None] | None:
        """As :func:`taking`: None when ``n`` units were had at once, else the take to await."""
        if self.held >= n:
            self.held -= n
            return None
        need, bucket = n - self.held, self.bucket
        if need + self.grant <= bucket.burst and bucket.try_take(need + self.grant):
            self.held = self.grant
            return None
        self.held = 0.0  # short: the units held go towards n, the rest is waited for exactly
        return taking(bucket, need)

    def close(self) -> None:
        """The caller is done: the units held go back to the bucket."""
        self.bucket.give(self.held)
        self.held = 0.0


class KeyedBuckets:
    """One :class:`TokenBucket` per key (a client identity, an upstream name), created on first
    use. Beyond ``max_keys`` the least recently used key is dropped, so a stream of distinct
    client ids cannot grow memory without bound. A dropped key starts full again on its next use:
    with ``max_keys`` well above the clients active at once, the keys dropped have been idle long
    enough (``burst / rate`` seconds) to be full anyway."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        TokenBucket(rate, burst)  # validate once, here, rather than on the first key
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, TokenBucket] = OrderedDict()

    def bucket(self, key: object, now: float | None = None) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def try_take(self, key: object, n: float = 1.0, now: float | None = None) -> bool:
        return self.bucket(key, now).try_take(n, now)

    def wait_time(self, key: object, n: float = 1.0, now: float | None = None) -> float:
        return self.bucket(key, now).wait_time(n, now)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets
