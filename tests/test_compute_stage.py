"""The compute stage: adapter choice, the stage between two real rings (in this process), a wgpu
failure mid-run, the cancel action, and the stage as a real worker in a real engine."""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import orjson
import pytest
import zmq

from engine.logs import JsonLogger
from engine.protocol.requests import ingest_endpoint
from engine.protocol.tokens import OPERATOR
from engine.stage import WorkerContext
from engine.tokens import ensure_token
from shm.batch import Kind, TokenBatch, batch_size, encode_texts, write_batch
from shm.naming import segment_name
from shm.ring import Consumer, Producer, Ring
from stages.compute import adapter_probe, backends, gpu
from stages.compute import stage as stage_module
from stages.compute.stage import SIZES_KEPT, Compute
from tests.engine_harness import Engine, alive, wait_for

CPU = {"device": "llvmpipe (LLVM 15.0.6, 256 bits)", "adapter_type": "CPU", "backend_type": "Vulkan"}
CPU_GL = {**CPU, "backend_type": "OpenGL"}
IGPU = {"device": "Intel(R) UHD 770", "adapter_type": "IntegratedGPU", "backend_type": "Vulkan"}
DGPU = {"device": "NVIDIA H100", "adapter_type": "DiscreteGPU", "backend_type": "Vulkan"}


# ---- adapter choice ------------------------------------------------------------------------


def test_no_adapter_means_numpy():
    choice = gpu.choose_adapter([], "auto", True, None)
    assert (choice.backend, choice.reason) == ("numpy", "no wgpu adapter found")


def test_cpu_only_means_numpy_unless_allowed():
    assert gpu.choose_adapter([CPU_GL, CPU], "auto", False, None).backend == "numpy"
    allowed = gpu.choose_adapter([CPU_GL, CPU], "auto", True, None)
    assert (allowed.backend, allowed.api, allowed.index) == ("wgpu", "Vulkan", 1)  # Vulkan before OpenGL
    assert gpu.choose_adapter([CPU], "wgpu", False, None).backend == "wgpu"  # forcing wgpu takes a CPU one


def test_ranking_discrete_then_integrated_then_cpu():
    assert gpu.choose_adapter([CPU, IGPU, DGPU], "auto", True, None).adapter == "NVIDIA H100"
    assert gpu.choose_adapter([CPU, IGPU], "auto", True, None).adapter == "Intel(R) UHD 770"


def test_overrides():
    assert gpu.choose_adapter([DGPU], "numpy", False, None).backend == "numpy"
    named = gpu.choose_adapter([DGPU, CPU], "auto", False, "llvmpipe")
    assert (named.backend, named.adapter_type) == ("wgpu", "CPU")  # a named adapter, whatever its type
    missing = gpu.choose_adapter([DGPU], "auto", False, "radeon")
    assert missing.backend == "numpy" and "NVIDIA H100" in missing.reason


def test_wgpu_asked_for_opens_here_and_falls_back_to_numpy(monkeypatch, tmp_path):
    log, memory = JsonLogger("compute", "error"), str(tmp_path / "compute.adapters.json")
    monkeypatch.setattr(gpu, "enumerate_adapters", lambda: [])
    kernels = backends.open_kernels({"backend": "wgpu"}, log, memory)
    assert kernels.probe is None and kernels.device is None and kernels.choice["reason"] == "no wgpu adapter found"
    monkeypatch.setenv(backends.ENV_BACKEND, "numpy")  # the environment wins over the params
    assert backends.open_kernels({"backend": "wgpu"}, log, memory).choice["backend"] == "numpy"
    monkeypatch.setenv(backends.ENV_BACKEND, "cuda")
    with pytest.raises(ValueError, match="compute backend must be one of"):
        backends.open_kernels({}, log, memory)


AUTO = """
import json, os, sys, time
from engine.logs import JsonLogger
from stages.compute import backends
kernels = backends.open_kernels({}, JsonLogger("compute", "error"), sys.argv[1])
began = {"reason": kernels.choice["reason"], "idle": os.sched_getscheduler(kernels.probe.pid) == os.SCHED_IDLE}
deadline = time.monotonic() + 30
while not kernels.adopt() and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"began": began, "choice": kernels.choice, "wgpu": "wgpu" in sys.modules}))
"""


def test_auto_lists_the_adapters_in_an_idle_process_and_imports_wgpu_only_to_use_one(tmp_path):
    memory = tmp_path / "compute.adapters.json"
    done = subprocess.run([sys.executable, "-c", AUTO, str(memory)], capture_output=True, timeout=60, check=True)
    out = orjson.loads(done.stdout.splitlines()[-1])
    assert out["began"] == {"reason": "looking for a wgpu adapter in the background", "idle": True}
    found = orjson.loads(memory.read_bytes())
    chosen = "adapters" in found and gpu.choose_adapter(found["adapters"], "auto", False, None).backend == "wgpu"
    assert out["choice"]["backend"] == ("wgpu" if chosen else "numpy")
    assert out["wgpu"] == chosen  # no adapter to use (no GPU here): wgpu never loaded into the worker


def test_an_adapter_the_probe_lists_is_opened_in_this_process(tmp_path):
    memory = str(tmp_path / "compute.adapters.json")
    kernels = backends.open_kernels({"allow_cpu_adapter": True}, JsonLogger("compute", "error"), memory)
    try:
        wait_for(kernels.adopt, 30, "the adapter probe and the device")
    finally:
        kernels.close()
    found = adapter_probe.recall(memory)
    if kernels.choice["backend"] == "numpy":
        pytest.skip(f"no wgpu adapter here: {found}")
    assert kernels.device.name == "wgpu" and kernels.choice["adapter"] in {a["device"] for a in found["adapters"]}


REMEMBERED = """
import json, sys, time
from engine.logs import JsonLogger
from stages.compute import backends
began = time.perf_counter()
kernels = backends.open_kernels({}, JsonLogger("compute", "error"), sys.argv[1])
print(json.dumps({"choice": kernels.choice, "probing": kernels.probe is not None, "wgpu": "wgpu" in sys.modules}))
"""


