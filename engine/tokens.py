"""Shared secrets in an engine instance's runtime directory: who may ask for what on its sockets.

    <runtime dir>/lookup.token     ingest -> cache: only a holder may make the cache replay a stream
    <runtime dir>/operator.token   the CLI and operators: cache clear/snapshot, cancel any stream

Each is 32 random bytes as hex, in a 0600 file of the engine's user inside the 0700 instance
directory, made on first use by whichever worker needs it first (link(2) of a complete temporary
file: two workers starting at once agree on one value, a reader never sees half a file) and
removed with the directory when the engine stops. A client given only a socket path cannot
present them; the engine's own user can read them (docs/security.md says what that does and does
not defend against).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets

from engine.rundir import RuntimeDirError, open_private_dir, open_private_file

_TOKEN_CHARS = 64


def token_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, f"{name}.token")


def _read(dir_fd: int, file: str) -> str:
    fd = open_private_file(dir_fd, file, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read(_TOKEN_CHARS + 1).decode("ascii", "replace").strip()


def ensure_token(runtime_dir: str, name: str) -> str:
    """The token ``name`` of the engine in ``runtime_dir``, made (0600) if there is none yet."""
    dir_fd = open_private_dir(runtime_dir, create=False)
    try:
        file = f"{name}.token"
        tmp = f"{file}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = open_private_file(dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(_TOKEN_CHARS // 2).encode())
        try:
            with contextlib.suppress(FileExistsError):  # another worker made it first: use theirs
                os.link(tmp, file, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
        return _read(dir_fd, file)
    finally:
        os.close(dir_fd)


def read_token(runtime_dir: str, name: str) -> str | None:
    """The token ``name`` if the engine has made it, else None (never creates one)."""
    try:
        dir_fd = open_private_dir(runtime_dir, create=False)
    except (OSError, RuntimeDirError):
        return None
    try:
        return _read(dir_fd, f"{name}.token")
    except (FileNotFoundError, RuntimeDirError):
        return None
    finally:
        os.close(dir_fd)


def matches(presented: object, expected: str | None) -> bool:
    """True when ``presented`` is the expected token (constant time; no token expected: False)."""
    if not expected or not isinstance(presented, str) or len(presented) > 4 * _TOKEN_CHARS:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())
