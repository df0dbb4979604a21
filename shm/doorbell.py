"""A wake-up primitive that is a file descriptor: a FIFO opened read-write and non-blocking.

Chosen over an eventfd because a restarted worker reopens it by path (an eventfd can only be
passed down at spawn), and over a ZeroMQ socket because ringing it is one ``write`` with no
context or I/O thread. Being an fd, it can be polled together with ZeroMQ sockets (``zmq.Poller``
takes raw fds) and from asyncio (``loop.add_reader``). Ringing is idempotent: a full pipe already
means "wake up", so EAGAIN is ignored.
"""

from __future__ import annotations

import errno
import os
import select

_PIPE_CAPACITY = 1 << 16  # Linux's default pipe buffer


def create_fifo(path: str) -> None:
    """Make the FIFO at ``path`` (mode 0600); an existing FIFO there is reused."""
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        import stat

        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise FileExistsError(errno.EEXIST, "doorbell path exists and is not a FIFO", path) from None


class Doorbell:
    """One end of a FIFO doorbell; both sides open it read-write so neither open blocks."""

    __slots__ = ("_poll", "fd", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def fileno(self) -> int:
        return self.fd

    def ring(self) -> None:
        # try/except, not contextlib.suppress: every record of every stage rings, and the context
        # manager's calls cost ~0.3 µs each time (a try costs nothing until it catches)
        try:  # noqa: SIM105 (the reason above)
            os.write(self.fd, b"\x01")
        except BlockingIOError:  # the pipe is full: rung already
            pass

    def drain(self) -> None:
        """Consume pending rings so the next poll blocks until a new one. One read of the pipe's
        whole capacity suffices (a second would only cost a syscall and an EAGAIN): a ring
        written just after only makes the next poll return at once, and the caller re-checks
        its ring anyway."""
        try:  # noqa: SIM105 (as ring: no context manager on the hot path)
            os.read(self.fd, _PIPE_CAPACITY)
        except BlockingIOError:  # nothing to drain
            pass

    def wait(self, timeout_s: float) -> bool:
        """Block until rung or ``timeout_s`` passes; True when rung."""
        return bool(self._poll.poll(max(0, int(timeout_s * 1000 + 0.999))))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
