"""The default-topology part of ``neuralpipe bench recovery``: embedded upstream -> ingest ->
compute -> cache -> broadcast under paced chat load, one worker killed at a time.

A real engine runs the default topology (the default params of every stage) with the embedded
upstream paced at ``pace`` tokens/s a stream. A submitter thread keeps about ``streams`` streams
open: it submits a stream of ``tokens`` tokens (distinct prompts: no cache hit) every
``tokens / pace / streams`` seconds. A consumer process (engine/clients/consumer.py's StreamConsumer on the
binary socket, every stream) checks every stream it gets: rows in seq order without a gap or a
repeat, ended by END after all its tokens or by an explicit ERROR row. The harness kills compute,
cache, broadcast in turn, and ingest last (a killed ingest ends its open streams with an error
row: expected, counted apart). For each kill, in ms after the kill:

- gone: the killed process's pidfd becomes readable (the kernel has torn it down);
- detect / respawn: the supervisor's ``worker_exited`` / ``worker_started`` events;
- attach: the new pid in the header of every ring the worker uses (its runtime attaches them
  before it imports its stage: spawn, the interpreter and the runtime's imports);
- ready: the new pid shows ``ready`` in ``status`` (its stage is set up; polled every
  STATUS_POLL_S, so this step has that resolution);
- flowing: the consumer receives a token that ingest stamped (``recv_ns``) after the kill: a
  token that went through the new worker (for ingest: the first token of a stream it took).
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from engine.clients.requests import RequestClient
from engine.protocol.requests import RequestError, ingest_endpoint
from shm import descriptor as d
from shm.naming import segment_name

from . import report
from .proc import BenchError, ChildProcess
from .recovery import BACKOFF_S, BenchEngine, RingWatch, _kill, _poll, _restart_events, wait_for

ROLES = ("compute", "cache", "broadcast", "ingest")  # the kill rotation; ingest's kills come last
STEPS = ("detect", "respawn", "attach", "ready", "flowing")
# Where each role's pid appears once its runtime attached its rings (before it imports its stage):
# (ring, pid word of its end).
ENDS = {
    "ingest": (("ingest-compute", d.PRODUCER_PID_OFFSET),),
    "compute": (("ingest-compute", d.CONSUMER_PID_OFFSET), ("compute-cache", d.PRODUCER_PID_OFFSET)),
    "cache": (("compute-cache", d.CONSUMER_PID_OFFSET), ("cache-broadcast", d.PRODUCER_PID_OFFSET)),
    "broadcast": (("cache-broadcast", d.CONSUMER_PID_OFFSET),),
}
STATUS_POLL_S = 0.005
WAIT_S = 30.0
LOOK_NS = 2_000_000  # how often a busy consumer looks at its pipe to the bench (the flowing step's resolution)
CONSUMER_HISTORY = 50_000  # batches remembered (arrival, newest token stamp) for the flowing query
SUBMIT_TIMEOUT_S = 0.25  # a submit lost with a killed ingest: the next one soon (ingest replies at once)


@dataclass(frozen=True)
class DefaultSettings:
    kills_per_role: int
    streams: int  # open at once, about
    pace: float  # tokens/s of each stream
    tokens: int  # per stream
    settle_s: float  # steady flow observed before each kill
    timeout_s: float  # a recovery step taking longer fails the run

    @property
    def offered(self) -> float:
        return self.streams * self.pace


DEFAULT_FULL = DefaultSettings(kills_per_role=8, streams=100, pace=50.0, tokens=150, settle_s=0.5, timeout_s=20.0)
DEFAULT_QUICK = DefaultSettings(kills_per_role=1, streams=100, pace=50.0, tokens=50, settle_s=0.3, timeout_s=20.0)


def default_toml(settings: DefaultSettings, kills: int) -> str:
    """The default topology (stage defaults), the embedded upstream paced; back-off pinned as in
    the test topology's run, and no escalation during the run."""
    return f"""
[supervisor]
intensity = {2 * kills + 10}
period_s = 60.0
backoff_initial_s = {BACKOFF_S}
backoff_max_s = {BACKOFF_S}

[workers.ingest]
stage = "ingest"
outputs = ["ingest-compute"]
params.embedded = {{ tokens_per_s = {settings.pace} }}

[workers.compute]
stage = "compute"
inputs = ["ingest-compute"]
outputs = ["compute-cache"]

[workers.cache]
stage = "cache"
inputs = ["compute-cache"]
outputs = ["cache-broadcast"]

[workers.broadcast]
stage = "broadcast"
inputs = ["cache-broadcast"]
"""


