"""Limits enforced in memory for one gateway process: requests and tokens per sliding minute,
streams open at once, and the token budget (the ledger's figure, kept current between reads).

Per principal a fixed 60-bucket window (one per second), so memory per caller is constant; the
callers' states are an LRU bounded by ``max_principals``, and an idle state (no open stream) is
what gets evicted. Evicting forgets at most the last minute of that caller's rate (the budget comes
back from the ledger), so the bound holds whatever the number of distinct keys or JWT subjects.

Limits are per gateway process, that is per engine instance: N engines behind a load balancer
admit up to N times each rate (docs/gateway.md, "Auth and limits").
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from engine.auth.errors import LimitExceeded
from engine.auth.principal import Principal

WINDOW_S = 60
BUDGET_REFRESH_S = 60.0  # how stale the ledger's budget figure may get (other writers, the hour's edge)
MAX_PRINCIPALS = 10_000


class SlidingWindow:
    """Counts over the last 60 whole seconds (``now`` from a monotonic clock)."""

    __slots__ = ("_buckets", "_second")

    def __init__(self) -> None:
        self._buckets = [0] * WINDOW_S
        self._second = 0

    def _advance(self, second: int) -> None:
        gap = second - self._second
        if gap <= 0:
            return
        if gap >= WINDOW_S:
            self._buckets = [0] * WINDOW_S
        else:
            for s in range(self._second + 1, second + 1):
                self._buckets[s % WINDOW_S] = 0
        self._second = second

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        self._advance(second)
        self._buckets[second % WINDOW_S] += n

    def total(self, now: float) -> int:
        self._advance(int(now))
        return sum(self._buckets)

    def seconds_until_below(self, now: float, limit: int) -> float:
        """Seconds until the count falls below ``limit`` as old seconds leave the window."""
        second = int(now)
        self._advance(second)
        remaining = sum(self._buckets)
        for s in range(second - WINDOW_S + 1, second + 1):
            if remaining < limit:
                break
            remaining -= self._buckets[s % WINDOW_S]
            if remaining < limit:
                return max(0.0, s + WINDOW_S - now)
        return 0.0 if remaining < limit else float(WINDOW_S)

    def seconds_until_empty(self, now: float) -> float:
        """Seconds until every count now in the window has left it."""
        second = int(now)
        self._advance(second)
        for s in range(second, second - WINDOW_S, -1):  # the newest counted second leaves last
            if self._buckets[s % WINDOW_S]:
                return max(0.0, s + WINDOW_S - now)
        return 0.0


class PrincipalState:
    __slots__ = ("budget_read_at", "budget_retry_at", "budget_used", "in_flight", "requests", "streams", "tokens")

    def __init__(self) -> None:
        self.requests = SlidingWindow()
        self.tokens = SlidingWindow()
        self.streams = 0
        self.in_flight = 0  # tokens delivered on open streams (not in the ledger yet)
        self.budget_used = 0  # the ledger's figure at budget_read_at, plus what ended or was delivered since
        self.budget_read_at = float("-inf")
        self.budget_retry_at = 0.0  # wall time before which a spent budget is not looked up again


# (principal, its budget window in seconds) -> (tokens used in it, seconds until enough leaves it to go on)
BudgetReader = Callable[[Principal, int, int], tuple[int, float]]


class Limiter:
    """Admission and accounting for every principal of one gateway."""

    def __init__(
        self,
        read_budget: BudgetReader | None,
        max_principals: int = MAX_PRINCIPALS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._read_budget = read_budget
        self._states: OrderedDict[str, PrincipalState] = OrderedDict()
        self._max = max_principals
        self._clock = clock  # windows and refreshes
        self._wall = wall_clock  # the ledger's time (a spent budget's retry)

    def __len__(self) -> int:
        return len(self._states)

    def state(self, principal: Principal) -> PrincipalState:
        states = self._states
        state = states.get(principal.label)
        if state is None:
            state = states[principal.label] = PrincipalState()
            if len(states) > self._max:
                self._evict()
        else:
            states.move_to_end(principal.label)
        return state

    def _evict(self) -> None:
        """Drop the least recently used idle states until within the bound (one with an open stream
        is kept, moved to the back: its slot must be released)."""
        states = self._states
        for _ in range(len(states)):
            if len(states) <= self._max:
                return
            label, state = next(iter(states.items()))
            if state.streams:
                states.move_to_end(label)
            else:
                del states[label]

    def admit(self, principal: Principal, state: PrincipalState, streams: int = 1) -> None:
        """Count one request and ``streams`` open streams (a request's choices), or raise
        LimitExceeded (nothing counted)."""
        limits = principal.limits
        now = self._clock()
        if limits.budget_tokens is not None:
            self._check_budget(principal, state)
        if limits.rpm is not None and state.requests.total(now) >= limits.rpm:
            wait = state.requests.seconds_until_below(now, limits.rpm)
            raise LimitExceeded("rpm", wait, f"rate limit reached: {limits.rpm} requests per minute")
        if limits.tpm is not None and state.tokens.total(now) >= limits.tpm:
            wait = state.tokens.seconds_until_below(now, limits.tpm)
            raise LimitExceeded("tpm", wait, f"rate limit reached: {limits.tpm} tokens per minute")
        if limits.max_streams is not None and state.streams + streams > limits.max_streams:
            never = ""
            if streams > limits.max_streams:
                never = f"; a request of {streams} streams (its choices) can never fit"
            raise LimitExceeded("streams", 1.0, f"rate limit reached: {limits.max_streams} concurrent streams{never}")
        state.requests.add(now)
        state.streams += streams

    def _check_budget(self, principal: Principal, state: PrincipalState) -> None:
        limits = principal.limits
        wall = self._wall()
        if wall < state.budget_retry_at:
            raise self._spent(limits.budget_tokens, state.budget_retry_at - wall)
        # read the ledger again when the last read is old, or a spent budget's wait is over
        stale = state.budget_retry_at or self._clock() - state.budget_read_at >= BUDGET_REFRESH_S
        if self._read_budget is not None and stale:
            state.budget_retry_at = 0.0
            used, wait = self._read_budget(principal, limits.budget_period_s, limits.budget_tokens)
            state.budget_used = used + state.in_flight
            state.budget_read_at = self._clock()
            if state.budget_used >= limits.budget_tokens:
                state.budget_retry_at = wall + wait
                raise self._spent(limits.budget_tokens, wait)
        elif state.budget_used >= limits.budget_tokens:
            state.budget_read_at = float("-inf")  # spent since the last read: read the ledger again next time
            raise self._spent(limits.budget_tokens, 1.0)

    @staticmethod
    def _spent(budget: int, wait: float) -> LimitExceeded:
        return LimitExceeded("budget", wait, f"token budget of {budget} spent for this period")

    def rate_headers(self, principal: Principal, state: PrincipalState) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the per-minute limits ``principal`` has: each
        limit, what is left of it now, and when all of it is back (``1m0s``, ``12s``)."""
        limits, now, headers = principal.limits, self._clock(), {}
        for limit, window, name in ((limits.rpm, state.requests, "requests"), (limits.tpm, state.tokens, "tokens")):
            if limit is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - window.total(now)))
                headers[f"x-ratelimit-reset-{name}"] = _duration(window.seconds_until_empty(now))
        return headers

    def delivered(self, state: PrincipalState, n: int) -> None:
        state.tokens.add(self._clock(), n)
        state.in_flight += n
        state.budget_used += n

    def release(self, state: PrincipalState, delivered: int, spent: int, streams: int = 1) -> None:
        """A request of ``streams`` streams ended after ``delivered`` tokens went through
        :meth:`delivered`; ``spent`` is what the ledger gets for it (prompt + completion): the
        budget figure moves by the rest."""
        state.streams -= streams
        state.in_flight -= delivered
        state.budget_used += max(0, spent - delivered)


def _duration(seconds: float) -> str:
    """Whole seconds, rounded up, as OpenAI writes them: ``0s``, ``59s``, ``1m0s``."""
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"
