"""Segment names: every segment of an engine instance is ``neuralpipe-<instance>-<ring>``.

One prefix lets operators and tools (``ls /dev/shm``, ``neuralpipe check``) find everything the
engine made, and the instance part tells one engine's segments from another's.
"""

from __future__ import annotations

import os
import re
import secrets

PREFIX = "neuralpipe"
SHM_DIR = "/dev/shm"

_INSTANCE = re.compile(r"[A-Za-z0-9_]{1,32}")
_RING = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}")


class NameError_(ValueError):
    """A segment, instance or ring name that does not follow the naming scheme."""


def new_instance_id() -> str:
    """A fresh random instance id (8 hex digits)."""
    return secrets.token_hex(4)


def check_instance(instance: str) -> str:
    if not _INSTANCE.fullmatch(instance):
        raise NameError_(f"instance id {instance!r} must be 1-32 characters of [A-Za-z0-9_]")
    return instance


def check_ring(ring: str) -> str:
    if not _RING.fullmatch(ring):
        raise NameError_(f"ring name {ring!r} must be 1-100 characters of [A-Za-z0-9_.-], not starting with '-'")
    return ring


def segment_name(instance: str, ring: str) -> str:
    """The shared-memory name of ``ring`` in engine ``instance``."""
    return f"{PREFIX}-{check_instance(instance)}-{check_ring(ring)}"


def parse_segment_name(name: str) -> tuple[str, str] | None:
    """``(instance, ring)`` for one of our segment names, else None."""
    parts = name.split("-", 2)
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    instance, ring = parts[1], parts[2]
    if not _INSTANCE.fullmatch(instance) or not _RING.fullmatch(ring):
        return None
    return instance, ring


def segment_path(name: str) -> str:
    """Where a POSIX shared-memory segment of this name lives on Linux."""
    return os.path.join(SHM_DIR, name)
