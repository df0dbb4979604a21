"""How many files (sockets included) the engine's processes may hold open.

A desktop session's soft limit is usually 1024 while its hard limit is far higher (systemd: 524288):
under the soft one, ingest and its embedded upstream could not hold the 1,000 concurrent streams
the engine is built for. The supervisor raises its soft limit to the hard one at start, as Go's
runtime does for every program, and the workers it spawns inherit it. Only the hard limit (a
systemd unit's ``LimitNOFILE=``, ``ulimit -Hn``) bounds the engine then.
"""

from __future__ import annotations

import errno
import resource

# Linux refuses a limit above fs.nr_open (1048576 by default): an unlimited hard limit raises the soft one to this
MOST = 1 << 20
EXHAUSTED = (errno.EMFILE, errno.ENFILE)  # this process's limit, or the system's file table


def raise_open_files() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MOST if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a container's nr_open below the hard limit: keep what we have
            return soft, soft
        return soft, target
    return soft, soft


def open_files_limit() -> int:
    """This process's soft limit (what it may open)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def out_of_descriptors(exc: BaseException | None) -> bool:
    """Whether ``exc`` (an OSError, or an error carrying one as ``os_error``, as aiohttp's connector
    errors do) says this process or the system has no file descriptor left."""
    exc = _os_error(exc)
    return isinstance(exc, OSError) and exc.errno in EXHAUSTED


def _os_error(exc: BaseException | None) -> BaseException | None:
    return getattr(exc, "os_error", exc)  # aiohttp's connector errors carry the OSError


def descriptors_message(exc: OSError) -> str:
    """What to tell about ``exc`` (one that :func:`out_of_descriptors` recognises)."""
    if _os_error(exc).errno == errno.ENFILE:
        return "the system has no file descriptor left (its file table is full: fs.file-max)"
    return (
        f"no file descriptor left: the {open_files_limit()} this process may open are open (RLIMIT_NOFILE;"
        " the engine raises its soft limit to the hard one at start: raise the hard limit, e.g. a systemd"
        " unit's LimitNOFILE= or ulimit -Hn)"
    )