# ---- the consumer process -------------------------------------------------------------------------


class _Check:
    """Per stream: the next seq expected, tokens seen, how it ended."""

    def __init__(self) -> None:
        self.next: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.ended: dict[int, str] = {}
        self.gaps = self.repeats = self.after_end = 0

    def rows(self, sids: Any, seqs: Any, kinds: Any, synthetic: bool) -> None:
        from engine.protocol import wire

        for sid, seq, kind in zip(sids.tolist(), seqs.tolist(), kinds.tolist(), strict=True):
            if sid in self.ended:
                self.after_end += 1
                continue
            expected = self.next.get(sid)
            if expected is not None and seq != expected and not synthetic:
                if seq < expected:
                    self.repeats += 1
                    continue
                self.gaps += 1
            self.next[sid] = seq + 1
            if kind == wire.TOKEN:
                self.tokens[sid] = self.tokens.get(sid, 0) + 1
            elif kind == wire.END:
                self.ended[sid] = "end"
            elif kind == wire.ERROR:
                self.ended[sid] = "synthetic" if synthetic else "error"

    def report(self, tokens: int) -> dict[str, Any]:
        ends = [self.ended.get(sid) for sid in self.next]
        short = sum(1 for sid, how in self.ended.items() if how == "end" and self.tokens.get(sid, 0) != tokens)
        return {
            "streams": len(self.next),
            "ended": ends.count("end"),
            "errors": ends.count("error"),
            "synthetic_errors": ends.count("synthetic"),  # ended at the client: lost (a failure)
            "open": ends.count(None),
            "incomplete": short,  # ended by END without all their tokens
            "gaps": self.gaps,
            "repeats": self.repeats,
            "rows_after_end": self.after_end,
            "tokens": sum(self.tokens.values()),
            "ended_ids": sorted(self.ended),
        }


def _consume(runtime_dir: str, tokens: int, conn: Any) -> None:
    """Consumer process: read every stream's batches, check them (_Check), remember each batch's
    arrival and newest token stamp; answer the bench: ("after", t_ns) -> the arrival (monotonic
    ns) of the first batch with a token stamped after ``t_ns`` (None if none came within
    WAIT_S); ("report",) -> the check's report; None -> exit."""
    import numpy as np

    from engine.clients.consumer import StreamConsumer
    from engine.protocol import wire

    check = _Check()
    history: deque[tuple[int, int]] = deque(maxlen=CONSUMER_HISTORY)
    query: tuple[int, float] | None = None
    with StreamConsumer.for_engine(runtime_dir, binary=True) as consumer:
        if not consumer.join():
            raise RuntimeError("the engine's broadcast did not answer")
        conn.send("ready")
        while True:
            look_at = time.monotonic_ns() + LOOK_NS
            for batch in consumer.batches(idle_timeout_s=LOOK_NS / 1e9):
                now = time.monotonic_ns()
                cols = batch.columns
                kinds = cols["kind"]
                check.rows(cols["stream_id"], cols["seq"], kinds, bool(batch.header.get("synthetic")))
                stamps = cols["recv_ns"][kinds == wire.TOKEN]
                if len(stamps):
                    history.append((now, int(np.max(stamps))))
                if now >= look_at or (query is not None and history and history[-1][1] > query[0]):
                    break
            if query is not None:
                found = next((at for at, newest in history if newest > query[0]), None)
                if found is not None or time.monotonic() > query[1]:
                    conn.send(found)
                    query = None
            while conn.poll(0):
                ask = conn.recv()
                if ask is None:
                    return
                if ask[0] == "after":
                    query = ask[1], time.monotonic() + WAIT_S
                else:
                    conn.send(check.report(tokens) | {"client": dict(consumer.counts)})


