"""``neuralpipe bench idle``: what an engine with nothing to do costs, and how long
``neuralpipe check`` takes.

Idle: real engines (a counting source -> relays -> verifying sink chain with the engine's default
timings: one relay, then eleven), whose source stops after one 16-token batch. Once the sink has
that batch and a settling pause has passed, the harness reads each process's CPU time (utime +
stime of ``/proc/<pid>/stat``, in clock ticks) and its voluntary context switches over all its
threads (each one is a sleep that ended in a wake-up) at the start and the end of the idle window,
and reports CPU as a percentage of one core and wake-ups per second; it sleeps meanwhile. A
process that busy-polls shows as whole percents and thousands of wake-ups. Two sizes, because an
idle supervisor's work grows with the number of workers (each sends heartbeats). Then the default
topology (no config file: the embedded upstream, ingest, compute, cache, broadcast, gateway), idle from the
moment it reports running: the workers whose stages serve sockets (cache, broadcast) must park
like the rest, not poll their sockets.

Check: on the larger engine, idle, with its twelve rings attached at both ends, ``python -m
engine.cli check --json --instance <id>`` runs several times: its wall time as an operator sees it
(interpreter start and imports included) and the ``elapsed_ms`` it reports for the inspection.
"""

from __future__ import annotations

import contextlib
import glob
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import click

from . import report
from .proc import BenchError, cpu_seconds
from .recovery import DOCS, BenchEngine, topology_toml, wait_for

# Targets: the for the supervisor; "well under a second" (DESIGN.md) for check.
TARGET_SUPERVISOR_PCT = 1.0
TARGET_CHECK_MS = 1000.0
TARGET_WORKERS_PCT = 1.0  # issue 11: an idle engine's workers use ~no CPU

TOKENS = 16  # one batch, then the source idles
RELAYS = (1, 11)  # engine sizes: 3 workers and 2 rings, 13 workers and 12 rings (check runs on this one)


@dataclass(frozen=True)
class Settings:
    idle_s: float  # the measured idle window
    settle_s: float  # after the last token, before the window opens
    check_runs: int


FULL = Settings(idle_s=10.0, settle_s=2.0, check_runs=10)
QUICK = Settings(idle_s=2.0, settle_s=0.5, check_runs=3)


# ---- idle CPU ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    switches: int  # voluntary context switches, all threads


def usage(pid: int) -> Usage:
    """CPU seconds (user + system, every thread) and voluntary context switches of ``pid``."""
    switches = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:  # a thread may have just ended
            switches += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return Usage(cpu_seconds(pid), switches)


def _wait_idle(engine: BenchEngine, settings: Settings) -> None:
    """Wait until the sink has the source's only batch, then let start-up settle."""
    wait_for(
        lambda: engine.workers()["sink"]["stats"].get("messages") == TOKENS, 60, f"the sink to get {TOKENS} tokens"
    )
    time.sleep(settings.settle_s)


def idle_window(engine: BenchEngine, settings: Settings) -> list[dict[str, Any]]:
    """CPU % of a core and wake-ups per second of each engine process over the idle window."""
    processes = engine.processes()
    start, began = {name: usage(pid) for name, pid in processes.items()}, time.monotonic()
    time.sleep(settings.idle_s)
    end, elapsed = {name: usage(pid) for name, pid in processes.items()}, time.monotonic() - began
    if any(w["restarts"] for w in engine.workers().values()):
        raise BenchError("a worker restarted during the idle window")
    rows = [_usage_row(name, processes[name], start[name], end[name], elapsed) for name in processes]
    workers = [r for r in rows if r["process"] not in ("supervisor", "resource_tracker")]
    return [*rows, _sum_row("workers (all)", workers, elapsed), _sum_row("engine (all)", rows, elapsed)]


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


