"""``neuralpipe bench pipeline``: end-to-end tokens/s and latency of the full pipeline, the same
stages run over each transport in one run: shared-memory rings, multiprocessing.Queue, zmq ipc.

For each transport a real engine (``python -m engine.cli run``) runs embedded upstream -> ingest
-> compute -> cache -> broadcast with ``[engine] transport`` set (engine/transport.py); nothing
else differs. A consumer process (engine/consumer.py's StreamConsumer on the binary broadcast
socket) takes every tokens message and records, per token, ``time.monotonic_ns() - recv_ns``:
from ingest parsing the upstream's SSE event to the consumer receiving it (CLOCK_MONOTONIC is
system-wide, so the two processes' readings compare).

- Throughput: the upstream unpaced; 1, 100 and 1,000 concurrent streams of a fixed length
  (``ignore_eos``) submitted one after another through engine/requests.py's RequestClient;
  tokens/s = tokens received / (last token received - first submit). Latency percentiles of
  such a load are mostly the queueing of a saturated pipeline.
- Latency at a paced load: the upstream paced per stream so that the streams together offer
  PACED_TOKENS_PER_S (10,000 tokens/s, the target's load), and 1,000 tokens/s (a pipeline with
  room to spare); p50/p99/p99.9 of the same per-token latency.

Each load's prompts are distinct (no cache hit). The consumer repairs ZeroMQ drops from the
broadcast's snapshots; a token it still never gets is counted in the row's ``lost`` (and a load
that is short of tokens otherwise fails).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from typing import Any

import click

from engine.requests import RequestClient, ingest_endpoint

from . import report
from .proc import BenchError
from .recovery import BenchEngine, wait_for

TRANSPORTS = ("shm", "queue", "zmq")
PACED_TOKENS_PER_S = 10_000.0
# Targets from the issue, reported (never asserted).
TARGET_TOKENS_PER_S = 200_000.0
TARGET_PACED_P99_US = 2_000.0
TARGET_RING_OVER_QUEUE = 3.0

RING_CAPACITY = 1 << 23  # the queue and zmq transports get the same bound in messages (transport.slots)
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Settings:
    unpaced: tuple[tuple[int, int], ...]  # (streams, tokens per stream)
    paced: tuple[tuple[int, float, int], ...]  # (streams, tokens/s of all streams together, tokens per stream)


# The first paced load is the target's (PACED_TOKENS_PER_S); the second shows an unsaturated pipeline.
FULL = Settings(
    unpaced=((1, 20_000), (100, 400), (1000, 60)), paced=((100, PACED_TOKENS_PER_S, 400), (10, 1_000.0, 200))
)
QUICK = Settings(unpaced=((1, 300), (100, 4)), paced=((10, PACED_TOKENS_PER_S, 20),))


def engine_toml(transport: str, tokens_per_s: float) -> str:
    """The full topology over ``transport``; the upstream paced at ``tokens_per_s`` per stream
    (0: unpaced); limits per client far above the load (one client submits everything)."""
    return f"""
[engine]
transport = "{transport}"

[ring_defaults]
capacity = {RING_CAPACITY}

[workers.ingest]
stage = "ingest"
outputs = ["ingest-compute"]
params.client_requests_per_s = 1e6
params.client_burst = 1e6
params.client_tokens_per_s = 1e9
params.client_burst_tokens = 1e9
params.queue_bound = 100000
params.embedded = {{ tokens_per_s = {tokens_per_s}, max_concurrency = 2048 }}

[workers.compute]
stage = "compute"
inputs = ["ingest-compute"]
outputs = ["compute-cache"]
params.backend = "numpy"

[workers.cache]
stage = "cache"
inputs = ["compute-cache"]
outputs = ["cache-broadcast"]
params.snapshot_path = ""