class Consumer(ChildProcess):
    """The checking consumer process and the pipe to it."""

    def __init__(self, runtime_dir: str, tokens: int) -> None:
        super().__init__(_consume, (runtime_dir, tokens), "bench consumer", WAIT_S)

    def ask(self, *question: Any) -> None:
        self.conn.send(question)

    def answer(self, timeout_s: float = 2 * WAIT_S) -> Any:
        return super().answer(timeout_s)


class Submitter(threading.Thread):
    """Submits a stream every ``tokens / pace / streams`` s until stopped; a submit that fails
    (ingest down or restarting) is counted and the next one goes at its time."""

    def __init__(self, runtime_dir: str, settings: DefaultSettings) -> None:
        super().__init__(name="bench-submitter", daemon=True)
        self.endpoint = ingest_endpoint(runtime_dir)
        self.settings = settings
        self.interval_s = settings.tokens / settings.pace / settings.streams
        self.accepted: list[int] = []
        self.failed = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the bench, never lost in a thread
            self.error = exc

    def _run(self) -> None:
        client = RequestClient(self.endpoint, timeout_s=SUBMIT_TIMEOUT_S)
        try:
            due = time.monotonic()
            for i in itertools.count():
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                due += self.interval_s
                body = {
                    "messages": [{"role": "user", "content": f"recovery {i}"}],
                    "max_tokens": self.settings.tokens,
                    "ignore_eos": True,
                }
                try:
                    self.accepted.append(client.submit(body))
                except (RequestError, TimeoutError):
                    self.failed += 1
                    # a timed-out call can leave the socket waiting: a fresh one for the next
                    client.close()
                    client = RequestClient(self.endpoint, timeout_s=SUBMIT_TIMEOUT_S)
                    due = max(due, time.monotonic())
        finally:
            client.close()

    def finish(self) -> None:
        self.stop.set()
        self.join(WAIT_S)
        if self.error is not None:
            raise BenchError(f"the submitter failed: {self.error!r}")


# ---- one kill --------------------------------------------------------------------------------------


def _worker(engine: BenchEngine, role: str) -> dict[str, Any]:
    return engine.workers()[role]


def _wait_steady(engine: BenchEngine, consumer: Consumer, settings: DefaultSettings) -> None:
    """Every worker ready, and a token stamped after now reaches the consumer."""
    wait_for(
        lambda: all(w["ready"] and w["pid"] for w in engine.workers().values()),
        settings.timeout_s,
        "every worker ready",
        interval_s=0.05,
    )
    time.sleep(settings.settle_s)  # load running; the ring states settle after the last restart
    consumer.ask("after", time.monotonic_ns())
    if consumer.answer() is None:
        raise BenchError("no token reached the consumer in steady state")


class Rings:
    """The default topology's ring headers: who is attached to each."""

    def __init__(self, instance: str) -> None:
        names = {ring for ends in ENDS.values() for ring, _ in ends}
        self.rings = {ring: RingWatch(segment_name(instance, ring)) for ring in names}

    def pids(self, role: str) -> list[int]:
        return [self.rings[ring].word(offset) for ring, offset in ENDS[role]]

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()


