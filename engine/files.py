"""Reading a file that configuration names, without trusting what it is: a FIFO would block the
reader until some writer came (for good, on an event loop), and a device such as /dev/zero never
ends. One home for the check, for the config file, the JWT key files and the cache's snapshot."""

from __future__ import annotations

import os
import stat

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnusableFile(ValueError):
    """The path names no regular file, or one larger than the reader takes."""


def read_regular_file(path: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``; UnusableFile naming the problem when it is none
    (``"<path>: not a regular file but a FIFO"``) or has more than ``limit`` bytes; OSError as the
    open or the read raise it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait for a writer
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "something else")
            raise UnusableFile(f"{path}: not a regular file but {kind}")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise UnusableFile(f"{path}: larger than {limit} bytes")
    return data