[workers.broadcast]
stage = "broadcast"
inputs = ["cache-broadcast"]
params.sndhwm = 1000000
"""


# ---- the consumer process -----------------------------------------------------------------------


def _consume(runtime_dir: str, conn: Any) -> None:
    """Consumer process: for each ``(tokens, deadline)`` asked on ``conn``, read until that many
    tokens came or were given up as lost (the consumer's ``gaps``: what the broadcast no longer
    had when asked), and answer with their latencies (ns), the time the last one came and the
    consumer's counters for this load."""
    import numpy as np

    from engine.consumer import StreamConsumer

    with StreamConsumer.for_engine(runtime_dir, binary=True) as consumer:
        conn.send("ready")
        while (ask := conn.recv()) is not None:
            expected, deadline = ask
            latency = np.empty(expected, dtype=np.int64)
            got, last = 0, 0
            before = dict(consumer.counts)

            def lost() -> int:
                return consumer.counts["gaps"] - before["gaps"]  # noqa: B023

            while got + lost() < expected and time.monotonic() < deadline:
                for message in consumer.messages(idle_timeout_s=0.5):
                    if message.type != "tokens":
                        continue
                    now = time.monotonic_ns()
                    recv_ns = message.columns["recv_ns"][: expected - got]
                    latency[got : got + len(recv_ns)] = now - recv_ns
                    got += len(recv_ns)
                    last = now
                    if got + lost() >= expected:
                        break
            conn.send((latency[:got], last, {k: v - before[k] for k, v in consumer.counts.items()}))


class Consumer:
    """The consumer process of one engine and the pipe to it."""

    def __init__(self, runtime_dir: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_consume, args=(runtime_dir, child), name="bench-consumer", daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(30) or self.conn.recv() != "ready":
            raise BenchError("the bench consumer did not start")

    def expect(self, tokens: int) -> None:
        self.conn.send((tokens, time.monotonic() + LOAD_TIMEOUT_S))

    def result(self) -> tuple[Any, int, dict[str, int]]:
        if not self.conn.poll(LOAD_TIMEOUT_S + 10):
            raise BenchError("the bench consumer sent no result")
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


# ---- loads ----------------------------------------------------------------------------------------


def _chat(label: str, i: int, tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"{label} {i}"}], "max_tokens": tokens, "ignore_eos": True}


def run_load(engine: BenchEngine, consumer: Consumer, label: str, streams: int, tokens: int) -> dict[str, Any]:
    """Submit ``streams`` streams of ``tokens`` tokens; the consumer's tokens/s and latency."""
    import numpy as np

    expected = streams * tokens
    consumer.expect(expected)
    began = time.monotonic_ns()
    with RequestClient(ingest_endpoint(engine.info["runtime_dir"]), timeout_s=30) as client:
        for i in range(streams):
            client.submit(_chat(label, i, tokens))
    latency, last, counts = consumer.result()
    if len(latency) + counts["gaps"] < expected:
        raise BenchError(f"{label}: the consumer got {len(latency)} of {expected} tokens in time ({counts})")
    p50, p99, p999 = np.percentile(latency, (50, 99, 99.9)) / 1e3
    return {
        "streams": streams,
        "tokens": expected,
        "tokens_per_s": round(len(latency) / ((last - began) / 1e9)),
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "p999_us": round(float(p999), 1),
        "lost": counts["gaps"],  # tokens the consumer never got (reported, never hidden)
        "compute_us_per_batch": engine.workers()["compute"]["stats"].get("busy_us_per_batch"),
    }


def run_engine(transport: str, pace: float, loads: list[tuple[int, int]], progress: bool) -> list[dict[str, Any]]:
    rows = []
    with BenchEngine(engine_toml(transport, pace), f"pipeline-{transport}") as engine:
        consumer = Consumer(engine.info["runtime_dir"])
        try:
            # a SUB socket misses what is published before its subscription reaches the XPUB
            wait_for(
                lambda: engine.workers()["broadcast"]["stats"].get("subscriptions", 0) > 0,
                LOAD_TIMEOUT_S,
                "the consumer's subscription to reach the broadcast",
                interval_s=0.05,
            )
            # warm-up: first connections (zmq reconnects every 100 ms until its peer binds), imports
            run_load(engine, consumer, f"{transport} {pace} warm-up", 1, 10)
            for n, (streams, tokens) in enumerate(loads):
                row = {"transport": transport} | run_load(engine, consumer, f"{transport} {pace} {n}", streams, tokens)
                rows.append(row)
                if progress:
                    click.echo(f"  {row}", err=True)
        finally:
            consumer.close()
    return rows