def kill_default(engine: BenchEngine, consumer: Consumer, rings: Rings, role: str, timeout_s: float) -> dict[str, Any]:
    """Kill ``role`` with SIGKILL and time its recovery (ms after the kill)."""
    old = _worker(engine, role)["pid"]
    wgpu_before = _maps_wgpu(old) if role == "compute" else None
    kill_ns = time.monotonic_ns()
    killed_at, dead_at = _kill(old, timeout_s)
    consumer.ask("after", kill_ns)
    attached_at = _poll(lambda: all(p not in (0, old) for p in rings.pids(role)), timeout_s, f"a new {role}")

    def ready() -> int | None:
        w = _worker(engine, role)
        return w["pid"] if w["pid"] not in (0, None, old) and w["ready"] else None

    new = wait_for(ready, timeout_s, f"a new {role} to be ready", interval_s=STATUS_POLL_S)
    ready_at = time.time()
    flowing_ns = consumer.answer()
    if flowing_ns is None:
        raise BenchError(f"no token went through the new {role} within {WAIT_S:g} s")
    exited_at, started_at = _restart_events(engine, role, new, killed_at)
    # what the new compute chose its backend from: a remembered probe, or a probe again (wgpu)
    backend = [e.get("reason") for e in engine.events() if e.get("pid") == new and e["event"] == "compute_backend"]
    wgpu = _maps_wgpu(new) if role == "compute" else None

    def ms(t: float) -> float:
        return round((t - killed_at) * 1e3, 2)

    return {
        "worker": role,
        "old_pid": old,
        "new_pid": new,
        "dead_ms": ms(dead_at),
        "detect_ms": ms(exited_at),
        "respawn_ms": ms(started_at),
        "attach_ms": ms(attached_at),
        "ready_ms": ms(ready_at),
        "flowing_ms": round((flowing_ns - kill_ns) / 1e6, 2),
        **(
            {"backend": backend[0] if backend else None, "old_wgpu_loaded": wgpu_before, "wgpu_loaded": wgpu}
            if role == "compute"
            else {}
        ),
    }


def _maps_wgpu(pid: int) -> bool | None:
    """Whether ``pid`` has wgpu's native library mapped (None: the process is gone)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any("libwgpu" in line for line in maps)
    except OSError:
        return None


# ---- the run -----------------------------------------------------------------------------------------


def measure_default(settings: DefaultSettings, progress: Any = None) -> dict[str, Any]:
    """Run the default topology under load, kill each role ``kills_per_role`` times (ingest last),
    then stop the load, let every stream end and take the consumer's check."""
    order = [*(ROLES[:-1] * settings.kills_per_role), *(["ingest"] * settings.kills_per_role)]
    with (
        BenchEngine(default_toml(settings, len(order)), "recovery-default") as engine,
        Consumer(engine.info["runtime_dir"], settings.tokens) as consumer,
    ):
        wait_for(
            lambda: engine.workers()["broadcast"]["stats"].get("subscriptions", 0) > 0,
            WAIT_S,
            "the consumer's subscription to reach the broadcast",
            interval_s=0.05,
        )
        submitter = Submitter(engine.info["runtime_dir"], settings)
        submitter.start()
        rings = Rings(engine.instance)
        kills = []
        try:
            for i, role in enumerate(order):
                _wait_steady(engine, consumer, settings)
                kills.append(kill_default(engine, consumer, rings, role, settings.timeout_s))
                if progress is not None:
                    progress(f"[default {i + 1}/{len(order)}] {_kill_line(kills[-1])}")
            _wait_steady(engine, consumer, settings)
        except BenchError as exc:
            raise BenchError(f"{exc}\nengine log (end):\n{engine.log_tail()}") from None
        finally:
            rings.close()
            submitter.finish()
        accepted = set(submitter.accepted)
        # every accepted stream ends: its last token is due tokens / pace after its submit
        deadline = time.monotonic() + settings.tokens / settings.pace + WAIT_S

        def all_ended() -> dict[str, Any] | None:
            consumer.ask("report")
            report = consumer.answer()
            done = accepted <= set(report["ended_ids"]) or time.monotonic() > deadline
            return report if done else None

        check = wait_for(all_ended, settings.tokens / settings.pace + 2 * WAIT_S, "every stream to end", 0.2)
        restarts = {name: w["restarts"] for name, w in engine.workers().items()}
    ended = set(check.pop("ended_ids"))
    check |= {
        "submitted": len(accepted),
        "submit_failures": submitter.failed,
        "never_seen": len(accepted - ended),  # accepted, never ended at the consumer: lost
    }
    return {"kills": kills, "check": check, "restarts": restarts, "order": order}


