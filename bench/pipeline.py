"""``neuralpipe bench pipeline``: how much paced chat traffic the full pipeline carries, what each
of its processes spends per token, and the latency it adds, over each transport: shared-memory
rings (``shm``), multiprocessing.Queue (``queue``), zmq ipc (``zmq``).

One step: a real engine (``python -m engine.cli run``) runs embedded upstream -> ingest -> compute
-> cache -> broadcast with ``[engine] transport`` set (bench/ring_transports.py) and the upstream paced
per stream so that ``streams`` streams together offer ``offered`` tokens/s. Once every worker is
ready and a warm-up stream went through, the streams (distinct prompts, no cache hit, a fixed
length, ``ignore_eos``) are submitted through engine/protocol/requests.py's RequestClient, their starts
spread over one token interval (chats do not start in lockstep). A consumer process
(engine/clients/consumer.py's StreamConsumer, ``batches()`` of every stream on the binary broadcast
socket) reads continuously from before the load until its end and stamps each batch as it comes.

Every figure covers the steady window only: from ``warmup_s`` after the first submit (start-up,
first connections, the streams' first tokens: left out; or from the last submit, if later) to when
the first stream's last token is due (every stream produces throughout the window).

- ``delivered_tokens_per_s``: tokens the consumer received in the window / its length;
  ``delivered_ratio`` = that / ``offered_tokens_per_s``. ``ingested_tokens_per_s``: tokens ingest
  stamped in the window, to tell a load generator or ingest that fell behind from a backlog after it.
- latency p50/p99/p99.9 of the tokens ingest stamped in the window: the consumer's
  ``time.monotonic_ns()`` when the message came minus the token's ``recv_ns`` (ingest parsing the
  upstream's SSE event; CLOCK_MONOTONIC is system-wide).
- CPU µs per token of each process: utime + stime (``/proc/<pid>/stat``, every thread) over the
  window / tokens delivered in the window. The engine's processes (supervisor, ingest, compute,
  cache, broadcast, the resource tracker) sum to ``engine_cpu_us_per_token``; the load generator
  (the embedded upstream, a child of ingest) and the bench's consumer are reported apart.
- ``missing``: tokens the consumer never got (lost on the way, still queued ``drain_s`` after the
  load, or never produced: ``stream_errors`` counts the streams the engine ended with an error).

A step holds its load when delivered >= 99 %, p99 <= 10 ms and no token or stream is missing. The sweep runs
the ladder of offered rates on each transport, stopping at the first step that does not hold,
then bisects between the last that held and that one; the highest that held is the transport's
``saturation_tokens_per_s``. The upstream's pace is an engine setting, so each step has an engine
of its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import click

from engine.clients.requests import RequestClient
from engine.protocol.requests import ingest_endpoint

from . import report
from .proc import BenchError, ChildProcess, children, cpu_seconds
from .recovery import BenchEngine, sched_policy_line, wait_for
from .ring_transports import REFERENCES

TRANSPORTS = ("shm", "queue", "zmq")
STREAMS = 100
MAX_STREAMS = 2048  # the embedded upstream's max_concurrency below
# When a step holds its load (the sweep's criteria).
HOLD_DELIVERED = 0.99
HOLD_P99_US = 10_000.0
# Targets from the issue, reported (never asserted).
TARGET_LOAD = 10_000.0
TARGET_LOAD_DELIVERED = 0.99
TARGET_LOAD_P99_US = 5_000.0
TARGET_SATURATION = 30_000.0
TARGET_ENGINE_CPU_US = 40.0
TARGET_RING_OVER_QUEUE = 1.5

RING_CAPACITY = 1 << 23  # the queue and zmq transports get the same bound in messages (transport.slots)
WARM_UP_TOKENS = 3
WAIT_S = 30.0  # for the consumer to start, the subscription, the warm-up stream
CONSUMER_LOOK_NS = 20_000_000  # how often a busy consumer looks at its pipe to the bench


@dataclass(frozen=True)
class Settings:
    streams: int
    ladder: tuple[float, ...]  # offered tokens/s, tried in turn until a step does not hold
    halvings: int  # when the ladder's first step does not hold: at most this many steps halving it
    bisections: int  # then steps between the last that held and the first that did not
    retries: int  # a step that did not hold is run again up to this many times (other work can spoil one)
    always: tuple[float, ...]  # offered tokens/s also run when the sweep did not (the targets' load)
    duration_s: float  # each stream's length at its pace
    warmup_s: float  # after the first submit, left out of every figure
    drain_s: float  # after the load, how long its last tokens may take to come
    target_runs: int = 1  # runs at the targets' load on the rings that held: its target figures are their medians
    flush_ms: float | None = None  # ingest's flush window (None: the engine's default)
    pin: bool = False  # ingest (and the load around it) on one CPU, compute, cache and broadcast on another
    sched_policy: str | None = None  # the workers' scheduling policy (None: the engine's default)


FULL = Settings(
    streams=STREAMS,
    ladder=(
        2_500.0,
        5_000.0,
        10_000.0,
        20_000.0,
        30_000.0,
        40_000.0,
        60_000.0,
        80_000.0,
        100_000.0,
        120_000.0,
        160_000.0,
    ),
    halvings=3,
    bisections=1,
    retries=1,
    always=(TARGET_LOAD,),
    target_runs=3,
    duration_s=6.0,
    warmup_s=1.0,
    drain_s=3.0,
)
QUICK = Settings(
    streams=20,
    ladder=(1_000.0,),
    halvings=0,
    bisections=0,
    retries=0,
    always=(),
    duration_s=2.0,
    warmup_s=0.5,
    drain_s=2.0,
)


def pinned_cpus() -> tuple[int, int]:
    """(the CPU of ingest, its embedded upstream and the bench's consumer; the CPU of compute, cache
    and broadcast) for ``--pin``: the first two this process may run on."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        raise ValueError(f"--pin needs 2 CPUs; this process may run on {len(usable)}")
    return usable[0], usable[1]


