"""Wake-up latency between two processes for the candidate doorbells of a blocked ring side.

A sleeper process waits on the doorbell (poll, then drain, as the ring's block strategy does);
a waker process waits until the sleeper has handled the previous ring, pauses, writes the send
time into shared memory and rings. The latency is the time from just before the ring to the
sleeper running again. Candidates:

- ``fifo``: a named FIFO in a directory, opened read-write by both (``shm.doorbell.Doorbell``,
  what the ring uses);
- ``eventfd``: ``os.eventfd``; it has no path, and reopening ``/proc/<pid>/fd/<n>`` does not work
  for it (ENXIO, an anonymous inode), so it is handed to the sleeper when it is spawned;
- ``zmq-pair``: a pyzmq PAIR socket pair over ipc:// in a private directory; one empty message
  is a ring.

Each doorbell is measured after a short pause (the sleeper's CPU has just gone idle) and after
1 ms (it is really asleep: the hypervisor has stopped polling it). Use :func:`main`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import select
import shutil
import statistics
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing import reduction
from typing import Any

import click
import numpy as np

from shm.doorbell import Doorbell, create_fifo

from . import report
from .proc import BenchError, run_child, run_pair, yield_for

DOORBELLS = ("fifo", "eventfd", "zmq-pair")


@dataclass(frozen=True)
class Settings:
    repeats: int
    warmup: int  # rings first, not measured
    rings: int  # measured rings per pause
    short_gap_us: float  # pause before each ring of the first phase (the waker spins)
    long_gap_us: float  # ... of the second phase (the waker sleeps)
    timeout_s: float  # a doorbell that does not wake its sleeper for this long fails the run


FULL = Settings(repeats=3, warmup=50, rings=1000, short_gap_us=50, long_gap_us=1000, timeout_s=5)
QUICK = Settings(repeats=1, warmup=5, rings=30, short_gap_us=50, long_gap_us=1000, timeout_s=5)

_COLUMNS: tuple[report.Column, ...] = (
    ("doorbell", "doorbell", "{}"),
    ("short_p50_us", "p50 µs, 50 µs idle", "{:,.1f}"),
    ("short_p99_us", "p99 µs, 50 µs idle", "{:,.1f}"),
    ("long_p50_us", "p50 µs, 1 ms idle", "{:,.1f}"),
    ("long_p99_us", "p99 µs, 1 ms idle", "{:,.1f}"),
    ("ring_p50_us", "ring call p50 µs", "{:,.2f}"),
)


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Measure every doorbell, print a table (or one JSON object) and return the results.

    A full run from a checkout also writes bench/results/doorbell-<machine>.json and the
    generated part of the section "Choosing the doorbell" of docs/benchmarks.md."""
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    rows = _measure(settings, progress=not as_json)
    result = {
        "benchmark": "doorbell",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings),
        "notes": [_eventfd_reopen_note()],
        "rows": rows,
    }
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(report.machine_line(info, load_before, result["load_after"]))
        click.echo()
        click.echo(report.text_table(rows, _COLUMNS))
        for note in result["notes"]:
            click.echo(f"note: {note}")
    if not quick:
        report.publish("doorbell", info, result, markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The generated part of docs/benchmarks.md's "Choosing the doorbell"."""
    settings = result["settings"]
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            f"Median of {settings['repeats']} runs; each run: {settings['warmup']} warm-up rings, then "
            f"{settings['rings']} rings each {settings['short_gap_us']:g} µs after the sleeper handled the "
            f"previous one (the waker spinning meanwhile) and {settings['rings']} rings each "
            f"{settings['long_gap_us']:g} µs after (the waker sleeping). Sleeper and waker on two different CPUs.",
            "",
            report.markdown_table(result["rows"], _COLUMNS),
            *(f"\nNote: {note}" for note in result["notes"]),
        ]
    )


def _measure(settings: Settings, progress: bool) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    runs: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {name: [] for name in DOORBELLS}
    for repeat in range(settings.repeats):
        for name in DOORBELLS:
            short, long, ring = run_once(ctx, name, settings)
            runs[name].append((short, long, ring))
            if progress:
                click.echo(
                    f"[{repeat + 1}/{settings.repeats}] {name:<9} wake p50 {np.median(short) / 1e3:6.1f} µs "
                    f"(50 µs idle), {np.median(long) / 1e3:6.1f} µs (1 ms idle)",
                    err=True,
                )
    return [_row(name, results) for name, results in runs.items()]