def _kill_line(kill: dict[str, Any]) -> str:
    return (
        f"{kill['worker']}: gone {kill['dead_ms']:.1f} ms, detect {kill['detect_ms']:.1f} ms, "
        f"respawn {kill['respawn_ms']:.1f} ms, attach {kill['attach_ms']:.1f} ms, ready {kill['ready_ms']:.1f} ms, "
        f"flowing {kill['flowing_ms']:.1f} ms"
    )


# ---- what dominates a worker's start-up ----------------------------------------------------------

STAGE_MODULES = {
    "ingest": "stages.ingest.stage",
    "compute": "stages.compute.stage",
    "cache": "stages.cache.stage",
    "broadcast": "stages.broadcast.stage",
}
# Packages whose import time -X importtime reports for each role (cumulative: nested ones overlap).
DEFAULT_IMPORT_ROOTS = ("site", "engine.cli", "engine.worker", "numpy", "zmq", "aiohttp", "asyncio", "uvloop", "wgpu")


def startup_by_role(runs: int) -> list[dict[str, Any]]:
    """Per role: wall time of an interpreter doing what a spawned worker of that role imports
    (the supervisor's main module, the runtime, the stage), and its heaviest imports."""
    from .recovery import _median_wall_ms, import_times

    rows = []
    for role, module in STAGE_MODULES.items():
        code = f"import engine.cli, engine.worker, {module}"
        imports = import_times(code, (*DEFAULT_IMPORT_ROOTS, module))
        rows.append(
            {
                "worker": role,
                "imports_ms": _median_wall_ms([sys.executable, "-c", code], runs),
                "stage_module_ms": imports.pop(module, 0.0),
                "import_ms": imports,
            }
        )
    return rows


# ---- summary and report ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    return {
        "median": round(float(np.median(values)), 2),
        "p99": round(float(np.percentile(values, 99)), 2),
        "max": round(max(values), 2),
    }


def phases(kill: dict[str, Any]) -> dict[str, float]:
    """The steps of one kill as the phases between them (ms)."""
    return {
        "exit": kill["dead_ms"],  # the kernel tears the process down
        "reap": round(kill["detect_ms"] - kill["dead_ms"], 2),  # the supervisor sees the sentinel
        "restart_delay": round(kill["respawn_ms"] - kill["detect_ms"], 2),  # back-off, Process.start
        "runtime_start": round(kill["attach_ms"] - kill["respawn_ms"], 2),  # interpreter, runtime imports, rings
        "stage_start": round(kill["ready_ms"] - kill["attach_ms"], 2),  # stage imports, start/set-up
        # the first post-kill token to the consumer after ready (negative: it came before the
        # STATUS_POLL_S poll saw ready)
        "first_token": round(kill["flowing_ms"] - kill["ready_ms"], 2),
    }