@pytest.mark.parametrize(
    "findings, reason",
    [
        ({"adapters": [CPU, CPU_GL]}, "only CPU adapters found"),
        ({"adapters": []}, "no wgpu adapter found"),
        ({"error": "OSError('no libvulkan')"}, "no libvulkan"),
    ],
)
def test_a_restart_that_would_not_use_an_adapter_never_imports_wgpu(tmp_path, findings, reason):
    memory = tmp_path / "compute.adapters.json"
    memory.write_bytes(orjson.dumps(findings))
    done = subprocess.run([sys.executable, "-c", REMEMBERED, str(memory)], capture_output=True, timeout=60, check=True)
    out = orjson.loads(done.stdout.splitlines()[-1])
    assert out["choice"]["backend"] == "numpy" and reason in out["choice"]["reason"]
    assert "remembered" in out["choice"]["reason"]
    assert not out["probing"] and not out["wgpu"]


def test_a_remembered_adapter_is_opened_without_listing_again(monkeypatch, tmp_path):
    memory = tmp_path / "compute.adapters.json"
    infos = [{"device": "NVIDIA H100", "adapter_type": "DiscreteGPU", "backend_type": "Vulkan"}]
    memory.write_bytes(orjson.dumps({"adapters": infos}))
    release = threading.Event()

    def slow_enumeration():  # opening takes as long as the test says
        release.wait(10)
        return [types.SimpleNamespace(info=info) for info in infos]

    opened = object()
    monkeypatch.setattr(gpu, "enumerate_adapters", slow_enumeration)
    monkeypatch.setattr(gpu, "open_device", lambda adapter: opened)
    kernels = backends.open_kernels({}, JsonLogger("compute", "error"), str(memory))
    assert kernels.probe.pid is None  # no process: the findings are in
    assert kernels.device is None and kernels.choice["backend"] == "numpy"  # at once, the device still opening
    assert not kernels.adopt()
    release.set()
    wait_for(kernels.adopt, 10, "the device")
    assert kernels.device is opened and kernels.choice["adapter"] == "NVIDIA H100"


def test_no_wgpu_library_means_numpy_with_the_reason_remembered(monkeypatch, tmp_path):
    monkeypatch.setenv("WGPU_LIB_PATH", str(tmp_path / "missing" / "libwgpu_native.so"))
    memory = tmp_path / "compute.adapters.json"
    memory.write_bytes(b'{"adapters": [')  # torn: looked for again
    kernels = backends.open_kernels({}, JsonLogger("compute", "error"), str(memory))
    wait_for(kernels.adopt, 30, "the adapter probe")
    assert kernels.device is None and "cannot load library" in kernels.choice["reason"]
    assert "cannot load library" in orjson.loads(memory.read_bytes())["error"]


def test_a_probe_killed_midway_means_numpy_and_is_not_tried_again(tmp_path):
    memory = str(tmp_path / "compute.adapters.json")
    kernels = backends.open_kernels({}, JsonLogger("compute", "error"), memory)
    os.kill(kernels.probe.pid, signal.SIGKILL)
    wait_for(kernels.adopt, 10, "the adapter probe's end")
    assert kernels.choice["reason"] == "wgpu unusable: the adapter probe exited with status -9"
    again = backends.open_kernels({}, JsonLogger("compute", "error"), memory)
    assert again.probe is None and "remembered" in again.choice["reason"]


def test_closing_the_kernels_stops_the_probe(tmp_path):
    memory = tmp_path / "compute.adapters.json"
    kernels = backends.open_kernels({}, JsonLogger("compute", "error"), str(memory))
    pid = kernels.probe.pid
    kernels.close()
    assert kernels.probe is None and not pathlib.Path(f"/proc/{pid}").exists()  # killed and reaped
    assert not memory.exists()


def test_a_probe_that_cannot_start_means_numpy_with_the_reason(monkeypatch, tmp_path):
    def no_process(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "posix_spawn", no_process)
    kernels = backends.open_kernels({}, JsonLogger("compute", "error"), str(tmp_path / "compute.adapters.json"))
    assert kernels.probe is None and kernels.device is None
    assert kernels.choice["reason"].startswith("the adapter probe could not start: [Errno 11]")


ORPHAN = """
import sys, time
from engine.logs import JsonLogger
from stages.compute import backends
kernels = backends.open_kernels({}, JsonLogger("compute", "error"), sys.argv[1])
print(kernels.probe.pid, flush=True)
time.sleep(60)
"""


def test_the_probe_dies_with_its_worker(tmp_path):
    memory = tmp_path / "compute.adapters.json"
    worker = subprocess.Popen([sys.executable, "-c", ORPHAN, str(memory)], stdout=subprocess.PIPE)
    try:
        pid = int(worker.stdout.readline())
    finally:
        worker.kill()
        worker.wait(10)
        worker.stdout.close()
    wait_for(lambda: not alive(pid), 10, "the orphaned probe's end")
    assert not memory.exists()  # killed, not finished


def test_the_probe_process_lists_what_it_can_and_says_why_not(monkeypatch):
    class Odd:  # an adapter whose info cannot be read
        @property
        def info(self):
            raise RuntimeError("driver went away")

    monkeypatch.setattr(gpu, "enumerate_adapters", lambda: [Odd()])
    assert adapter_probe.list_adapters() == ([], {"error": "RuntimeError('driver went away')"})
    monkeypatch.setattr(gpu, "enumerate_adapters", lambda: [types.SimpleNamespace(info=CPU)])
    assert adapter_probe.list_adapters()[1] == {"adapters": [CPU]}
    assert adapter_probe.main(["adapter_probe", "findings.json"]) == 2  # no parent pid: usage, nothing probed


# ---- the stage between two rings, in this process -------------------------------------------


