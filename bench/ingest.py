"""``neuralpipe bench ingest``: how many tokens per second the ingest worker puts into its ring
from the embedded upstream with 1, 100 and 1,000 concurrent streams, and the latency it adds
from an SSE event's arrival to its batch's commit in the ring.

A real engine (``python -m engine.cli run``) runs ingest -> verifying sink, with the embedded
upstream started by the ingest worker (over real HTTP on loopback, in its own process). Requests
go in through the ingest ROUTER with ``ignore_eos`` and a fixed ``max_tokens``, so every stream
has a known length. A load's requests are pipelined on one DEALER (all sent at once, the replies
taken while sampling): one request at a time waits a turn of the busy event loop for each, and
1,000 streams took about 8 s to submit that way, so most had ended before the last one started.

- Throughput: the upstream unpaced. All streams of a load are submitted at once; the write
  cursor in the header of the ingest worker's ring is sampled every POLL_S (a memory load through
  a read-only mapping) until it stands still and the worker's ``tokens`` counter has them all. Bytes become
  tokens by the load's bytes per row (every row of a load is alike: START, TOKEN..., END).
  Reported: the steady rate between 10 % and 90 % of the bytes, and the overall rate from the
  first submit to the last commit. (The worker's own counter is not sampled for the rate: it
  comes with its heartbeats, which a saturated event loop sends late.)
- Added latency: the upstream paced per stream; the ingest worker's ``latency_p50_us`` and
  ``latency_p99_us`` (SSE event parsed -> batch committed, over its last 4,096 tokens) are read
  while the streams are running.
- CPU per token, every run: the CPU time (utime + stime of ``/proc/<pid>/stat``) the ingest
  worker and, apart, the embedded upstream (the load generator, its child process on the same
  cores) spent from the first submit to the last commit, divided by the load's tokens. The
  headline is the paced load of issue 11: 100 streams at 100 tokens/s each (10k tokens/s).

At the end of each engine the sink must have every row, in order: its ``gaps`` must be 0.
"""

from __future__ import annotations

import contextlib
import glob
import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import click
import orjson
import zmq

from engine.config import EngineConfig
from engine.protocol.requests import ingest_endpoint
from shm import descriptor as d
from shm.naming import segment_name

from . import report
from .idle import usage
from .proc import BenchError
from .recovery import BenchEngine, RingWatch, sched_policy_line, wait_for

DOCS = report.DOCS.parent / "ingest.md"

# Targets from the issue, reported (never asserted).
TARGET_TOKENS_PER_S = 200_000.0  # with 1,000 streams
TARGET_P99_US = 200.0
TARGET_CPU_US_PER_TOKEN = 10.0  # ingest, paced 100 x 100 tokens/s

# the engine's default: the CPU measured includes what heartbeats cost a deployment (a bench's
# 10 Hz, for fresher status figures, cost ingest ~0.3 µs per token more at the paced load)
HEARTBEAT_S = EngineConfig().heartbeat_interval_s
POLL_S = 0.002  # ring cursor samples
QUIET_S = 0.2  # the cursor standing still this long: time to ask whether the load is done
RING = "ingest-sink"
RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Settings:
    unpaced: tuple[tuple[int, int], ...]  # (streams, tokens per stream)
    paced: tuple[tuple[int, float, int], ...]  # (streams, tokens/s per stream, tokens per stream)
    cpu: tuple[int, float, int]  # the paced load whose CPU per token is the headline (issue 11)
    # runs of it on one engine after a short warm-up run; the headline is the median run (one
    # run's figure moves by a few tenths of a µs: /proc counts CPU in 10 ms ticks, the machine is shared)
    cpu_runs: int = 3
    # the paced upstream writes every stream's tokens on one clock, as a batching server does
    decode_steps: bool = False
    sched_policy: str | None = None  # the workers' scheduling policy (None: the engine's default)


FULL = Settings(
    unpaced=((1, 32768), (100, 2000), (1000, 200)),
    paced=((100, 20.0, 120), (1000, 20.0, 120)),
    cpu=(100, 100.0, 500),
)
QUICK = Settings(unpaced=((1, 2000), (100, 40), (1000, 4)), paced=((100, 20.0, 30),), cpu=(100, 100.0, 150), cpu_runs=1)


def engine_toml(tokens_per_s: float, decode_steps: bool = False, sched_policy: str | None = None) -> str:
    """Ingest -> verifying sink; limits per client far above the load (one client submits all)."""
    steps = ", decode_steps = true" if decode_steps else ""
    return f"""
[engine]
heartbeat_interval_s = {HEARTBEAT_S}
{sched_policy_line(sched_policy)}

[ring_defaults]
capacity = {1 << 23}

[workers.ingest]
stage = "ingest"
outputs = ["ingest-sink"]
params.client_requests_per_s = 1e6
params.client_burst = 1e6
params.client_tokens_per_s = 1e9
params.client_burst_tokens = 1e9
params.queue_bound = 100000
params.embedded = {{ tokens_per_s = {tokens_per_s}, max_concurrency = 2048{steps} }}

[workers.sink]
stage = "verify"
inputs = ["ingest-sink"]
params = {{ streams = 65536 }}
"""


