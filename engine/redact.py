"""Masking secrets on every surface that shows configuration or events: logs, ``status``,
``config show``. A secret is the userinfo of a URL (``http://user:password@host``), the value
of a key named like ``api_key``, and all of a webhook URL but its origin (its path or query is
the token, as Slack's and Discord's are); each becomes ``***`` (docs/security.md)."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_KEYS = frozenset({"api_key", "password", "secret", "token"})
URL_SECRET_KEYS = frozenset({"webhooks"})  # lists of URLs shown as their origin only
_ORIGIN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#@\s]*")
# scheme://<userinfo>@: up to the LAST "@" before the path (a raw "@" in a password is common)
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")
_MAX_DEPTH = 32


def mask_url(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***``."""
    return _USERINFO.sub(MASK + "@", text) if "@" in text else text


def url_origin(url: str) -> str:
    """``scheme://host:port`` of ``url`` (credentials masked): all that may be shown of a URL whose
    path or query is a secret, such as a webhook's."""
    found = _ORIGIN.match(mask_url(url))
    return found.group(0) if found else MASK


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, strings) with the secrets masked."""
    if isinstance(value, str):
        return mask_url(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {k: _redact_item(k, v, depth) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, depth + 1) for v in value]
    return value


def _redact_item(key: Any, value: Any, depth: int) -> Any:
    name = key.lower() if isinstance(key, str) else ""
    if name in SECRET_KEYS and value:
        return MASK
    if name in URL_SECRET_KEYS and isinstance(value, list | tuple):
        return [f"{url_origin(v)}/{MASK}" if isinstance(v, str) else MASK for v in value]
    return redact(value, depth + 1)
