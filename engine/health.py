"""PAS, the pipeline alignment score: four sub-scores in [0, 1] over a sliding window.

Pure computation over samples the supervisor gathers (ring headers, worker reports, egress
counters), so every fault can be injected in a unit test. The formulas, their inputs and the
reasons for them are in docs/health.md; keep the two in step.

Counters are monotonic totals; a sub-score uses their increase over the window, from the oldest
sample still inside it to now. An increase is summed step by step and a step where a counter
went down counts from zero (a restarted worker reports from 0 again), as Prometheus' increase()
does. The first observation has no increase: only absolute facts (an invalid header, a dead
worker, a full ring) lower the score then.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shm.ring import RingHeader

HEALTHY = 0.90  # score >= HEALTHY: "healthy"
WARNING = 0.85  # HEALTHY > score >= WARNING: "warning"; below: "critical"
PENALTY = 0.9  # integrity factor per leaked segment and per torn record unblocked
FULL_OCCUPANCY = 0.95  # a ring at least this full counts as full
ENTROPY_WEIGHT = 0.7  # symmetry = ENTROPY_WEIGHT x load balance + (1 - ENTROPY_WEIGHT) x rings not full

WORKER_STATES = ("starting", "running", "paused", "draining", "backoff", "stopped", "failed")


@dataclass(frozen=True)
class WorkerSample:
    name: str
    group: str  # replica group (the stage role); load balance is computed within a group
    state: str  # one of WORKER_STATES
    alive: bool
    restarts: int  # total restarts since the supervisor started (monotonic)
    heartbeat_age_s: float  # seconds since the last heartbeat (control or shm, whichever is newer)
    processed: int  # records processed, monotonic total reported by the worker
    intensity: int | None = None  # this worker's restart policy intensity; None: the monitor's

    def __post_init__(self) -> None:
        if self.state not in WORKER_STATES:
            raise ValueError(f"worker {self.name!r}: state {self.state!r} is not one of {', '.join(WORKER_STATES)}")


@dataclass(frozen=True)
class RingSample:
    name: str
    header: RingHeader | None  # None when the header could not be read/validated
    error: str = ""  # the RingCorrupt message in that case
    consumer: str = ""  # the worker reading the ring ("" when unknown): blamed when it stalls


@dataclass(frozen=True)
class EgressSample:
    """Monotonic totals at the pipeline's exit (sink / broadcast)."""

    messages: int = 0
    gaps: int = 0
    duplicates: int = 0
    batches: int = 0
    batches_within_budget: int = 0


@dataclass(frozen=True)
class Pas:
    integrity: float
    stability: float
    symmetry: float
    consistency: float
    score: float  # mean of the four
    status: str  # "healthy" | "warning" | "critical"
    details: dict = field(default_factory=dict)  # each sub-score's inputs, JSON-serialisable


def status_for(score: float) -> str:
    if score >= HEALTHY:
        return "healthy"
    if score >= WARNING:
        return "warning"
    return "critical"


@dataclass(frozen=True)
class _Snapshot:
    time: float
    rings: dict[str, RingHeader | None]
    consumers: dict[str, str]  # ring -> the worker reading it
    workers: dict[str, WorkerSample]
    egress: EgressSample
    upstream_load: dict[str, int]


def _increase(values: Iterable[int]) -> int:
    """Increase of a monotonic counter over consecutive samples, counting a reset from zero."""
    total = 0
    previous = None
    for value in values:
        if previous is not None:
            total += value - previous if value >= previous else value
        previous = value
    return total


def _finite(x: float) -> float | None:
    """JSON has no infinity: a worker that never sent a heartbeat has an age of None."""
    return x if math.isfinite(x) else None


def _normalized_entropy(loads: list[int]) -> float:
    """Shannon entropy of the load shares over log(n): 1 when spread evenly, 0 when one takes all.
    1 when there is nothing to balance (one replica, or no load)."""
    total = sum(loads)
    if len(loads) < 2 or total <= 0:
        return 1.0
    entropy = -sum(x / total * math.log(x / total) for x in loads if x > 0)
    return entropy / math.log(len(loads))


