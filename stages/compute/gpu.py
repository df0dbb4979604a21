"""The wgpu side: choosing an adapter, and a backend that runs the WGSL kernels on it.

Create it only inside the worker, after spawn: a wgpu device created before a fork makes the child
hang in ``queue.submit``. ``open_device`` compiles every pipeline and runs one warm-up dispatch of
each (the first dispatch costs up to 0.2 s). ``queue.on_submitted_work_done_sync()`` is broken in
wgpu 0.32.0, so a dispatch is waited for by reading back 4 bytes of its output.

Calls larger than the device's limits (bytes per storage binding, workgroups per dimension) are
split into several dispatches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stages.compute.shaders import PARAM_WORDS, SPECS, WORKGROUP, KernelSpec, Params

_TYPE_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "Unknown": 2, "Other": 2, "CPU": 3}
_API_RANK = {"Vulkan": 0, "Metal": 0, "D3D12": 0, "OpenGL": 1}
_MIN_BUFFER = 16
_WORD_TYPES = {"u": np.uint32, "i": np.uint32, "b": np.uint32, "f": np.float32}


@dataclass(frozen=True)
class Choice:
    """Which backend runs the kernels, on which adapter, and why (logged, and in stats)."""

    backend: str  # "wgpu" | "numpy"
    reason: str
    adapter: str | None = None  # device name, e.g. "NVIDIA H100" or "llvmpipe (LLVM 15.0.6, 256 bits)"
    adapter_type: str | None = None  # DiscreteGPU, IntegratedGPU, CPU, ...
    api: str | None = None  # Vulkan, Metal, D3D12, OpenGL
    index: int | None = None  # in enumerate_adapters_sync()

    def stats(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "index"}


def choose_adapter(infos: list[dict[str, Any]], mode: str, allow_cpu: bool, name: str | None) -> Choice:
    """Pick from adapter infos (``adapter.info`` of each adapter, in enumeration order).

    ``mode`` "numpy" never uses one; "auto" ranks discrete GPU, integrated, other, and takes a CPU
    adapter (Mesa lavapipe/llvmpipe: slower than numpy) only with ``allow_cpu``; "wgpu" takes the
    best adapter there is, CPU ones included. ``name`` (a substring of the adapter's device,
    description or vendor) picks that adapter whatever its type. Within a type, Vulkan, Metal and
    D3D12 come before OpenGL."""
    if mode == "numpy":
        return Choice("numpy", "backend = numpy configured")
    if not infos:
        return Choice("numpy", "no wgpu adapter found")
    candidates = list(enumerate(infos))
    if name:
        wanted = name.lower()
        candidates = [(i, a) for i, a in candidates if wanted in _label(a).lower()]
        if not candidates:
            found = "; ".join(_label(a) for a in infos)
            return Choice("numpy", f"no adapter matches {name!r} (found: {found})")
    elif not (allow_cpu or mode == "wgpu"):
        candidates = [(i, a) for i, a in candidates if a.get("adapter_type") != "CPU"]
        if not candidates:
            return Choice("numpy", "only CPU adapters found (numpy is faster; allow_cpu_adapter to use them)")
    index, info = min(
        candidates,
        key=lambda c: (_TYPE_RANK.get(c[1].get("adapter_type"), 2), _API_RANK.get(c[1].get("backend_type"), 2), c[0]),
    )
    reason = f"adapter {name!r} configured" if name else f"best of {len(infos)} adapter(s)"
    return Choice(
        "wgpu", reason, info.get("device") or "unknown", info.get("adapter_type"), info.get("backend_type"), index
    )


def _label(info: dict[str, Any]) -> str:
    return " ".join(str(info.get(k) or "") for k in ("device", "description", "vendor")).strip()


def enumerate_adapters() -> list[Any]:
    """The adapters wgpu sees ([] on a machine without any)."""
    import wgpu  # here: a numpy-only worker never loads it

    return list(wgpu.gpu.enumerate_adapters_sync())


def open_device(adapter: Any, max_binding_bytes: int | None = None, max_workgroups: int | None = None) -> WgpuBackend:
    """A device on ``adapter`` with its largest buffer limits, every pipeline compiled and warmed up."""
    limits = adapter.limits
    required = {
        "max-storage-buffer-binding-size": limits["max-storage-buffer-binding-size"],
        "max-buffer-size": limits["max-buffer-size"],
    }
    device = adapter.request_device_sync(required_limits=required)
    backend = WgpuBackend(
        device,
        max_binding_bytes or required["max-storage-buffer-binding-size"],
        max_workgroups or limits["max-compute-workgroups-per-dimension"],
    )
    backend.warm_up()
    return backend


class WgpuBackend:
    """Runs the kernels of :mod:`stages.compute.shaders` on one device. Buffers grow and are
    reused; resident inputs (feature tables) are uploaded once per array. ``timings`` sums the
    seconds spent uploading, dispatching (submit to done) and reading back."""

    name = "wgpu"

    def __init__(self, device: Any, max_binding_bytes: int, max_workgroups: int) -> None:
        import wgpu

        self._wgpu = wgpu
        self.device = device
        self.max_binding = int(max_binding_bytes)
        self.max_rows = int(max_workgroups) * WORKGROUP
        self.pipelines = {
            name: device.create_compute_pipeline(
                layout="auto", compute={"module": device.create_shader_module(code=spec.code), "entry_point": "main"}
            )
            for name, spec in SPECS.items()
        }
        self.buffers: dict[tuple[str, str], Any] = {}
        self.resident: dict[tuple[str, str], tuple[np.ndarray, Any]] = {}
        self.timings = {"upload": 0.0, "dispatch": 0.0, "readback": 0.0}
        self.dispatches = 0

    def warm_up(self) -> None:
        """One small dispatch of every kernel: the first one pays for lazy driver work."""
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 1 << 31, 64, dtype=np.uint32)
        self.run("layout", {"token_id": ids, "logprob": -rng.random(64, dtype=np.float32)}, {"order": 8})
        self.run("entropy", {"toplp": -rng.random((64, 2), dtype=np.float32)}, {"k": 2})
        query = np.arange(64, dtype=np.uint32)
        self.run("repetition", {"ids": ids, "query": query, "first": query * 0}, {"ngram": 2, "window": 8})
        table, probes = rng.random((16, 4), dtype=np.float32), rng.random((2, 4), dtype=np.float32)
        self.run("probes", {"token_id": ids, "table": table, "probes": probes}, {"rows": 16, "dim": 4, "k": 2})
        for key in [k for k in self.resident if k[0] == "probes"]:
            del self.resident[key]  # the warm-up's table: not worth keeping on the device

    def run(self, kernel: str, inputs: dict[str, np.ndarray], params: Params) -> dict[str, np.ndarray]:
        spec = SPECS[kernel]
        n = len(inputs[spec.row_input])
        widths = [(name, dtype, params[w] if isinstance(w, str) else w) for name, dtype, w in spec.outputs]
        outputs = {name: np.empty((n, width), dtype="<" + dtype) for name, dtype, width in widths}
        resident = [self._resident(kernel, name, inputs[name]) for name in spec.resident]
        by_row = {name: inputs[name] for name in spec.inputs if name not in spec.resident}
        per_row = max([a.nbytes // max(n, 1) for a in by_row.values()] + [4 * w for _, _, w in widths] + [1])
        step = max(1, min(self.max_rows, self.max_binding // per_row))
        start = 0
        while start < n:
            stop = min(n, start + step)
            part = spec.rows(by_row, params, start, stop)
            if step > 1 and max(a.nbytes for a in part.values()) > self.max_binding:
                step //= 2  # e.g. rows that read a long stretch of context (repetition's ids)
                continue
            views = {name: out[start:stop] for name, out in outputs.items()}
            self._dispatch(spec, part, resident, params, stop - start, views)
            start = stop
        return {name: _shaped(name, out) for name, out in outputs.items()}

    def _dispatch(
        self,
        spec: KernelSpec,
        part: dict[str, np.ndarray],
        resident: list[Any],
        params: Params,
        rows: int,
        outputs: dict[str, np.ndarray],
    ) -> None:
        wgpu, device = self._wgpu, self.device
        began = time.perf_counter()
        uniform = np.zeros(PARAM_WORDS, dtype=np.uint32)
        uniform[: 1 + len(params)] = [rows, *params.values()]
        bound = [self._upload(spec.name, "params", uniform, wgpu.BufferUsage.UNIFORM)]
        resident_iter = iter(resident)
        for name in spec.inputs:
            bound.append(next(resident_iter) if name in spec.resident else self._upload(spec.name, name, part[name]))
        out_buffers = [
            self._buffer(spec.name, name, out.nbytes, wgpu.BufferUsage.COPY_SRC) for name, out in outputs.items()
        ]
        bound += [(buf, out.nbytes) for buf, out in zip(out_buffers, outputs.values(), strict=True)]
        pipeline = self.pipelines[spec.name]
        group = device.create_bind_group(
            layout=pipeline.get_bind_group_layout(0),
            entries=[
                {"binding": i, "resource": {"buffer": buf, "offset": 0, "size": max(_MIN_BUFFER, _round4(size))}}
                for i, (buf, size) in enumerate(bound)
            ],
        )
        uploaded = time.perf_counter()
        encoder = device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        compute.set_pipeline(pipeline)
        compute.set_bind_group(0, group)
        compute.dispatch_workgroups(-(-rows // WORKGROUP))
        compute.end()
        device.queue.submit([encoder.finish()])
        device.queue.read_buffer(out_buffers[0], 0, 4)  # returns once the dispatch is done
        dispatched = time.perf_counter()
        for buf, out in zip(out_buffers, outputs.values(), strict=True):
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(device.queue.read_buffer(buf, 0, out.nbytes), np.uint8)
        done = time.perf_counter()
        self.timings["upload"] += uploaded - began
        self.timings["dispatch"] += dispatched - uploaded
        self.timings["readback"] += done - dispatched
        self.dispatches += 1

    def _buffer(self, kernel: str, name: str, nbytes: int, usage: int) -> Any:
        """A reused buffer of at least ``nbytes`` (grown by doubling)."""
        usage |= self._wgpu.BufferUsage.COPY_DST | (
            0 if usage & self._wgpu.BufferUsage.UNIFORM else self._wgpu.BufferUsage.STORAGE
        )
        buf = self.buffers.get((kernel, name))
        if buf is None or buf.size < nbytes:
            size = max(_MIN_BUFFER, _round4(nbytes), 2 * buf.size if buf is not None else 0)
            if buf is not None:
                buf.destroy()
            buf = self.buffers[(kernel, name)] = self.device.create_buffer(size=size, usage=usage)
        return buf

    def _upload(self, kernel: str, name: str, array: np.ndarray, usage: int = 0) -> tuple[Any, int]:
        data = np.ascontiguousarray(array, dtype=_WORD_TYPES[array.dtype.kind])  # shaders read 32-bit words
        buf = self._buffer(kernel, name, data.nbytes, usage)
        if data.nbytes:
            self.device.queue.write_buffer(buf, 0, data)
        return buf, data.nbytes

    def _resident(self, kernel: str, name: str, array: np.ndarray) -> tuple[Any, int]:
        """The device copy of a table; uploaded again only when a different array is passed."""
        kept = self.resident.get((kernel, name))
        if kept is not None and kept[0] is array:
            return kept[1]
        data = np.ascontiguousarray(array, dtype=np.float32)
        if data.nbytes > self.max_binding:
            raise ValueError(
                f"{kernel} {name}: {data.nbytes} bytes exceed the device's binding limit {self.max_binding}"
            )
        buf = self.device.create_buffer_with_data(data=data, usage=self._wgpu.BufferUsage.STORAGE)
        self.resident[(kernel, name)] = (array, (buf, data.nbytes))
        return buf, data.nbytes


def _round4(n: int) -> int:
    return (n + 3) & ~3


def _shaped(name: str, out: np.ndarray) -> np.ndarray:
    """Outputs as the numpy reference returns them: rgba as u8[n, 4], one-wide columns flat."""
    if name == "rgba":
        return out.view(np.uint8).reshape(len(out), 4)
    return out.reshape(-1) if out.shape[1] == 1 else out
