"""``neuralpipe bench recovery``: how long a real engine needs to get tokens flowing again after one
of its workers is killed with SIGKILL, and where that time goes.

A real engine (``python -m engine.cli run``) runs the counting source -> relay -> verifying sink
topology at a steady rate, in a private runtime directory with a fresh instance id. The harness
kills the workers in turn (relay, sink, source, relay, ...) and takes, for each kill:

- gone: when the killed process has been torn down by the kernel (its pidfd becomes readable);
- detect: the supervisor's ``worker_exited`` log event minus the kill (the JSON-lines log stamps
  ``ts`` with ``time.time()``, the clock the kill is timed with);
- respawn: its ``worker_started`` event for the new process minus the kill;
- attach: the first moment the new pid shows in the header of every ring the worker uses (a
  worker attaches its rings right before it says hello to the supervisor);
- flowing: the first moment after that when the read cursor of the sink's input ring moves: the
  sink has verified and released a batch that went through the restarted worker.

Ring headers are read through read-only mappings kept open for the run and polled every 0.5 ms
(a few memory loads, no system call); the log is read only after each recovery. The supervisor's
back-off is pinned at its default initial 10 ms (``backoff_max_s = backoff_initial_s``), so every
kill measures the same mechanism instead of a back-off that doubles with each restart in the
period. At the end the sink's own counters must show no gap.

A second part measures what a worker's start-up is made of: the bare interpreter, the imports a
spawned worker does (``spawn`` re-imports the parent's main module, here ``engine.cli``, then the
worker runtime and its stage), and ``-X importtime`` for the heaviest packages.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
import orjson

from engine.clients.supervisor import EngineNotFound, find_engine, request
from engine.launcher import process_gone
from shm import descriptor as d
from shm.naming import new_instance_id, segment_name
from shm.registry import remove_stale
from shm.ring import read_header
from shm.segment import map_readonly

from . import report
from .proc import BenchError, children

DOCS = report.DOCS.parent / "recovery.md"

# Targets from the issue, reported (never asserted).
TARGET_DETECT_MS = 50.0
TARGET_FLOWING_MS = 1000.0

BACKOFF_S = 0.01  # the supervisor's default backoff_initial_s, pinned (see the module docstring)
POLL_S = 0.0005
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0

SOURCE_RING, SINK_RING = "source-relay", "relay-sink"
VICTIMS = ("relay", "sink", "source")  # the kill rotation
STEPS = ("detect", "respawn", "attach", "flowing")  # what each kill times, in this order
# Where each worker's pid appears once it has attached: (ring, pid word of its end).
ENDS = {
    "source": ((SOURCE_RING, d.PRODUCER_PID_OFFSET),),
    "relay": ((SOURCE_RING, d.CONSUMER_PID_OFFSET), (SINK_RING, d.PRODUCER_PID_OFFSET)),
    "sink": ((SINK_RING, d.CONSUMER_PID_OFFSET),),
}
# What a spawned worker imports: the parent's main module (re-imported by spawn), the runtime,
# the test stages.
WORKER_IMPORTS = "import engine.cli, engine.worker, stages.testing.counter, stages.testing.relay, stages.testing.verify"
# Packages whose import time -X importtime reports (cumulative, so nested ones overlap).
IMPORT_ROOTS = ("site", "engine.cli", "click", "engine.worker", "engine.stage", "numpy", "asyncio", "zmq", "shm")

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    kills: int
    rate: int  # tokens/s the source emits
    settle_s: float  # steady flow observed before each kill
    timeout_s: float  # a recovery step taking longer fails the run
    startup_runs: int  # repeats of each start-up measurement (median reported)


FULL = Settings(kills=30, rate=20_000, settle_s=0.5, timeout_s=15.0, startup_runs=7)
QUICK = Settings(kills=3, rate=20_000, settle_s=0.2, timeout_s=15.0, startup_runs=1)


def topology_toml(rate: float, total: int, relays: int = 1) -> str:
    """The counting source -> relay (x ``relays``) -> verifying sink chain, with the engine's
    defaults; each ring is named after the workers at its ends (``source-relay``, ``relay-sink``)."""
    names = ["source", "relay", *(f"relay{i}" for i in range(2, relays + 1)), "sink"]
    rings = [f"{a}-{b}" for a, b in itertools.pairwise(names)]
    sections = [
        f'[workers.source]\nstage = "counter"\noutputs = ["{rings[0]}"]\n'
        f"params = {{ streams = 4, batch = 16, rate = {rate}, total = {total} }}\n"
    ]
    for name, inp, out in zip(names[1:-1], rings[:-1], rings[1:], strict=True):
        sections.append(f'[workers.{name}]\nstage = "relay"\ninputs = ["{inp}"]\noutputs = ["{out}"]\n')
    sections.append(f'[workers.sink]\nstage = "verify"\ninputs = ["{rings[-1]}"]\nparams = {{ streams = 4 }}\n')
    return "\n".join(sections)


def _recovery_toml(settings: Settings) -> str:
    restarts = 2 * settings.kills  # never escalate during the run
    return f"""
