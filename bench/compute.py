"""``neuralpipe bench compute``: each compute kernel's throughput on numpy and on every wgpu
adapter there is, at 1k, 64k and 1M tokens per call, with the device time split into upload,
dispatch (submit to done) and readback; the compute stage's time per record; its start-up.

Kernel rows: a call's inputs are random (never all zero), the same for every backend; a backend's
output is compared with numpy's (``max_abs_err``). Each call is timed ``repeats`` times after one
untimed call (pipelines are compiled and warmed up when the device opens) and the median is kept.
Upload/dispatch/readback are the wgpu backend's own clocks around those three steps (dispatch
waits for the work by reading back 4 bytes). A CPU adapter (Mesa lavapipe) is measured when it is
the only one: the issue's 10x target is for a real GPU, and a CPU adapter runs on the same cores.

Stage rows: a Compute stage (numpy backend, default kernels) between two rings in this process;
records of 1, 2, 16, 32 and 64 token rows from 1 or several streams are written into its input ring
one at a time and its ``do_work`` is timed: read, kernels, per-stream running values, write with
the columns, commit. A Relay (the copy alone) is timed the same way. With a baseline checkout
(``NEURALPIPE_BENCH_BASELINE=/tmp/np-base``) the same harness times the baseline's stage in a
subprocess of the same run (its engine, shm and stages first on the path).

Start-up rows: a real compute worker process started the way the supervisor starts one, its
``ready`` timed on a control ROUTER; then SIGKILL and the time until the process is gone. The
first start has an empty state directory, the restarts keep it (docs/compute.md: what compute
remembers there).
"""

from __future__ import annotations

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
TARGET_STAGE_US = 50.0  # compute's time per 64-row record with the default kernels, numpy (issue 11)
TARGET_GPU_SPEEDUP = 10.0  # probes at 1M tokens on a real GPU against numpy
PROBES = {"rows": 4096, "dim": 64, "k": 8}  # the stage's default hashed table, 8 probes


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    repeats: int
    stage_batches: int
    stage_rounds: int  # baseline and this checkout alternated, per case
    startup_runs: int  # the first start, then restarts


FULL = Settings(sizes=(1_000, 65_536, 1_048_576), repeats=3, stage_batches=3000, stage_rounds=3, startup_runs=6)
QUICK = Settings(sizes=(1_000, 16_384), repeats=1, stage_batches=300, stage_rounds=1, startup_runs=2)


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


# ---- the stage's time per record -------------------------------------------------------------

# (rows, streams) of a record; 32 rows of 32 streams: a paced load's record (a token of each stream)
STAGE_CASES = ((1, 1), (2, 2), (16, 1), (16, 16), (32, 32), (64, 1), (64, 16))
ENV_BASELINE = "NEURALPIPE_BENCH_BASELINE"  # a checkout of older code to measure side by side


def _write(producer: Producer, k: int, streams: int, rows: int) -> None:
    """Record ``k``: ``rows`` token rows spread over ``streams`` streams (ingest's shape)."""
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


