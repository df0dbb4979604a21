"""Start the supervisor in the background (``neuralpipe run --detach``) and wait for processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from engine.client import EngineNotFound, find_engine
from shm.naming import new_instance_id


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited: no such process, or a zombie its parent has not reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` is gone; False if it still runs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def launch_detached(cfg, config_path: str | None, timeout_s: float = 20.0) -> dict[str, Any]:
    """Run ``neuralpipe run`` in a new session with its log in the runtime base directory; return
    the engine's info once its supervisor reports running."""
    instance = cfg.engine.instance or new_instance_id()
    base = cfg.engine.resolved_runtime_dir()
    os.makedirs(base, mode=0o700, exist_ok=True)
    log_path = os.path.join(base, f"{instance}.log")
    cmd = [sys.executable, "-m", "engine.cli", "run"] + (["--config", config_path] if config_path else [])
    env = dict(os.environ, NEURALPIPE_INSTANCE=instance, NEURALPIPE_RUNTIME_DIR=base)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited at start with code {proc.returncode}; see {log_path}")
        try:
            info = find_engine(base, instance)
        except EngineNotFound:
            info = None
        if info is not None and info.get("state") == "running":
            return {**info, "log": log_path}
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"engine did not report running within {timeout_s:g} s; see {log_path}")