[supervisor]
intensity = {restarts}
period_s = 60.0
backoff_initial_s = {BACKOFF_S}
backoff_max_s = {BACKOFF_S}
{topology_toml(settings.rate, total=0)}"""


# ---- the engine under measurement --------------------------------------------------------------


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
    return value


def _term_with_parent() -> None:
    """Run in the engine's process before exec: the kernel sends it SIGTERM if the bench dies, so
    even a killed bench leaves no engine behind (SIGTERM makes the engine clean up)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def sched_policy_line(policy: str | None) -> str:
    """The ``[engine]`` line that sets the workers' scheduling policy; "" keeps the engine's default."""
    return f'sched_policy = "{policy}"' if policy else ""


class BenchEngine:
    """A real engine, ``python -m engine.cli run``, in a subprocess with its config, runtime
    directory and log in a private temporary directory.

    As a context manager it always cleans up: the engine is stopped with SIGTERM and waited for
    (killed if it does not exit), segments it could not remove are removed, the directory goes."""

    def __init__(self, config: str, label: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"neuralpipe-bench-{label}-")
        self.base = os.path.join(self.tmp, "run")
        self.instance = "bench" + new_instance_id()
        self.config_path = os.path.join(self.tmp, "engine.toml")
        self.log_path = os.path.join(self.tmp, "engine.log")
        Path(self.config_path).write_text(config)
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.exit_code: int | None = None

    def __enter__(self) -> BenchEngine:
        try:
            self._start()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _start(self) -> None:
        env = dict(
            os.environ,
            NEURALPIPE_RUNTIME_DIR=self.base,
            NEURALPIPE_INSTANCE=self.instance,
            NEURALPIPE_METRICS_PORT="0",
            NEURALPIPE_LOG_LEVEL="info",  # the restart events are the measurement
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "run", "--config", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=_term_with_parent,
            )
        self.info = wait_for(self._running, START_TIMEOUT_S, "the engine to report running")

    def _running(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise BenchError(f"engine exited with code {self.proc.returncode} at start:\n{self.log_tail()}")
        with contextlib.suppress(EngineNotFound):
            info = find_engine(self.base, self.instance)
            if info.get("state") == "running":
                return info
        return None

    def status(self) -> dict[str, Any]:
        return request(self.info["control"], "status", timeout_s=5.0)

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in self.status()["workers"]}

    def processes(self) -> dict[str, int]:
        """Name -> pid of every process of the engine as ``status`` and /proc show it now: the
        supervisor, its workers and its helpers (the multiprocessing resource tracker)."""
        workers = {name: w["pid"] for name, w in self.workers().items()}
        helpers = {_label(cmd): pid for pid, cmd in children(self.pid).items() if pid not in workers.values()}
        return {"supervisor": self.pid, **workers, **helpers}

    def events(self) -> list[dict[str, Any]]:
        """Every JSON event logged so far, by the supervisor and the workers (they share stderr)."""
        events = []
        with open(self.log_path, "rb") as f:
            for line in f:
                with contextlib.suppress(orjson.JSONDecodeError):
                    event = orjson.loads(line)
                    if isinstance(event, dict):
                        events.append(event)
        return events

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        return ""

    def close(self) -> None:
        try:
            if self.proc is not None and self.exit_code is None:
                self.exit_code = _stop(self.proc)
        finally:
            remove_stale(self.instance)  # only a killed supervisor leaves segments
            shutil.rmtree(self.tmp, ignore_errors=True)


