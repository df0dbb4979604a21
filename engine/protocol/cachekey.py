"""The cache key of a generation request and the policy that says which requests are cacheable.

Ingest computes the key (``cache_key``) and writes it into the stream's START row; the cache stage
stores the finished stream under it and answers lookups by it (docs/cache.md).

The key is the BLAKE2b-128 hex digest of a canonical JSON form of ``(producer, endpoint, body)``:
- ``producer`` (:func:`producer_id`) identifies the upstream set that generated the stream: the same
  prompt at temperature 0 gives other tokens from another server or model, so an engine pointed at
  llama.cpp never gets the embedded upstream's answer from a snapshot both engines shared;
- every body field counts, except those that cannot change the generated tokens (``IGNORED``:
  ``stream``, ``stream_options``, ``user``, ``metadata``, ``store``); an unknown sampling field
  (``top_k``, ``min_p``, ``ignore_eos`` ...) therefore separates keys rather than colliding them;
- object keys are sorted; an integral float up to 2**53 in size is written as the integer (``0.0``
  and ``0`` are one key: JSON does not tell them apart); a larger one stays a float (an integer
  that large is no exact double, and orjson writes integers of 64 bits at most);
- a chat message whose content is a list of only text parts counts as the joined string (OpenAI
  treats the two forms the same).

Policies: ``deterministic`` (default) caches requests with ``temperature`` 0 or a fixed ``seed``
(the same request then gives the same tokens); ``all`` caches every request (a repeat gets the
first answer again); ``off`` caches nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

POLICIES = ("deterministic", "all", "off")
EXACT = 2**53  # the integers a double holds exactly
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
    if isinstance(value, float) and value.is_integer() and -EXACT <= value <= EXACT:
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


def producer_id(upstreams: Iterable[Mapping[str, Any]]) -> str:
    """A stable id (16 hex characters) of the upstream set whose answers are cached: each
    upstream's settings that decide what it generates (for a real server its URL and models; for
    the embedded one its corpus settings), order-independent."""
    canonical = sorted(orjson.dumps(_canonical(dict(u)), option=orjson.OPT_SORT_KEYS) for u in upstreams)
    return hashlib.blake2b(b"\n".join(canonical), digest_size=8).hexdigest()


def cache_key(body: dict[str, Any], endpoint: str = "chat", producer: str = "") -> str:
    """The canonical key (32 hex characters) of a request body sent to ``endpoint`` of ``producer``."""
    fields = {k: v for k, v in body.items() if k not in IGNORED}
    if isinstance(fields.get("messages"), list):
        fields["messages"] = [_message(m) for m in fields["messages"]]
    canonical = orjson.dumps([producer, endpoint, _canonical(fields)], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def key_for(body: dict[str, Any], endpoint: str, policy: str, producer: str) -> str | None:
    """The request's key when ``policy`` caches it, else None."""
    return cache_key(body, endpoint, producer) if cacheable(body, policy) else None
