"""Running a kernel: the numpy backend, and :class:`Kernels`, which runs each call on the chosen
wgpu device and falls back to numpy for that call when the device fails (counted, never fatal)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Protocol

import numpy as np

from engine.logs import JsonLogger
from stages.compute import kernels
from stages.compute.shaders import Params

Arrays = dict[str, np.ndarray]


class Backend(Protocol):
    name: str

    def run(self, kernel: str, inputs: Arrays, params: Params) -> Arrays: ...


class NumpyBackend:
    """The reference implementations (:mod:`stages.compute.kernels`), on the worker's CPU."""

    name = "numpy"

    def run(self, kernel: str, inputs: Arrays, params: Params) -> Arrays:
        if kernel == "layout":
            return kernels.layout(inputs["token_id"], inputs["logprob"], params["order"])
        if kernel == "entropy":
            return {"entropy": kernels.entropy(inputs["toplp"])}
        if kernel == "repetition":
            match = kernels.repetition_match(
                inputs["ids"], inputs["query"], inputs["first"], params["ngram"], params["window"]
            )
            return {"match": match}
        if kernel == "probes":
            return {"cosine": kernels.probe_cosine(inputs["token_id"], inputs["table"], inputs["probes"])}
        raise ValueError(f"unknown kernel {kernel!r}")


class Kernels:
    """The stage's one way to run kernels: on ``device`` (a wgpu backend, or None for numpy
    only), each failed call retried on numpy and counted in ``fallbacks``. ``choice`` says which
    backend and why (logged, and in stats); while an adapter probe runs in the background the
    kernels run on numpy and :meth:`adopt` takes the probe's device once it is in."""

    def __init__(self, device: Backend | None, log: JsonLogger, choice: dict[str, Any]) -> None:
        self.device = device
        self.cpu = NumpyBackend()
        self.log = log
        self.choice = choice
        self.fallbacks = 0
        self.probe: _Probe | None = None

    def run(self, kernel: str, inputs: Arrays, params: Params) -> Arrays:
        if self.device is not None:
            try:
                return self.device.run(kernel, inputs, params)
            except Exception as exc:  # any device error: this call on numpy, the stream goes on
                self.fallbacks += 1
                if self.fallbacks == 1 or self.fallbacks % 1000 == 0:  # a failing device logs, not floods
                    self.log.warning("compute_fallback", kernel=kernel, error=repr(exc), fallbacks=self.fallbacks)
        return self.cpu.run(kernel, inputs, params)

    def adopt(self) -> bool:
        """Take the background probe's outcome if it is in (call it between records: the device
        changes only then); True once no probe is pending."""
        probe = self.probe
        if probe is None:
            return True
        if probe.thread.is_alive():
            return False
        self.probe = None
        self.device, choice = probe.outcome
        self.choice = choice.stats()
        self.log.info("compute_backend", **self.choice)
        return True

    def stats(self) -> dict[str, Any]:
        return {"fallbacks": self.fallbacks, **self.choice}


ENV_BACKEND = "NEURALPIPE_COMPUTE_BACKEND"
BACKENDS = ("auto", "numpy", "wgpu")