def engine_toml(
    transport: str,
    tokens_per_s: float,
    flush_ms: float | None = None,
    pin: bool = False,
    sched_policy: str | None = None,
) -> str:
    """The full topology over ``transport``; the upstream paced at ``tokens_per_s`` per stream
    (0: unpaced); limits per client far above the load (one client submits everything); ingest's
    flush window ``flush_ms`` (None: its default); with ``pin``, each worker's ``cpus``
    (:func:`pinned_cpus`; the embedded upstream is ingest's child: on its CPU)."""
    flush = "" if flush_ms is None else f"params.flush_ms = {flush_ms}"
    io_cpu, chain_cpu = pinned_cpus() if pin else (None, None)
    ingest_cpus, chain_cpus = (f"cpus = [{io_cpu}]", f"cpus = [{chain_cpu}]") if pin else ("", "")
    return f"""
[engine]
transport = "{REFERENCES[transport]}"
{sched_policy_line(sched_policy)}

[ring_defaults]
capacity = {RING_CAPACITY}

[workers.ingest]
stage = "ingest"
outputs = ["ingest-compute"]
{ingest_cpus}
params.client_requests_per_s = 1e6
params.client_burst = 1e6
params.client_tokens_per_s = 1e9
params.client_burst_tokens = 1e9
params.queue_bound = 100000
{flush}
params.embedded = {{ tokens_per_s = {tokens_per_s}, max_concurrency = {MAX_STREAMS} }}

[workers.compute]
stage = "compute"
{chain_cpus}
inputs = ["ingest-compute"]
outputs = ["compute-cache"]
params.backend = "numpy"

[workers.cache]
stage = "cache"
{chain_cpus}
inputs = ["compute-cache"]
outputs = ["cache-broadcast"]
params.snapshot_path = ""

[workers.broadcast]
stage = "broadcast"
{chain_cpus}
inputs = ["cache-broadcast"]
params.sndhwm = 1000000
"""


