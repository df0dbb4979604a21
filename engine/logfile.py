"""A detached engine's log file, ``<runtime base>/<instance>.log``, kept to a size.

Every process of the engine appends to that one file (O_APPEND, inherited), and the runtime base is
a tmpfs on most systems, so its size is memory. The supervisor looks at it once per health tick:
past ``[engine] log_max_bytes`` it copies the file to ``<instance>.log.1`` (replacing the one
before) and cuts it to nothing, in place, as logrotate's ``copytruncate`` does. The writers'
descriptors stay valid and, appending, go on at the new end; a line written between the copy and
the cut is lost (a few microseconds' window, once per ``log_max_bytes``). A file that is not this
log (a foreground engine's stderr redirected by the user) is never touched.

At start, the logs of engines gone for a week are removed: each detached run writes its own.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time

from engine.rundir import RuntimeDirError, open_private_file

COPY_CHUNK = 1 << 20
OLD_SUFFIX = ".1"
LOG_SUFFIX = ".log"
KEEP_LOGS_S = 7 * 86400  # a dead engine's log is kept this long (a week to read what happened)


def keep_under(fd: int, base_fd: int, name: str, max_bytes: int) -> str | None:
    """Cut the log ``name`` in the directory ``base_fd`` when ``fd`` (a descriptor writing to it) has
    grown past ``max_bytes``: None when it was not, else where its content was kept (``name +
    ".1"``), or "" when it could not be (a full file system: the bound matters more)."""
    try:
        st = os.fstat(fd)
        if max_bytes <= 0 or not stat.S_ISREG(st.st_mode) or st.st_size <= max_bytes:
            return None
        named = os.stat(name, dir_fd=base_fd, follow_symlinks=False)
    except OSError:  # no such log (a foreground engine), or no stderr at all
        return None
    if (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
        return None  # not our log: a user's file
    kept = name + OLD_SUFFIX
    try:
        _copy(base_fd, name, kept)
    except (OSError, RuntimeDirError):  # a full file system; a symlink planted where the copy goes
        kept = ""
    os.ftruncate(fd, 0)
    return kept


def _copy(base_fd: int, source: str, target: str) -> None:
    """``source`` copied to ``target`` (0600, replaced atomically), in the directory ``base_fd``."""
    partial = target + ".tmp"
    src = open_private_file(base_fd, source, os.O_RDONLY)
    try:
        dst = open_private_file(base_fd, partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            while chunk := os.read(src, COPY_CHUNK):
                os.write(dst, chunk)
        finally:
            os.close(dst)
        os.replace(partial, target, src_dir_fd=base_fd, dst_dir_fd=base_fd)
    except (OSError, RuntimeDirError):
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=base_fd)
        raise
    finally:
        os.close(src)


def remove_old_logs(base: str, max_age_s: float = KEEP_LOGS_S) -> list[str]:
    """Remove ``<instance>.log`` and ``.log.1`` files in ``base`` older than ``max_age_s`` whose
    instance has no directory there (its engine is gone); the names removed."""
    entries = list(os.scandir(base))
    live = {entry.name for entry in entries if entry.is_dir(follow_symlinks=False)}
    now, removed = time.time(), []
    for entry in entries:
        name = entry.name
        stem = name.removesuffix(OLD_SUFFIX)
        if not stem.endswith(LOG_SUFFIX) or stem.removesuffix(LOG_SUFFIX) in live:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > max_age_s:
                os.unlink(entry.path)
                removed.append(name)
        except FileNotFoundError:
            continue
    return removed
