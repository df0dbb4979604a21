"""Where the per-token kernels run: numpy, or WGSL shaders through wgpu on a chosen adapter.

Both backends have the same three methods (``layout``, ``entropy``, ``probes``) with the
signatures of :mod:`stages.compute.kernels`. :func:`choose_backend` picks one: an override
(param ``backend`` or ``NEURALPIPE_COMPUTE_BACKEND``: numpy | wgpu | auto), else the best
adapter: discrete GPU, then integrated, then virtual/unknown, and a CPU adapter (Mesa
lavapipe/llvmpipe) only when allowed, because on a CPU numpy is faster; no adapter: numpy. The
choice and its reason are returned for the log and the metrics.

The wgpu device is made here, lazily, inside the worker process (after spawn: a device made
before a fork hangs the child). Pipelines are compiled and run once at start (the first dispatch
costs up to 0.2 s). Results are read back with ``queue.read_buffer``, which also waits for the
work (``on_submitted_work_done_sync`` is broken in wgpu 0.32). Batches larger than a storage
binding allows are split.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.compute import kernels, shaders

ENV_BACKEND = "NEURALPIPE_COMPUTE_BACKEND"
_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "Unknown": 2, "CPU": 3}
_LUT_MAX_ORDER = 10  # precomputed Hilbert centres up to 4**10 cells (8 MiB); larger orders walk


class NumpyBackend:
    name = "numpy"
    adapter = "numpy"

    def __init__(self) -> None:
        self._lut: dict[int, np.ndarray] = {}
        self.timing = {"upload_s": 0.0, "dispatch_s": 0.0, "readback_s": 0.0}

    def layout(self, token_id: np.ndarray, logprob: np.ndarray, order: int) -> dict[str, np.ndarray]:
        if order > _LUT_MAX_ORDER:
            return kernels.layout(token_id, logprob, order)
        lut = self._lut.get(order)
        if lut is None:  # the curve's cells never change: walk them once
            d = np.arange(1 << (2 * order), dtype=np.uint32)
            x, y = kernels.hilbert_xy(d, order)
            side = np.float32(1 << order)
            lut = self._lut[order] = np.stack([(x + 0.5) / side, (y + 0.5) / side], axis=1).astype(np.float32)
        d = kernels.hilbert_cell(token_id, order)
        conf = kernels.confidence(logprob)
        hue = (d.astype(np.float32) / np.float32(len(lut)))[:, None]
        return {"hilbert": lut[d], "conf": conf, "rgba": kernels.colour(hue, conf)}

    def entropy(self, top_logprobs: np.ndarray) -> np.ndarray:
        return kernels.entropy(top_logprobs)

    def probes(self, token_id: np.ndarray, table: np.ndarray, probes: np.ndarray) -> np.ndarray:
        return kernels.probe_cosine(token_id, table, probes)


class WgpuBackend:
    name = "wgpu"

    def __init__(self, adapter: Any) -> None:
        import wgpu

        self.wgpu = wgpu
        info = adapter.info
        self.adapter = f"{info['device']} ({info['adapter_type']}, {info['backend_type']})"
        self.adapter_type = info["adapter_type"]
        self.backend_type = info["backend_type"]
        self.max_binding = int(adapter.limits["max-storage-buffer-binding-size"])
        self.device = adapter.request_device_sync(required_limits={"max-storage-buffer-binding-size": self.max_binding})
        self.pipelines = {
            name: self.device.create_compute_pipeline(
                layout="auto", compute={"module": self.device.create_shader_module(code=code), "entry_point": "main"}
            )
            for name, code in (("layout", shaders.LAYOUT), ("entropy", shaders.ENTROPY), ("probes", shaders.PROBES))
        }
        self.timing = {"upload_s": 0.0, "dispatch_s": 0.0, "readback_s": 0.0}
        warm = np.arange(64, dtype=np.uint32)  # compile and run each pipeline once now, not on the first batch
        self.layout(warm, np.zeros(64, dtype=np.float32), 8)
        self.entropy(np.zeros((64, 1), dtype=np.float32))
        self.probes(warm, np.ones((4, 4), dtype=np.float32), np.ones((1, 4), dtype=np.float32))

    # ---- kernels --------------------------------------------------------------------------

    def layout(self, token_id: np.ndarray, logprob: np.ndarray, order: int) -> dict[str, np.ndarray]:
        n = len(token_id)
        xy, conf, rgba = self._run(
            "layout",
            n,
            (order, 0, 0),
            [token_id.astype(np.uint32), logprob.astype(np.float32)],
            [(np.float32, 2), (np.float32, 1), (np.uint32, 1)],
            row_bytes=8,
        )
        return {"hilbert": xy.reshape(n, 2), "conf": conf, "rgba": rgba.view(np.uint8).reshape(n, 4)}

    def entropy(self, top_logprobs: np.ndarray) -> np.ndarray:
        n, k = top_logprobs.shape
        (out,) = self._run(
            "entropy", n, (k, 0, 0), [top_logprobs.astype(np.float32)], [(np.float32, 1)], row_bytes=4 * k
        )
        return out

    def probes(self, token_id: np.ndarray, table: np.ndarray, probes: np.ndarray) -> np.ndarray:
        n, (rows, dim), k = len(token_id), table.shape, len(probes)
        (out,) = self._run(
            "probes",
            n,
            (rows, dim, k),
            [token_id.astype(np.uint32), table.astype(np.float32), probes.astype(np.float32)],
            [(np.float32, k)],
            row_bytes=4 * k,
            whole=(1, 2),
        )
        return out.reshape(n, k)

    # ---- dispatch -------------------------------------------------------------------------

    def _run(self, kernel, n, params, inputs, outputs, row_bytes, whole=()):
        """Run ``kernel`` over ``n`` rows in as many dispatches as the binding size needs.
        ``inputs`` are per-row arrays except the indexes in ``whole`` (bound entire each time);
        ``outputs`` are (dtype, values per row). Returns the outputs, concatenated."""
        step = max(1, min(n, self.max_binding // max(row_bytes, 4)))
        parts: list[list[np.ndarray]] = [[] for _ in outputs]
        for at in range(0, n, step):
            rows = min(step, n - at)
            chunk = [a if i in whole else a[at : at + rows] for i, a in enumerate(inputs)]
            for i, out in enumerate(self._dispatch(kernel, rows, params, chunk, outputs)):
                parts[i].append(out)
        return [np.concatenate(p) if len(p) > 1 else p[0] for p in parts]

    def _dispatch(self, kernel, n, params, inputs, outputs):
        wgpu, device = self.wgpu, self.device
        usage = wgpu.BufferUsage
        began = time.perf_counter()
        uniform = device.create_buffer_with_data(data=np.array([n, *params], dtype=np.uint32), usage=usage.UNIFORM)
        ins = [device.create_buffer_with_data(data=_padded(a), usage=usage.STORAGE) for a in inputs]
        outs = [
            device.create_buffer(
                size=max(16, n * width * np.dtype(dtype).itemsize), usage=usage.STORAGE | usage.COPY_SRC
            )
            for dtype, width in outputs
        ]
        pipeline = self.pipelines[kernel]
        bind = device.create_bind_group(
            layout=pipeline.get_bind_group_layout(0),
            entries=[{"binding": i, "resource": {"buffer": b}} for i, b in enumerate([uniform, *ins, *outs])],
        )
        uploaded = time.perf_counter()
        encoder = device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        compute.set_pipeline(pipeline)
        compute.set_bind_group(0, bind)
        groups = -(-n // shaders.WORKGROUP)
        compute.dispatch_workgroups(min(groups, 65535), -(-groups // 65535), 1)
        compute.end()
        device.queue.submit([encoder.finish()])
        dispatched = time.perf_counter()
        results = [
            np.frombuffer(device.queue.read_buffer(buf), dtype=dtype)[: n * width].copy()
            for buf, (dtype, width) in zip(outs, outputs, strict=True)
        ]
        done = time.perf_counter()
        self.timing["upload_s"] += uploaded - began
        self.timing["dispatch_s"] += dispatched - uploaded
        self.timing["readback_s"] += done - dispatched  # includes waiting for the GPU to finish
        return results


def _padded(array: np.ndarray) -> np.ndarray:
    """A contiguous copy at least 16 bytes long (wgpu refuses empty or tiny storage buffers)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.nbytes >= 16:
        return flat
    return np.concatenate([flat, np.zeros(16 // flat.itemsize, dtype=flat.dtype)])


@dataclass
class Choice:
    backend: NumpyBackend | WgpuBackend
    reason: str


def choose_backend(backend: str = "auto", allow_cpu_adapter: bool = False, adapter: str = "") -> Choice:
    """The backend to run the kernels on, and why (see the module docstring)."""
    backend = os.environ.get(ENV_BACKEND) or backend
    if backend not in ("auto", "numpy", "wgpu"):
        raise ValueError(f"compute backend must be auto, numpy or wgpu (got {backend!r})")
    if backend == "numpy":
        return Choice(NumpyBackend(), "numpy chosen by configuration")
    try:
        import wgpu

        adapters = wgpu.gpu.enumerate_adapters_sync()
    except Exception as exc:  # no Vulkan/Metal/DX12 loader, no wgpu-native library ...
        return Choice(NumpyBackend(), f"wgpu unavailable: {exc}")
    if adapter:
        adapters = [a for a in adapters if adapter.lower() in a.info["device"].lower()]
    if backend == "auto" and not allow_cpu_adapter:
        adapters = [a for a in adapters if a.info["adapter_type"] != "CPU"]
    if not adapters:
        why = f"no adapter matching {adapter!r}" if adapter else "no GPU adapter (CPU adapters not allowed)"
        return Choice(NumpyBackend(), why)
    best = min(adapters, key=lambda a: _RANK.get(a.info["adapter_type"], 2))
    try:
        return Choice(WgpuBackend(best), f"best adapter: {best.info['adapter_type']}")
    except Exception as exc:
        return Choice(NumpyBackend(), f"wgpu device on {best.info['device']!r} failed: {exc!r}")