class Rig:
    """A Compute stage between an input and an output ring it does not own, as a worker has it."""

    def __init__(self, instance: str, tmp_path, params: dict, out_capacity: int = 1 << 20) -> None:
        self.rings = [
            Ring.create(segment_name(instance, "in"), 1 << 20),
            Ring.create(segment_name(instance, "out"), out_capacity),
        ]
        self.source = Producer.attach(self.rings[0].name)
        self.sink = Consumer.attach(self.rings[1].name)
        self.ctx = WorkerContext(
            name="compute",
            params=params,
            inputs=[Consumer.attach(self.rings[0].name)],
            outputs=[Producer.attach(self.rings[1].name)],
            log=JsonLogger("compute", "error"),
            runtime_dir=str(tmp_path),
            state_dir=str(tmp_path),
            incarnation=0,
        )
        self.stage = Compute()
        try:
            self.stage.start(self.ctx)
        except BaseException:
            self.close()
            raise

    def send(self, rows: list[tuple]) -> None:
        """One batch of (stream, seq, kind, token_id, logprob, text) rows."""
        texts = [r[5] for r in rows]
        view = self.source.try_claim(batch_size(len(rows), sum(map(len, texts))))
        cols = write_batch(view, len(rows), sum(map(len, texts)))
        for i, name in enumerate(("stream_id", "seq", "kind", "token_id", "logprob")):
            getattr(cols, name)[:] = [r[i] for r in rows]
        cols.recv_ns[:] = 7
        encode_texts(cols, texts)
        del cols
        view.release()
        self.source.commit(16)

    def receive(self) -> list[dict]:
        """Every batch in the output ring, as plain lists."""
        batches = []
        while (record := self.sink.try_read()) is not None:
            cols = TokenBatch.decode(record[1])
            batch = {n: getattr(cols, n).tolist() for n in ("stream_id", "seq", "kind", "token_id", "recv_ns")}
            batch["logprob"] = cols.logprob.copy()
            batch["texts"] = cols.texts()
            batch.update({name: array.copy() for name, array in cols.extra.items()})
            batches.append(batch)
            del cols
            record[1].release()
        self.sink.release()
        return batches

    def close(self) -> None:
        self.stage.close()
        for side in (self.source, self.sink, *self.ctx.inputs, *self.ctx.outputs):
            side.close()
        for ring in self.rings:
            ring.destroy()


@pytest.fixture
def rig(instance, tmp_path):
    rigs = []

    def make(out_capacity: int = 1 << 20, **params) -> Rig:
        rigs.append(Rig(f"{instance}{len(rigs)}", tmp_path, params, out_capacity))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def stream_rows(
    sid: int, token_ids: list[int], logprobs: list[float], end: bool = True, thinking: int = 0
) -> list[tuple]:
    """A stream's rows: START, ``thinking`` REASONING rows (a reasoning model's), its tokens, END."""
    start = orjson.dumps({"model": "m", "cached": False, "cache_key": None})
    rows = [(sid, 0, Kind.START, 0, math.nan, start)]
    rows += [(sid, i + 1, Kind.REASONING, 77, -0.5, b"hm") for i in range(thinking)]
    rows += [
        (sid, len(rows) + i, Kind.TOKEN, t, lp, b"t%d" % t)
        for i, (t, lp) in enumerate(zip(token_ids, logprobs, strict=True))
    ]
    if end:
        rows.append((sid, len(rows), Kind.END, 0, math.nan, b'{"finish_reason": "stop", "usage": null}'))
    return rows


def test_stage_passes_rows_through_and_appends_columns(rig):
    r = rig(backend="numpy", repetition={"ngram": 2, "window": 4, "threshold": 0.5}, coalesce_rows=1)
    lps = [math.log(0.5), math.log(0.25), math.nan, math.log(0.5)]
    rows = stream_rows(1, [5, 6, 7, 8], lps) + stream_rows(2, [9, 9, 9, 9, 9, 9], [math.nan] * 6)
    r.send(rows[:5])
    r.send(rows[5:])
    assert r.stage.do_work() == 2
    out = r.receive()
    assert [len(b["seq"]) for b in out] == [5, len(rows) - 5]
    flat = {k: [v for b in out for v in b[k]] for k in ("stream_id", "seq", "kind", "token_id", "texts", "recv_ns")}
    assert flat["stream_id"] == [row[0] for row in rows] and flat["seq"] == [row[1] for row in rows]
    assert flat["token_id"] == [row[3] for row in rows] and set(flat["recv_ns"]) == {7}
    assert flat["texts"] == [row[5].decode() for row in rows]
    assert list(out[0])[-7:] == ["hilbert", "conf", "rgba", "entropy", "ppl", "rep", "repflag"]
    col = {k: np.concatenate([b[k] for b in out]) for k in ("conf", "ppl", "entropy", "rep", "repflag", "rgba")}
    # stream 1: START, 4 tokens, END (the END row in the second batch: running state carried over)
    assert col["conf"][:6].tolist() == pytest.approx([0, 0.5, 0.25, 1.0, 0.5, 0])
    nll = [-math.log(0.5), -math.log(0.25), -math.log(0.5)]
    ppl = [math.exp(nll[0]), math.exp(sum(nll[:2]) / 2), math.exp(sum(nll[:2]) / 2), math.exp(sum(nll) / 3)]
    assert col["ppl"][1:5].tolist() == pytest.approx(ppl, rel=1e-6)
    assert col["ppl"][5] == pytest.approx(ppl[-1], rel=1e-6)  # END: the stream's final perplexity
    assert col["entropy"][1] == pytest.approx(math.log(2), abs=1e-6)
    assert col["rgba"][[0, 5]].max() == 0  # control rows: transparent
    # stream 2 repeats one id: the bigram (9, 9) recurs from its third token on
    assert col["repflag"][7:13].tolist() == [0, 0, 0, 1, 1, 1]
    assert col["rep"][7:13].tolist() == pytest.approx([0, 0, 1 / 3, 2 / 4, 3 / 4, 4 / 4])
    assert r.stage.stats()["repetitions"] == 1 and r.stage.stats()["backend"] == "numpy"


