"""``neuralpipe bench compute``: each compute kernel's throughput on numpy and on every wgpu
adapter there is, at 1k, 64k and 1M tokens per call, with the device time split into upload,
dispatch (submit to done) and readback; and the compute stage's added time per 64-token batch.

Kernel rows: a call's inputs are random (never all zero), the same for every backend; a backend's
output is compared with numpy's (``max_abs_err``). Each call is timed ``repeats`` times after one
untimed call (pipelines are compiled and warmed up when the device opens) and the median is kept.
Upload/dispatch/readback are the wgpu backend's own clocks around those three steps (dispatch
waits for the work by reading back 4 bytes). A CPU adapter (Mesa lavapipe) is measured when it is
the only one: the issue's 10x target is for a real GPU, and a CPU adapter runs on the same cores.

Stage rows: a Compute stage (numpy backend, default kernels) between two rings in this process;
64-token batches from 1 or 16 streams are written into its input ring one at a time and its
``do_work`` is timed: read, kernels, per-stream running values, write with the columns, commit.
A Relay (the copy alone) is timed the same way; the difference is what compute adds.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import click
import numpy as np

from engine.logs import JsonLogger
from engine.stage import WorkerContext
from shm.batch import Kind, batch_size, encode_texts, write_batch
from shm.naming import segment_name
from shm.ring import Consumer, Producer, Ring

from . import report

DOCS = report.DOCS.parent / "compute.md"
KERNELS = ("layout", "entropy", "repetition", "probes")
TARGET_STAGE_US = 100.0  # added per 64-token batch with the default kernels, on the CPU
TARGET_GPU_SPEEDUP = 10.0  # probes at 1M tokens on a real GPU against numpy
PROBES = {"rows": 4096, "dim": 64, "k": 8}  # the stage's default hashed table, 8 probes


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    repeats: int
    stage_batches: int


FULL = Settings(sizes=(1_000, 65_536, 1_048_576), repeats=3, stage_batches=3000)
QUICK = Settings(sizes=(1_000, 16_384), repeats=1, stage_batches=300)


def kernel_call(kernel: str, n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Random inputs and params of one call of ``kernel`` over ``n`` tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1 << 32, n, dtype=np.uint32)
    if kernel == "layout":
        lp = np.where(rng.random(n) < 0.1, np.nan, -rng.exponential(1.0, n)).astype(np.float32)
        return {"token_id": ids, "logprob": lp}, {"order": 8}
    if kernel == "entropy":
        return {"toplp": np.log(rng.dirichlet(np.ones(5), n)).astype(np.float32)}, {"k": 5}
    if kernel == "repetition":
        # streams of 1,000 tokens, each after a full context (window + ngram - 1 ids); ids from a
        # small alphabet so that n-grams do repeat
        ngram, window, length = 4, 64, 1000
        context = window + ngram - 1
        streams = -(-n // length)
        ids = rng.integers(1, 50, streams * (context + length), dtype=np.uint32)
        starts = np.arange(streams) * (context + length)
        query = (starts[:, None] + context + np.arange(length)).reshape(-1)[:n].astype(np.uint32)
        first = np.repeat(starts, length)[:n].astype(np.uint32)
        return {"ids": ids, "query": query, "first": first}, {"ngram": ngram, "window": window}
    table = rng.standard_normal((PROBES["rows"], PROBES["dim"])).astype(np.float32)
    probes = rng.standard_normal((PROBES["k"], PROBES["dim"])).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    return {"token_id": ids, "table": table, "probes": probes}, dict(PROBES)


def max_abs_err(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64)).max(initial=0)) for k in want)


def time_calls(backend: Any, kernel: str, inputs: dict, params: dict, repeats: int) -> tuple[dict, list[dict]]:
    """The output of one untimed call, then per timed call its seconds and the device's split."""
    out = backend.run(kernel, inputs, params)
    samples = []
    for _ in range(repeats):
        before = dict(getattr(backend, "timings", {}))
        began = time.perf_counter()
        backend.run(kernel, inputs, params)
        sample = {"seconds": time.perf_counter() - began}
        for step, total in getattr(backend, "timings", {}).items():
            sample[f"{step}_ms"] = (total - before[step]) * 1e3
        samples.append(sample)
    return out, samples


