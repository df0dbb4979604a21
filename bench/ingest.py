"""``neuralpipe bench ingest``: how many tokens per second the ingest worker puts into its ring
from the embedded upstream with 1, 100 and 1,000 concurrent streams, and the latency it adds
from an SSE event's arrival to its batch's commit in the ring.

A real engine (``python -m engine.cli run``) runs ingest -> verifying sink, with the embedded
upstream started by the ingest worker (over real HTTP on loopback, in its own process). Requests
go in through the ingest ROUTER (``engine.requests.RequestClient``) with ``ignore_eos`` and a
fixed ``max_tokens``, so every stream has a known length.

- Throughput: the upstream unpaced. All streams of a load are submitted at once; the ingest
  worker's ``tokens`` counter (status stats, refreshed with every heartbeat) is sampled until it
  has them all. Reported: the steady rate between 10 % and 90 % of the tokens, and the overall rate
  from the first submit to the last token.
- Added latency: the upstream paced per stream; the ingest worker's ``latency_p50_us`` and
  ``latency_p99_us`` (SSE event parsed -> batch committed, over its last 4,096 tokens) are read
  while the streams are running.

At the end of each engine the sink must have every row, in order: its ``gaps`` must be 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import click

from engine.requests import RequestClient, ingest_endpoint

from . import report
from .proc import BenchError
from .recovery import BenchEngine, wait_for

DOCS = report.DOCS.parent / "ingest.md"

# Targets from the issue, reported (never asserted).
TARGET_TOKENS_PER_S = 200_000.0  # with 1,000 streams
TARGET_P99_US = 200.0

HEARTBEAT_S = 0.1  # how fresh the status stats are
SAMPLE_S = 0.05
RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Settings:
    unpaced: tuple[tuple[int, int], ...]  # (streams, tokens per stream)
    paced: tuple[tuple[int, float, int], ...]  # (streams, tokens/s per stream, tokens per stream)


FULL = Settings(unpaced=((1, 32768), (100, 2000), (1000, 200)), paced=((100, 20.0, 120), (1000, 20.0, 120)))
QUICK = Settings(unpaced=((1, 2000), (100, 40), (1000, 4)), paced=((100, 20.0, 30),))


def engine_toml(tokens_per_s: float) -> str:
    """Ingest -> verifying sink; limits per client far above the load (one client submits all)."""
    return f"""
[engine]
heartbeat_interval_s = {HEARTBEAT_S}

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
params.embedded = {{ tokens_per_s = {tokens_per_s}, max_concurrency = 2048 }}

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
        self.client = RequestClient(ingest_endpoint(engine.info["runtime_dir"]), timeout_s=30.0)

    def stats(self, worker: str) -> dict[str, Any]:
        return self.engine.workers()[worker]["stats"]

    def submit(self, streams: int, tokens: int) -> int:
        """Submit ``streams`` requests; the ingest ``tokens`` count they will bring it to."""
        before = self.stats("ingest").get("tokens", 0)
        for i in range(streams):
            self.client.submit(chat(i, tokens))
        return before + streams * tokens

    def samples_until(self, total: int) -> list[tuple[float, int]]:
        """(time, ingest tokens) every SAMPLE_S until the count reaches ``total``."""
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not samples or samples[-1][1] < total:
            if time.monotonic() > deadline:
                raise BenchError(f"ingest stuck at {samples[-1][1]} of {total} tokens")
            samples.append((time.monotonic(), self.stats("ingest").get("tokens", 0)))
            time.sleep(SAMPLE_S)
        return samples

    def settle(self) -> dict[str, Any]:
        """Wait until no stream is active and the sink has every row; the sink's counters."""
        wait_for(lambda: self.stats("ingest").get("active", 1) == 0, RUN_TIMEOUT_S, "streams to end")
        ingest = self.stats("ingest")
        rows = ingest["tokens"] + 2 * ingest["accepted"]  # START and END around each stream's tokens
        return wait_for(lambda: (s := self.stats("sink"))["messages"] >= rows and s, RUN_TIMEOUT_S, "the sink")

    def close(self) -> None:
        self.client.close()


