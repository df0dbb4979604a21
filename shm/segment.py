"""Create, attach and remove shared-memory segments without the resource tracker's interference.

Python 3.11's ``SharedMemory`` registers every segment it opens, created or attached, with
``multiprocessing.resource_tracker``, which unlinks whatever is still registered when the
process tree that started it exits. An attaching worker, ``neuralpipe check`` or a consumer in
another process tree would thus delete rings the engine still uses. Here every segment is
unregistered right after it is opened, so no tracker ever unlinks one; lifetime belongs to the
owner alone, and a dead owner's segments are found through their lock (see ``registry``) and
removed by the next start or ``neuralpipe check --clean``.

Liveness: the creator holds ``flock(LOCK_EX)`` on its own descriptor of each segment for the
segment's lifetime. The kernel drops that lock when the owner dies, even by SIGKILL, so "the lock
can be taken" means "the owner is gone".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from multiprocessing import resource_tracker, shared_memory

from shm.naming import SHM_DIR, segment_path


class NoSharedMemory(RuntimeError):
    """The shared-memory filesystem cannot hold a new segment; the message says how much is missing."""


def _untrack(seg: shared_memory.SharedMemory) -> None:
    resource_tracker.unregister(seg._name, "shared_memory")


def create_segment(name: str, size: int) -> shared_memory.SharedMemory:
    """Create segment ``name`` of ``size`` bytes, locked by this process as its owner.

    The pages are reserved now (``posix_fallocate``): ``ftruncate`` alone reserves nothing, and a
    full /dev/shm would then kill whichever process first touches an unbacked page with SIGBUS.
    Raises :class:`NoSharedMemory` when they cannot be reserved."""
    seg = shared_memory.SharedMemory(name=name, create=True, size=size)
    _untrack(seg)
    try:
        os.posix_fallocate(seg._fd, 0, size)
    except OSError as exc:
        close_segment(seg)
        remove_segment(name)
        if exc.errno != errno.ENOSPC:
            raise
        raise NoSharedMemory(
            f"not enough shared memory for segment {name!r}: need {size:,} bytes, {SHM_DIR} has {shm_free():,} free",
        ) from None
    fcntl.flock(seg._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return seg


def shm_free() -> int:
    """Bytes the shared-memory filesystem can still hand out."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def attach_segment(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment read-write (a producer or consumer attaching)."""
    seg = shared_memory.SharedMemory(name=name, create=False)
    _untrack(seg)
    return seg


def map_readonly(name: str) -> mmap.mmap:
    """Map a segment read-only, never touching the resource tracker (inspection, consumers)."""
    fd = os.open(segment_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def owner_alive(name: str) -> bool:
    """True while the creator of segment ``name`` still holds its lock."""
    fd = os.open(segment_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_segment(name: str) -> bool:
    """Unlink segment ``name``; False when it was already gone. Mappings stay valid until unmapped."""
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        return False
    return True


def close_segment(seg: shared_memory.SharedMemory) -> None:
    """Unmap ``seg`` and close its descriptor (dropping an owner's lock).

    If a caller still holds views into it (a record it kept), the mapping stays alive with them
    and is unmapped when the last one goes; the descriptor is closed either way."""
    try:
        seg.close()
    except BufferError:
        with contextlib.suppress(OSError):
            # the mmap, alive with the views, holds a dup of the descriptor and thus the lock
            fcntl.flock(seg._fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(seg._fd)
        seg._fd, seg._buf, seg._mmap = -1, None, None
