"""Listing the wgpu adapters in a process of its own, and the findings file it leaves.

    python -m stages.compute.adapter_probe FINDINGS PARENT_PID

writes ``{"adapters": [info, ...]}`` (each adapter's ``info``, in enumeration order) or
``{"error": why}`` to FINDINGS, atomically, and exits. Compute starts it at SCHED_IDLE
(:mod:`stages.compute.backends`): importing wgpu and loading the drivers costs 0.5-1.1 s of
CPU, which in compute's own process competed with the first streams for the GIL and the cores,
and left wgpu's libraries in a worker that, on a machine without a GPU, never uses them.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def recall(path: str) -> dict[str, Any] | None:
    """The findings in ``path`` ({"adapters": [info, ...]} or {"error": why}); None if there are
    none, or the file is torn or foreign (then the adapters are looked for again)."""
    try:
        with open(path, "rb") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(found, dict) and (
        isinstance(found.get("error"), str)
        or (isinstance(found.get("adapters"), list) and all(isinstance(a, dict) for a in found["adapters"]))
    )
    return found if ok else None


def remember(path: str, findings: dict[str, Any]) -> None:
    """Write ``findings`` to ``path`` whole or not at all (a process killed mid-write leaves no torn file)."""
    temporary = f"{path}.{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            json.dump(findings, f, default=str)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only or full directory: the next start looks again


def list_adapters() -> tuple[list[Any], dict[str, Any]]:
    """The adapters this process finds, and the findings to remember: every adapter's info, or why
    wgpu cannot be used here (then no adapters)."""
    from stages.compute import gpu  # imports wgpu only inside enumerate_adapters

    try:
        adapters = gpu.enumerate_adapters()
        return adapters, {"adapters": [dict(adapter.info) for adapter in adapters]}
    except Exception as exc:  # no Vulkan loader, no wgpu-native library, a driver that fails
        return [], {"error": repr(exc)}


def _die_with(parent: int) -> None:
    """Be killed with the compute worker that started us, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: python -m stages.compute.adapter_probe FINDINGS PARENT_PID", file=sys.stderr)
        return 2
    _die_with(int(argv[2]))
    remember(argv[1], list_adapters()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