def test_records_of_ever_new_shapes_do_not_grow_compute(rig):
    """Compute remembered the output size of every (rows, text bytes) it met, without bound:
    texts' lengths vary without end, so a long-running engine grew by every new shape (~180 bytes
    each). Now what it keeps is bounded."""
    r = rig(backend="numpy", coalesce_rows=1)
    shapes = 6000
    for i in range(shapes):  # 1-4 rows, their texts longer each time: a (rows, text bytes) never seen
        rows = 1 + i % 4
        r.send([(i, seq, Kind.TOKEN, 1, -0.1, b"x" * (1 + i // 4)) for seq in range(rows)])
        if i % 50 == 49:
            while r.stage.do_work():
                pass
            assert len(r.receive()) == 50
    assert len(r.stage.sizes) <= SIZES_KEPT < shapes


def test_output_full_keeps_the_input(rig):
    r = rig(backend="numpy", out_capacity=1 << 18)
    for sid in range(20):  # more than the output ring holds with the columns appended
        r.send(stream_rows(sid, list(range(600)), [-0.1] * 600, end=False))
    moved = r.stage.do_work()
    assert 0 < moved < 20
    seen = [b["stream_id"][0] for b in r.receive()]
    while len(seen) < 20:
        assert r.stage.do_work() > 0
        seen += [b["stream_id"][0] for b in r.receive()]
    assert seen == list(range(20))


def test_probes_columns(rig):
    r = rig(backend="numpy", probes={"count": 3, "dim": 8, "rows": 64, "window": 2})
    r.send(stream_rows(1, [1, 2, 3], [-0.1] * 3))
    r.stage.do_work()
    (batch,) = r.receive()
    assert batch["probe"].shape == (5, 3)
    table, probes = r.stage.table, r.stage.probe_vectors
    raw = (table[[1, 2, 3]] @ probes.T) / np.linalg.norm(table[[1, 2, 3]], axis=1)[:, None]
    expected = np.stack([raw[0], (raw[0] + raw[1]) / 2, (raw[1] + raw[2]) / 2])
    assert np.allclose(batch["probe"][1:4], expected, atol=1e-6)


def per_stream_reference(rows: list[tuple], stage: Compute) -> tuple[dict[str, np.ndarray], int]:
    """The running columns of ``rows`` computed the plain way, one row at a time with a list per
    stream (docs/compute.md), and how many times a stream's flag first fired."""
    n, w, pw = stage.ngram, stage.window, stage.probe_window
    state: dict[int, dict] = {}
    out = {"ppl": [], "rep": [], "repflag": [], "probe": []}
    fired = 0
    for sid, _, kind, token, logprob, _ in rows:
        s = state.setdefault(sid, {"nll": 0.0, "count": 0, "ids": [], "flags": [], "cos": [], "fired": False})
        rep, probe = 0.0, np.zeros(0 if stage.table is None else len(stage.probe_vectors))
        if kind == Kind.TOKEN:
            lp = float(np.float32(logprob))
            if not math.isnan(lp):
                s["nll"], s["count"] = s["nll"] - lp, s["count"] + 1
            ids = s["ids"]
            ids.append(token)
            p = len(ids) - 1
            gram = ids[p - n + 1 : p + 1]
            s["flags"].append(p >= n - 1 and any(ids[j - n + 1 : j + 1] == gram for j in range(max(n - 1, p - w), p)))
            rep = sum(s["flags"][-w:]) / len(s["flags"][-w:])
            if rep >= stage.threshold and not s["fired"]:
                s["fired"], fired = True, fired + 1
            if stage.table is not None:
                emb = stage.table[token % len(stage.table)].astype(np.float64)
                s["cos"].append(stage.probe_vectors @ emb / np.linalg.norm(emb))
                probe = np.mean(s["cos"][-pw:], axis=0)
        out["ppl"].append(math.exp(s["nll"] / s["count"]) if s["count"] else 0.0)
        out["rep"].append(rep)
        out["repflag"].append(kind == Kind.TOKEN and rep >= stage.threshold)
        out["probe"].append(probe)
        if kind in (Kind.END, Kind.ERROR):
            del state[sid]
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}, fired


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_vectorised_streams_equal_a_per_stream_reference(rig, seed):
    # random streams interleaved in random batches: a stream's rows span several calls, a batch
    # holds several streams, some streams end (one id comes back after its END: a new stream)
    rng = np.random.default_rng(seed)
    r = rig(
        backend="numpy",
        repetition={"ngram": int(rng.integers(1, 4)), "window": int(rng.integers(2, 9)), "threshold": 0.5},
        probes={"count": 3, "dim": 8, "rows": 16, "window": 3},
        coalesce_rows=1,  # each record its own computation: the reborn id starts one
    )
    streams = []
    for sid in [*range(1, 9), 3]:
        length = int(rng.integers(0, 60))
        logprobs = np.where(rng.random(length) < 0.2, math.nan, -rng.exponential(1.0, length)).tolist()
        ends = len(streams) == 2 or rng.random() < 0.7  # id 3's first life (the third stream) ends
        tokens = rng.integers(0, 4, length).tolist()
        streams.append(stream_rows(sid, tokens, logprobs, end=bool(ends), thinking=sid % 3))  # thinking: not tokens
    rows, queues, second = [], [list(s) for s in streams[:8]], list(streams[8])
    while any(queues) or second:
        if second and not queues[2]:  # id 3 comes back once its first life has ended
            queues[2], second = second, []
        live = [q for q in queues if q]
        rows.append(live[int(rng.integers(len(live)))].pop(0))
    # ingest never reuses an id; a reused one's new life starts a batch (state goes at the batch's end)
    reborn = [i for i, row in enumerate(rows) if row[0] == 3 and row[2] == Kind.START][1]
    cuts = np.unique([reborn, *rng.choice(np.arange(1, len(rows)), 12, replace=False)])
    for part in np.split(np.arange(len(rows)), cuts):
        r.send([rows[i] for i in part])
    assert r.stage.do_work() == len(cuts) + 1
    out = r.receive()
    got = {k: np.concatenate([b[k] for b in out]) for k in ("ppl", "rep", "repflag", "probe")}
    want, fired = per_stream_reference(rows, r.stage)
    assert np.allclose(got["ppl"], want["ppl"], rtol=1e-5, atol=0)
    assert np.allclose(got["rep"], want["rep"], atol=1e-6)
    assert got["repflag"].tolist() == want["repflag"].astype(int).tolist()
    assert np.allclose(got["probe"], want["probe"], atol=1e-5)
    assert r.stage.stats()["repetitions"] == fired and fired > 0


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "compiled"])
def test_small_records_equal_the_reference_and_the_vectorised_path(rig, compiled):
    # a paced stream's records: 1-8 rows each (numpy: row by row), against the plain per-stream
    # reference and against the same rows computed in large records (numpy: the vectorised path);
    # a threshold of 0.7 with a window of 10: a share of 7/10 sits on the f32 rounding edge
    rng = np.random.default_rng(11)
    params = {"repetition": {"ngram": 3, "window": 10, "threshold": 0.7}, "coalesce_rows": 1, "compiled": compiled}
    streams = []
    for sid in range(1, 6):
        length = int(rng.integers(20, 70))
        logprobs = np.where(rng.random(length) < 0.2, math.nan, -rng.exponential(1.0, length)).tolist()
        tokens = rng.integers(0, 3, length).tolist()
        streams.append(stream_rows(sid, tokens, logprobs, end=sid != 5, thinking=sid % 3))  # thinking: not tokens
    rows, queues = [], [list(q) for q in streams]
    while any(queues):
        live = [q for q in queues if q]
        rows.append(live[int(rng.integers(len(live)))].pop(0))
    one_by_one, vectorised = rig(backend="numpy", **params), rig(backend="numpy", **params)
    cuts = np.cumsum(rng.integers(1, stage_module._SMALL_RECORD + 1, len(rows)))
    small = np.split(np.arange(len(rows)), cuts[cuts < len(rows)])
    for part in small:
        one_by_one.send([rows[i] for i in part])
        assert one_by_one.stage.do_work() == 1
    assert max(map(len, small)) == stage_module._SMALL_RECORD and min(map(len, small)) == 1
    for part in np.array_split(np.arange(len(rows)), 9):
        vectorised.send([rows[i] for i in part])
        assert vectorised.stage.do_work() == 1
    got, other = (
        {k: np.concatenate([b[k] for b in out]) for k in ("ppl", "rep", "repflag")}
        for out in (one_by_one.receive(), vectorised.receive())
    )
    want, fired = per_stream_reference(rows, one_by_one.stage)
    assert np.allclose(got["ppl"], want["ppl"], rtol=1e-5, atol=0)
    assert np.allclose(got["rep"], want["rep"], atol=1e-6)
    assert got["repflag"].tolist() == want["repflag"].astype(int).tolist()
    assert got["rep"].tobytes() == other["rep"].tobytes() and got["repflag"].tolist() == other["repflag"].tolist()
    assert np.allclose(got["ppl"], other["ppl"], rtol=1e-6, atol=0)
    assert one_by_one.stage.stats()["repetitions"] == fired == vectorised.stage.stats()["repetitions"] > 0
    assert np.isclose(got["rep"], 0.7).any()  # the edge was reached


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "compiled"])
def test_long_streams_through_every_path_equal_the_reference(rig, compiled):
    # streams longer than a state row (compacted: its last window + ngram - 1 columns moved to the
    # front), records with more of one stream's tokens than a row has free (numpy: the rows
    # widened), and records of each shape: a few rows (numpy: row by row), one stream (views), a
    # token of each of many streams (no sort) and several tokens of several streams (sorted)
    rng = np.random.default_rng(5)
    params = {"repetition": {"ngram": 3, "window": 16, "threshold": 0.5}, "coalesce_rows": 1, "compiled": compiled}
    queues = {}
    for sid in range(1, 25):
        length = int(rng.integers(400, 600)) if sid <= 4 else int(rng.integers(5, 60))
        logprobs = np.where(rng.random(length) < 0.1, math.nan, -rng.exponential(1.0, length)).tolist()
        queues[sid] = stream_rows(sid, rng.integers(0, 3, length).tolist(), logprobs, end=sid != 2)
    # over _ROWS_AT_ONCE rows of one stream, then of three streams: computed in parts
    records = [
        queues[1][:300],
        [row for rows in zip(*(queues[sid][:100] for sid in (2, 3, 4)), strict=True) for row in rows],
    ]
    for sid, count in ((1, 300), (2, 100), (3, 100), (4, 100)):
        del queues[sid][:count]
    while any(queues.values()):
        live = [sid for sid, q in queues.items() if q]
        shape = rng.integers(4)
        if shape == 0:  # one stream, up to 150 rows
            sid = live[int(rng.integers(len(live)))]
            take = [(sid, int(rng.integers(1, 151)))]
        elif shape == 1:  # one row of each of up to 20 streams
            take = [(sid, 1) for sid in rng.permutation(live)[:20].tolist()]
        else:  # several rows of several streams, interleaved
            take = [(sid, int(rng.integers(1, 9))) for sid in rng.permutation(live)[:6].tolist()]
        parts = [queues[sid][:count] for sid, count in take]
        for sid, count in take:
            del queues[sid][:count]
        # round robin over the parts: each stream's rows in order, the streams interleaved
        records.append([part[i] for i in range(max(map(len, parts))) for part in parts if i < len(part)])
    r = rig(backend="numpy", **params)
    for record in records:
        r.send(record)
        assert r.stage.do_work() == 1
    out = r.receive()
    got = {k: np.concatenate([b[k] for b in out]) for k in ("ppl", "rep", "repflag")}
    flat = [row for record in records for row in record]
    want, fired = per_stream_reference(flat, r.stage)
    if not compiled:  # the C kernel takes a token at a time: its rows never widen
        assert r.stage.states.span + 64 < r.stage.states.width <= r.stage.states.span + stage_module._ROWS_AT_ONCE
    assert np.allclose(got["ppl"], want["ppl"], rtol=1e-5, atol=0)
    assert np.allclose(got["rep"], want["rep"], atol=1e-6)
    assert got["repflag"].tolist() == want["repflag"].astype(int).tolist()
    assert r.stage.stats()["repetitions"] == fired > 0


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "compiled"])
def test_records_of_one_token_per_stream_equal_the_reference(rig, compiled):
    # the paced load's record: a token of each of 24 streams (their order shuffled), records with a
    # logprob on every row and records with some missing (the two ways the running sums move on),
    # streams longer than a state row (compacted); the same rows cut into records of at most
    # _SMALL_RECORD rows (row by row) give the same rep and repflag, bit for bit
    rng = np.random.default_rng(17)
    params = {"repetition": {"ngram": 4, "window": 16, "threshold": 0.5}, "coalesce_rows": 1, "compiled": compiled}
    streams, length = list(range(1, 25)), 150
    ids = {sid: rng.integers(0, 2 if sid % 4 == 0 else 50, length).tolist() for sid in streams}
    records = []
    for t in range(length):
        missing = t % 5 == 3  # every fifth record has rows without a logprob
        rows = []
        for sid in rng.permutation(streams).tolist():
            lp = math.nan if missing and rng.random() < 0.3 else -float(rng.exponential(1.0))
            rows.append((sid, t, Kind.TOKEN, ids[sid][t], lp, b"t"))
        records.append(rows)
    distinct, small = rig(backend="numpy", **params), rig(backend="numpy", **params)
    for record in records:
        distinct.send(record)
        assert distinct.stage.do_work() == 1
        for start in range(0, len(record), stage_module._SMALL_RECORD):
            small.send(record[start : start + stage_module._SMALL_RECORD])
            assert small.stage.do_work() == 1
    got, other = (
        {k: np.concatenate([b[k] for b in out]) for k in ("ppl", "rep", "repflag")}
        for out in (distinct.receive(), small.receive())
    )
    want, fired = per_stream_reference([row for record in records for row in record], distinct.stage)
    assert np.allclose(got["ppl"], want["ppl"], rtol=1e-5, atol=0)
    assert np.allclose(got["rep"], want["rep"], atol=1e-6)
    assert got["repflag"].tolist() == want["repflag"].astype(int).tolist()
    assert got["rep"].tobytes() == other["rep"].tobytes() and got["repflag"].tolist() == other["repflag"].tolist()
    assert np.allclose(got["ppl"], other["ppl"], rtol=1e-6, atol=0)
    assert distinct.stage.stats()["repetitions"] == fired == small.stage.stats()["repetitions"] > 0


