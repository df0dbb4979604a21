"""Masking secrets on every surface that shows configuration or events: logs, ``status``,
``config show``. A secret is the userinfo of a URL (``http://user:password@host``) and the value
of a key named like ``api_key``; each becomes ``***`` (docs/security.md)."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_KEYS = frozenset({"api_key", "password", "secret", "token"})
# scheme://<userinfo>@: up to the LAST "@" before the path (a raw "@" in a password is common)
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")
_MAX_DEPTH = 32


def mask_url(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***``."""
    return _USERINFO.sub(MASK + "@", text) if "@" in text else text


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, strings) with the secrets masked."""
    if isinstance(value, str):
        return mask_url(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and k.lower() in SECRET_KEYS and v else redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, depth + 1) for v in value]
    return value
