"""The cache key of a generation request and the policy that says which requests are cacheable.

Ingest computes the key (``cache_key``) and writes it into the stream's START row; the cache stage
stores the finished stream under it and answers lookups by it (docs/cache.md).

The key is the BLAKE2b-128 hex digest of a canonical JSON form of ``(endpoint, body)``:
- every body field counts, except those that cannot change the generated tokens (``IGNORED``:
  ``stream``, ``stream_options``, ``user``, ``metadata``, ``store``); an unknown sampling field
  (``top_k``, ``min_p``, ``ignore_eos`` ...) therefore separates keys rather than colliding them;
- object keys are sorted; an integral float is written as the integer (``0.0`` and ``0`` are one
  key: JSON does not tell them apart);
- a chat message whose content is a list of only text parts counts as the joined string (OpenAI
  treats the two forms the same).

Policies: ``deterministic`` (default) caches requests with ``temperature`` 0 or a fixed ``seed``
(the same request then gives the same tokens); ``all`` caches every request (a repeat gets the
first answer again); ``off`` caches nothing.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

POLICIES = ("deterministic", "all", "off")
IGNORED = frozenset({"stream", "stream_options", "user", "metadata", "store"})


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`POLICIES`; else ValueError naming it."""
    if policy not in POLICIES:
        raise ValueError(f"cache_policy must be one of {', '.join(POLICIES)} (got {policy!r})")
    return policy


def is_deterministic(body: dict[str, Any]) -> bool:
    """Temperature 0 or a fixed seed: the same request gives the same tokens."""
    return body.get("temperature") == 0 or body.get("seed") is not None


def cacheable(body: dict[str, Any], policy: str) -> bool:
    """Whether a request with ``body`` is cached under ``policy``."""
    return policy == "all" or (policy == "deterministic" and is_deterministic(body))


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _message(msg: Any) -> Any:
    content = msg.get("content") if isinstance(msg, dict) else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type", "text") == "text" for p in content):
        return {**msg, "content": "".join(str(p.get("text", "")) for p in content)}
    return msg


def cache_key(body: dict[str, Any], endpoint: str = "chat") -> str:
    """The canonical key (32 hex characters) of a request body sent to ``endpoint``."""
    fields = {k: v for k, v in body.items() if k not in IGNORED}
    if isinstance(fields.get("messages"), list):
        fields["messages"] = [_message(m) for m in fields["messages"]]
    canonical = orjson.dumps([endpoint, _canonical(fields)], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def key_for(body: dict[str, Any], endpoint: str, policy: str) -> str | None:
    """The request's key when ``policy`` caches it, else None."""
    return cache_key(body, endpoint) if cacheable(body, policy) else None