def open_kernels(params: dict[str, Any], log: JsonLogger, memory: str | None = None) -> Kernels:
    """The stage's kernels on the backend its params (``backend``, overridden by the environment
    variable NEURALPIPE_COMPUTE_BACKEND; ``allow_cpu_adapter``; ``adapter``) choose. No usable
    adapter, or a device that fails to start: numpy, with the reason.

    Looking for adapters costs 0.5-0.7 s (importing wgpu, loading the drivers): with ``auto`` it
    runs in a background thread while the kernels start on numpy, and its list of adapters is
    kept in the file ``memory`` (in the engine's state directory), so that a restarted worker
    that would not use any of them never imports wgpu. ``wgpu`` (asked for explicitly) opens the
    device before returning."""
    from stages.compute import gpu  # wgpu itself is imported only when an adapter is looked for

    mode = os.environ.get(ENV_BACKEND) or str(params.get("backend", "auto"))
    if mode not in BACKENDS:
        raise ValueError(f"compute backend must be one of {', '.join(BACKENDS)} (got {mode!r})")
    allow_cpu, name = bool(params.get("allow_cpu_adapter", False)), params.get("adapter")
    if mode == "numpy":
        known = gpu.choose_adapter([], "numpy", False, None)
    else:
        known = _recalled_choice(_recall(memory), mode, allow_cpu, name)
    if known is not None and known.backend == "numpy":  # nothing to open: wgpu is never imported
        kernels = Kernels(None, log, known.stats())
    else:
        probe = _Probe(mode, allow_cpu, name, memory)
        if mode == "wgpu":
            probe.run()
            device, choice = probe.outcome
            kernels = Kernels(device, log, choice.stats())
        else:
            kernels = Kernels(None, log, gpu.Choice("numpy", "looking for a wgpu adapter in the background").stats())
            kernels.probe = probe
            probe.thread.start()
    log.info("compute_backend", **kernels.choice)
    return kernels


class _Probe:
    """Enumerate the adapters, choose one and open a device on it (in a thread, or called at once)."""

    def __init__(self, mode: str, allow_cpu: bool, name: str | None, memory: str | None) -> None:
        self.args = (mode, allow_cpu, name)
        self.memory = memory
        self.outcome: tuple[Backend | None, Any] = (None, None)
        # a thread, never a process: a wgpu device made before a fork hangs the child (stages/compute/gpu.py)
        self.thread = threading.Thread(target=self.run, name="compute-wgpu-probe", daemon=True)

    def run(self) -> None:
        from stages.compute import gpu

        try:
            self.outcome = self._probe(gpu)
        except Exception as exc:  # no loader, no wgpu-native library, a device that will not start
            self.outcome = (None, gpu.Choice("numpy", f"wgpu unusable: {exc!r}"))

    def _probe(self, gpu: Any) -> tuple[Backend | None, Any]:
        mode, allow_cpu, name = self.args
        try:
            adapters = gpu.enumerate_adapters()
        except Exception as exc:  # remembered: this machine cannot run wgpu at all
            _remember(self.memory, {"error": repr(exc)})
            raise
        infos = [dict(a.info) for a in adapters]
        _remember(self.memory, {"adapters": infos})
        choice = gpu.choose_adapter(infos, mode, allow_cpu, name)
        return (gpu.open_device(adapters[choice.index]) if choice.backend == "wgpu" else None), choice


def _recalled_choice(remembered: dict[str, Any] | None, mode: str, allow_cpu: bool, name: str | None) -> Any:
    """The choice the first probe's findings make (None: nothing remembered)."""
    from stages.compute import gpu

    if remembered is None:
        return None
    if "error" in remembered:
        return gpu.Choice("numpy", f"wgpu unusable: {remembered['error']} (remembered from the first probe)")
    choice = gpu.choose_adapter(remembered["adapters"], mode, allow_cpu, name)
    if choice.backend == "numpy":
        return gpu.Choice("numpy", f"{choice.reason} (remembered from the first probe)")
    return choice


def _recall(memory: str | None) -> dict[str, Any] | None:
    """The first probe's findings ({"adapters": [info, ...]} or {"error": why}), None if none."""
    if memory is None:
        return None
    try:
        with open(memory, "rb") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(found, dict) and (
        isinstance(found.get("error"), str)
        or (isinstance(found.get("adapters"), list) and all(isinstance(a, dict) for a in found["adapters"]))
    )
    return found if ok else None  # anything else (a torn or foreign file): probe again


def _remember(memory: str | None, findings: dict[str, Any]) -> None:
    if memory is None:
        return
    temporary = f"{memory}.{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            json.dump(findings, f, default=str)
        os.replace(temporary, memory)  # whole or not at all: a worker killed mid-write leaves no torn file
    except OSError:
        pass  # a read-only or full state directory: the next start probes again
