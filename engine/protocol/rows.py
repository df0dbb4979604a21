"""The texts of a stream's START and END rows (docs/data-plane.md, "Rows of a stream"). Ingest and
the cache's replay write them; the cache's collector and the broadcast read them. Both sides use
this module, so the format is written once. A TOKEN or REASONING row's text is the token, an ERROR
row's the reason: plain text, nothing to encode; a TOOL_CALL row's is a piece of a tool call
(engine/protocol/toolcalls.py).

Reading is forgiving: a text that is not the JSON object expected reads as the defaults (a row is
data from another process, and a bad one must not stop the reader)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Start:
    model: str = ""  # what the request asked for ("" when it named none)
    cached: bool = False  # the cache replays a stored stream
    cache_key: str | None = None  # internal: the cache stores the finished stream under it


@dataclass(frozen=True)
class End:
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


def start_text(start: Start) -> bytes:
    return orjson.dumps({"model": start.model, "cached": start.cached, "cache_key": start.cache_key})


def read_start(text: bytes | str) -> Start:
    fields = _object(text)
    key = fields.get("cache_key")
    return Start(
        str(fields.get("model") or ""), bool(fields.get("cached")), key if isinstance(key, str) and key else None
    )


def end_text(end: End) -> bytes:
    return orjson.dumps({"finish_reason": end.finish_reason, "usage": end.usage})


def read_end(text: bytes | str) -> End:
    fields = _object(text)
    usage = fields.get("usage")
    reason = fields.get("finish_reason")
    return End(reason if isinstance(reason, str) else None, usage if isinstance(usage, dict) else None)


def _object(text: bytes | str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