def measure(settings: Settings, transports: tuple[str, ...], progress: bool) -> dict[str, Any]:
    """Every transport's unpaced loads on one engine, then each paced load on an engine of its own
    (the upstream's pace is an engine setting)."""
    rows, paced = [], []
    for transport in transports:
        rows += run_engine(transport, 0.0, list(settings.unpaced), progress)
        for streams, offered, tokens in settings.paced:
            for row in run_engine(transport, offered / streams, [(streams, tokens)], progress):
                paced.append(row | {"offered_tokens_per_s": offered})
    return {"rows": rows, "paced": paced}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """shm tokens/s over each other transport's, per stream count."""
    by = {(r["transport"], r["streams"]): r["tokens_per_s"] for r in rows}
    out = []
    for (transport, streams), rate in by.items():
        if transport != "shm" and ("shm", streams) in by and rate:
            out.append({"streams": streams, "versus": transport, "shm_over": round(by["shm", streams] / rate, 2)})
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    shm = [r for r in result["rows"] if r["transport"] == "shm"]
    best = max((r["tokens_per_s"] for r in shm), default=0)
    paced = next(
        (r for r in result["paced"] if r["transport"] == "shm" and r["offered_tokens_per_s"] == PACED_TOKENS_PER_S),
        None,
    )
    queue = [r["shm_over"] for r in result["ratios"] if r["versus"] == "queue"]
    out = [
        {
            "target": "end-to-end tokens/s, shm (best load)",
            "goal": f">= {TARGET_TOKENS_PER_S:,.0f}",
            "value": best,
            "met": best >= TARGET_TOKENS_PER_S,
        }
    ]
    if paced is not None:
        out.append(
            {
                "target": f"p99 latency (µs) at {PACED_TOKENS_PER_S:,.0f} tokens/s, shm",
                "goal": f"< {TARGET_PACED_P99_US:,.0f}",
                "value": paced["p99_us"],
                "met": paced["p99_us"] < TARGET_PACED_P99_US,
            }
        )
    if queue:
        worst = min(queue)
        out.append(
            {
                "target": "shm / queue tokens/s (worst stream count)",
                "goal": f">= {TARGET_RING_OVER_QUEUE:g}x",
                "value": worst,
                "met": worst >= TARGET_RING_OVER_QUEUE,
            }
        )
    return out


def main(as_json: bool = False, quick: bool = False, transports: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results. A full run
    of every transport from a checkout also writes bench/results/pipeline-<machine>.json and the
    generated section of docs/benchmarks.md."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise click.BadParameter(f"unknown transport(s) {', '.join(sorted(unknown))}; choose from {TRANSPORTS}")
    chosen = tuple(t for t in TRANSPORTS if t in transports) if transports else TRANSPORTS
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    run = measure(settings, chosen, progress=not as_json)
    result = {
        "benchmark": "pipeline",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings) | {"ring_capacity": RING_CAPACITY},
        **run,
    }
    result["ratios"] = ratios(result["rows"])
    result["targets"] = targets(result)
    _print(result, as_json)
    if not quick and chosen == TRANSPORTS:
        report.publish("pipeline", info, result, markdown(result))
    return result


# ---- output ---------------------------------------------------------------------------------------

_COLUMNS: tuple[report.Column, ...] = (
    ("transport", "transport", "{}"),
    ("streams", "streams", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("tokens_per_s", "tokens/s", "{:,}"),
    ("p50_us", "p50 µs", "{:,.0f}"),
    ("p99_us", "p99 µs", "{:,.0f}"),
    ("p999_us", "p99.9 µs", "{:,.0f}"),
    ("lost", "lost", "{:,}"),
)
_PACED_COLUMNS: tuple[report.Column, ...] = (("offered_tokens_per_s", "offered tokens/s", "{:,.0f}"), *_COLUMNS)
_RATIO_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    ("versus", "versus", "{}"),
    ("shm_over", "shm tokens/s ÷ theirs", "{:.2f}"),
)


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/benchmarks.md for this result."""
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            "Unpaced upstream (throughput; latency is then mostly queueing):",
            "",
            report.markdown_table(result["rows"], _COLUMNS),
            "",
            "Upstream paced per stream to the offered tokens/s of all streams together (latency):",
            "",
            report.markdown_table(result["paced"], _PACED_COLUMNS),
            "",
            report.markdown_table(result["ratios"], _RATIO_COLUMNS),
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
    click.echo(report.text_table(result["rows"], _COLUMNS))
    click.echo()
    click.echo("paced:")
    click.echo(report.text_table(result["paced"], _PACED_COLUMNS))
    click.echo()
    click.echo(report.text_table(result["ratios"], _RATIO_COLUMNS))
    for line in report.target_lines(result["targets"], "{:,}".format):
        click.echo(line)