@pytest.fixture(scope="module")
def lavapipe_params():
    try:
        infos = [dict(a.info) for a in gpu.enumerate_adapters()]
    except Exception as exc:
        pytest.skip(f"wgpu cannot enumerate adapters here: {exc!r}")
    if not any(i.get("backend_type") == "Vulkan" for i in infos):
        pytest.skip("no Vulkan adapter (install mesa-vulkan-drivers libvulkan1 for lavapipe; tools/test.sh does)")
    return {"backend": "wgpu", "allow_cpu_adapter": True}


def test_wgpu_failure_mid_run_falls_back_without_loss(rig, lavapipe_params):
    params = {"repetition": {"ngram": 2, "window": 8}, "probes": {"count": 2, "dim": 8, "rows": 32}}
    reference = rig(backend="numpy", **params)
    device = rig(**lavapipe_params, **params)
    assert device.stage.stats()["backend"] == "wgpu"
    rng = np.random.default_rng(5)
    batches = [stream_rows(sid, rng.integers(0, 5, 30).tolist(), (-rng.random(30)).tolist()) for sid in range(1, 7)]
    real_run, calls = device.stage.kernels.device.run, []

    def flaky(kernel, inputs, params):
        calls.append(kernel)
        if 5 <= len(calls) <= 12:  # the device fails for a while, mid-run
            raise RuntimeError("device lost (injected)")
        return real_run(kernel, inputs, params)

    device.stage.kernels.device.run = flaky
    for rows in batches:
        for r in (reference, device):
            r.send(rows)
            assert r.stage.do_work() == 1
    want, got = reference.receive(), device.receive()
    assert len(got) == len(batches) == len(want)
    assert device.stage.stats()["fallbacks"] == 8
    for a, b in zip(want, got, strict=True):
        assert a["seq"] == b["seq"] and a["texts"] == b["texts"]
        for name in ("hilbert", "conf", "entropy", "ppl", "rep", "repflag", "probe"):
            assert np.allclose(a[name], b[name], atol=1e-5, equal_nan=True), name
        assert np.abs(a["rgba"].astype(int) - b["rgba"]).max() <= 1


