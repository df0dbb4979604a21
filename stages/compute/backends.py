"""Running a kernel: the numpy backend, and :class:`Kernels`, which runs each call on the chosen
wgpu device and falls back to numpy for that call when the device fails (counted, never fatal)."""

from __future__ import annotations

import os
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
    only), each failed call retried on numpy and counted in ``fallbacks``."""

    def __init__(self, device: Backend | None, log: JsonLogger) -> None:
        self.device = device
        self.cpu = NumpyBackend()
        self.log = log
        self.fallbacks = 0

    def run(self, kernel: str, inputs: Arrays, params: Params) -> Arrays:
        if self.device is not None:
            try:
                return self.device.run(kernel, inputs, params)
            except Exception as exc:  # any device error: this call on numpy, the stream goes on
                self.fallbacks += 1
                if self.fallbacks == 1 or self.fallbacks % 1000 == 0:  # a failing device logs, not floods
                    self.log.warning("compute_fallback", kernel=kernel, error=repr(exc), fallbacks=self.fallbacks)
        return self.cpu.run(kernel, inputs, params)

    def stats(self) -> dict[str, Any]:
        return {"fallbacks": self.fallbacks}


ENV_BACKEND = "NEURALPIPE_COMPUTE_BACKEND"
BACKENDS = ("auto", "numpy", "wgpu")


def open_kernels(params: dict[str, Any], log: JsonLogger) -> tuple[Kernels, dict[str, Any]]:
    """The stage's kernels on the backend its params (``backend``, overridden by the environment
    variable NEURALPIPE_COMPUTE_BACKEND; ``allow_cpu_adapter``; ``adapter``) choose, and the choice
    for the log and stats. No usable adapter, or a device that fails to start: numpy, with the reason."""
    from stages.compute import gpu  # wgpu itself is imported only when an adapter is looked for

    mode = os.environ.get(ENV_BACKEND) or str(params.get("backend", "auto"))
    if mode not in BACKENDS:
        raise ValueError(f"compute backend must be one of {', '.join(BACKENDS)} (got {mode!r})")
    device = None
    adapters: list[Any] = []
    try:
        if mode != "numpy":
            adapters = gpu.enumerate_adapters()
        choice = gpu.choose_adapter(
            [dict(a.info) for a in adapters], mode, bool(params.get("allow_cpu_adapter", False)), params.get("adapter")
        )
        if choice.backend == "wgpu":
            device = gpu.open_device(adapters[choice.index])
    except Exception as exc:  # no loader, no wgpu-native library, a device that will not start
        choice = gpu.Choice("numpy", f"wgpu unusable: {exc!r}")
    info = choice.stats()
    log.info("compute_backend", **info)
    return Kernels(device, log), info
