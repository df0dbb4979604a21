"""Start the supervisor in the background (``neuralpipe run --detach``) and wait for processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.clients.supervisor import EngineNotFound, find_engine
from engine.rundir import RuntimeDirError, open_private_dir, open_private_file
from shm.naming import new_instance_id
from shm.ring import pid_alive


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited: no such process, or a zombie its parent has not reaped."""
    return not pid_alive(pid)


def wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` is gone; False if it still runs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class LaunchError(RuntimeError):
    """The engine did not start; the text says why (one line, then where its log is)."""


def launch_detached(
    cfg, config_path: str | None, timeout_s: float = 20.0, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run ``neuralpipe run`` in a new session with its log in the runtime base directory; return
    the engine's info once its supervisor reports running: every worker has said ready.

    ``progress`` is told, as it changes, which workers the engine still waits for. Raises
    :class:`LaunchError` when the engine exits at start (the reason read from its log) or is not
    running within ``timeout_s``."""
    instance = cfg.engine.instance or new_instance_id()
    base = cfg.engine.resolved_runtime_dir()
    log_path = os.path.join(base, f"{instance}.log")
    try:  # the base checked (ours, no symlink) and the log opened without following one, 0600
        base_fd = open_private_dir(base)
        try:
            log_fd = open_private_file(base_fd, f"{instance}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        finally:
            os.close(base_fd)
    except RuntimeDirError as exc:
        raise LaunchError(str(exc)) from None
    cmd = [sys.executable, "-m", "engine.cli", "run"] + (["--config", config_path] if config_path else [])
    env = dict(os.environ, NEURALPIPE_INSTANCE=instance, NEURALPIPE_RUNTIME_DIR=base)
    with os.fdopen(log_fd, "ab") as log:
        start_offset = log.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    told: list[str] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            reason = start_failure(log_path, start_offset) or f"the engine exited with code {proc.returncode}"
            raise LaunchError(f"{reason}; log: {log_path}")
        try:
            info = find_engine(base, instance)
        except EngineNotFound:
            info = None
        if info is not None and info.get("state") == "running":
            return {**info, "log": log_path}
        waiting = list(info.get("waiting_for") or []) if info is not None else []
        if progress is not None and waiting and waiting != told:
            progress(f"waiting for worker{'s' if len(waiting) > 1 else ''} {', '.join(waiting)} to be ready")
            told = waiting
        time.sleep(0.01)
    proc.kill()
    raise LaunchError(f"the engine did not report running within {timeout_s:g} s; log: {log_path}")


def start_failure(log_path: str, offset: int = 0) -> str:
    """Why an engine that exited at start failed, from its JSON-lines log (written from
    ``offset`` on): the supervisor's escalation reason and the failed worker's own error, or the
    last error event; "" when the log says nothing."""
    import orjson

    errors: list[dict[str, Any]] = []
    refused = ""  # `run` refusing to start prints one plain "Error: ..." line (click)
    with contextlib.suppress(OSError), open(log_path, "rb") as f:
        f.seek(offset)
        for line in f:
            if line.startswith(b"Error: "):
                refused = line[7:].decode(errors="replace").strip().removeprefix("engine not started: ")
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict) and event.get("level") == "error":
                    errors.append(event)
    escalation = next((e for e in reversed(errors) if e.get("event") == "escalation"), None)
    failed = [e for e in errors if e.get("error") and e.get("stage") != "supervisor"]
    if escalation is None:
        return refused or (str(failed[-1]["error"]) if failed else "")
    cause = next((e for e in reversed(failed) if escalation["reason"].startswith(f"worker {e['stage']!r}")), None)
    return str(escalation["reason"]) + (f": {cause['error']}" if cause else "")