def test_auto_switches_to_a_real_adapter_found_in_the_background(rig, lavapipe_params):
    params = {"repetition": {"ngram": 2, "window": 8}}
    reference = rig(backend="numpy", **params)
    auto = rig(backend="auto", allow_cpu_adapter=True, **params)
    assert auto.stage.stats()["backend"] == "numpy"  # ready at once, on numpy
    rng = np.random.default_rng(9)
    batches = [stream_rows(sid, rng.integers(0, 5, 30).tolist(), (-rng.random(30)).tolist()) for sid in range(1, 4)]
    for r in (reference, auto):
        r.send(batches[0])
        assert r.stage.do_work() == 1
    wait_for(auto.stage.kernels.adopt, 60, "the background probe to open lavapipe")
    assert auto.stage.stats()["backend"] == "wgpu" and auto.stage.stats()["api"] == "Vulkan"
    for rows in batches[1:]:
        for r in (reference, auto):
            r.send(rows)
            assert r.stage.do_work() == 1
    assert auto.stage.kernels.device.dispatches > 0 and auto.stage.stats()["fallbacks"] == 0
    for a, b in zip(reference.receive(), auto.receive(), strict=True):
        for name in ("hilbert", "conf", "entropy", "ppl", "rep", "repflag"):
            assert np.allclose(a[name], b[name], atol=1e-5, equal_nan=True), name