def unpaced_run(load: Load, streams: int, tokens: int) -> dict[str, Any]:
    began = time.monotonic()
    first = load.stats("ingest").get("tokens", 0)
    total = load.submit(streams, tokens)
    samples = load.samples_until(total)
    sent = total - first
    return {
        "streams": streams,
        "tokens_per_stream": tokens,
        "tokens": sent,
        "steady_tokens_per_s": round(steady_rate(samples, first, sent)),
        "overall_tokens_per_s": round(sent / (samples[-1][0] - began)),
        "seconds": round(samples[-1][0] - began, 3),
    }


def steady_rate(samples: list[tuple[float, int]], first: int, sent: int) -> float:
    """Tokens per second between the samples that first pass 10 % and 90 % of ``sent``: the
    rate with every stream going, without submission at the start or the last stragglers."""
    low = next(s for s in samples if s[1] - first >= 0.1 * sent)
    high = next(s for s in samples if s[1] - first >= 0.9 * sent)
    if high[0] <= low[0]:  # all of it between two samples: too short to tell, say so with 0
        return 0.0
    return (high[1] - low[1]) / (high[0] - low[0])


def paced_run(load: Load, streams: int, rate: float, tokens: int) -> dict[str, Any]:
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
    }


def run_engine(pace: float, runs: list[Any], measure: Any, progress: bool) -> tuple[list[dict], dict]:
    """Each of ``runs`` measured with ``measure`` on one engine whose upstream runs at ``pace``
    tokens/s per stream (0: unpaced); the rows and the sink's final counters."""
    rows = []
    with BenchEngine(engine_toml(pace), "ingest") as engine:
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
    unpaced, sink_unpaced = run_engine(0.0, list(settings.unpaced), unpaced_run, progress)
    rate = settings.paced[0][1]  # the upstream's pace is per engine: every paced load uses the first's
    paced, sink_paced = run_engine(rate, list(settings.paced), paced_run, progress)
    return {"unpaced": unpaced, "paced": paced, "sink": _sum_counts(sink_unpaced, sink_paced)}


def _sum_counts(*counts: dict[str, int]) -> dict[str, int]:
    return {key: sum(c.get(key, 0) for c in counts) for key in counts[0]}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    most = max(result["unpaced"], key=lambda r: r["streams"])
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
        {"target": "sink gaps", "goal": "0", "value": result["sink"].get("gaps", 0), "met": not result["sink"]["gaps"]},
    ]


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results.

    A full run from a checkout also writes bench/results/ingest-<machine>.json and the generated
    section of docs/ingest.md."""
    settings = QUICK if quick else FULL
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
    if not quick and report.in_checkout():
        path = report.RESULTS / f"ingest-{report.machine_slug(info)}.json"
        report.write_json(path, result)
        report.write_section("ingest", markdown(result), path=DOCS)
        click.echo(f"wrote {path} and {DOCS}", err=True)
    return result


# ---- output ------------------------------------------------------------------------------------

_UNPACED_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    ("tokens_per_stream", "tokens/stream", "{:,}"),
    ("steady_tokens_per_s", "steady tokens/s", "{:,}"),
    ("overall_tokens_per_s", "overall tokens/s", "{:,}"),
    ("seconds", "seconds", "{:.2f}"),
)
_PACED_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    ("tokens_per_s_per_stream", "tokens/s each", "{:g}"),
    ("load_tokens_per_s", "tokens/s total", "{:,.0f}"),
    ("latency_p50_us", "added p50 µs", "{:.1f}"),
    ("latency_p99_us", "added p99 µs", "{:.1f}"),
)


def _verdict(t: dict[str, Any]) -> str:
    return "met" if t["met"] else "not met"


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
            "Throughput, embedded upstream unpaced (ingest `tokens` counter sampled every "
            f"{SAMPLE_S * 1e3:g} ms; steady: between 10 % and 90 % of the tokens):",
            "",
            report.markdown_table(result["unpaced"], _UNPACED_COLUMNS),
            "",
            "Added latency, SSE event parsed -> batch committed, embedded upstream paced per stream:",
            "",
            report.markdown_table(result["paced"], _PACED_COLUMNS),
            "",
            _sink_line(result),
            "",
            "| target | goal | measured | |",
            "|---|---|---:|---|",
            *(f"| {t['target']} | {t['goal']} | {t['value']:,} | {_verdict(t)} |" for t in result["targets"]),
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
    click.echo(_sink_line(result))
    for t in result["targets"]:
        click.echo(f"target {t['target']}: {t['value']:,} (goal {t['goal']}): {_verdict(t)}")