def _row(name: str, results: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The median over repeats of each run's quantiles, in µs."""

    def median_us(phase: int, q: float) -> float:
        return round(float(statistics.median(np.percentile(r[phase], q) for r in results)) / 1e3, 3)

    return {
        "doorbell": name,
        "short_p50_us": median_us(0, 50),
        "short_p99_us": median_us(0, 99),
        "long_p50_us": median_us(1, 50),
        "long_p99_us": median_us(1, 99),
        "ring_p50_us": median_us(2, 50),
    }


def run_once(ctx: Any, name: str, settings: Settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(short-pause latencies, long-pause latencies, ring call durations), all in ns."""
    budget_s = 30 + 2 * settings.rings * (settings.long_gap_us / 1e6 + 1e-3) + 2 * settings.timeout_s
    # [sequence number, send time] written by the waker before it rings, [handled] by the sleeper
    clock = ctx.RawArray("q", [-1, 0, -1])
    with _doorbell(name) as (sleeper_end, waker_end):
        results = run_pair(
            ctx,
            budget_s,
            sleeper=(_sleep, (name, settings, sleeper_end, clock)),
            waker=(_wake, (name, settings, waker_end, clock)),
        )
    short, long = (np.frombuffer(raw, dtype=np.int64) for raw in results["sleeper"])
    return short, long, np.frombuffer(results["waker"], dtype=np.int64)


class _PassedFd:
    """An fd handed to a spawned child: duplicated into it when it starts (the way
    multiprocessing passes sockets), arriving there as a plain int."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Callable, tuple]:
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup: Any) -> int:
    return dup.detach()


@contextlib.contextmanager
def _doorbell(name: str) -> Iterator[tuple[Any, Any]]:
    """Make doorbell ``name`` in the parent; yields what the sleeper and the waker open, and
    removes it on exit."""
    directory = tempfile.mkdtemp(prefix="neuralpipe-bench-")
    try:
        if name == "fifo":
            path = os.path.join(directory, "bell")
            create_fifo(path)
            yield path, path
        elif name == "eventfd":
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                yield _PassedFd(fd), _PassedFd(fd)
            finally:
                os.close(fd)
        elif name == "zmq-pair":
            address = f"ipc://{os.path.join(directory, 'bell.sock')}"
            yield address, address
        else:
            raise ValueError(f"unknown doorbell {name!r}; one of {', '.join(DOORBELLS)}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _opened(name: str, end: Any, sleeper: bool) -> Iterator[tuple[Callable, Callable, Callable]]:
    """(ring, wait(timeout_s) -> rung, drain) of one end of doorbell ``name``, closed on exit."""
    if name == "fifo":
        bell = Doorbell(end)
        try:
            yield bell.ring, bell.wait, bell.drain
        finally:
            bell.close()
    elif name == "eventfd":
        poller = select.poll()
        poller.register(end, select.POLLIN)

        def drain() -> None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(end)

        try:
            yield functools.partial(os.eventfd_write, end, 1), _poll_wait(poller), drain
        finally:
            os.close(end)
    else:
        import zmq

        context = zmq.Context()
        sock = context.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        if sleeper:
            sock.bind(end)
        else:
            sock.connect(end)

        def drain() -> None:
            with contextlib.suppress(zmq.Again):
                while True:
                    sock.recv(zmq.NOBLOCK)

        try:
            yield functools.partial(sock.send, b""), lambda timeout_s: bool(sock.poll(timeout_s * 1000)), drain
        finally:
            sock.close()
            context.term()


def _poll_wait(poller: Any) -> Callable[[float], bool]:
    def wait(timeout_s: float) -> bool:
        return bool(poller.poll(timeout_s * 1000))

    return wait


def _sleep(name: str, settings: Settings, end: Any, clock: Any, ready: Any, cpu: int | None, results: Any) -> None:
    """Sleeper process: wait, note the time, drain; the latency of each ring in two phases."""

    def body() -> tuple[bytes, bytes]:
        with _opened(name, end, sleeper=True) as (_, wait, drain):
            ready.set()
            latencies = []
            for expected in range(settings.warmup + 2 * settings.rings):
                if not wait(settings.timeout_s):
                    raise BenchError(f"{name}: not rung for {settings.timeout_s} s")
                now = time.monotonic_ns()
                seq, sent = clock[0], clock[1]
                drain()
                if seq != expected:
                    raise BenchError(f"{name}: woke for ring {seq}, expected {expected}")
                latencies.append(now - sent)
                clock[2] = seq
        short = latencies[settings.warmup : settings.warmup + settings.rings]
        return array("q", short).tobytes(), array("q", latencies[-settings.rings :]).tobytes()

    run_child(body, cpu, results)


def _wake(name: str, settings: Settings, end: Any, clock: Any, ready: Any, cpu: int | None, results: Any) -> None:
    """Waker process: wait for the sleeper, pause, stamp, ring; returns how long each ring call
    took (ns)."""

    def body() -> bytes:
        if not ready.wait(settings.timeout_s):
            raise BenchError("the sleeper never became ready")
        with _opened(name, end, sleeper=False) as (ring, _, _):
            short = yield_for(int(settings.short_gap_us * 1000))
            long = functools.partial(time.sleep, settings.long_gap_us / 1e6)
            pauses = [short] * (settings.warmup + settings.rings) + [long] * settings.rings
            durations = []
            for seq, pause in enumerate(pauses):
                _until_handled(clock, seq - 1, settings.timeout_s)
                pause()
                clock[0] = seq
                clock[1] = start = time.monotonic_ns()
                ring()
                durations.append(time.monotonic_ns() - start)
        return array("q", durations[settings.warmup :]).tobytes()

    run_child(body, cpu, results)


def _until_handled(clock: Any, seq: int, timeout_s: float) -> None:
    """Wait until the sleeper has handled ring ``seq`` (and is going back to sleep), so that each
    ring wakes a sleeper rather than finding it still awake."""
    deadline = time.monotonic() + timeout_s
    while clock[2] != seq:
        if time.monotonic() > deadline:
            raise BenchError(f"the sleeper did not handle ring {seq} within {timeout_s} s")
        os.sched_yield()


def _eventfd_reopen_note() -> str:
    """Whether an eventfd can be reopened by path, as a restarted worker would need."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        os.close(os.open(f"/proc/{os.getpid()}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return (
            f"eventfd: reopening /proc/<pid>/fd/<n> fails here ({exc.strerror}): an eventfd reaches "
            "only processes it is handed to at spawn (or over a unix socket), so it is measured passed at spawn."
        )
    finally:
        os.close(fd)
    return "eventfd: reopening /proc/<pid>/fd/<n> works here; it is measured passed at spawn anyway."
