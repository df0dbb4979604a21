"""The runtime directory: where an engine instance keeps its sockets, doorbells and worker state.

    <base>/                       mode 0700 ($XDG_RUNTIME_DIR/neuralpipe or /tmp/neuralpipe-<uid>)
      <instance>.log              a detached engine's log (0600)
      <instance>/                 mode 0700, one per running engine
        supervisor.lock           flock(LOCK_EX) held by the supervisor while it lives
        supervisor.json           {instance, pid, control, metrics_port, started, state} (0600)
        control.sock              the supervisor's control ROUTER (ipc://)
        bells/                    the rings' FIFO doorbells
        state/                    workers' restart-surviving state (WorkerContext.state_array)

Commands (status, stop) find running engines here; a directory whose lock is free belongs to a
dead supervisor and is removed by the next start.

Every directory here is opened without following symbolic links and checked (owned by this user;
its mode tightened to 0700) before anything is read, written or swept in it: /tmp is shared, and
another local user who made /tmp/neuralpipe-<uid> first, or a symlink there, would otherwise
receive our sockets or have us delete what it points to (docs/security.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import time

import orjson

INFO_FILE = "supervisor.json"
LOCK_FILE = "supervisor.lock"
PRIVATE_UMASK = 0o077  # files 0600, directories and ipc sockets 0700: only this user


class RuntimeDirError(RuntimeError):
    """The runtime directory cannot be used (owner, a symlink, a live engine with the same id)."""


def open_private_dir(path: str, create: bool = True, dir_fd: int | None = None) -> int:
    """An O_DIRECTORY fd of ``path`` (relative to ``dir_fd`` when given), made mode 0700 if absent.
    Never follows a symlink; raises :class:`RuntimeDirError` (one line) when ``path`` is a symlink,
    not a directory, or belongs to another user; tightens a looser mode of our own to 0700."""
    if create:
        if dir_fd is None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        link = stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        what = "is a symbolic link; refusing to follow it" if link else "is not a directory"
        raise RuntimeDirError(f"{path} {what} (remove it)") from None
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        os.close(fd)
        raise RuntimeDirError(
            f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); refusing to use it"
            " (remove it, or set engine.runtime_dir)"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def open_private_file(dir_fd: int, name: str, flags: int) -> int:
    """Open the file ``name`` in the directory ``dir_fd`` without following a symlink (0600 when
    ``flags`` has O_CREAT); refused when it is not a regular file of this user."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RuntimeDirError(f"{name} is a symbolic link; refusing to follow it (remove it)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise RuntimeDirError(f"{name} is not a regular file of this user (uid {os.getuid()}); refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def write_private_file(dir_fd: int, name: str, data: bytes) -> None:
    """Replace ``name`` in ``dir_fd`` atomically (readers never see half a file), mode 0600."""
    tmp = name + ".tmp"
    fd = open_private_file(dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


class InstanceDir:
    """An engine instance's runtime directory, held (locked) by its supervisor."""

    def __init__(self, base: str, instance: str) -> None:
        # the workers spawned from here inherit it: their sockets and files are this user's only
        os.umask(PRIVATE_UMASK)
        self._base_fd = open_private_dir(base)
        self.path = os.path.join(base, instance)
        try:
            self._fd = open_private_dir(instance, dir_fd=self._base_fd)
        except BaseException:
            os.close(self._base_fd)
            raise
        self._lock_fd = open_private_file(self._fd, LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close()
            raise RuntimeDirError(f"engine instance {instance!r} is already running ({self.path})") from None
        self.bells = os.path.join(self.path, "bells")
        self.state = os.path.join(self.path, "state")
        for name in ("bells", "state"):
            os.close(open_private_dir(name, dir_fd=self._fd))
        self.control_socket = os.path.join(self.path, "control.sock")

    @property
    def base_fd(self) -> int:
        """The runtime base directory, opened (checked: ours, no symlink)."""
        return self._base_fd

    @property
    def control_endpoint(self) -> str:
        return "ipc://" + self.control_socket

    def write_info(self, info: dict) -> None:
        """Replace supervisor.json atomically, mode 0600."""
        write_private_file(self._fd, INFO_FILE, orjson.dumps(info))

    def remove(self) -> None:
        """Delete the directory and drop the lock (last thing a supervisor does)."""
        shutil.rmtree(os.path.basename(self.path), ignore_errors=True, dir_fd=self._base_fd)
        self._close()

    def _close(self) -> None:
        for fd in (self._lock_fd, self._fd, self._base_fd):
            os.close(fd)


def _lock_free(dir_fd: int, name: str) -> bool:
    try:
        fd = os.open(os.path.join(name, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # not ours to judge (a symlink, unreadable): leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _subdirs(dir_fd: int) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of the real directories (not symlinks) in ``dir_fd``, by name."""
    found = []
    for name in sorted(os.listdir(dir_fd)):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                found.append((name, st))
    return found


def live_instances(base: str) -> list[dict]:
    """supervisor.json of every engine running under ``base`` (lock held), oldest first. Raises
    :class:`RuntimeDirError` when ``base`` is not this user's private directory."""
    try:
        base_fd = open_private_dir(base, create=False)
    except FileNotFoundError:
        return []
    found = []
    try:
        for name, _ in _subdirs(base_fd):
            if _lock_free(base_fd, name):
                continue  # a dead engine's directory
            try:
                fd = os.open(os.path.join(name, INFO_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
                with os.fdopen(fd, "rb") as f:
                    found.append(orjson.loads(f.read()))
            except (FileNotFoundError, orjson.JSONDecodeError):
                continue  # starting up: no info yet
    finally:
        os.close(base_fd)
    return sorted(found, key=lambda info: info.get("started", 0))


def remove_dead_instances(base: str, grace_s: float = 10.0) -> list[str]:
    """Remove runtime directories of supervisors that died without cleaning up. ``base`` is
    created or checked (ours, no symlink) first. A directory younger than ``grace_s`` may belong to
    a supervisor that has not taken its lock yet."""
    base_fd = open_private_dir(base)
    removed = []
    now = time.time()
    try:
        for name, st in _subdirs(base_fd):
            if now - st.st_mtime > grace_s and _lock_free(base_fd, name):
                shutil.rmtree(name, ignore_errors=True, dir_fd=base_fd)
                removed.append(name)
    finally:
        os.close(base_fd)
    return removed
