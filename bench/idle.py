"""``neuralpipe bench idle``: what an engine with nothing to do costs, and how long
``neuralpipe check`` takes.

Idle: a real engine (the counting source -> relay -> verifying sink topology with the engine's
default timings) whose source stops after one 16-token batch. Once the sink has that batch and a
settling pause has passed, the harness reads each process's CPU time (utime + stime of
``/proc/<pid>/stat``, in clock ticks) and its voluntary context switches over all its threads
(each one is a sleep that ended in a wake-up) at the start and the end of the idle window, and
reports CPU as a percentage of one core and wake-ups per second. The harness itself sleeps
meanwhile. A process that busy-polls shows as whole percents and thousands of wake-ups.

Check: twelve rings are created under a fresh instance id, each with a live producer and consumer
attached (this process) and a record in it, so every per-segment check has something to look at;
then ``python -m engine.cli check --json --instance <id>`` runs several times: its wall time as an
operator sees it (interpreter start and imports included) and the ``elapsed_ms`` it reports for the
inspection itself.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import click

from shm.naming import new_instance_id, segment_name
from shm.ring import Consumer, Producer, Ring

from . import report
from .proc import BenchError
from .recovery import DOCS, BenchEngine, topology_toml, wait_for

# Targets: the for the supervisor; "well under a second" (DESIGN.md) for check.
TARGET_SUPERVISOR_PCT = 1.0
TARGET_CHECK_MS = 1000.0

CLK_TCK = os.sysconf("SC_CLK_TCK")
TOKENS = 16  # one batch, then the source idles
RECORD_TYPE = 16  # the first user record type


@dataclass(frozen=True)
class Settings:
    idle_s: float  # the measured idle window
    settle_s: float  # after the last token, before the window opens
    check_runs: int
    check_rings: int


FULL = Settings(idle_s=10.0, settle_s=2.0, check_runs=10, check_rings=12)
QUICK = Settings(idle_s=2.0, settle_s=0.5, check_runs=3, check_rings=12)


# ---- idle CPU ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    switches: int  # voluntary context switches, all threads


def usage(pid: int) -> Usage:
    """CPU seconds (user + system, every thread) and voluntary context switches of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of proc(5)
    switches = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:  # a thread may have just ended
            switches += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return Usage(ticks / CLK_TCK, switches)


def _children(pid: int) -> dict[int, str]:
    """Child pid -> command line, for the engine's processes other than its workers (the
    multiprocessing resource tracker)."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            with open(stat, "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid == pid:
                child = int(stat.split("/")[2])
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    found[child] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def _label(cmdline: str) -> str:
    return "resource_tracker" if "resource_tracker" in cmdline else cmdline[:40]


def engine_processes(engine: BenchEngine) -> dict[str, int]:
    """Name -> pid of every process of the engine: supervisor, workers, helpers."""
    workers = {name: w["pid"] for name, w in engine.workers().items()}
    helpers = {_label(cmd): pid for pid, cmd in _children(engine.pid).items() if pid not in workers.values()}
    return {"supervisor": engine.pid, **workers, **helpers}


def _idle_engine(engine: BenchEngine, settings: Settings) -> None:
    """Wait until the sink has the source's only batch, then let start-up settle."""
    wait_for(
        lambda: engine.workers()["sink"]["stats"].get("messages") == TOKENS, 30, f"the sink to get {TOKENS} tokens"
    )
    time.sleep(settings.settle_s)


def measure_idle(settings: Settings) -> list[dict[str, Any]]:
    """CPU % of a core and wake-ups per second of each engine process over the idle window."""
    with BenchEngine(topology_toml(rate=2000, total=TOKENS), "idle") as engine:
        _idle_engine(engine, settings)
        processes = engine_processes(engine)
        start, began = {name: usage(pid) for name, pid in processes.items()}, time.monotonic()
        time.sleep(settings.idle_s)
        end, elapsed = {name: usage(pid) for name, pid in processes.items()}, time.monotonic() - began
        if any(w["restarts"] for w in engine.workers().values()):
            raise BenchError("a worker restarted during the idle window")
    if engine.exit_code != 0:
        raise BenchError(f"engine exited with code {engine.exit_code} when stopped")
    rows = [_usage_row(name, processes[name], start[name], end[name], elapsed) for name in processes]
    total = Usage(sum(r["cpu_s"] for r in rows), sum(r["wakeups"] for r in rows))
    return [*rows, _usage_row("engine (all)", 0, Usage(0.0, 0), total, elapsed)]


def _usage_row(name: str, pid: int, start: Usage, end: Usage, elapsed: float) -> dict[str, Any]:
    cpu_s, wakeups = end.cpu_s - start.cpu_s, end.switches - start.switches
    return {
        "process": name,
        "pid": pid,
        "cpu_s": round(cpu_s, 3),
        "cpu_pct": round(100 * cpu_s / elapsed, 3),
        "wakeups": wakeups,
        "wakeups_per_s": round(wakeups / elapsed, 1),
    }


# ---- check -------------------------------------------------------------------------------------