def _sum_row(name: str, rows: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    total = Usage(sum(r["cpu_s"] for r in rows), sum(r["wakeups"] for r in rows))
    return _usage_row(name, 0, Usage(0.0, 0), total, elapsed)


def measure_default_topology(settings: Settings) -> dict[str, Any]:
    """The default topology (an empty config), idle: CPU and wake-ups of each process."""
    with BenchEngine("", "idle-default") as engine:
        time.sleep(settings.settle_s)
        result = {"workers": len(engine.workers()), "processes": idle_window(engine, settings)}
    if engine.exit_code != 0:
        raise BenchError(f"engine exited with code {engine.exit_code} when stopped")
    return result


def measure_engine(relays: int, settings: Settings, time_check: bool) -> dict[str, Any]:
    """Start an engine with ``relays`` relays, let it go idle and measure its processes; with
    ``time_check``, then time ``neuralpipe check`` against its rings."""
    with BenchEngine(topology_toml(rate=2000, total=TOKENS, relays=relays), "idle") as engine:
        _wait_idle(engine, settings)
        result: dict[str, Any] = {"workers": relays + 2, "rings": relays + 1}
        result["processes"] = idle_window(engine, settings)
        if time_check:
            result["check"] = measure_check(engine.instance, relays + 1, settings.check_runs)
    if engine.exit_code != 0:
        raise BenchError(f"engine exited with code {engine.exit_code} when stopped")
    return result


# ---- check -------------------------------------------------------------------------------------


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


def measure_check(instance: str, rings: int, count: int) -> dict[str, Any]:
    """Wall time and reported ``elapsed_ms`` of ``count`` runs of ``neuralpipe check --json`` over
    an engine's rings."""
    runs = [_run_check(instance, rings) for _ in range(count)]
    return {
        "rings": rings,
        "runs": count,
        "wall_ms": _stats([r["wall_ms"] for r in runs]),
        "elapsed_ms": _stats([r["elapsed_ms"] for r in runs]),
        "statuses": sorted({r["status"] for r in runs}),
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


# ---- the run -----------------------------------------------------------------------------------


def _process(engine: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in engine["processes"] if p["process"] == name)


def targets(engines: list[dict[str, Any]], check: dict[str, Any], default: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for engine in engines:
        pct = _process(engine, "supervisor")["cpu_pct"]
        found.append(
            {
                "target": f"idle supervisor CPU, {engine['workers']} workers",
                "goal": f"< {TARGET_SUPERVISOR_PCT:g} % of a core",
                "value": pct,
                "met": pct < TARGET_SUPERVISOR_PCT,
            }
        )
    workers_pct = _process(default, "workers (all)")["cpu_pct"]
    found.append(
        {
            "target": "idle workers CPU, default topology (all together)",
            "goal": f"< {TARGET_WORKERS_PCT:g} % of a core",
            "value": workers_pct,
            "met": workers_pct < TARGET_WORKERS_PCT,
        }
    )
    found.append(
        {
            "target": "check wall time (max)",
            "goal": f"< {TARGET_CHECK_MS:g} ms",
            "value": check["wall_ms"]["max"],
            "met": check["wall_ms"]["max"] < TARGET_CHECK_MS,
        }
    )
    return found


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Run both measurements, print tables (or one JSON object) and return the results.

    A full run from a checkout also writes bench/results/idle-<machine>.json and the generated
    section of docs/recovery.md."""
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    engines = [measure_engine(relays, settings, time_check=relays == RELAYS[-1]) for relays in RELAYS]
    check = engines[-1].pop("check")
    default = measure_default_topology(settings)
    result = {
        "benchmark": "idle",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings),
        "engines": engines,
        "check": check,
        "default_topology": default,
        "targets": targets(engines, check, default),
    }
    _print(result, as_json)
    if not quick:
        report.publish("idle", info, result, markdown(result), docs=DOCS)
    return result


# ---- output ------------------------------------------------------------------------------------

_COLUMNS: tuple[report.Column, ...] = (
    ("process", "process", "{}"),
    ("cpu_s", "CPU s", "{:.3f}"),
    ("cpu_pct", "% of a core", "{:.3f}"),
    ("wakeups_per_s", "wake-ups/s", "{:.1f}"),
)
_SIZE_COLUMNS: tuple[report.Column, ...] = (
    ("workers", "workers", "{}"),
    ("supervisor_pct", "supervisor % of a core", "{:.2f}"),
    ("supervisor_wakeups", "supervisor wake-ups/s", "{:.1f}"),
    ("workers_pct", "workers (all) %", "{:.2f}"),
    ("engine_pct", "engine (all) %", "{:.2f}"),
    ("engine_wakeups", "engine wake-ups/s", "{:.1f}"),
)


def _size_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per engine size: the supervisor against the whole engine."""
    rows = []
    for engine in result["engines"]:
        supervisor, everything = _process(engine, "supervisor"), _process(engine, "engine (all)")
        rows.append(
            {
                "workers": engine["workers"],
                "supervisor_pct": supervisor["cpu_pct"],
                "supervisor_wakeups": supervisor["wakeups_per_s"],
                "workers_pct": _process(engine, "workers (all)")["cpu_pct"],
                "engine_pct": everything["cpu_pct"],
                "engine_wakeups": everything["wakeups_per_s"],
            }
        )
    return rows


def _check_line(result: dict[str, Any]) -> str:
    check, workers = result["check"], result["engines"][-1]["workers"]
    return (
        f"`neuralpipe check --json` over the {check['rings']} rings of the idle {workers}-worker "
        f"engine, {check['runs']} runs: wall {check['wall_ms']['median']:.0f} ms median "
        f"({check['wall_ms']['max']:.0f} ms max, interpreter start and imports included); inspection (its "
        f"elapsed_ms) {check['elapsed_ms']['median']:.2f} ms median ({check['elapsed_ms']['max']:.2f} ms max); "
        f"status {', '.join(check['statuses'])}."
    )


def _window_line(result: dict[str, Any], engine: dict[str, Any]) -> str:
    settings = result["settings"]
    return (
        f"Idle engine of {engine['workers']} workers (source stopped after {TOKENS} tokens, default timings), "
        f"over {settings['idle_s']:g} s after a {settings['settle_s']:g} s pause:"
    )


def _default_line(result: dict[str, Any]) -> str:
    settings = result["settings"]
    return (
        f"Idle default topology (no config file: embedded upstream, ingest, compute, cache, broadcast, gateway), "
        f"over {settings['idle_s']:g} s after a {settings['settle_s']:g} s pause once running:"
    )


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/recovery.md for this result: the small engine's processes,
    then the supervisor's cost by engine size."""
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            _window_line(result, result["engines"][0]),
            "",
            report.markdown_table(result["engines"][0]["processes"], _COLUMNS),
            "",
            "By engine size:",
            "",
            report.markdown_table(_size_rows(result), _SIZE_COLUMNS),
            "",
            _default_line(result),
            "",
            report.markdown_table(result["default_topology"]["processes"], _COLUMNS),
            "",
            _check_line(result),
            "",
            *report.target_table(result["targets"], "{:g}".format),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    for engine in result["engines"]:
        click.echo()
        click.echo(_window_line(result, engine))
        click.echo(report.text_table(engine["processes"], _COLUMNS))
    click.echo()
    click.echo(report.text_table(_size_rows(result), _SIZE_COLUMNS))
    click.echo()
    click.echo(_default_line(result))
    click.echo(report.text_table(result["default_topology"]["processes"], _COLUMNS))
    click.echo()
    click.echo(_check_line(result))
    for line in report.target_lines(result["targets"], "{:g}".format):
        click.echo(line)