def by_role(kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per killed role: median and p99 of each step and phase."""
    rows = []
    for role in ROLES:
        mine = [k for k in kills if k["worker"] == role]
        if not mine:
            continue
        series = {f"{step}_ms": [k[f"{step}_ms"] for k in mine] for step in ("dead", *STEPS)}
        series |= {f"{name}_ms": [phases(k)[name] for k in mine] for name in phases(mine[0])}
        row: dict[str, Any] = {"worker": role, "kills": len(mine)}
        for key, values in series.items():
            stats = _stats(values)
            row[key.replace("_ms", "_p50_ms")] = stats["median"]
            row[key.replace("_ms", "_p99_ms")] = stats["p99"]
        rows.append(row)
    return rows


def targets(kills: list[dict[str, Any]], check: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on this topology (reported, never asserted); ingest's flowing again
    apart: it restarts the embedded upstream with it, and its clients must submit again."""
    from .recovery import TARGET_DETECT_MS, TARGET_FLOWING_MS

    detect = _stats([k["detect_ms"] for k in kills])["p99"]
    rows = [
        {"target": "detect p99 (every kill)", "goal": f"< {TARGET_DETECT_MS:g} ms", "value": detect},
    ]
    for label, roles in (("compute, cache, broadcast", ("compute", "cache", "broadcast")), ("ingest", ("ingest",))):
        mine = [k["flowing_ms"] for k in kills if k["worker"] in roles]
        if mine:
            rows.append(
                {
                    "target": f"flowing again p99 ({label})",
                    "goal": f"< {TARGET_FLOWING_MS:g} ms",
                    "value": _stats(mine)["p99"],
                }
            )
    for row in rows:
        row["met"] = row["value"] < float(row["goal"].split()[1])
    lost = check["never_seen"] + check["open"] + check["synthetic_errors"] + check["incomplete"]
    wrong = check["gaps"] + check["repeats"] + check["rows_after_end"]
    bad = lost + wrong
    rows.append({"target": "streams lost or with a gap/repeat", "goal": "0", "value": bad, "met": bad == 0})
    return rows


def run(quick: bool, startup_runs: int, progress: Any = None) -> dict[str, Any]:
    """The default-topology part: measure, summarise, profile the start-up."""
    settings = DEFAULT_QUICK if quick else DEFAULT_FULL
    measured = measure_default(settings, progress)
    return {
        "settings": asdict(settings) | {"offered_tokens_per_s": settings.offered, "status_poll_s": STATUS_POLL_S},
        "kills": measured["kills"],
        "by_role": by_role(measured["kills"]),
        "check": measured["check"],
        "restarts": measured["restarts"],
        "startup": startup_by_role(startup_runs),
        "targets": targets(measured["kills"], measured["check"]),
    }


_ROLE_COLUMNS: tuple[report.Column, ...] = (
    ("worker", "killed", "{}"),
    ("kills", "kills", "{}"),
    ("dead_p50_ms", "gone p50", "{:.0f}"),
    ("detect_p50_ms", "detect p50", "{:.0f}"),
    ("detect_p99_ms", "detect p99", "{:.0f}"),
    ("respawn_p50_ms", "respawn p50", "{:.0f}"),
    ("attach_p50_ms", "attach p50", "{:.0f}"),
    ("ready_p50_ms", "ready p50", "{:.0f}"),
    ("ready_p99_ms", "ready p99", "{:.0f}"),
    ("flowing_p50_ms", "flowing p50", "{:.0f}"),
    ("flowing_p99_ms", "flowing p99", "{:.0f}"),
)
_PHASE_COLUMNS: tuple[report.Column, ...] = (
    ("worker", "killed", "{}"),
    ("exit_p50_ms", "kill -> gone", "{:.1f}"),
    ("reap_p50_ms", "gone -> detect", "{:.1f}"),
    ("restart_delay_p50_ms", "detect -> respawn", "{:.1f}"),
    ("runtime_start_p50_ms", "respawn -> attach", "{:.1f}"),
    ("stage_start_p50_ms", "attach -> ready", "{:.1f}"),
    ("first_token_p50_ms", "ready -> flowing", "{:.1f}"),
)
_STARTUP_COLUMNS: tuple[report.Column, ...] = (
    ("worker", "worker", "{}"),
    ("imports_ms", "interpreter + imports ms", "{:.0f}"),
    ("stage_module_ms", "stage module ms", "{:.0f}"),
    ("heaviest", "heaviest imports (cumulative ms)", "{}"),
)


def _startup_rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        row | {"heaviest": ", ".join(f"{name} {ms:.0f}" for name, ms in list(row["import_ms"].items())[:4])}
        for row in part["startup"]
    ]


