"""Running a kernel: the numpy backend, and :class:`Kernels`, which runs each call on the chosen
wgpu device and falls back to numpy for that call when the device fails (counted, never fatal)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Protocol

import numpy as np

from engine.logs import JsonLogger
from stages.compute import adapter_probe, kernels
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
        outcome = probe.poll()
        if outcome is None:
            return False
        self.probe = None
        self.device, choice = outcome
        self.choice = choice.stats()
        self.log.info("compute_backend", **self.choice)
        return True

    def close(self) -> None:
        """Stop a probe still looking (its process is killed: none is left behind)."""
        if self.probe is not None:
            self.probe.stop()
            self.probe = None

    def stats(self) -> dict[str, Any]:
        return {"fallbacks": self.fallbacks, **self.choice}


ENV_BACKEND = "NEURALPIPE_COMPUTE_BACKEND"
BACKENDS = ("auto", "numpy", "wgpu")


def open_kernels(params: dict[str, Any], log: JsonLogger, memory: str) -> Kernels:
    """The stage's kernels on the backend its params (``backend``, overridden by the environment
    variable NEURALPIPE_COMPUTE_BACKEND; ``allow_cpu_adapter``; ``adapter``) choose. No usable
    adapter, or a device that fails to start: numpy, with the reason.

    The adapters found are kept in the file ``memory`` (in the run's state directory), so that a
    restarted worker does not look again. With ``auto`` and nothing remembered, the kernels start
    on numpy while a process at SCHED_IDLE lists the adapters (stages.compute.adapter_probe);
    wgpu is imported here only if they hold one to use, and its device is opened in a thread.
    ``wgpu`` (asked for explicitly) opens the device here, before returning."""
    from stages.compute import gpu  # wgpu itself is imported only when an adapter is looked for

    mode = os.environ.get(ENV_BACKEND) or str(params.get("backend", "auto"))
    if mode not in BACKENDS:
        raise ValueError(f"compute backend must be one of {', '.join(BACKENDS)} (got {mode!r})")
    wanted = (mode, bool(params.get("allow_cpu_adapter", False)), params.get("adapter"))
    known = gpu.choose_adapter([], "numpy", False, None) if mode == "numpy" else _recalled_choice(memory, wanted)
    if known is not None and known.backend == "numpy":  # nothing to open: wgpu is never imported
        kernels = Kernels(None, log, known.stats())
    elif mode == "wgpu":
        device, choice = _open_device(wanted, memory)
        kernels = Kernels(device, log, choice.stats())
    else:
        try:
            probe = _Probe(wanted, memory, listed=known is not None)
        except OSError as exc:  # no process to be had (EAGAIN, ENOMEM): numpy, and why
            kernels = Kernels(None, log, gpu.Choice("numpy", f"the adapter probe could not start: {exc}").stats())
        else:
            kernels = Kernels(None, log, gpu.Choice("numpy", "looking for a wgpu adapter in the background").stats())
            kernels.probe = probe
    log.info("compute_backend", **kernels.choice)
    return kernels


class _Probe:
    """The background search of ``auto``: a child process lists the adapters (unless they are
    ``listed`` in ``memory`` already), then, only if they hold one to use, a thread opens its device
    here. :meth:`poll` gives (device, choice) once both are done."""

    def __init__(self, wanted: tuple[str, bool, str | None], memory: str, listed: bool) -> None:
        self.wanted = wanted
        self.memory = memory
        self.outcome: tuple[Backend | None, Any] = (None, None)
        # a thread, never a forked process: a wgpu device made before a fork hangs the child (gpu.py)
        self.thread = threading.Thread(target=self._open, name="compute-wgpu-open", daemon=True)
        self.pid: int | None = None
        if listed:
            self.thread.start()
        else:
            self.pid = _spawn_lister(memory)

    def poll(self) -> tuple[Backend | None, Any] | None:
        if self.pid is not None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return None
            self.pid = None
            findings = adapter_probe.recall(self.memory)
            if findings is None:  # it wrote nothing (a driver that crashed it, say): not tried again
                findings = {"error": f"the adapter probe exited with status {os.waitstatus_to_exitcode(status)}"}
                adapter_probe.remember(self.memory, findings)
            choice = _choice(findings, self.wanted)
            if choice.backend == "numpy":
                return None, choice
            self.thread.start()
        return None if self.thread.is_alive() else self.outcome

    def stop(self) -> None:
        """Kill and reap the child if it still runs (the thread cannot be stopped: it is a daemon)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None

    def _open(self) -> None:
        self.outcome = _open_device(self.wanted, self.memory)


def _spawn_lister(memory: str) -> int:
    """Start ``python -m stages.compute.adapter_probe`` at SCHED_IDLE: it runs only on a core nobody
    else wants, so the first streams never wait for it (under full load it waits for them)."""
    argv = [sys.executable, "-m", "stages.compute.adapter_probe", memory, str(os.getpid())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this worker imports
    quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]  # drivers chatter
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=quiet)
    # set from here: posix_spawn's own scheduler argument takes real-time policies only (EINVAL)
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:  # a sandbox that refuses it: the lowest nice value will do
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, 19)
    return pid


def _open_device(wanted: tuple[str, bool, str | None], memory: str) -> tuple[Backend | None, Any]:
    """List the adapters in this process (remembering them), choose one and open its device."""
    from stages.compute import gpu

    adapters, findings = adapter_probe.list_adapters()
    adapter_probe.remember(memory, findings)
    choice = _choice(findings, wanted)
    if choice.backend == "numpy":
        return None, choice
    try:
        return gpu.open_device(adapters[choice.index]), choice
    except Exception as exc:  # a device that will not start
        return None, gpu.Choice("numpy", f"wgpu unusable: {exc!r}")


def _recalled_choice(memory: str, wanted: tuple[str, bool, str | None]) -> Any:
    """The choice the findings remembered in ``memory`` make (None: nothing remembered)."""
    findings = adapter_probe.recall(memory)
    return None if findings is None else _choice(findings, wanted, " (remembered from the first probe)")


def _choice(findings: dict[str, Any], wanted: tuple[str, bool, str | None], note: str = "") -> Any:
    """The adapter the findings (an adapter_probe findings file's) give to use, or numpy and why."""
    from stages.compute import gpu

    if "error" in findings:
        return gpu.Choice("numpy", f"wgpu unusable: {findings['error']}{note}")
    choice = gpu.choose_adapter(findings["adapters"], *wanted)
    return gpu.Choice("numpy", choice.reason + note) if choice.backend == "numpy" else choice