def time_stage(stage_ref: str, params: dict, rows: int, streams: int, records: int) -> list[float]:
    """Seconds of ``do_work`` for each of ``records`` single-record turns of the stage."""
    from engine.worker import load_stage

    instance = "b" + uuid.uuid4().hex[:10]
    rings = [Ring.create(segment_name(instance, name), 1 << 22) for name in ("in", "out")]
    source, sink = Producer.attach(rings[0].name), Consumer.attach(rings[1].name)
    state = tempfile.mkdtemp(prefix="np-bench-compute-")
    ctx = WorkerContext(
        name="compute",
        params=params,
        inputs=[Consumer.attach(rings[0].name)],
        outputs=[Producer.attach(rings[1].name)],
        log=JsonLogger("compute", "warning"),
        runtime_dir=state,
        state_dir=state,
        incarnation=0,
    )
    stage = load_stage(stage_ref)
    samples = []
    try:
        stage.start(ctx)
        for k in range(records):
            _write(source, k, streams, rows)
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
        shutil.rmtree(state, ignore_errors=True)
    return samples[len(samples) // 10 :]  # the first tenth warms caches up


def stage_medians(records: int, cases: tuple[int, ...] | None = None, numpy_too: bool = True) -> list[dict[str, float]]:
    """Per case of :data:`STAGE_CASES` (those of index in ``cases``, default all): p50 and p99 µs of
    the relay and of compute on the CPU with its default params (the C kernel where it is built)
    and, with ``numpy_too``, p50 of its numpy path (``compiled`` off; a baseline checkout may not
    know the param)."""
    out = []
    for i in range(len(STAGE_CASES)) if cases is None else cases:
        rows, streams = STAGE_CASES[i]
        relay = time_stage("stages.testing.relay:Relay", {}, rows, streams, records)
        compute = time_stage("stages.compute.stage:Compute", {"backend": "numpy"}, rows, streams, records)
        row = {
            "rows": rows,
            "streams": streams,
            "relay_p50_us": round(float(np.percentile(relay, 50)) * 1e6, 1),
            "compute_p50_us": round(float(np.percentile(compute, 50)) * 1e6, 1),
            "compute_p99_us": round(float(np.percentile(compute, 99)) * 1e6, 1),
        }
        if numpy_too:
            numpy_path = time_stage("stages.compute.stage:Compute", _NUMPY_PATH, rows, streams, records)
            row["numpy_p50_us"] = round(float(np.percentile(numpy_path, 50)) * 1e6, 1)
        out.append(row)
    return out


_NUMPY_PATH = {"backend": "numpy", "compiled": False}


_IN_BASELINE = """
import json, sys
sys.path.insert(0, sys.argv[1])  # engine, shm and stages from the baseline; this harness from here
from neuralpipe_bench import compute
print(json.dumps(compute.{call}))
"""


def in_baseline(baseline: str, call: str) -> Any:
    """``call`` (an expression on this module) evaluated with the baseline's engine, shm and stages."""
    done = subprocess.run(
        [sys.executable, "-c", _IN_BASELINE.format(call=call), baseline],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode:
        raise click.ClickException(f"baseline run in {baseline} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def stage_rows(settings: Settings, baseline: str | None) -> list[dict[str, Any]]:
    """The stage's time per record now and, with a baseline checkout, before, side by side: case
    by case, the baseline then this checkout, ``settings.stage_rounds`` times (the machine's load
    drifts: alternating spreads it over both); each figure the median of the rounds' medians."""
    rows = []
    for i in range(len(STAGE_CASES)):
        now, before = [], []
        for _ in range(settings.stage_rounds):
            if baseline:
                before += in_baseline(baseline, f"stage_medians({settings.stage_batches}, ({i},), numpy_too=False)")
            now += stage_medians(settings.stage_batches, (i,))
        row = {key: now[0][key] for key in ("rows", "streams")}
        for key in ("relay_p50_us", "compute_p50_us", "compute_p99_us", "numpy_p50_us"):
            row[key] = round(statistics.median(r[key] for r in now), 1)
        row["added_p50_us"] = round(row["compute_p50_us"] - row["relay_p50_us"], 1)
        row["compiled_speedup"] = round(row["numpy_p50_us"] / row["compute_p50_us"], 2)
        row["before_p50_us"] = round(statistics.median(r["compute_p50_us"] for r in before), 1) if before else None
        row["speedup"] = round(row["before_p50_us"] / row["compute_p50_us"], 2) if before else None
        rows.append(row)
    return rows


# ---- the worker's start-up and teardown -------------------------------------------------------------

_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from engine.worker import RingEnd, WorkerSpec, main
from shm.wait import WaitStrategy
d = json.loads(sys.argv[2])
main(WorkerSpec(name="compute", stage="stages.compute.stage:Compute",
                inputs=(RingEnd(d["in"], WaitStrategy()),), outputs=(RingEnd(d["out"], WaitStrategy()),),
                control_endpoint=d["control"], runtime_dir=d["dir"], state_dir=d["dir"],
                supervisor_pid=d["parent"], incarnation=d["incarnation"], log_level="warning"))
"""


def startup_samples(root: str, runs: int, settle_s: float) -> dict[str, list[float]]:
    """A real compute worker (default params: backend auto) started ``runs`` times from the code
    in ``root``, as the supervisor starts one (a fresh interpreter, its rings, a control DEALER):
    ms from the start of the process to its ``ready``, and from a SIGKILL ``settle_s`` after
    ready to the process being gone (its pidfd readable). The first start has an empty state
    directory; the others (restarts) keep it, as a supervisor's restarts do."""
    import zmq

    instance = "b" + uuid.uuid4().hex[:10]
    rings = [Ring.create(segment_name(instance, name), 1 << 20) for name in ("in", "out")]
    state = tempfile.mkdtemp(prefix="np-bench-start-")
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    control = f"ipc://{state}/control.sock"
    router.bind(control)
    samples: dict[str, list[float]] = {"ready_ms": [], "gone_ms": []}
    try:
        for incarnation in range(runs):
            spec = {"in": rings[0].name, "out": rings[1].name, "control": control, "dir": state}
            spec |= {"parent": os.getpid(), "incarnation": incarnation}
            began = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", _WORKER, root, json.dumps(spec)])
            try:
                while True:
                    if not router.poll(30_000):
                        raise click.ClickException(f"compute from {root} sent no ready within 30 s")
                    _, frame = router.recv_multipart()
                    if json.loads(frame)["type"] == "ready":
                        samples["ready_ms"].append((time.perf_counter() - began) * 1e3)
                        break
                deadline = time.perf_counter() + settle_s
                while (left := deadline - time.perf_counter()) > 0:  # heartbeats, read and dropped
                    if router.poll(int(left * 1000) + 1):
                        router.recv_multipart()
                pidfd = os.pidfd_open(proc.pid)
                try:
                    killed = time.perf_counter()
                    os.kill(proc.pid, signal.SIGKILL)
                    select.select([pidfd], [], [], 30)
                    samples["gone_ms"].append((time.perf_counter() - killed) * 1e3)
                finally:
                    os.close(pidfd)
            finally:
                proc.kill()
                proc.wait()
    finally:
        router.close()
        context.term()
        for ring in rings:
            ring.destroy()
        shutil.rmtree(state, ignore_errors=True)
    return samples


def startup_rows(settings: Settings, baseline: str | None) -> list[dict[str, Any]]:
    """Start-up (spawn -> ready) and teardown (SIGKILL -> gone) of the first start and of the
    restarts, from this checkout and from the baseline."""
    roots = [("now", str(report.DOCS.parent.parent))] + ([("before", baseline)] if baseline else [])
    rows = []
    for label, root in roots:
        samples = startup_samples(root, settings.startup_runs, settle_s=1.0)
        for case, part in (("first start", slice(0, 1)), ("restart", slice(1, None))):
            ready, gone = samples["ready_ms"][part], samples["gone_ms"][part]
            if ready:
                rows.append(
                    {
                        "code": label,
                        "case": case,
                        "runs": len(ready),
                        "ready_ms": round(statistics.median(ready), 1),
                        "ready_max_ms": round(max(ready), 1),
                        "gone_ms": round(statistics.median(gone), 1),
                        "gone_max_ms": round(max(gone), 1),
                    }
                )
    return rows


# ---- report ------------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    worst = max(r["compute_p50_us"] for r in result["stage"] if r["rows"] == 64)
    out = [
        {
            "target": "compute's time per 64-row record (on the CPU, default params), p50 µs",
            "goal": f"<= {TARGET_STAGE_US:g}",
            "value": worst,
            "met": worst <= TARGET_STAGE_US,
        }
    ]
    restarts = [r for r in result["startup"] if r["code"] == "now" and r["case"] == "restart"]
    if restarts:
        out.append(
            {
                "target": "a restarted compute worker: process start -> ready, median ms",
                "goal": "no adapter probe",
                "value": restarts[0]["ready_ms"],
                "met": None,
            }
        )
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


def compiled_kernel_built() -> bool:
    from stages.compute import stage

    return stage._compiled is not None


def main(as_json: bool = False, quick: bool = False, baseline: str | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results.

    ``baseline`` (default: the environment variable NEURALPIPE_BENCH_BASELINE), a checkout of
    older code (``git worktree add /tmp/np-base <commit>``): its stage and start-up are measured in
    the same run, next to this checkout's. A full run from a checkout also writes
    bench/results/compute-<machine>.json and the generated section of docs/compute.md."""
    settings = QUICK if quick else FULL
    baseline = baseline or os.environ.get(ENV_BASELINE) or None
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
        "baseline": baseline,
        "compiled": compiled_kernel_built(),
        "stage": stage_rows(settings, baseline),
        "startup": startup_rows(settings, baseline),
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
    ("rows", "rows per record", "{:,}"),
    ("streams", "streams", "{:,}"),
    ("relay_p50_us", "relay p50 µs", "{:.1f}"),
    ("before_p50_us", "compute before p50 µs", "{}"),
    ("numpy_p50_us", "numpy path p50 µs", "{:.1f}"),
    ("compute_p50_us", "compute p50 µs", "{:.1f}"),
    ("compute_p99_us", "compute p99 µs", "{:.1f}"),
    ("added_p50_us", "added p50 µs", "{:.1f}"),
    ("compiled_speedup", "compiled vs numpy (x)", "{}"),
    ("speedup", "vs before (x)", "{}"),
)
_STARTUP_COLUMNS: tuple[report.Column, ...] = (
    ("code", "code", "{}"),
    ("case", "case", "{}"),
    ("runs", "runs", "{}"),
    ("ready_ms", "start -> ready ms (median)", "{:.1f}"),
    ("ready_max_ms", "max", "{:.1f}"),
    ("gone_ms", "SIGKILL -> gone ms (median)", "{:.1f}"),
    ("gone_max_ms", "max", "{:.1f}"),
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
            "The stage's time per record (`do_work`: read, compute, write, commit) on the CPU (backend numpy), "
            f"default params ({'the C kernel' if result['compiled'] else 'the C kernel is not built: numpy'}), "
            "one record per call between in-process rings; *numpy path*: the same with `compiled = false`; "
            f"*before*: the baseline checkout ({result['baseline'] or 'none'}) in the same run:",
            "",
            report.markdown_table(_dashes(result["stage"]), _STAGE_COLUMNS),
            "",
            "A compute worker (default params, backend auto) started as the supervisor starts one: a "
            "fresh interpreter to its `ready`, and SIGKILL 1 s after ready to the process gone:",
            "",
            report.markdown_table(result["startup"], _STARTUP_COLUMNS),
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
    click.echo(report.text_table(_dashes(result["stage"]), _STAGE_COLUMNS))
    click.echo()
    click.echo(report.text_table(result["startup"], _STARTUP_COLUMNS))
    for line in report.target_lines(result["targets"]):
        click.echo(line)
