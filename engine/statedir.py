"""The state directory: what an engine instance keeps across runs and reboots (the gateway's API
keys and usage ledger, engine/auth/keystore.py), unlike the runtime directory (engine/rundir.py),
which lives and dies with one run.

    `[engine] state_dir`          the directory itself, when configured (absolute path)
    $NEURALPIPE_STATE_DIR         else this (the directory itself)
    $XDG_STATE_HOME/neuralpipe/<instance>   else (~/.local/state/neuralpipe/<instance>)

``<instance>`` is the *configured* instance id (``[engine] instance``); the default "" (a random id
per run) maps to "default", so a key made with ``neuralpipe keys create`` and no ``--instance`` is
found by every run of an engine configured without one. Through the config the environment variable
overrides the file, as every NEURALPIPE_* variable does (engine/config.py ENV_OVERRIDES).

The directory is made 0700 and opened like the runtime directory: never through a symlink, refused
when another user owns it (engine.rundir.open_private_dir; docs/security.md).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping

from engine.rundir import RuntimeDirError, open_private_dir

STATE_DIR_ENV = "NEURALPIPE_STATE_DIR"
DEFAULT_INSTANCE = "default"
_INSTANCE = re.compile(r"[A-Za-z0-9_]{1,32}")  # as engine/config.py checks [engine] instance


def state_dir(instance: str, configured: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The instance's state directory, created 0700 if absent and checked (this user's, not a
    symlink). Raises :class:`engine.rundir.RuntimeDirError` (one line) when it cannot be used."""
    path = state_dir_path(instance, configured, env)
    refuse_shared_dir(path)
    os.close(open_private_dir(path))
    return path


def refuse_shared_dir(path: str) -> None:
    """Refuse a directory others may write to (``/tmp`` given as the state directory): making it
    private, as open_private_dir does with a looser mode of our own, would take it from everyone."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_mode & (stat.S_IWOTH | stat.S_ISVTX):
        raise RuntimeDirError(
            f"{path} is a shared directory (mode {stat.S_IMODE(st.st_mode):o}); give the state a directory of its own"
        )


def state_dir_path(instance: str, configured: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """Where :func:`state_dir` is, without making or checking it (the configuration hands it to
    the gateway worker, which opens it)."""
    path = configured or env.get(STATE_DIR_ENV, "")
    if not path:
        name = instance or DEFAULT_INSTANCE
        if not _INSTANCE.fullmatch(name):
            raise RuntimeDirError(f"instance id must be 1-32 characters of [A-Za-z0-9_] (got {name[:40]!r})")
        base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        path = os.path.join(base, "neuralpipe", name)
    elif not os.path.isabs(path):  # relative: would depend on the cwd of whoever runs a command
        source = "state_dir" if configured else STATE_DIR_ENV
        raise RuntimeDirError(f"{source} must be an absolute path (got {path[:200]!r})")
    return path