def chat(i: int, tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"prompt {i}"}], "max_tokens": tokens, "ignore_eos": True}


class Load:
    """One engine with the upstream at one pace; loads run on it one after another."""

    def __init__(self, engine: BenchEngine) -> None:
        self.engine = engine
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(ingest_endpoint(engine.info["runtime_dir"]))
        self.pending = 0  # submits not answered yet
        self.ring = RingWatch(segment_name(engine.instance, RING))

    def stats(self, worker: str) -> dict[str, Any]:
        return self.engine.workers()[worker]["stats"]

    def processes(self) -> dict[str, int]:
        """Pids of the ingest worker and of the embedded upstream (its only child process)."""
        ingest = int(self.engine.workers()["ingest"]["pid"])
        # the engine may report running before ingest has started its upstream
        children = wait_for(lambda: _children(ingest), RUN_TIMEOUT_S, "ingest to start the embedded upstream")
        if len(children) != 1:
            raise BenchError(f"ingest (pid {ingest}) should have one child, the embedded upstream: {children}")
        return {"ingest": ingest, "upstream": children[0]}

    def cpu_s(self) -> dict[str, float]:
        return {name: usage(pid).cpu_s for name, pid in self.processes().items()}

    def submit(self, streams: int, tokens: int) -> int:
        """Send ``streams`` requests at once (their replies are taken while sampling); the ingest
        ``tokens`` count they will bring it to."""
        before = self.stats("ingest").get("tokens", 0)
        for i in range(streams):
            self.sock.send(orjson.dumps({"type": "submit", "body": chat(i, tokens), "endpoint": "chat"}))
        self.pending += streams
        return before + streams * tokens

    def take_replies(self) -> None:
        """Every reply there is now; each must accept its request."""
        while self.pending and self.sock.poll(0):
            reply = orjson.loads(self.sock.recv())
            if reply.get("type") != "accepted":
                raise BenchError(f"submit not accepted: {reply}")
            self.pending -= 1

    def cursor(self) -> int:
        return self.ring.word(d.WRITE_CURSOR_OFFSET)

    def samples_until(self, total: int) -> list[tuple[float, int]]:
        """(time, ring write cursor) every POLL_S until the ingest ``tokens`` count reaches
        ``total``. The count is asked for only once the cursor has stood still for QUIET_S: a
        status request to a supervisor on a saturated machine can take long enough to leave a
        hole in the samples."""
        samples = [(time.monotonic(), self.cursor())]
        deadline = samples[0][0] + RUN_TIMEOUT_S
        moved = samples[0][0]
        while True:
            time.sleep(POLL_S)
            now, cursor = time.monotonic(), self.cursor()
            if cursor != samples[-1][1]:
                moved = now
            samples.append((now, cursor))
            self.take_replies()
            if now - moved >= QUIET_S:
                if not self.pending and self.stats("ingest").get("tokens", 0) >= total:
                    return samples
                if now > deadline:
                    raise BenchError(f"ingest did not get {total} tokens in {RUN_TIMEOUT_S:g} s")
                moved = time.monotonic()

    def settle(self) -> dict[str, Any]:
        """Wait until no stream is active and the sink has every row; the sink's counters."""
        wait_for(lambda: self.stats("ingest").get("active", 1) == 0, RUN_TIMEOUT_S, "streams to end")
        ingest = self.stats("ingest")
        rows = ingest["tokens"] + 2 * ingest["accepted"]  # START and END around each stream's tokens
        return wait_for(lambda: (s := self.stats("sink"))["messages"] >= rows and s, RUN_TIMEOUT_S, "the sink")

    def close(self) -> None:
        self.sock.close(0)
        self.ring.close()


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (``/proc/<pid>/task/*/children`` is not in every kernel)."""
    children = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(path, "rb") as f:
            if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:  # field 4 of proc(5): ppid
                children.append(int(path.split("/")[2]))
    return children


def cpu_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """µs of CPU per token of each process between two readings."""
    return {f"{name}_cpu_us_per_token": round((after[name] - before[name]) * 1e6 / tokens, 2) for name in before}


def rows_per_record(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Mean rows per ring record the sink received between two readings of its counters."""
    records = after["batches"] - before["batches"]
    return round((after["messages"] - before["messages"]) / records, 1) if records else 0.0


def unpaced_run(load: Load, streams: int, tokens: int) -> dict[str, Any]:
    cpu = load.cpu_s()
    began, first = time.monotonic(), load.cursor()
    samples = load.samples_until(load.submit(streams, tokens))
    last = samples[-1][1]
    ended = next(t for t, cursor in samples if cursor == last)
    # bytes -> tokens: each stream wrote tokens + 2 rows (START, END) of the load's bytes
    tokens_per_byte = streams * tokens / (last - first)
    return {
        "streams": streams,
        "tokens_per_stream": tokens,
        "tokens": streams * tokens,
        "steady_tokens_per_s": round(steady_bytes_per_s(samples, first) * tokens_per_byte),
        "overall_tokens_per_s": round(streams * tokens / (ended - began)),
        "seconds": round(ended - began, 3),
        **cpu_per_token(cpu, load.cpu_s(), streams * tokens),
    }


def steady_bytes_per_s(samples: list[tuple[float, int]], first: int) -> float:
    """Bytes per second between the samples that first pass 10 % and 90 % of what was written:
    the rate with every stream going, without the submissions at the start or the stragglers."""
    written = samples[-1][1] - first
    low = next(s for s in samples if s[1] - first >= 0.1 * written)
    high = next(s for s in samples if s[1] - first >= 0.9 * written)
    if high[0] <= low[0]:  # all of it between two samples: too short to tell, say so with 0
        return 0.0
    return (high[1] - low[1]) / (high[0] - low[0])


def paced_run(load: Load, streams: int, rate: float, tokens: int) -> dict[str, Any]:
    cpu, sink = load.cpu_s(), load.stats("sink")
    total = load.submit(streams, tokens)
    first = total - streams * tokens
    # Read the latency window while every stream is still running (past the start-up burst).
    wait_for(
        lambda: load.stats("ingest").get("tokens", 0) - first >= 0.75 * streams * tokens,
        RUN_TIMEOUT_S,
        "the paced streams to be three quarters done",
    )
    stats = load.stats("ingest")
    load.samples_until(total)
    return {
        "streams": streams,
        "tokens_per_s_per_stream": rate,
        "tokens_per_stream": tokens,
        "load_tokens_per_s": streams * rate,
        "latency_p50_us": stats.get("latency_p50_us", 0.0),
        "latency_p99_us": stats.get("latency_p99_us", 0.0),
        **cpu_per_token(cpu, load.cpu_s(), streams * tokens),
        "rows_per_record": rows_per_record(sink, load.settle()),
    }


def run_engine(
    pace: float, runs: list[Any], measure: Any, progress: bool, settings: Settings, decode_steps: bool = False
) -> tuple[list[dict], dict]:
    """Each of ``runs`` measured with ``measure`` on one engine whose upstream runs at ``pace``
    tokens/s per stream (0: unpaced), on one clock with ``decode_steps``; the rows and the sink's
    final counters."""
    rows = []
    with BenchEngine(engine_toml(pace, decode_steps, settings.sched_policy), "ingest") as engine:
        load = Load(engine)
        try:
            for args in runs:
                rows.append(measure(load, *args))
                if progress:
                    click.echo(f"  {rows[-1]}", err=True)
            sink = load.settle()
        finally:
            load.close()
    return rows, sink


def measure(settings: Settings, progress: bool) -> dict[str, Any]:
    unpaced, sink_unpaced = run_engine(0.0, list(settings.unpaced), unpaced_run, progress, settings)
    rate = settings.paced[0][1]  # the upstream's pace is per engine: every paced load uses the first's
    paced, sink_paced = run_engine(rate, list(settings.paced), paced_run, progress, settings, settings.decode_steps)
    streams, cpu_rate, tokens = settings.cpu
    warm_up = (streams, cpu_rate, max(tokens // 5, 1))  # the streams' connections made, the code paths run once
    runs = [warm_up] + [settings.cpu] * settings.cpu_runs
    cpu, sink_cpu = run_engine(cpu_rate, runs, paced_run, progress, settings, settings.decode_steps)
    cpu = cpu[1:]
    median = sorted(cpu, key=lambda row: row["ingest_cpu_us_per_token"])[len(cpu) // 2]
    sink = _sum_counts(sink_unpaced, sink_paced, sink_cpu)
    return {"unpaced": unpaced, "paced": paced, "cpu": median, "cpu_runs": cpu, "sink": sink}


def _sum_counts(*counts: dict[str, int]) -> dict[str, int]:
    return {key: sum(c.get(key, 0) for c in counts) for key in counts[0]}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    most = max(result["unpaced"], key=lambda r: r["streams"])
    cpu = result["cpu"]
    worst_p99 = max(r["latency_p99_us"] for r in result["paced"])
    return [
        {
            "target": f"ingest tokens/s with {most['streams']:,} streams",
            "goal": f"> {TARGET_TOKENS_PER_S:,.0f}",
            "value": most["steady_tokens_per_s"],
            "met": most["steady_tokens_per_s"] > TARGET_TOKENS_PER_S,
        },
        {
            "target": "added latency p99 (µs), paced",
            "goal": f"< {TARGET_P99_US:g}",
            "value": worst_p99,
            "met": worst_p99 < TARGET_P99_US,
        },
        {
            "target": f"ingest CPU µs per token, paced {cpu['streams']} x {cpu['tokens_per_s_per_stream']:g} tokens/s",
            "goal": f"<= {TARGET_CPU_US_PER_TOKEN:g}",
            "value": cpu["ingest_cpu_us_per_token"],
            "met": cpu["ingest_cpu_us_per_token"] <= TARGET_CPU_US_PER_TOKEN,
        },
        {"target": "sink gaps", "goal": "0", "value": result["sink"].get("gaps", 0), "met": not result["sink"]["gaps"]},
    ]


def main(
    as_json: bool = False, quick: bool = False, decode_steps: bool = False, sched_policy: str | None = None
) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results.

    A full run from a checkout with independently paced streams also writes
    bench/results/ingest-<machine>.json and the generated section of docs/ingest.md."""
    settings = replace(QUICK if quick else FULL, decode_steps=decode_steps, sched_policy=sched_policy)
    info, load_before = report.machine(), report.load()
    run = measure(settings, progress=not as_json)
    result = {
        "benchmark": "ingest",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings) | {"heartbeat_s": HEARTBEAT_S},
        **run,
    }
    result["targets"] = targets(result)
    _print(result, as_json)
    if not quick and not decode_steps and sched_policy is None:
        report.publish("ingest", info, result, markdown(result), docs=DOCS)
    return result


# ---- output ------------------------------------------------------------------------------------

_UNPACED_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    ("tokens_per_stream", "tokens/stream", "{:,}"),
    ("steady_tokens_per_s", "steady tokens/s", "{:,}"),
    ("overall_tokens_per_s", "overall tokens/s", "{:,}"),
    ("seconds", "seconds", "{:.2f}"),
    ("ingest_cpu_us_per_token", "ingest CPU µs/token", "{:.1f}"),
    ("upstream_cpu_us_per_token", "upstream CPU µs/token", "{:.1f}"),
)
_PACED_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    ("tokens_per_s_per_stream", "tokens/s each", "{:g}"),
    ("load_tokens_per_s", "tokens/s total", "{:,.0f}"),
    ("latency_p50_us", "added p50 µs", "{:.1f}"),
    ("latency_p99_us", "added p99 µs", "{:.1f}"),
    ("rows_per_record", "rows/record", "{:.1f}"),
    ("ingest_cpu_us_per_token", "ingest CPU µs/token", "{:.1f}"),
    ("upstream_cpu_us_per_token", "upstream CPU µs/token", "{:.1f}"),
)


def _sink_line(result: dict[str, Any]) -> str:
    sink = result["sink"]
    return (
        f"Sink: {sink.get('messages', 0):,} rows in order, {sink.get('gaps', 0)} missing, "
        f"{sink.get('duplicates', 0)} duplicates."
    )


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/ingest.md for this result."""
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            "Throughput, embedded upstream unpaced (the ring's write cursor sampled every "
            f"{POLL_S * 1e3:g} ms; steady: between 10 % and 90 % of the bytes):",
            "",
            report.markdown_table(result["unpaced"], _UNPACED_COLUMNS),
            "",
            "Added latency, SSE event parsed -> batch committed, embedded upstream paced per stream:",
            "",
            report.markdown_table(result["paced"], _PACED_COLUMNS),
            "",
            f"CPU per token at the paced load of issue 11, {len(result['cpu_runs'])} runs on one engine after a "
            f"warm-up (ingest: socket read to committed row, heartbeats every {result['settings']['heartbeat_s']:g} "
            "s included; upstream: the embedded load generator, apart); the target's figure is the median run:",
            "",
            report.markdown_table(result["cpu_runs"], _PACED_COLUMNS),
            "",
            _sink_line(result),
            "",
            *report.target_table(result["targets"], "{:,}".format),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo()
    click.echo(report.text_table(result["unpaced"], _UNPACED_COLUMNS))
    click.echo()
    click.echo(report.text_table(result["paced"], _PACED_COLUMNS))
    click.echo()
    click.echo(report.text_table(result["cpu_runs"], _PACED_COLUMNS))
    click.echo()
    click.echo(_sink_line(result))
    for line in report.target_lines(result["targets"], "{:,}".format):
        click.echo(line)