def kernel_rows(settings: Settings, backends: list[tuple[Any, str]], progress: bool) -> list[dict[str, Any]]:
    from stages.compute.backends import NumpyBackend

    reference = NumpyBackend()
    rows = []
    for kernel in KERNELS:
        for n in settings.sizes:
            inputs, params = kernel_call(kernel, n)
            want = None
            for backend, adapter in [(reference, "cpu (numpy)"), *backends]:
                out, samples = time_calls(backend, kernel, inputs, params, settings.repeats)
                want = out if want is None else want
                seconds = statistics.median(s["seconds"] for s in samples)
                row = {
                    "kernel": kernel,
                    "backend": backend.name,
                    "adapter": adapter,
                    "batch": n,
                    "tokens_per_s": round(n / seconds),
                    "max_abs_err": max_abs_err(out, want),
                }
                for step in ("upload", "dispatch", "readback"):
                    key = f"{step}_ms"
                    row[key] = round(statistics.median(s[key] for s in samples), 3) if key in samples[0] else None
                rows.append(row)
                if progress:
                    click.echo(f"  {row}", err=True)
    return rows


def open_adapters(progress: bool) -> tuple[list[tuple[Any, str]], list[str]]:
    """A backend on every adapter that opens, and a note for each that does not."""
    from stages.compute import gpu

    opened, notes = [], []
    try:
        adapters = gpu.enumerate_adapters()
    except Exception as exc:
        return [], [f"wgpu unavailable: {exc!r}"]
    if not adapters:
        notes.append("no wgpu adapter on this machine")
    for adapter in adapters:
        info = adapter.info
        label = f"{info['device']} ({info['adapter_type']}, {info['backend_type']})"
        try:
            opened.append((gpu.open_device(adapter), label))
        except Exception as exc:  # e.g. an OpenGL adapter without compute support
            notes.append(f"{label}: could not open: {exc!r}")
        if progress:
            click.echo(f"adapter {label}", err=True)
    return opened, notes


# ---- the stage's added time per batch ----------------------------------------------------------


def _write(producer: Producer, k: int, streams: int, rows: int = 64) -> None:
    """Batch ``k``: ``rows`` token rows spread over ``streams`` streams (ingest's shape)."""
    tokens = [b" tok%d" % ((k * rows + i) % 997) for i in range(rows)]
    text = sum(map(len, tokens))
    view = producer.try_claim(batch_size(rows, text))
    cols = write_batch(view, rows, text)
    cols.stream_id[:] = np.arange(rows) % streams
    cols.seq[:] = k * rows // streams + np.arange(rows) // streams
    cols.kind[:] = Kind.TOKEN
    cols.token_id[:] = (np.arange(rows) * 7919 + k) % 50000
    cols.logprob[:] = -np.linspace(0.01, 3.0, rows)
    cols.recv_ns[:] = time.monotonic_ns()
    encode_texts(cols, tokens)
    del cols
    view.release()
    producer.commit(16)