def _label(cmdline: str) -> str:
    return "resource_tracker" if "resource_tracker" in cmdline else cmdline[:40]


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM (the engine drains and cleans up), then SIGKILL if it is still there."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()  # its workers follow it (parent-death signal)
        return proc.wait()


class RingWatch:
    """One ring's header words read through a read-only mapping kept open for the run: a read is
    a memory load, cheap enough to poll every half millisecond (``read_header`` maps and
    validates the segment on every call)."""

    def __init__(self, segment: str) -> None:
        read_header(segment)  # refuses a segment that is not a valid ring
        self._map = map_readonly(segment)
        self._view = memoryview(self._map)
        self._q = self._view[: d.HEADER_SIZE].cast("Q")

    def word(self, offset: int) -> int:
        return self._q[d.word(offset)]

    def close(self) -> None:
        self._q.release()
        self._view.release()
        self._map.close()


class Pipeline:
    """The running topology as its ring headers show it: who is attached, what the sink took."""

    def __init__(self, instance: str) -> None:
        self.rings = {ring: RingWatch(segment_name(instance, ring)) for ring in (SOURCE_RING, SINK_RING)}

    def pids(self, worker: str) -> list[int]:
        return [self.rings[ring].word(offset) for ring, offset in ENDS[worker]]

    def delivered(self) -> int:
        """Bytes the sink has verified and released (it releases after its bookkeeping)."""
        return self.rings[SINK_RING].word(d.READ_CURSOR_OFFSET)

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()


# ---- kills -------------------------------------------------------------------------------------


