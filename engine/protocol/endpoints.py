"""Where a worker's sockets are: the one naming rule, derived from the worker's name. A worker binds
``ipc://<runtime dir>/<worker>.sock`` for its main socket and ``<worker>-<role>.sock`` for others
(the broadcast's ``binary`` and ``snapshot``); clients derive the same paths from the same name."""

from __future__ import annotations

import os


def socket_file(runtime_dir: str, worker: str, role: str = "") -> str:
    """The socket file of ``worker``'s ``role`` socket (its main one when ``role`` is empty)."""
    return os.path.join(runtime_dir, f"{worker}-{role}.sock" if role else f"{worker}.sock")


def endpoint(runtime_dir: str, worker: str, role: str = "") -> str:
    """The ``ipc://`` endpoint of :func:`socket_file`."""
    return "ipc://" + socket_file(runtime_dir, worker, role)