@contextlib.contextmanager
def check_rings(count: int) -> Iterator[tuple[str, list[Producer | Consumer]]]:
    """A fresh instance id with ``count`` rings, each with a producer and a consumer attached (this
    process) and a record in it; everything is closed and removed on leaving."""
    instance = "bench" + new_instance_id()
    with tempfile.TemporaryDirectory(prefix="neuralpipe-bench-bells-") as bells, contextlib.ExitStack() as stack:
        ends: list[Producer | Consumer] = []
        for i in range(count):
            name = segment_name(instance, f"ring{i:02d}")
            stack.enter_context(Ring.create(name, 1 << 16, doorbell_dir=bells))
            producer = stack.enter_context(Producer.attach(name))
            ends += [producer, stack.enter_context(Consumer.attach(name))]
            producer.write(b"x" * 64, RECORD_TYPE)
        yield instance, ends


def _run_check(instance: str, expected: int) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", "--json", "--instance", instance],
        capture_output=True,
        text=True,
        timeout=60,
    )
    wall_ms = (time.perf_counter() - start) * 1e3
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"check printed no JSON (exit {done.returncode}):\n{done.stderr[-2000:]}") from None
    if len(out["segments"]) != expected:
        raise BenchError(f"check saw {len(out['segments'])} segments, expected {expected}")
    return {"wall_ms": wall_ms, "elapsed_ms": out["elapsed_ms"], "status": out["status"]}


def measure_check(settings: Settings) -> dict[str, Any]:
    """Wall time and reported ``elapsed_ms`` of ``neuralpipe check --json`` over the rings."""
    runs = []
    with check_rings(settings.check_rings) as (instance, ends):
        for _ in range(settings.check_runs):
            for end in ends:  # fresh heartbeats: no run may find a side stale, however long they take
                end.heartbeat()
            runs.append(_run_check(instance, settings.check_rings))
    return {
        "rings": settings.check_rings,
        "runs": len(runs),
        "wall_ms": _stats([r["wall_ms"] for r in runs]),
        "elapsed_ms": _stats([r["elapsed_ms"] for r in runs]),
        "statuses": sorted({r["status"] for r in runs}),
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


# ---- the run -----------------------------------------------------------------------------------


def targets(processes: list[dict[str, Any]], check: dict[str, Any]) -> list[dict[str, Any]]:
    supervisor = next(p for p in processes if p["process"] == "supervisor")
    return [
        {
            "target": "idle supervisor CPU",
            "goal": f"< {TARGET_SUPERVISOR_PCT:g} % of a core",
            "value": supervisor["cpu_pct"],
            "met": supervisor["cpu_pct"] < TARGET_SUPERVISOR_PCT,
        },
        {
            "target": "check wall time (max)",
            "goal": f"< {TARGET_CHECK_MS:g} ms",
            "value": check["wall_ms"]["max"],
            "met": check["wall_ms"]["max"] < TARGET_CHECK_MS,
        },
    ]


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Run both measurements, print a table (or one JSON object) and return the results.

    A full run from a checkout also writes bench/results/idle-<machine>.json and the generated
    section of docs/recovery.md."""
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    processes = measure_idle(settings)
    check = measure_check(settings)
    result = {
        "benchmark": "idle",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings),
        "processes": processes,
        "check": check,
        "targets": targets(processes, check),
    }
    _print(result, as_json)
    if not quick and report.in_checkout():
        path = report.RESULTS / f"idle-{report.machine_slug(info)}.json"
        report.write_json(path, result)
        report.write_section("idle", markdown(result), path=DOCS)
        click.echo(f"wrote {path} and {DOCS}", err=True)
    return result


# ---- output ------------------------------------------------------------------------------------

_COLUMNS: tuple[report.Column, ...] = (
    ("process", "process", "{}"),
    ("cpu_s", "CPU s", "{:.3f}"),
    ("cpu_pct", "% of a core", "{:.3f}"),
    ("wakeups_per_s", "wake-ups/s", "{:.1f}"),
)


def _check_line(result: dict[str, Any]) -> str:
    check = result["check"]
    return (
        f"`neuralpipe check --json` over {check['rings']} live rings, {check['runs']} runs: wall "
        f"{check['wall_ms']['median']:.0f} ms median ({check['wall_ms']['max']:.0f} ms max, interpreter start "
        f"and imports included); inspection (its elapsed_ms) {check['elapsed_ms']['median']:.2f} ms median "
        f"({check['elapsed_ms']['max']:.2f} ms max); status {', '.join(check['statuses'])}."
    )


def _window_line(result: dict[str, Any]) -> str:
    settings = result["settings"]
    return (
        f"Idle engine (source stopped after {TOKENS} tokens, default timings), measured over "
        f"{settings['idle_s']:g} s after a {settings['settle_s']:g} s pause:"
    )


def _verdict(t: dict[str, Any]) -> str:
    return "met" if t["met"] else "not met"


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/recovery.md for this result."""
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            _window_line(result),
            "",
            report.markdown_table(result["processes"], _COLUMNS),
            "",
            _check_line(result),
            "",
            "| target | goal | measured | |",
            "|---|---|---:|---|",
            *(f"| {t['target']} | {t['goal']} | {t['value']:g} | {_verdict(t)} |" for t in result["targets"]),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo()
    click.echo(_window_line(result))
    click.echo(report.text_table(result["processes"], _COLUMNS))
    click.echo()
    click.echo(_check_line(result))
    for t in result["targets"]:
        click.echo(f"target {t['target']}: {t['value']:g} (goal {t['goal']}): {_verdict(t)}")