class HealthMonitor:
    """Computes PAS from the samples given to :meth:`observe`.

    Not thread-safe: call it from one thread (the supervisor's health tick). ``now`` must be a
    monotonic clock in seconds; the window holds the samples taken in the last ``window_s``.
    """

    def __init__(
        self,
        window_s: float = 60.0,
        heartbeat_timeout_s: float = 2.0,
        intensity: int = 5,
        latency_budget_ms: float = 50.0,
        stall_s: float | None = None,
    ) -> None:
        if window_s <= 0 or heartbeat_timeout_s <= 0 or intensity < 0 or latency_budget_ms <= 0:
            raise ValueError("window_s, heartbeat_timeout_s and latency_budget_ms must be > 0, intensity >= 0")
        self.window_s = window_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # records waiting this long without the consumer reading one: stalled, like a missed heartbeat
        self.stall_s = heartbeat_timeout_s if stall_s is None else stall_s
        self.intensity = intensity
        self.latency_budget_ms = latency_budget_ms
        self._history: deque[_Snapshot] = deque()

    def observe(
        self,
        now: float,
        rings: list[RingSample],
        workers: list[WorkerSample],
        egress: EgressSample,
        leaked_segments: int = 0,
        upstream_load: dict[str, int] | None = None,
    ) -> Pas:
        """Add one sample and score the window ending at ``now``.

        ``leaked_segments``: segments under the engine's prefix that no live engine owns, now.
        ``upstream_load``: monotonic totals of work per upstream (e.g. requests sent), balanced
        like a replica group."""
        self._history.append(
            _Snapshot(
                time=now,
                rings={r.name: r.header for r in rings},
                consumers={r.name: r.consumer for r in rings if r.consumer},
                workers={w.name: w for w in workers},
                egress=egress,
                upstream_load=dict(upstream_load or {}),
            )
        )
        while self._history[0].time < now - self.window_s:
            self._history.popleft()
        window = list(self._history)

        stalled = _stalled(window, self.stall_s)
        integrity, integrity_details = _integrity(window, rings, leaked_segments)
        stability, stability_details = _stability(window, self.heartbeat_timeout_s, self.intensity, stalled)
        symmetry, symmetry_details = _symmetry(window)
        consistency, consistency_details = _consistency(window, self.latency_budget_ms, stalled)
        score = (integrity + stability + symmetry + consistency) / 4
        return Pas(
            integrity=integrity,
            stability=stability,
            symmetry=symmetry,
            consistency=consistency,
            score=score,
            status=status_for(score),
            details={
                "window": {"span_s": now - window[0].time, "samples": len(window), "window_s": self.window_s},
                "integrity": integrity_details,
                "stability": stability_details,
                "symmetry": symmetry_details,
                "consistency": consistency_details,
            },
        )


def _ring_series(window: list[_Snapshot], ring: str, counter: Callable[[RingHeader], int]) -> list[int]:
    """A ring counter at every sample of the window where the ring's header was valid."""
    return [counter(h) for s in window if (h := s.rings.get(ring)) is not None]


def _integrity(window: list[_Snapshot], rings: list[RingSample], leaked: int) -> tuple[float, dict]:
    invalid = {r.name: r.error for r in rings if r.header is None}
    unblocks = sum(_increase(_ring_series(window, r.name, lambda h: h.unblocks)) for r in rings)
    valid_fraction = (len(rings) - len(invalid)) / len(rings) if rings else 1.0
    score = valid_fraction * PENALTY**leaked * PENALTY**unblocks
    return score, {
        "segments": len(rings),
        "invalid": invalid,
        "leaked_segments": leaked,
        "unblocks_in_window": unblocks,
    }


def _stalled(window: list[_Snapshot], stall_s: float) -> dict[str, float]:
    """Rings whose records have waited at least ``stall_s`` without their running consumer reading
    one (ring -> seconds). Heartbeats prove a worker's loop turns, not that it moves data: a stage
    wedged on a record it can never pass on keeps beating while its input fills."""
    latest = window[-1]
    stalled = {}
    for ring, head in latest.rings.items():
        consumer = latest.workers.get(latest.consumers.get(ring, ""))
        if head is None or head.used == 0 or consumer is None or consumer.state != "running":
            continue
        since = latest.time
        for sample in reversed(window):
            h = sample.rings.get(ring)
            if h is None or h.used == 0 or h.records_read != head.records_read:
                break
            since = sample.time
        if latest.time - since >= stall_s:
            stalled[ring] = latest.time - since
    return stalled


def _worker_score(w: WorkerSample, restarts: int, heartbeat_timeout_s: float, intensity: int) -> float:
    # A starting worker may not have sent its first heartbeat yet (spawn and imports take a
    # while); the supervisor's start timeout covers a worker that never gets going.
    live = w.alive and (w.state == "starting" or w.heartbeat_age_s < heartbeat_timeout_s)
    if not live:
        return 0.0
    if intensity == 0:
        return 0.0 if restarts else 1.0
    return 1.0 - min(1.0, restarts / intensity)


