"""The runtime directory: where an engine instance keeps its sockets, doorbells and worker state.

    <base>/                       mode 0700 ($XDG_RUNTIME_DIR/neuralpipe or /tmp/neuralpipe-<uid>)
      <instance>/                 mode 0700, one per running engine
        supervisor.lock           flock(LOCK_EX) held by the supervisor while it lives
        supervisor.json           {instance, pid, control, metrics_port, started, state}
        control.sock              the supervisor's control ROUTER (ipc://)
        bells/                    the rings' FIFO doorbells
        state/                    workers' restart-surviving state (WorkerContext.state_array)

Commands (status, stop) find running engines here; a directory whose lock is free belongs to a
dead supervisor and is removed by the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time

import orjson

INFO_FILE = "supervisor.json"
LOCK_FILE = "supervisor.lock"


class RuntimeDirError(RuntimeError):
    """The runtime directory cannot be used (permissions, a live engine with the same id)."""


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime directory {path} belongs to uid {st.st_uid}, not to us")
    os.chmod(path, 0o700)


class InstanceDir:
    """An engine instance's runtime directory, held (locked) by its supervisor."""

    def __init__(self, base: str, instance: str) -> None:
        _private_dir(base)
        self.path = os.path.join(base, instance)
        _private_dir(self.path)
        self._lock_fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeDirError(f"engine instance {instance!r} is already running ({self.path})") from None
        self.bells = os.path.join(self.path, "bells")
        self.state = os.path.join(self.path, "state")
        for path in (self.bells, self.state):
            _private_dir(path)
        self.control_socket = os.path.join(self.path, "control.sock")

    @property
    def control_endpoint(self) -> str:
        return "ipc://" + self.control_socket

    def write_info(self, info: dict) -> None:
        """Replace supervisor.json atomically (readers never see half a file)."""
        tmp = os.path.join(self.path, INFO_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(info))
        os.replace(tmp, os.path.join(self.path, INFO_FILE))

    def remove(self) -> None:
        """Delete the directory and drop the lock (last thing a supervisor does)."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


def _lock_free(path: str) -> bool:
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def live_instances(base: str) -> list[dict]:
    """supervisor.json of every engine running under ``base`` (lock held), oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(base)):
            path = os.path.join(base, name)
            if not os.path.isdir(path) or _lock_free(path):
                continue  # a detached engine's log file, or a dead engine's directory
            try:
                with open(os.path.join(path, INFO_FILE), "rb") as f:
                    found.append(orjson.loads(f.read()))
            except (FileNotFoundError, orjson.JSONDecodeError):
                continue  # starting up: no info yet
    return sorted(found, key=lambda info: info.get("started", 0))


def remove_dead_instances(base: str, grace_s: float = 10.0) -> list[str]:
    """Remove runtime directories of supervisors that died without cleaning up. A directory
    younger than ``grace_s`` may belong to a supervisor that has not taken its lock yet."""
    removed = []
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if os.path.isdir(path) and now - os.stat(path).st_mtime > grace_s and _lock_free(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    return removed