def _lines(result: dict[str, Any], table: Any) -> list[str]:
    part = result["default"]
    s, check = part["settings"], part["check"]
    return [
        f"Default topology (embedded upstream -> ingest -> compute -> cache -> broadcast, stage defaults): "
        f"~{s['streams']} streams of {s['tokens']} tokens at {s['pace']:g} tokens/s each "
        f"({s['offered_tokens_per_s']:,.0f} tokens/s offered), a wildcard consumer checking every stream; "
        f"{len(part['kills'])} kills (compute, cache, broadcast in turn, then ingest); supervisor back-off "
        f"{BACKOFF_S * 1e3:g} ms; ready polled every {s['status_poll_s'] * 1e3:g} ms. In ms after the kill:",
        "",
        table(part["by_role"], _ROLE_COLUMNS),
        "",
        "Medians of the phases between the steps (ms):",
        "",
        table(part["by_role"], _PHASE_COLUMNS),
        "",
        "Worker start-up outside the engine, per role (what its spawn imports; median wall, -X importtime):",
        "",
        table(_startup_rows(part), _STARTUP_COLUMNS),
        "",
        f"Consumer: {check['streams']:,} streams ({check['submitted']:,} accepted, {check['submit_failures']} submits "
        f"refused or timed out while ingest restarted), {check['tokens']:,} tokens; {check['ended']:,} complete, "
        f"{check['errors']} ended by an explicit error row (ingest kills), {check['never_seen']} never ended, "
        f"{check['gaps']} gaps, {check['repeats']} repeats, {check['incomplete']} short.",
        "",
    ]


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """Per role: its flowing-again median over the test topology's, measured in the same run (the
    machine's load moves both; their ratio much less)."""
    if "summary" not in result:
        return {}
    test = result["summary"]["flowing"]["median"]
    return {row["worker"]: round(row["flowing_p50_ms"] / test, 2) for row in result["default"]["by_role"]}


def _ratio_lines(result: dict[str, Any]) -> list[str]:
    found = ratios(result)
    if not found:
        return []
    test = result["summary"]["flowing"]["median"]
    each = ", ".join(f"{role} {ratio:.2f}x" for role, ratio in found.items())
    return [f"Flowing again, median, over the test topology's in the same run ({test:.0f} ms): {each}.", ""]


def markdown(result: dict[str, Any]) -> str:
    """The generated default-topology section of docs/recovery.md."""
    lines = [
        report.machine_line(result["machine"], result["load_before"], result["load_after"]),
        "",
        *_lines(result, report.markdown_table),
        *_ratio_lines(result),
        *report.target_table(result["default"]["targets"], "{:g}".format),
    ]
    return "\n".join(lines)


def text(result: dict[str, Any]) -> str:
    """The default-topology part for the terminal."""
    kills = report.text_table(result["default"]["kills"], _KILL_COLUMNS)
    lines = [kills, "", *_lines(result, report.text_table), *_ratio_lines(result)]
    lines += report.target_lines(result["default"]["targets"], "{:g}".format)
    return "\n".join(lines)


_KILL_COLUMNS: tuple[report.Column, ...] = (
    ("worker", "worker", "{}"),
    ("dead_ms", "gone ms", "{:.1f}"),
    ("detect_ms", "detect ms", "{:.1f}"),
    ("respawn_ms", "respawn ms", "{:.1f}"),
    ("attach_ms", "attach ms", "{:.1f}"),
    ("ready_ms", "ready ms", "{:.1f}"),
    ("flowing_ms", "flowing ms", "{:.1f}"),
)