# ---- the consumer process -----------------------------------------------------------------------


def _consume(runtime_dir: str, conn: Any) -> None:
    """Consumer process: read the broadcast's batches continuously (engine/clients/consumer.py's
    ``batches``: every stream's rows of one record, numpy columns), keeping the ``recv_ns`` of each
    batch's token rows and the moment the batch came, and counting the streams that ended (end or
    error rows); between batches (every CONSUMER_LOOK_NS while busy) answer the bench:
    ``("wait", streams, deadline)`` -> the streams ended since the last take, once that many have
    or at the deadline; ``("take",)`` -> (recv_ns, arrival_ns, {"ended", "errors"}) since the
    last take; None -> exit."""
    import numpy as np

    from engine.clients.consumer import StreamConsumer
    from engine.protocol import wire

    stamps: list[np.ndarray] = []
    arrivals: list[int] = []
    ended = {"ended": 0, "errors": 0}
    waiting: tuple[int, float] | None = None
    with StreamConsumer.for_engine(runtime_dir, binary=True) as consumer:

        def done() -> bool:
            return waiting is not None and ended["ended"] + ended["errors"] >= waiting[0]

        conn.send("ready")
        while True:
            look_at = time.monotonic_ns() + CONSUMER_LOOK_NS
            for batch in consumer.batches(idle_timeout_s=CONSUMER_LOOK_NS / 1e9):
                now = time.monotonic_ns()
                kind = batch.columns["kind"]
                stamps.append(batch.columns["recv_ns"][kind == wire.TOKEN])  # a copy: not a view of the frame
                arrivals.append(now)
                ended["ended"] += int(np.count_nonzero(kind == wire.END))
                ended["errors"] += int(np.count_nonzero(kind == wire.ERROR))
                if now >= look_at or done():
                    break
            if waiting is not None and (done() or time.monotonic() >= waiting[1]):
                conn.send(ended["ended"] + ended["errors"])
                waiting = None
            while conn.poll(0):
                ask = conn.recv()
                if ask is None:
                    return
                if ask[0] == "wait":
                    waiting = ask[1], ask[2]
                else:
                    recv = np.concatenate(stamps).astype(np.int64) if stamps else np.empty(0, np.int64)
                    arrival = np.repeat(np.array(arrivals, np.int64), [len(s) for s in stamps])
                    conn.send((recv, arrival, ended))
                    stamps, arrivals, ended = [], [], {"ended": 0, "errors": 0}


class Consumer(ChildProcess):
    """The consumer process of one engine and the pipe to it."""

    def __init__(self, runtime_dir: str) -> None:
        super().__init__(_consume, (runtime_dir,), "bench consumer", WAIT_S)

    def wait(self, streams: int, timeout_s: float) -> int:
        """Streams ended since the last take, once ``streams`` have or after ``timeout_s``."""
        self.conn.send(("wait", streams, time.monotonic() + timeout_s))
        return self.answer(timeout_s + WAIT_S)

    def take(self) -> tuple[Any, Any, dict[str, int]]:
        """recv_ns and arrival time (ns) of each token received since the last take, and the
        streams that ended since, normally (``ended``) or with an error (``errors``)."""
        self.conn.send(("take",))
        return self.answer(WAIT_S)


# ---- one step -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    transport: str
    offered: float  # tokens/s of all streams together
    streams: int
    tokens: int  # per stream

    @property
    def pace(self) -> float:
        """Tokens/s of each stream."""
        return self.offered / self.streams


