"""Tie a child process's life to its parent's: the kernel kills the child when the parent dies.

A module of its own, importing only the standard library: the embedded upstream (a child of ingest)
needs this and nothing else of the worker runtime, whose imports (numpy, zmq, the rings) would add
~30 ms to each of its starts (docs/recovery.md)."""

from __future__ import annotations

import ctypes
import os
import signal

EXIT_ORPHANED = 4
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL us when ``parent_pid`` (our parent) dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(EXIT_ORPHANED)