def test_small_records_stay_on_the_cpu_with_a_device(rig, lavapipe_params):
    device = rig(**lavapipe_params)
    backend = device.stage.kernels.device
    warmed = backend.dispatches  # the warm-up's
    device.send(stream_rows(1, [], [])[:1])  # one START row
    device.send(stream_rows(1, [3], [-0.5], end=False)[1:])  # one token
    assert device.stage.do_work() == 2  # computed together, as one 2-row record
    assert backend.dispatches == warmed  # a device call would cost more than the record
    device.send(stream_rows(1, list(range(20)), [-0.5] * 20, end=False)[1:])
    assert device.stage.do_work() == 1 and backend.dispatches > warmed
    batches = device.receive()
    assert [len(b["seq"]) for b in batches] == [2, 20] and batches[0]["conf"][1] == pytest.approx(math.exp(-0.5))


def test_cancel_action_asks_ingest(rig, tmp_path):
    token = ensure_token(str(tmp_path), OPERATOR)  # the engine's operator token, which ingest makes
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ingest_endpoint(str(tmp_path)))
    try:
        r = rig(backend="numpy", repetition={"ngram": 1, "window": 4, "threshold": 0.5, "action": "cancel"})
        r.send(stream_rows(3, [4] * 8, [-0.1] * 8, end=False))
        asked = []

        def answer():  # a stand-in for ingest: answers one request (after its envelope: identity, call id)
            if router.poll(0):
                *envelope, frame = router.recv_multipart()
                asked.append(orjson.loads(frame))
                router.send_multipart([*envelope, orjson.dumps({"type": "cancelled", "stream_id": 3})])
            return asked

        thread = threading.Thread(target=lambda: wait_for(answer, 5, "a cancel request"))
        thread.start()
        r.stage.do_work()
        thread.join()
        assert asked == [{"type": "cancel", "stream_id": 3, "token": token}]
        assert r.stage.stats()["cancels"] == 1
    finally:
        router.close(0)


def test_cancel_failure_is_counted_not_fatal(rig):
    r = rig(backend="numpy", repetition={"ngram": 1, "window": 4, "threshold": 0.5, "action": "cancel"})
    r.send(stream_rows(3, [4] * 8, [-0.1] * 8))
    assert r.stage.do_work() == 1  # nobody listens at the ingest endpoint: times out quickly
    assert r.stage.stats()["cancel_errors"] == 1 and len(r.receive()) == 1


def test_bad_params_are_named(rig):
    with pytest.raises(ValueError, match="hilbert_order"):
        rig(backend="numpy", hilbert_order=16)
    with pytest.raises(ValueError, match=r"repetition\.action"):
        rig(backend="numpy", repetition={"action": "shout"})


# ---- a real worker in a real engine ---------------------------------------------------------

ENGINE = """
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 2.0
health_interval_s = 0.2
stop_timeout_s = 5.0

[supervisor]
backoff_initial_s = 0.01
backoff_max_s = 0.2

[ring_defaults]
capacity = 262144

[workers.source]
stage = "counter"
outputs = ["source-compute"]
params = {{ streams = 4, batch = 16, rate = 20000, total = {total} }}

[workers.compute]
stage = "compute"
inputs = ["source-compute"]
outputs = ["compute-sink"]
params = {{ backend = "numpy" }}

[workers.sink]
stage = "verify"
inputs = ["compute-sink"]
params = {{ streams = 4 }}
"""


@pytest.mark.timeout(90)
def test_compute_worker_killed_mid_run_loses_nothing(tmp_path, instance):
    total = 40_000
    engine = Engine(tmp_path, ENGINE.format(total=total), instance).start()
    try:
        sink = lambda: engine.worker("sink")["stats"]  # noqa: E731
        wait_for(lambda: sink().get("messages", 0) > 4000, 30, "tokens through compute")
        # its stats come with its heartbeats: wait for one sent after it computed tokens
        victim = wait_for(lambda: (w := engine.worker("compute"))["stats"].get("tokens", 0) > 0 and w, 10, "stats")
        assert victim["stats"]["backend"] == "numpy"
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: (w := engine.worker("compute"))["restarts"] >= 1 and w["state"] == "running", 20, "restart")
        stats = wait_for(lambda: (s := sink()).get("messages", 0) >= total and s, 60, "every token at the sink")
        assert stats["messages"] == total and stats["gaps"] == 0 and stats["foreign"] == 0, stats
        assert engine.stop() == 0
    finally:
        engine.kill_all()
    with contextlib.suppress(FileNotFoundError):
        assert '"event":"compute_backend"' in engine.log()


@pytest.mark.timeout(60)
def test_an_auto_worker_without_an_adapter_to_use_never_loads_wgpu(tmp_path, instance):
    config = ENGINE.format(total=4000).replace('backend = "numpy"', 'backend = "auto"')
    engine = Engine(tmp_path, config, instance).start()
    try:
        probed = lambda: "background" not in (w := engine.worker("compute"))["stats"].get("reason", "background") and w  # noqa: E731
        worker = wait_for(probed, 30, "compute's adapter probe to end")
        maps = pathlib.Path(f"/proc/{worker['pid']}/maps").read_text()
        if worker["stats"]["backend"] == "numpy":  # this machine has no adapter auto takes
            assert "wgpu" not in maps and "libvulkan" not in maps
        else:
            assert "wgpu" in maps
        assert engine.stop() == 0
    finally:
        engine.kill_all()