def _stability(
    window: list[_Snapshot], heartbeat_timeout_s: float, intensity: int, stalled: dict[str, float]
) -> tuple[float, dict]:
    # A stopped worker was stopped on purpose (a finished transient one, a drain): not a fault.
    workers = [w for w in window[-1].workers.values() if w.state != "stopped"]
    stalled_workers = {window[-1].consumers[ring] for ring in stalled}
    per_worker = {}
    for w in workers:
        restarts = _increase(s.workers[w.name].restarts for s in window if w.name in s.workers)
        score = _worker_score(w, restarts, heartbeat_timeout_s, intensity if w.intensity is None else w.intensity)
        per_worker[w.name] = {
            "state": w.state,
            "alive": w.alive,
            "heartbeat_age_s": _finite(w.heartbeat_age_s),
            "restarts_in_window": restarts,
            "stalled": w.name in stalled_workers,
            "score": 0.0 if w.name in stalled_workers else score,
        }
    score = sum(d["score"] for d in per_worker.values()) / len(per_worker) if per_worker else 1.0
    return score, {"workers": per_worker, "heartbeat_timeout_s": heartbeat_timeout_s, "intensity": intensity}


def _load_groups(window: list[_Snapshot]) -> dict[str, dict[str, int]]:
    """Work done in the window per member, per replica group (and the upstreams as one group)."""
    groups: dict[str, dict[str, int]] = {}
    for w in window[-1].workers.values():
        if w.state != "stopped":
            series = (s.workers[w.name].processed for s in window if w.name in s.workers)
            groups.setdefault(w.group, {})[w.name] = _increase(series)
    if window[-1].upstream_load:
        groups["upstreams"] = {
            name: _increase(s.upstream_load[name] for s in window if name in s.upstream_load)
            for name in window[-1].upstream_load
        }
    return groups


def _full_fraction(window: list[_Snapshot], ring: str) -> float:
    """Fraction of the window's time during which ``ring`` was full.

    An interval between two samples counts as full when the producer hit a full ring in it
    (back-pressure events or drops went up) or the ring was nearly full at its end. With no
    interval yet (first observation), the ring's occupancy now decides."""
    headers = [(s.time, s.rings.get(ring)) for s in window]
    full_time = span = 0.0
    for (t0, h0), (t1, h1) in itertools.pairwise(headers):
        if h0 is None or h1 is None:
            continue
        hit_full = h1.backpressure_events > h0.backpressure_events or h1.drops > h0.drops
        span += t1 - t0
        if hit_full or h1.occupancy >= FULL_OCCUPANCY:
            full_time += t1 - t0
    if span > 0:
        return full_time / span
    now = headers[-1][1]
    return 1.0 if now is not None and now.occupancy >= FULL_OCCUPANCY else 0.0


def _symmetry(window: list[_Snapshot]) -> tuple[float, dict]:
    groups = _load_groups(window)
    entropies = {g: _normalized_entropy(list(loads.values())) for g, loads in groups.items()}
    balance = sum(entropies.values()) / len(entropies) if entropies else 1.0
    full = {ring: _full_fraction(window, ring) for ring in window[-1].rings}
    not_full = 1.0 - (sum(full.values()) / len(full) if full else 0.0)
    score = ENTROPY_WEIGHT * balance + (1 - ENTROPY_WEIGHT) * not_full
    return score, {
        "load": groups,
        "entropy": entropies,
        "balance": balance,
        "full_fraction": full,
        "not_full": not_full,
    }


def _consistency(window: list[_Snapshot], latency_budget_ms: float, stalled: dict[str, float]) -> tuple[float, dict]:
    def increase(counter: str) -> int:
        return _increase(getattr(s.egress, counter) for s in window)

    messages, gaps, duplicates = increase("messages"), increase("gaps"), increase("duplicates")
    batches, within = increase("batches"), increase("batches_within_budget")
    ordered = 1.0 - min(1.0, (gaps + duplicates) / messages) if messages else 1.0
    # records stuck in a stalled ring are already later than any budget, and never reach egress to be counted
    on_time = 0.0 if stalled else min(1.0, within / batches) if batches else 1.0
    return ordered * on_time, {
        "stalled_rings": {ring: round(seconds, 3) for ring, seconds in stalled.items()},
        "messages": messages,
        "gaps": gaps,
        "duplicates": duplicates,
        "batches": batches,
        "batches_within_budget": within,
        "latency_budget_ms": latency_budget_ms,
        "ordered": ordered,
        "on_time": on_time,
    }