def plan(transport: str, offered: float, settings: Settings) -> Load:
    """The load of one step; a ValueError says why ``offered`` cannot be measured with ``settings``."""
    if not 0 < offered <= 1e6:
        raise ValueError(f"offered tokens/s must be in (0, 1,000,000], not {offered:g}")
    if not 1 <= settings.streams <= MAX_STREAMS:
        raise ValueError(f"streams must be 1..{MAX_STREAMS}, not {settings.streams}")
    if settings.duration_s - settings.warmup_s < 0.5:
        raise ValueError(f"duration must exceed the {settings.warmup_s:g} s warm-up by at least 0.5 s")
    load = Load(transport, offered, settings.streams, round(offered / settings.streams * settings.duration_s))
    if (load.tokens - 1) / load.pace - settings.warmup_s < 0.5:
        raise ValueError(
            f"{offered:g} tokens/s over {settings.streams} streams is {load.pace:g} tokens/s a stream: "
            f"too few tokens in {settings.duration_s:g} s; offer more or use fewer streams or a longer duration"
        )
    return load


def _chat(label: str, i: int, tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"{label} {i}"}], "max_tokens": tokens, "ignore_eos": True}


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _warm_up(engine: BenchEngine, consumer: Consumer, label: str, pace: float) -> None:
    """One short stream through the whole pipeline; the consumer sees it, then forgets it."""
    with RequestClient(ingest_endpoint(engine.info["runtime_dir"]), timeout_s=WAIT_S) as client:
        client.submit(_chat(f"{label} warm-up", 0, WARM_UP_TOKENS))
    consumer.wait(1, WAIT_S + WARM_UP_TOKENS / pace)
    recv_ns, _, ended = consumer.take()
    if len(recv_ns) != WARM_UP_TOKENS or ended["ended"] != 1:
        raise BenchError(f"{label}: the warm-up stream did not go through ({ended}, {len(recv_ns)} tokens)")


def _submit(engine: BenchEngine, load: Load, label: str) -> int:
    """Submit the load's streams, their starts spread over one token interval; the first submit's
    time (ns)."""
    spacing_ns = 1e9 / load.pace / load.streams
    with RequestClient(ingest_endpoint(engine.info["runtime_dir"]), timeout_s=WAIT_S) as client:
        first = time.monotonic_ns()
        for i in range(load.streams):
            _sleep_until(first + round(i * spacing_ns))
            client.submit(_chat(label, i, load.tokens))
    return first


def _processes(engine: BenchEngine, consumer: Consumer) -> tuple[dict[str, int], dict[str, int]]:
    """(the engine's processes, the load's: upstream and consumer), name -> pid."""
    engine_pids = engine.processes()
    upstream = [pid for pid, cmd in children(engine_pids["ingest"]).items() if "resource_tracker" not in cmd]
    if len(upstream) != 1:
        raise BenchError(f"expected one embedded upstream under ingest, found {len(upstream)}")
    return engine_pids, {"upstream": upstream[0], "consumer": consumer.proc.pid}