def _poll(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """``time.time()`` at the first poll where ``predicate`` holds (POLL_S resolution)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(POLL_S)
    return time.time()


def _wait_steady(pipe: Pipeline, settings: Settings) -> None:
    """Every worker attached and alive, and the sink took data during the last ``settle_s``."""

    def steady() -> bool:
        before = pipe.delivered()
        time.sleep(settings.settle_s)
        attached = all(pid and not process_gone(pid) for worker in ENDS for pid in pipe.pids(worker))
        return attached and pipe.delivered() > before

    wait_for(steady, settings.timeout_s, "tokens to flow steadily through every worker", interval_s=0)


def kill_and_recover(engine: BenchEngine, pipe: Pipeline, worker: str, timeout_s: float) -> dict[str, Any]:
    """Kill ``worker`` with SIGKILL and time its recovery (milliseconds after the kill)."""
    old = pipe.pids(worker)[0]
    killed_at, dead_at = _kill(old, timeout_s)
    attached_at = _poll(lambda: all(p not in (0, old) for p in pipe.pids(worker)), timeout_s, f"a new {worker}")
    # What the sink takes from now on went through the new worker: the old one's last output
    # was drained while its successor started.
    mark = pipe.delivered()
    flowing_at = _poll(lambda: pipe.delivered() > mark, timeout_s, f"tokens through the new {worker}")
    new = pipe.pids(worker)[0]
    exited_at, started_at = _restart_events(engine, worker, new, killed_at)

    def ms(t: float) -> float:
        return round((t - killed_at) * 1e3, 2)

    return {
        "worker": worker,
        "old_pid": old,
        "new_pid": new,
        "dead_ms": ms(dead_at),
        "detect_ms": ms(exited_at),
        "respawn_ms": ms(started_at),
        "attach_ms": ms(attached_at),
        "flowing_ms": ms(flowing_at),
    }


def _kill(pid: int, timeout_s: float) -> tuple[float, float]:
    """SIGKILL ``pid``; ``time.time()`` of the kill and of the moment the process is gone.

    A pidfd becomes readable when the last thread has exited, after the kernel has torn the
    process down and closed its descriptors (the supervisor's sentinel among them); the pid file
    under /proc would not do: it shows a zombie as soon as the main thread is done."""
    pidfd = os.pidfd_open(pid)
    try:
        killed_at = time.time()
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not select.select([pidfd], [], [], timeout_s)[0]:
            raise BenchError(f"pid {pid} still alive {timeout_s:g} s after SIGKILL")
        return killed_at, time.time()
    finally:
        os.close(pidfd)


def _restart_events(engine: BenchEngine, worker: str, new_pid: int, since: float) -> tuple[float, float]:
    """``ts`` of the supervisor's ``worker_exited`` and ``worker_started`` (of ``new_pid``) events."""

    def find() -> tuple[float, float] | None:
        exited = started = None
        for e in engine.events():
            if e.get("stage") != "supervisor" or e.get("worker") != worker or e["ts"] < since:
                continue
            if e["event"] == "worker_exited" and exited is None:
                exited = e["ts"]
            elif e["event"] == "worker_started" and e.get("worker_pid") == new_pid:
                started = e["ts"]
        return (exited, started) if exited is not None and started is not None else None

    return wait_for(find, 5.0, f"the supervisor's restart events for {worker}")


# ---- worker start-up ---------------------------------------------------------------------------


def _wall_ms(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return (time.perf_counter() - start) * 1e3


def _median_wall_ms(argv: list[str], runs: int) -> float:
    return round(statistics.median(_wall_ms(argv) for _ in range(runs)), 1)


def import_times(code: str, roots: tuple[str, ...] = IMPORT_ROOTS) -> dict[str, float]:
    """Cumulative import time in ms of each of ``roots`` that ``code`` imports (-X importtime)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    found: dict[str, float] = {}
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the header line
        name = parts[2].strip()
        if name in roots and name not in found:
            found[name] = round(int(parts[1]) / 1e3, 1)
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def startup_anatomy(runs: int) -> dict[str, Any]:
    """Wall time of a bare interpreter and of a worker's imports, and the heaviest imports."""
    return {
        "interpreter_ms": _median_wall_ms([sys.executable, "-c", "pass"], runs),
        "worker_imports_ms": _median_wall_ms([sys.executable, "-c", WORKER_IMPORTS], runs),
        "import_ms": import_times(WORKER_IMPORTS),
    }


# ---- the run -----------------------------------------------------------------------------------


def measure(settings: Settings, progress: bool) -> dict[str, Any]:
    """Run the engine, kill and time ``settings.kills`` workers, check the sink, stop the engine."""
    with BenchEngine(_recovery_toml(settings), "recovery") as engine:
        pipe = Pipeline(engine.instance)
        try:
            kills = []
            for i in range(settings.kills):
                _wait_steady(pipe, settings)
                kills.append(kill_and_recover(engine, pipe, VICTIMS[i % len(VICTIMS)], settings.timeout_s))
                if progress:
                    click.echo(f"[{i + 1}/{settings.kills}] {_kill_line(kills[-1])}", err=True)
            _wait_steady(pipe, settings)
            workers = engine.workers()
        except BenchError as exc:
            raise BenchError(f"{exc}\n{_diagnosis(engine, pipe)}") from None
        finally:
            pipe.close()
    if engine.exit_code != 0:
        raise BenchError(f"engine exited with code {engine.exit_code} when stopped")
    return {
        "kills": kills,
        "sink": workers["sink"]["stats"],
        "restarts": {n: w["restarts"] for n, w in workers.items()},
    }


def _diagnosis(engine: BenchEngine, pipe: Pipeline) -> str:
    """What a failed run looked like: who the rings say is attached, the engine's last words."""
    pids = {worker: pipe.pids(worker) for worker in ENDS}
    return f"ring pids: {pids}, sink ring read cursor {pipe.delivered()}\nengine log (end):\n{engine.log_tail()}"


def summary(kills: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, p99 and max of each time after the kill, and of each phase between them."""
    series = {key: [k[f"{key}_ms"] for k in kills] for key in STEPS}
    series |= {
        # the kernel tears the killed process down (its threads, its mappings)
        "exit": [k["dead_ms"] for k in kills],
        # the supervisor wakes on the sentinel, reaps, unblocks the rings, logs
        "reap": [k["detect_ms"] - k["dead_ms"] for k in kills],
        # back-off (BACKOFF_S) and Process.start in the supervisor
        "restart_delay": [k["respawn_ms"] - k["detect_ms"] for k in kills],
        # interpreter start, imports, ring attach: the new process until it says hello
        "worker_start": [k["attach_ms"] - k["respawn_ms"] for k in kills],
        # stage start, then the first batch through the rest of the pipeline to the sink
        "first_batch": [k["flowing_ms"] - k["attach_ms"] for k in kills],
    }
    return {key: _stats(values) for key, values in series.items()}


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(float(np.median(values)), 2),
        "p99": round(float(np.percentile(values, 99)), 2),
        "max": round(max(values), 2),
    }


def by_worker(kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for worker in VICTIMS:
        mine = [k for k in kills if k["worker"] == worker]
        if mine:
            row: dict[str, Any] = {"worker": worker, "kills": len(mine)}
            for key in STEPS:
                row[f"{key}_ms"] = round(statistics.median(k[f"{key}_ms"] for k in mine), 2)
            row["flowing_max_ms"] = max(k["flowing_ms"] for k in mine)
            rows.append(row)
    return rows


def targets(stats: dict[str, dict[str, float]], sink: dict[str, int]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the p99 over all kills."""
    return [
        {
            "target": "detect p99",
            "goal": f"< {TARGET_DETECT_MS:g} ms",
            "value": stats["detect"]["p99"],
            "met": stats["detect"]["p99"] < TARGET_DETECT_MS,
        },
        {
            "target": "flowing again p99",
            "goal": f"< {TARGET_FLOWING_MS:g} ms",
            "value": stats["flowing"]["p99"],
            "met": stats["flowing"]["p99"] < TARGET_FLOWING_MS,
        },
        {
            "target": "sink gaps",
            "goal": "0",
            "value": sink.get("gaps", -1),
            "met": sink.get("gaps", -1) == 0 and sink.get("foreign", -1) == 0,
        },
    ]


TOPOLOGIES = ("both", "test", "default")


def main(as_json: bool = False, quick: bool = False, topology: str = "both") -> dict[str, Any]:
    """Run the benchmark on the test topology, the default one or both (one after the other, in
    the same run), print tables (or one JSON object) and return the results.

    A full run from a checkout also writes bench/results/recovery-<machine>.json and the
    generated sections of docs/recovery.md it measured."""
    from . import recovery_default  # imports this module: loaded only when run

    if topology not in TOPOLOGIES:
        raise BenchError(f"topology must be one of {', '.join(TOPOLOGIES)}, not {topology!r}")
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    result: dict[str, Any] = {"benchmark": "recovery", "machine": info, "load_before": load_before}
    if topology in ("both", "test"):
        run = measure(settings, progress=not as_json)
        stats = summary(run["kills"])
        result |= {
            "settings": asdict(settings) | {"backoff_s": BACKOFF_S, "poll_s": POLL_S},
            "kills": run["kills"],
            "summary": stats,
            "by_worker": by_worker(run["kills"]),
            "startup": startup_anatomy(settings.startup_runs),
            "sink": run["sink"],
            "restarts": run["restarts"],
            "targets": targets(stats, run["sink"]),
        }
    if topology in ("both", "default"):
        echo = None if as_json else (lambda line: click.echo(line, err=True))
        result["default"] = recovery_default.run(quick, settings.startup_runs, echo)
    result["load_after"] = report.load()
    _print(result, as_json)
    if not quick and report.in_checkout():
        name = "recovery" if topology == "both" else f"recovery-{topology}"
        path = report.RESULTS / f"{name}-{report.machine_slug(info)}.json"
        report.write_json(path, result)
        if "kills" in result:
            report.write_section("recovery", markdown(result), path=DOCS)
        if "default" in result:
            report.write_section("recovery-default", recovery_default.markdown(result), path=DOCS)
        click.echo(f"wrote {path} and {DOCS}", err=True)
    return result


# ---- output ------------------------------------------------------------------------------------

_KILL_COLUMNS: tuple[report.Column, ...] = (
    ("worker", "worker", "{}"),
    ("dead_ms", "gone ms", "{:.1f}"),
    ("detect_ms", "detect ms", "{:.1f}"),
    ("respawn_ms", "respawn ms", "{:.1f}"),
    ("attach_ms", "attach ms", "{:.1f}"),
    ("flowing_ms", "flowing ms", "{:.1f}"),
)
_WORKER_COLUMNS: tuple[report.Column, ...] = (
    ("worker", "killed", "{}"),
    ("kills", "kills", "{}"),
    ("detect_ms", "detect ms", "{:.1f}"),
    ("respawn_ms", "respawn ms", "{:.1f}"),
    ("attach_ms", "attach ms", "{:.1f}"),
    ("flowing_ms", "flowing ms", "{:.1f}"),
    ("flowing_max_ms", "flowing max ms", "{:.1f}"),
)
_SUMMARY_COLUMNS: tuple[report.Column, ...] = (
    ("what", "after the kill (ms)", "{}"),
    ("median", "median", "{:.1f}"),
    ("p99", "p99", "{:.1f}"),
    ("max", "max", "{:.1f}"),
)
_PHASES = {
    "detect": "detect (worker_exited)",
    "respawn": "respawn (worker_started)",
    "attach": "attach (new pid in the rings)",
    "flowing": "flowing (sink takes a new batch)",
    "exit": "phase: kill -> process gone",
    "reap": "phase: gone -> detect",
    "restart_delay": "phase: detect -> respawn",
    "worker_start": "phase: respawn -> attach",
    "first_batch": "phase: attach -> flowing",
}
_IMPORT_COLUMNS: tuple[report.Column, ...] = (("module", "module", "{}"), ("ms", "cumulative ms", "{:.1f}"))


def _kill_line(kill: dict[str, Any]) -> str:
    return (
        f"{kill['worker']}: detect {kill['detect_ms']:.1f} ms, respawn {kill['respawn_ms']:.1f} ms, "
        f"attach {kill['attach_ms']:.1f} ms, flowing {kill['flowing_ms']:.1f} ms"
    )


def _summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"what": title, **result["summary"][key]} for key, title in _PHASES.items()]


def _import_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"module": name, "ms": ms} for name, ms in result["startup"]["import_ms"].items()]


