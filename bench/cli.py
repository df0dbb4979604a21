"""``neuralpipe bench ...``: the benchmarks' commands. The engine's CLI finds this group through the
entry point ``neuralpipe.commands`` (pyproject), so the engine never imports the bench package;
each command imports its benchmark only when it runs."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks (the harness of bench/, shipped as the package neuralpipe_bench)."""


@bench.command("ipc")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a `rows` list.")
@click.option("--quick", is_flag=True, help="Few messages per row: a smoke run, not a measurement.")
@click.option("--payload", "payloads", type=int, multiple=True, help="Tokens per message (default 1, 64, 4096).")
@click.option(
    "--transport", "transports", multiple=True, help="Only these transports (ring, queue, pipe, zmq, faster-fifo)."
)
@click.option("--output", type=click.Path(dir_okay=False), help="Also write the results as JSON to this file.")
def bench_ipc(as_json: bool, quick: bool, payloads: tuple[int, ...], transports: tuple[str, ...], output) -> None:
    """One-way latency and throughput between two processes: the ring against the alternatives."""
    from . import ipc

    ipc.main(as_json=as_json, quick=quick, payloads=payloads, transports=transports, output=output)


@bench.command("recovery")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="A few kills: a smoke run, not a measurement.")
@click.option(
    "--topology",
    type=click.Choice(["both", "test", "default"]),
    default="both",
    show_default=True,
    help="counter -> relay -> sink, the default topology under chat load, or both.",
)
def bench_recovery(as_json: bool, quick: bool, topology: str) -> None:
    """Kill workers of a real engine with SIGKILL: time to detect, respawn and flow again."""
    from . import recovery

    recovery.main(as_json=as_json, quick=quick, topology=topology)


@bench.command("idle")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="A 2 s idle window and 3 checks: a smoke run, not a measurement.")
def bench_idle(as_json: bool, quick: bool) -> None:
    """CPU use of an idle engine's processes, and how long `neuralpipe check` takes."""
    from . import idle

    idle.main(as_json=as_json, quick=quick)


@bench.command("doorbell")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="Few wake-ups: a smoke run, not a measurement.")
def bench_doorbell(as_json: bool, quick: bool) -> None:
    """Wake-up latency of the candidate doorbells (FIFO, eventfd, zmq PAIR) between two processes."""
    from . import doorbell

    doorbell.main(as_json=as_json, quick=quick)


@bench.command("sse")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="1,000 events, 2 runs: a smoke run, not a measurement.")
def bench_sse(as_json: bool, quick: bool) -> None:
    """SSE parsing: stages.ingest.sse against httpx-sse and sseclient-py (MB/s, events/s, edge cases)."""
    from . import sse

    sse.main(as_json=as_json, quick=quick)


sched_policy_option = click.option(
    "--sched-policy",
    type=click.Choice(["batch", "normal"]),
    help="The workers' scheduling policy ([engine] sched_policy; default: the engine's, batch): one against the other.",
)


@bench.command("ingest")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="Short streams: a smoke run, not a measurement.")
@click.option(
    "--decode-steps",
    is_flag=True,
    help="The paced upstream writes every stream's tokens on one clock, as a server batching its streams does.",
)
@sched_policy_option
def bench_ingest(as_json: bool, quick: bool, decode_steps: bool, sched_policy: str | None) -> None:
    """Ingest throughput with 1, 100, 1,000 streams from the embedded upstream; added latency p50/p99."""
    from . import ingest

    ingest.main(as_json=as_json, quick=quick, decode_steps=decode_steps, sched_policy=sched_policy)


flush_ms_option = click.option(
    "--flush-ms",
    type=click.FloatRange(0, 100),
    help="Ingest's flush window in ms (default: the engine's, 2): the CPU-per-token against latency trade.",
)


@bench.command("pipeline")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a `rows` list.")
@click.option("--quick", is_flag=True, help="One short step per transport: a smoke run, not a measurement.")
@click.option("--transport", "transports", multiple=True, help="Only these transports (shm, queue, zmq).")
@click.option("--offered", type=float, help="One step at this many tokens/s (all streams together), not the sweep.")
@click.option("--streams", type=int, help="Paced streams sharing the offered load (default 100; --quick 20).")
@click.option("--duration", "duration_s", type=float, help="Each stream's length in seconds (default 6; --quick 2).")
@flush_ms_option
@click.option(
    "--pin",
    is_flag=True,
    help="Pin ingest (with the embedded upstream and the bench's consumer) to one CPU and compute, cache and "
    "broadcast to another ([workers.*] cpus).",
)
@sched_policy_option
def bench_pipeline(
    as_json: bool,
    quick: bool,
    transports: tuple[str, ...],
    offered: float | None,
    streams: int | None,
    duration_s: float | None,
    flush_ms: float | None,
    pin: bool,
    sched_policy: str | None,
) -> None:
    """Paced load through ingest -> compute -> cache -> broadcast over shm rings, Queue, zmq: delivered/offered,
    steady-state latency, CPU µs per token of each process, and each transport's saturation point."""
    from . import pipeline

    pipeline.main(
        as_json=as_json,
        quick=quick,
        transports=transports,
        offered=offered,
        streams=streams,
        duration_s=duration_s,
        flush_ms=flush_ms,
        pin=pin,
        sched_policy=sched_policy,
    )


@bench.command("broadcast")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="1 and 10 subscribers, short windows: a smoke run, not a measurement.")
def bench_broadcast(as_json: bool, quick: bool) -> None:
    """Broadcast latency (ring commit -> SUB receive) p50/p99 with 1/10/100 subscribers over ipc and tcp."""
    from . import broadcast

    broadcast.main(as_json=as_json, quick=quick)


@bench.command("compute")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a `rows` list.")
@click.option("--quick", is_flag=True, help="Sizes 1k and 16k, one call each: a smoke run, not a measurement.")
def bench_compute(as_json: bool, quick: bool) -> None:
    """Compute kernels on numpy and every wgpu adapter (1k, 64k, 1M tokens); the stage's added time per batch."""
    from . import compute

    compute.main(as_json=as_json, quick=quick)


@bench.command("cache")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="A short trace and 4 prompts: a smoke run, not a measurement.")
def bench_cache(as_json: bool, quick: bool) -> None:
    """Cache: LRU hit ratio vs Belady on a Zipf(1.0) trace; time to first token on a hit vs a miss."""
    from . import cache

    cache.main(as_json=as_json, quick=quick)


@bench.command("gateway")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="1 and 10 short streams, no LiteLLM: a smoke run, not a measurement.")
@flush_ms_option
@click.option(
    "--api",
    type=click.Choice(["chat", "responses"]),
    default="chat",
    help="Ask the gateway through chat completions (default) or the Responses API (no LiteLLM then).",
)
@sched_policy_option
def bench_gateway(as_json: bool, quick: bool, flush_ms: float | None, api: str, sched_policy: str | None) -> None:
    """Latency and CPU the gateway adds against calling the upstream directly (1 and 100 streams), LiteLLM beside it."""
    from . import gateway

    gateway.main(as_json=as_json, quick=quick, flush_ms=flush_ms, api=api, sched_policy=sched_policy)