def time_stage(stage_ref: str, params: dict, streams: int, batches: int) -> list[float]:
    """Seconds of ``do_work`` for each of ``batches`` single-batch turns of the stage."""
    from engine.worker import load_stage

    instance = "b" + uuid.uuid4().hex[:10]
    rings = [Ring.create(segment_name(instance, name), 1 << 22) for name in ("in", "out")]
    source, sink = Producer.attach(rings[0].name), Consumer.attach(rings[1].name)
    ctx = WorkerContext(
        name="compute",
        params=params,
        inputs=[Consumer.attach(rings[0].name)],
        outputs=[Producer.attach(rings[1].name)],
        log=JsonLogger("compute", "warning"),
        runtime_dir="/tmp",
        state_dir="/tmp",
        incarnation=0,
    )
    stage = load_stage(stage_ref)
    samples = []
    try:
        stage.start(ctx)
        for k in range(batches):
            _write(source, k, streams)
            began = time.perf_counter()
            moved = stage.do_work()
            samples.append(time.perf_counter() - began)
            assert moved == 1
            while sink.try_read() is not None:
                pass
            sink.release()
    finally:
        stage.close()
        for side in (source, sink, *ctx.inputs, *ctx.outputs):
            side.close()
        for ring in rings:
            ring.destroy()
    return samples[len(samples) // 10 :]  # the first tenth warms caches up


def stage_rows(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for streams in (1, 16):
        relay = time_stage("stages.testing.relay:Relay", {}, streams, settings.stage_batches)
        compute = time_stage("stages.compute.stage:Compute", {"backend": "numpy"}, streams, settings.stage_batches)
        relay_p50, compute_p50 = np.percentile(relay, 50) * 1e6, np.percentile(compute, 50) * 1e6
        rows.append(
            {
                "streams": streams,
                "rows": 64,
                "relay_p50_us": round(float(relay_p50), 1),
                "compute_p50_us": round(float(compute_p50), 1),
                "compute_p99_us": round(float(np.percentile(compute, 99) * 1e6), 1),
                "added_p50_us": round(float(compute_p50 - relay_p50), 1),
            }
        )
    return rows


# ---- report ------------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    worst = max(r["added_p50_us"] for r in result["stage"])
    out = [
        {
            "target": "compute adds per 64-token batch (numpy, default kernels), p50 µs",
            "goal": f"< {TARGET_STAGE_US:g}",
            "value": worst,
            "met": worst < TARGET_STAGE_US,
        }
    ]
    largest = max(r["batch"] for r in result["kernels"])
    numpy_rate = next(
        r["tokens_per_s"]
        for r in result["kernels"]
        if r["kernel"] == "probes" and r["batch"] == largest and r["backend"] == "numpy"
    )
    for r in result["kernels"]:
        if r["kernel"] == "probes" and r["batch"] == largest and r["backend"] == "wgpu":
            speedup = round(r["tokens_per_s"] / numpy_rate, 2)
            gpu = "CPU" not in r["adapter"]
            out.append(
                {
                    "target": f"probes at {largest:,} tokens, {r['adapter']} vs numpy (x)",
                    "goal": f">= {TARGET_GPU_SPEEDUP:g} (a real GPU)" if gpu else "none (a CPU adapter)",
                    "value": speedup,
                    "met": speedup >= TARGET_GPU_SPEEDUP if gpu else None,
                }
            )
    return out


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results.

    A full run from a checkout also writes bench/results/compute-<machine>.json and the generated
    section of docs/compute.md."""
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    backends, notes = open_adapters(progress=not as_json)
    result: dict[str, Any] = {
        "benchmark": "compute",
        "machine": info,
        "load_before": load_before,
        "settings": asdict(settings) | {"probes": PROBES},
        "adapters": [label for _, label in backends],
        "notes": notes,
        "rows": kernel_rows(settings, backends, progress=not as_json),
        "stage": stage_rows(settings),
        "load_after": report.load(),
    }
    result["kernels"] = result["rows"]
    result["targets"] = targets(result)
    _print(result, as_json)
    if not quick:
        report.publish("compute", info, result, markdown(result), docs=DOCS)
    return result


_KERNEL_COLUMNS: tuple[report.Column, ...] = (
    ("kernel", "kernel", "{}"),
    ("adapter", "backend (adapter)", "{}"),
    ("batch", "tokens", "{:,}"),
    ("tokens_per_s", "tokens/s", "{:,}"),
    ("upload_ms", "upload ms", "{}"),
    ("dispatch_ms", "dispatch ms", "{}"),
    ("readback_ms", "readback ms", "{}"),
    ("max_abs_err", "max abs err", "{:.2g}"),
)
_STAGE_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams per batch", "{:,}"),
    ("rows", "rows", "{:,}"),
    ("relay_p50_us", "relay p50 µs", "{:.1f}"),
    ("compute_p50_us", "compute p50 µs", "{:.1f}"),
    ("compute_p99_us", "compute p99 µs", "{:.1f}"),
    ("added_p50_us", "added p50 µs", "{:.1f}"),
)


def _dashes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: "-" if v is None else v for k, v in row.items()} for row in rows]


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/compute.md for this result."""
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            f"Adapters: {', '.join(result['adapters']) or 'none'}. {' '.join(result['notes'])}".rstrip(),
            "",
            f"Kernels (median of {result['settings']['repeats']} calls; upload/dispatch/readback: the wgpu "
            "backend's split of a call):",
            "",
            report.markdown_table(_dashes(result["rows"]), _KERNEL_COLUMNS),
            "",
            "The stage, numpy backend, default kernels, one 64-row batch per `do_work` (in-process rings):",
            "",
            report.markdown_table(result["stage"], _STAGE_COLUMNS),
            "",
            *report.target_table(result["targets"]),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo(f"adapters: {', '.join(result['adapters']) or 'none'} {' '.join(result['notes'])}")
    click.echo()
    click.echo(report.text_table(_dashes(result["rows"]), _KERNEL_COLUMNS))
    click.echo()
    click.echo(report.text_table(result["stage"], _STAGE_COLUMNS))
    for line in report.target_lines(result["targets"]):
        click.echo(line)