def _pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` onto ``cpu`` (threads it starts later inherit it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    try:
        return {name: cpu_seconds(pid) for name, pid in pids.items()}
    except FileNotFoundError as exc:
        raise BenchError(f"a process ended during the load: {exc.filename}") from None


def _restarts(engine: BenchEngine) -> dict[str, int]:
    return {name: w["restarts"] for name, w in engine.workers().items()}


def run_step(load: Load, settings: Settings) -> dict[str, Any]:
    """Run one load on an engine of its own; its row (see the module docstring)."""
    label = f"{load.transport} {load.offered:g}"
    config = engine_toml(load.transport, load.pace, settings.flush_ms, settings.pin, settings.sched_policy)
    with (
        BenchEngine(config, f"pipeline-{load.transport}") as engine,
        Consumer(engine.info["runtime_dir"]) as consumer,
    ):
        # a SUB socket misses what is published before its subscription reaches the XPUB
        wait_for(
            lambda: engine.workers()["broadcast"]["stats"].get("subscriptions", 0) > 0,
            WAIT_S,
            "the consumer's subscription to reach the broadcast",
            interval_s=0.05,
        )
        _warm_up(engine, consumer, label, load.pace)
        engine_pids, load_pids = _processes(engine, consumer)
        if settings.pin:  # the measuring consumer beside ingest, as the upstream is
            _pin(load_pids["consumer"], pinned_cpus()[0])
        restarts = _restarts(engine)
        first = _submit(engine, load, label)
        # a load so heavy that submitting outlasts the warm-up starts the window when every stream is in
        window = (
            max(first + round(settings.warmup_s * 1e9), time.monotonic_ns()),
            first + round((load.tokens - 1) / load.pace * 1e9),
        )
        if window[1] - window[0] < 0.5e9:
            raise BenchError(f"{label}: submitting the streams took most of their {settings.duration_s:g} s")
        _sleep_until(window[0])
        cpu_before = _cpu(engine_pids | load_pids)
        _sleep_until(window[1])
        cpu_after = _cpu(engine_pids | load_pids)
        consumer.wait(load.streams, 2 / load.pace + settings.drain_s)
        recv_ns, arrival_ns, counts = consumer.take()
        if _restarts(engine) != restarts:
            raise BenchError(f"{label}: a worker restarted during the load\n{engine.log_tail()}")
    cpu_s = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    return row(load, window, recv_ns, arrival_ns, counts, cpu_s, list(engine_pids))


def row(
    load: Load,
    window: tuple[int, int],
    recv_ns: Any,
    arrival_ns: Any,
    counts: dict[str, int],
    cpu_s: dict[str, float],
    engine_names: list[str],
) -> dict[str, Any]:
    """A step's figures from what the consumer received and the processes' CPU seconds over the
    window (``engine_names``: the processes summed as the engine's)."""
    import numpy as np

    start, end = window
    window_s = (end - start) / 1e9
    delivered = int(np.count_nonzero((arrival_ns >= start) & (arrival_ns < end)))
    stamped = (recv_ns >= start) & (recv_ns < end)
    if not delivered or not stamped.any():
        raise BenchError(f"{load.transport} {load.offered:g}: no token came in the measured window")
    p50, p99, p999 = np.percentile((arrival_ns - recv_ns)[stamped], (50, 99, 99.9)) / 1e3
    by_process = {name: round(seconds * 1e6 / delivered, 2) for name, seconds in cpu_s.items()}
    result = {
        "transport": load.transport,
        "streams": load.streams,
        "tokens_per_stream": load.tokens,
        "offered_tokens_per_s": load.offered,
        "delivered_tokens_per_s": round(delivered / window_s),
        "delivered_ratio": round(delivered / window_s / load.offered, 4),
        "ingested_tokens_per_s": round(int(np.count_nonzero(stamped)) / window_s),
        "window_s": round(window_s, 3),
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "p999_us": round(float(p999), 1),
        "missing": load.streams * load.tokens - len(recv_ns),  # never received (reported, never hidden)
        "stream_errors": counts["errors"],  # streams that ended with an error, not their last token
        "engine_cpu_us_per_token": round(sum(by_process[name] for name in engine_names), 2),
        "cpu_us_per_token_by_process": by_process,
        # how busy each process was (100: one core): a process that spins shows here, whatever it delivered
        "cpu_percent_by_process": {name: round(100 * seconds / window_s, 1) for name, seconds in cpu_s.items()},
    }
    result["held"] = (
        result["delivered_ratio"] >= HOLD_DELIVERED
        and result["p99_us"] <= HOLD_P99_US
        and result["missing"] == 0
        and result["stream_errors"] == 0
    )
    return result


# ---- the sweep ------------------------------------------------------------------------------------


def sweep(transport: str, settings: Settings, progress: bool) -> list[dict[str, Any]]:
    """The ladder until a step does not hold (halving the first step's rate while even that does
    not), then ``bisections`` steps between the last that held and the first that did not, then
    the ``always`` loads not run yet; a step that does not hold is tried ``retries`` more times
    before it counts. Every step's row, by offered tokens/s."""
    rows: list[dict[str, Any]] = []

    def step(offered: float, attempts: int = 1 + settings.retries) -> bool:
        for _ in range(attempts):
            rows.append(run_step(plan(transport, offered, settings), settings))
            if progress:
                click.echo(f"  {_progress_line(rows[-1])}", err=True)
            if rows[-1]["held"]:
                return True
        return False

    held, failed = None, None
    for offered in settings.ladder:
        if not step(offered):
            failed = offered
            break
        held = offered
    for _ in range(settings.halvings if held is None else 0):
        if step(failed / 2):
            held = failed / 2
            break
        failed /= 2
    for _ in range(settings.bisections if held is not None and failed is not None else 0):
        middle = round((held + failed) / 2, -2)
        if middle in (held, failed):
            break
        if step(middle):
            held = middle
        else:
            failed = middle
    for offered in settings.always:
        if all(r["offered_tokens_per_s"] != offered for r in rows):
            step(offered, attempts=1)
    if transport == "shm":  # the targets' figures: a median, not one run's luck with the scheduler
        held_at_target = sum(r["held"] for r in rows if r["offered_tokens_per_s"] == TARGET_LOAD)
        for _ in range(settings.target_runs - held_at_target if held_at_target else 0):
            step(TARGET_LOAD, attempts=1)
    return sorted(rows, key=lambda r: r["offered_tokens_per_s"])


def saturation(rows: list[dict[str, Any]], transport: str) -> float | None:
    """The highest offered tokens/s that held on ``transport`` (None: none did)."""
    return max((r["offered_tokens_per_s"] for r in rows if r["transport"] == transport and r["held"]), default=None)


def ratios(saturations: dict[str, float | None], topped: set[str]) -> list[dict[str, Any]]:
    """The rings' saturation point over each other transport's; ``lower_bound`` where the rings
    held at the ladder's top (their saturation is higher than the sweep went), none where the other
    transport did too (unknown)."""
    shm = saturations.get("shm")
    return [
        {"versus": transport, "shm_over": round(shm / rate, 2), "lower_bound": "shm" in topped}
        for transport, rate in saturations.items()
        if transport != "shm" and shm and rate and transport not in topped
    ]


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets; ``met`` None where this run did not measure it."""
    at_target = [
        r
        for r in result["rows"]
        if r["transport"] == "shm" and r["offered_tokens_per_s"] == TARGET_LOAD and r["streams"] == STREAMS
    ]
    runs = [r for r in at_target if r["held"]] or at_target[:1]  # the runs that held (a retry's), else the one

    def median(key: str) -> float | None:
        return statistics.median(r[key] for r in runs) if runs else None

    at_load = f"{TARGET_LOAD:,.0f} tokens/s over {STREAMS} streams, shm" + (
        f", median of {len(runs)} runs" if len(runs) > 1 else ""
    )
    queue = next((r["shm_over"] for r in result["ratios"] if r["versus"] == "queue"), None)

    def target(name: str, goal: str, value: float | None, met: Any) -> dict[str, Any]:
        return {"target": name, "goal": goal, "value": value, "met": None if value is None else bool(met(value))}

    return [
        target(
            f"delivered / offered at {at_load}",
            f">= {TARGET_LOAD_DELIVERED:g}",
            median("delivered_ratio"),
            lambda v: v >= TARGET_LOAD_DELIVERED,
        ),
        target(
            f"p99 latency (µs) at {at_load}",
            f"<= {TARGET_LOAD_P99_US:,.0f}",
            median("p99_us"),
            lambda v: v <= TARGET_LOAD_P99_US,
        ),
        target(
            f"engine CPU µs per token at {at_load}",
            f"<= {TARGET_ENGINE_CPU_US:g}",
            median("engine_cpu_us_per_token"),
            lambda v: v <= TARGET_ENGINE_CPU_US,
        ),
        target(
            "saturation over the rings (tokens/s)",
            f">= {TARGET_SATURATION:,.0f}",
            result["saturation_tokens_per_s"].get("shm"),
            lambda v: v >= TARGET_SATURATION,
        ),
        target(
            "rings / Queue at saturation",
            f">= {TARGET_RING_OVER_QUEUE:g}x",
            queue,
            lambda v: v >= TARGET_RING_OVER_QUEUE,
        ),
    ]


def _engine_source() -> str:
    """Where the engine this bench starts is imported from (its subprocess has our environment
    and working directory): tells a run against an older checkout from one against this one."""
    spec = importlib.util.find_spec("engine")
    return os.path.dirname(spec.origin) if spec and spec.origin else "unknown"


def main(
    as_json: bool = False,
    quick: bool = False,
    transports: tuple[str, ...] = (),
    offered: float | None = None,
    streams: int | None = None,
    duration_s: float | None = None,
    flush_ms: float | None = None,
    pin: bool = False,
    sched_policy: str | None = None,
) -> dict[str, Any]:
    """Run the sweep (or, with ``offered``, one step per transport), print a table (or one JSON
    object) and return the results. A full default sweep of every transport from a checkout
    also writes bench/results/pipeline-<machine>.json and the generated section of
    docs/benchmarks.md."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise click.BadParameter(f"unknown transport(s) {', '.join(sorted(unknown))}; choose from {TRANSPORTS}")
    chosen = tuple(t for t in TRANSPORTS if t in transports) if transports else TRANSPORTS
    settings = QUICK if quick else FULL
    if streams is not None:
        settings = replace(settings, streams=streams)
    if duration_s is not None:
        settings = replace(settings, duration_s=duration_s)
    if flush_ms is not None:
        settings = replace(settings, flush_ms=flush_ms)
    if sched_policy is not None:
        settings = replace(settings, sched_policy=sched_policy)
    if pin:
        try:
            pinned_cpus()
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        settings = replace(settings, pin=True)
    if offered is not None:
        settings = replace(settings, ladder=(offered,), halvings=0, bisections=0, retries=0, always=(), target_runs=1)
    try:
        for rate in (*settings.ladder, *settings.always, settings.ladder[0] / 2**settings.halvings):
            plan(chosen[0], rate, settings)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    info, load_before = report.machine(), report.load()
    rows = []
    for transport in chosen:
        rows += sweep(transport, settings, progress=not as_json)
    swept = offered is None
    saturations = {t: saturation(rows, t) if swept else None for t in chosen}
    # held at the ladder's last step: the saturation point is above what the sweep offered
    topped = {t for t, rate in saturations.items() if rate is not None and rate >= settings.ladder[-1]}
    result = {
        "benchmark": "pipeline",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "engine_source": _engine_source(),
        "settings": asdict(settings)
        | {
            "mode": "sweep" if swept else "targeted",
            "ring_capacity": RING_CAPACITY,
            "hold": {"delivered_ratio": HOLD_DELIVERED, "p99_us": HOLD_P99_US, "missing": 0, "stream_errors": 0},
        },
        "rows": rows,
        "saturation_tokens_per_s": saturations,
        "saturation_above_ladder": sorted(topped),
        "ratios": ratios(saturations, topped),
    }
    result["targets"] = targets(result)
    _print(result, as_json)
    if settings == FULL and chosen == TRANSPORTS:
        report.publish("pipeline", info, result, markdown(result))
    return result


# ---- output ---------------------------------------------------------------------------------------

PROCESS_COLUMNS = ("supervisor", "ingest", "compute", "cache", "broadcast", "upstream", "consumer")

_LOAD_COLUMNS: tuple[report.Column, ...] = (
    ("transport", "transport", "{}"),
    ("offered_tokens_per_s", "offered tokens/s", "{:,.0f}"),
    ("streams", "streams", "{:,}"),
    ("ingested_tokens_per_s", "ingested tokens/s", "{:,}"),
    ("delivered_tokens_per_s", "delivered tokens/s", "{:,}"),
    ("delivered_ratio", "delivered", "{:.1%}"),
    ("p50_us", "p50 µs", "{:,.0f}"),
    ("p99_us", "p99 µs", "{:,.0f}"),
    ("p999_us", "p99.9 µs", "{:,.0f}"),
    ("missing", "missing", "{:,}"),
    ("stream_errors", "errors", "{:,}"),
    ("verdict", "holds", "{}"),
)
_CPU_COLUMNS: tuple[report.Column, ...] = (
    ("transport", "transport", "{}"),
    ("offered_tokens_per_s", "offered tokens/s", "{:,.0f}"),
    ("engine_cpu_us_per_token", "engine", "{:.1f}"),
    *((name, name, "{:.1f}") for name in PROCESS_COLUMNS),
)
_SATURATION_COLUMNS: tuple[report.Column, ...] = (
    ("transport", "transport", "{}"),
    ("saturation", "saturation tokens/s", "{}"),
    ("shm_over", "shm ÷ theirs", "{}"),
)


def _display_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows flattened for the tables: each process's µs per token as a column of its own."""
    return [
        r
        | {"verdict": "yes" if r["held"] else "no"}
        | {name: r["cpu_us_per_token_by_process"].get(name, 0.0) for name in PROCESS_COLUMNS}
        for r in result["rows"]
    ]


def _saturation_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    over = {r["versus"]: (">= " if r["lower_bound"] else "") + f"{r['shm_over']:.2f}" for r in result["ratios"]}
    topped = result["saturation_above_ladder"]
    return [
        {
            "transport": transport,
            "saturation": (">= " if transport in topped else "") + _value_text(rate),
            "shm_over": over.get(transport, ""),
        }
        for transport, rate in result["saturation_tokens_per_s"].items()
    ]


def _value_text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _progress_line(r: dict[str, Any]) -> str:
    return (
        f"{r['transport']} {r['offered_tokens_per_s']:,.0f} tokens/s offered over {r['streams']} streams: "
        f"delivered {r['delivered_ratio']:.1%}, p99 {r['p99_us']:,.0f} µs, missing {r['missing']} "
        f"({r['stream_errors']} streams ended in error), "
        f"engine {r['engine_cpu_us_per_token']:.1f} µs/token: {'holds' if r['held'] else 'does not hold'}"
    )


def _settings_line(result: dict[str, Any]) -> str:
    s = result["settings"]
    return (
        f"{s['streams']} streams paced per stream, each {s['duration_s']:g} s long; the first "
        f"{s['warmup_s']:g} s after the first submit left out; ingest's flush window "
        + (f"{s['flush_ms']:g} ms" if s["flush_ms"] is not None else "its default")
        + ("; workers pinned (ingest, upstream and consumer on one CPU, the rest on another)" if s["pin"] else "")
        + (f"; workers' scheduling policy {s['sched_policy']}" if s.get("sched_policy") else "")
        + f"; a step holds with delivered >= "
        f"{HOLD_DELIVERED:.0%}, p99 <= {HOLD_P99_US / 1e3:g} ms, no token missing and no stream error"
        + (f"; one that did not is run {s['retries']} more time(s) before it counts" if s["retries"] else "")
        + (
            f"; the targets' load over the rings is run {s['target_runs']} times (when it holds) and its target "
            "figures are the medians."
            if s["target_runs"] > 1
            else "."
        )
    )


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/benchmarks.md for this result."""
    rows = _display_rows(result)
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            _settings_line(result),
            "",
            report.markdown_table(rows, _LOAD_COLUMNS),
            "",
            "CPU µs per delivered token (engine = its processes summed; upstream and consumer apart):",
            "",
            report.markdown_table(rows, _CPU_COLUMNS),
            "",
            report.markdown_table(_saturation_rows(result), _SATURATION_COLUMNS),
            "",
            *report.target_table(result["targets"], _value_text),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    rows = _display_rows(result)
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo(_settings_line(result))
    click.echo()
    click.echo(report.text_table(rows, _LOAD_COLUMNS))
    click.echo()
    click.echo("CPU µs per delivered token:")
    click.echo(report.text_table(rows, _CPU_COLUMNS))
    click.echo()
    click.echo(report.text_table(_saturation_rows(result), _SATURATION_COLUMNS))
    for line in report.target_lines(result["targets"], _value_text):
        click.echo(line)
