"""Find the engine's segments in /dev/shm, tell live from stale, and remove stale ones.

A segment is live while its creator holds the lock it took at creation (see ``segment``); the
kernel drops that lock when the creator dies, even by SIGKILL. A segment that is unlocked but
was written less than ``grace_s`` ago without its magic yet may be mid-creation, so it counts
as live until the grace period passes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from shm import descriptor as d
from shm.naming import PREFIX, SHM_DIR, parse_segment_name, segment_path
from shm.segment import owner_alive, remove_segment


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    instance: str
    ring: str
    size: int
    live: bool
    age_s: float


def _has_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return int.from_bytes(f.read(8), "little") == d.MAGIC
    except OSError:
        return False


def list_segments(instance: str | None = None, grace_s: float = 5.0) -> list[SegmentInfo]:
    """Every ``neuralpipe-*`` segment (of ``instance`` only, if given), sorted by name."""
    found = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    now = time.time()
    for name in sorted(names):
        if not name.startswith(PREFIX + "-"):
            continue
        parsed = parse_segment_name(name)
        if parsed is None or (instance is not None and parsed[0] != instance):
            continue
        path = segment_path(name)
        try:
            st = os.stat(path)
            locked = owner_alive(name)
        except FileNotFoundError:
            continue  # removed while we looked
        except PermissionError:
            locked = True  # another user's segment: never ours to judge or remove
        age = now - st.st_mtime
        live = locked or (age < grace_s and not _has_magic(path))
        found.append(SegmentInfo(name, parsed[0], parsed[1], st.st_size, live, age))
    return found


def remove_stale(instance: str | None = None, grace_s: float = 5.0) -> list[str]:
    """Unlink every stale segment (of ``instance`` only, if given); returns the names removed.

    A live segment is never removed: the lock is checked again right before each unlink."""
    removed = []
    for info in list_segments(instance, grace_s):
        if not info.live and not owner_alive(info.name) and remove_segment(info.name):
            removed.append(info.name)
    return removed