def _startup_line(result: dict[str, Any]) -> str:
    startup = result["startup"]
    return (
        f"Worker start-up outside the engine (median of {result['settings']['startup_runs']}): "
        f"bare interpreter {startup['interpreter_ms']:.0f} ms; interpreter + a worker's imports "
        f"{startup['worker_imports_ms']:.0f} ms."
    )


def _sink_line(result: dict[str, Any]) -> str:
    sink = result["sink"]
    return (
        f"Sink after {len(result['kills'])} kills: {sink.get('messages', 0):,} tokens delivered once, "
        f"{sink.get('gaps', 0)} missing, {sink.get('duplicates', 0):,} re-sent tokens dropped as duplicates."
    )


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/recovery.md for this result."""
    settings = result["settings"]
    lines = [
        report.machine_line(result["machine"], result["load_before"], result["load_after"]),
        "",
        f"{len(result['kills'])} kills (relay, sink, source in turn) at {settings['rate']:,} tokens/s; "
        f"supervisor back-off {settings['backoff_s'] * 1e3:g} ms; ring headers polled every "
        f"{settings['poll_s'] * 1e3:g} ms.",
        "",
        report.markdown_table(_summary_rows(result), _SUMMARY_COLUMNS),
        "",
        "Medians per killed worker:",
        "",
        report.markdown_table(result["by_worker"], _WORKER_COLUMNS),
        "",
        _startup_line(result) + " Import time (`-X importtime`, cumulative, nested entries overlap):",
        "",
        report.markdown_table(_import_rows(result), _IMPORT_COLUMNS),
        "",
        _sink_line(result),
        "",
        *report.target_table(result["targets"], "{:g}".format),
    ]
    return "\n".join(lines)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    if "kills" in result:
        _print_test(result)
    if "default" in result:
        from . import recovery_default

        click.echo()
        click.echo(recovery_default.text(result))


def _print_test(result: dict[str, Any]) -> None:
    click.echo()
    click.echo(report.text_table(result["kills"], _KILL_COLUMNS))
    click.echo()
    click.echo(report.text_table(_summary_rows(result), _SUMMARY_COLUMNS))
    click.echo()
    click.echo(report.text_table(result["by_worker"], _WORKER_COLUMNS))
    click.echo()
    click.echo(_startup_line(result))
    click.echo(report.text_table(_import_rows(result), _IMPORT_COLUMNS))
    click.echo()
    click.echo(_sink_line(result))
    for line in report.target_lines(result["targets"], "{:g}".format):
        click.echo(line)