def test_probes_from_a_gguf_token_embd(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package (the llamacpp extra) reads GGUF files")
    import importlib.util

    from stages.compute.probes import probe_table

    spec = importlib.util.spec_from_file_location("make_tiny_gguf", "tools/make_tiny_gguf.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    path = tiny.write(tmp_path / "tiny.gguf", seed=0)
    table, probes = probe_table({"table": str(path), "count": 3})
    assert table.shape == (len(tiny.vocabulary()[0]), tiny.N_EMBD)  # one row per vocabulary token
    assert probes.shape == (3, tiny.N_EMBD) and np.allclose(np.linalg.norm(probes, axis=1), 1)
    assert np.abs(table).max() > 0


def test_records_waiting_together_are_computed_as_one_with_the_same_columns(rig):
    rng = np.random.default_rng(7)
    rows = []
    for sid in range(1, 6):
        length = int(rng.integers(5, 40))
        logprobs = (-rng.exponential(1.0, length)).tolist()
        rows += stream_rows(sid, rng.integers(0, 4, length).tolist(), logprobs)
    rows.sort(key=lambda row: (row[1], row[0]))  # streams interleaved, each in order
    parts = np.array_split(np.arange(len(rows)), 17)
    outputs = []
    for coalesce in (1, 256):
        r = rig(backend="numpy", repetition={"ngram": 2, "window": 8}, coalesce_rows=coalesce)
        for part in parts:
            r.send([rows[i] for i in part])
        assert r.stage.do_work() == len(parts)
        outputs.append(r.receive())
    one_by_one, coalesced = outputs
    assert len(one_by_one) == len(parts) and len(coalesced) < len(parts)
    for name in ("stream_id", "seq", "kind", "token_id", "logprob", "hilbert", "conf", "ppl", "rep", "repflag"):
        a, b = (np.concatenate([batch[name] for batch in out]) for out in outputs)
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert [t for batch in coalesced for t in batch["texts"]] == [row[5].decode() for row in rows]


# ---- records that outgrow the output ring's max_record ---------------------------------------


def _long_rows(sid: int, count: int, text_bytes: int) -> list[tuple]:
    return [(sid, i + 1, Kind.TOKEN, i, math.log(0.5), b"x" * text_bytes) for i in range(count)]


def _drain(r: Rig) -> list[dict]:
    """Run the stage until every input record went through, taking its output as it comes (so a
    small output ring fills up and empties again on the way)."""
    out: list[dict] = []
    deadline = time.monotonic() + 20
    while r.ctx.inputs[0].available() or r.stage.split_at:
        assert time.monotonic() < deadline, "compute stopped moving"
        r.stage.do_work()
        out += r.receive()
    return out


def test_coalescing_stays_within_the_output_rings_records(rig):
    # 64 KiB output ring: records of at most 16,376 bytes; six 40-row records coalesced into one
    # (240 rows, ~41 KB) raised RecordTooLarge and crash-looped compute
    r = rig(out_capacity=1 << 16, backend="numpy")
    rows = _long_rows(1, 240, 100)
    for i in range(0, 240, 40):
        r.send(rows[i : i + 40])
    out = _drain(r)
    assert [s for b in out for s in b["seq"]] == list(range(1, 241))
    assert all(len(b["seq"]) * 100 < r.ctx.outputs[0].max_record for b in out)


def test_a_record_too_large_for_the_output_is_split_without_changing_its_values(rig):
    big, small = rig(backend="numpy"), rig(out_capacity=1 << 16, backend="numpy")
    rows = _long_rows(3, 64, 1000)  # one 64 KB record: four or more output records of at most 16 KB
    big.send(rows)
    small.send(rows)
    want = _drain(big)
    got = _drain(small)
    assert len(want) == 1 and len(got) >= 4 and small.stage.counts["split_records"] == len(got)
    assert [s for b in got for s in b["seq"]] == want[0]["seq"]
    for column in ("conf", "ppl", "rep", "entropy", "hilbert"):
        np.testing.assert_array_equal(np.concatenate([b[column] for b in got]), want[0][column])


# ---- the compiled record (stages/compute/compiled.c) -------------------------------------------


def test_the_compiled_record_equals_numpy_in_every_column(rig):
    # records of every shape through both paths: control rows, missing, positive and extreme
    # logprobs, ids with bit 31 set (hashed) and past the curve's cells; the floats within an ulp
    # or two of numpy's exp and log (libm's here), the colour within one step of its rounding, the
    # rest exact
    rng = np.random.default_rng(23)
    rows = []
    for sid in range(1, 13):
        length = int(rng.integers(1, 120))
        logprobs = -rng.exponential(2.0, length)
        logprobs[rng.random(length) < 0.1] = math.nan
        logprobs[rng.random(length) < 0.05] = 0.3
        logprobs[rng.random(length) < 0.05] = -1e-30
        logprobs[rng.random(length) < 0.05] = -40.0
        ids = rng.integers(0, 3, length)
        ids[rng.random(length) < 0.05] = rng.integers(1 << 31, 1 << 32)
        rows += stream_rows(sid, ids.tolist(), logprobs.tolist(), end=sid % 3 != 0)
    rows.sort(key=lambda row: (row[1], rng.random()))  # streams interleaved, each in order
    parts = np.split(np.arange(len(rows)), np.sort(rng.choice(np.arange(1, len(rows)), 40, replace=False)))
    outputs = []
    for compiled in (False, True):
        r = rig(backend="numpy", repetition={"ngram": 3, "window": 12}, coalesce_rows=1, compiled=compiled)
        assert r.stage.stats()["compiled"] == compiled
        for part in parts:
            r.send([rows[i] for i in part])
            assert r.stage.do_work() == 1
        out = r.receive()
        outputs.append({k: np.concatenate([np.asarray(b[k]) for b in out]) for k in out[0] if k != "texts"})
        outputs[-1]["repetitions"] = r.stage.stats()["repetitions"]
    numpy_path, compiled_path = outputs
    for name in ("stream_id", "seq", "kind", "token_id", "hilbert", "rep", "repflag", "repetitions"):
        np.testing.assert_array_equal(compiled_path[name], numpy_path[name], err_msg=name)
    np.testing.assert_allclose(compiled_path["conf"], numpy_path["conf"], rtol=3e-7, atol=0)
    # entropy's r ln r, r = 1 - p: an ulp of p near 1 is a few parts per million of r
    np.testing.assert_allclose(compiled_path["entropy"], numpy_path["entropy"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(compiled_path["ppl"], numpy_path["ppl"], rtol=1e-6, atol=0)
    assert np.abs(compiled_path["rgba"].astype(int) - numpy_path["rgba"]).max() <= 1
    assert numpy_path["repetitions"] > 0
