"""What /proc says about a process: CPU time and resident memory (the supervisor's per-worker
metrics). Linux only; None when the process is gone or /proc cannot be read."""

from __future__ import annotations

import os

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` (its own, not its children's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # after the command name, which may hold spaces and parentheses: utime, stime are fields 14, 15
    fields = stat.rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid``."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
