"""The ``neuralpipe`` command line (click). Subcommands import what they need lazily, so that
``neuralpipe --help`` and quick commands stay fast."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuralpipe")
def main() -> None:
    """neuralpipe: a multiprocess shared-memory dataflow engine for LLM token streams."""


@main.group()
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
    from neuralpipe_bench import ipc

    ipc.main(as_json=as_json, quick=quick, payloads=payloads, transports=transports, output=output)
