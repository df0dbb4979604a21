"""The texts of a stream's START and END rows (docs/data-plane.md, "Rows of a stream"). Ingest and
the cache's replay write them; the cache's collector and the broadcast read them. Both sides use
this module, so the format is written once. A TOKEN row's text is the token, an ERROR row's the
reason: plain text, nothing to encode.

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
    # a chat reply's tool calls, whole: [{"id", "type", "function": {"name", "arguments"}}]
    tool_calls: list[dict[str, Any]] | None = None


def start_text(start: Start) -> bytes:
    return orjson.dumps({"model": start.model, "cached": start.cached, "cache_key": start.cache_key})


def read_start(text: bytes | str) -> Start:
    fields = _object(text)
    key = fields.get("cache_key")
    return Start(
        str(fields.get("model") or ""), bool(fields.get("cached")), key if isinstance(key, str) and key else None
    )


def end_text(end: End) -> bytes:
    fields: dict[str, Any] = {"finish_reason": end.finish_reason, "usage": end.usage}
    if end.tool_calls:
        fields["tool_calls"] = end.tool_calls
    return orjson.dumps(fields)


def read_end(text: bytes | str) -> End:
    fields = _object(text)
    usage = fields.get("usage")
    reason = fields.get("finish_reason")
    calls = fields.get("tool_calls")
    if isinstance(calls, list) and calls and all(isinstance(call, dict) for call in calls):
        calls = [_tool_call(call) for call in calls]
    else:
        calls = None
    return End(reason if isinstance(reason, str) else None, usage if isinstance(usage, dict) else None, calls)


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """One call in its documented shape, every field a string, whatever the row held (a reader
    need not check it again)."""
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    call_id, kind, name, arguments = call.get("id"), call.get("type"), function.get("name"), function.get("arguments")
    return {
        "id": call_id if isinstance(call_id, str) else "",
        "type": kind if isinstance(kind, str) and kind else "function",
        "function": {
            "name": name if isinstance(name, str) else "",
            "arguments": arguments if isinstance(arguments, str) else "",
        },
    }


def _object(text: bytes | str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
