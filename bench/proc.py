"""Processes for the benchmarks: two spawned processes measuring something between them (a
consumer and a producer, a sleeper and a waker), on two different CPUs, reporting their results to
the parent, and always joined (or killed) before the parent goes on; and what /proc says about a
process (its CPU time, its children)."""

from __future__ import annotations

import contextlib
import gc
import glob
import multiprocessing.connection
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A run that failed: a child's error, a lost or reordered message, a timeout."""


def run_pair(ctx: Any, budget_s: float, **roles: tuple[Callable[..., None], tuple]) -> dict[str, Any]:
    """Run two roles, e.g. ``consumer=(target, args), producer=(target, args)``, in two spawned
    processes on two CPUs; return each role's result.

    Each target is called as ``target(*args, ready, cpu, results)`` and hands its work to
    :func:`run_child`; the first role (the side that waits) sets ``ready`` once the second may
    start. Both processes are gone when this returns or raises (KeyboardInterrupt included)."""
    ready = ctx.Event()
    conns = {role: ctx.Pipe(duplex=False) for role in roles}
    processes = [
        ctx.Process(target=target, args=(*args, ready, cpu, conns[role][1]), name=role, daemon=True)
        for (role, (target, args)), cpu in zip(roles.items(), _cpus(), strict=True)
    ]
    try:
        for process in processes:
            process.start()
        for _, report_end in conns.values():
            report_end.close()  # only the child holds it now: a child that dies shows as EOF
        return _collect({role: receive_end for role, (receive_end, _) in conns.items()}, budget_s)
    finally:
        _stop(*processes)
        for pair in conns.values():
            for conn in pair:
                conn.close()


def run_child(body: Callable[[], Any], cpu: int | None, results: Any) -> None:
    """Run a child's ``body`` on ``cpu`` and send ("ok", value) or ("error", traceback) to the parent.

    The garbage collector is off while it runs, for every transport alike, so that a collection
    never lands inside a timed message."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before the transport starts its threads: they inherit it
    gc.disable()
    try:
        outcome = ("ok", body())
    except BaseException:  # KeyboardInterrupt too: the parent must hear why the child stopped
        outcome = ("error", traceback.format_exc())
    try:
        results.send(outcome)
    except OSError:
        pass  # the parent is gone; nobody to tell
    finally:
        results.close()


def yield_for(gap_ns: int) -> Callable[[], None]:
    """A pause of ``gap_ns``, too short to sleep: spin on the clock, yielding the CPU. Yielding
    releases the GIL, which multiprocessing.Queue's feeder thread needs to send the message (a
    pure spin would hold it for the 5 ms switch interval)."""
    monotonic_ns, sched_yield = time.monotonic_ns, os.sched_yield

    def pause() -> None:
        until = monotonic_ns() + gap_ns
        while monotonic_ns() < until:
            sched_yield()

    return pause


def _cpus() -> tuple[int | None, int | None]:
    """CPUs for the two roles: two different ones when there are two, so every
    transport pays the same cross-core hand-off (left to the scheduler, the two sometimes share
    a CPU, which turns a wake-up into a cheaper same-core switch and makes runs bimodal)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[-1], cpus[-2]) if len(cpus) >= 2 else (None, None)


def _collect(conns: dict[str, Any], budget_s: float) -> dict[str, Any]:
    """Each child's result, in the order they come, so the first failure is the one reported
    (a dead producer, not the consumer that timed out waiting for it)."""
    deadline = time.monotonic() + budget_s
    pending = dict(conns)
    results = {}
    while pending:
        ready = multiprocessing.connection.wait(list(pending.values()), max(0.0, deadline - time.monotonic()))
        if not ready:
            raise BenchError(f"{' and '.join(pending)} sent no result within {budget_s:.0f} s")
        for role in [role for role, conn in pending.items() if conn in ready]:
            try:
                status, value = pending.pop(role).recv()
            except EOFError:
                raise BenchError(f"{role} died without a result") from None
            if status != "ok":
                raise BenchError(f"{role} failed:\n{value}")
            results[role] = value
    return results


def _stop(*processes: Any) -> None:
    """Join the children; those still running after a grace period are terminated, then killed."""
    for process in processes:
        if process.pid is None:
            continue
        process.join(5)
        if process.is_alive():
            process.terminate()
            process.join(2)
        if process.is_alive():
            process.kill()
            process.join()
        process.close()


# ---- /proc ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU seconds ``pid`` has used, user + system, all its threads (``/proc/<pid>/stat``, in
    clock ticks: 10 ms steps at the usual 100 Hz). FileNotFoundError once the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ")"
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime and stime, fields 14 and 15 of proc(5)


def children(pid: int) -> dict[int, str]:
    """Child pid -> command line of every child of ``pid``."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process may end while we look
            with open(stat, "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid == pid:
                child = int(stat.split("/")[2])
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    found[child] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return found


class ChildProcess:
    """A spawned helper process (a bench's consumer) and the pipe to it: it must send "ready"
    within ``ready_timeout_s``; questions go down the pipe, answers come back; ``close`` sends
    None (the child's signal to finish), then kills it if it does not."""

    def __init__(self, target: Callable[..., None], args: tuple, name: str, ready_timeout_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(ready_timeout_s) or self.conn.recv() != "ready":
            self.close()
            raise BenchError(f"the {name} did not start")

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise BenchError(f"the {self.proc.name} did not answer")
        return self.conn.recv()

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
            self.proc.join(5)
        finally:
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.proc.close()
            self.conn.close()
