"""A chat stream's tool calls, assembled from OpenAI's streamed ``delta.tool_calls``.

A tool call comes as deltas keyed by ``index``: the first carries its ``id``, ``type`` and
``function.name``, the next ones pieces of ``function.arguments`` (a JSON text, only whole once the
last piece is in). The ring's rows carry token text, so the pieces are kept here and the whole calls
travel in the stream's END row (engine/protocol/rows.py); the gateway gives them to the client
before the finish chunk. A delta of the wrong shape, or calls larger than a row can carry, is the
upstream's malformed stream: ValueError names what is wrong, and the stream ends with that error
rather than without its calls."""

from __future__ import annotations

from typing import Any

MAX_TOOL_CALLS = 128  # per stream: an index past it is a malformed delta
# names, ids and arguments together: the END row that carries them holds at most 64 KiB
MAX_TOOL_CALL_BYTES = 60 * 1024


class ToolCalls:
    """The tool calls of one stream so far."""

    __slots__ = ("calls", "size")

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}
        self.size = 0  # bytes of ids, names and arguments so far

    def add(self, deltas: Any) -> None:
        """Fold one chunk's ``delta.tool_calls`` in; ValueError names a malformed delta."""
        if type(deltas) is not list:
            raise ValueError(f"tool_calls must be a list, got {type(deltas).__name__}")
        for delta in deltas:
            if type(delta) is not dict:
                raise ValueError(f"a tool call delta must be an object, got {type(delta).__name__}")
            index = delta.get("index", 0)
            if type(index) is not int or not 0 <= index < MAX_TOOL_CALLS:
                raise ValueError(f"tool call index {index!r} is not an integer in 0..{MAX_TOOL_CALLS - 1}")
            function = delta.get("function") or {}
            if type(function) is not dict:
                raise ValueError(f"tool call {index}: function must be an object, got {type(function).__name__}")
            call = self.calls.get(index)
            if call is None:
                call = self.calls[index] = {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            for key, value in (("id", delta.get("id")), ("type", delta.get("type"))):
                if value:
                    call[key] = self._text(value, index, key)
            name, arguments = function.get("name"), function.get("arguments")
            if name:
                call["function"]["name"] = self._text(name, index, "function.name")
            if arguments:
                call["function"]["arguments"] += self._text(arguments, index, "function.arguments")
        if self.size > MAX_TOOL_CALL_BYTES:
            raise ValueError(f"tool calls of more than {MAX_TOOL_CALL_BYTES} bytes: more than a stream's end row holds")

    def _text(self, value: Any, index: int, key: str) -> str:
        if type(value) is not str:
            raise ValueError(f"tool call {index}: {key} must be a string, got {type(value).__name__}")
        self.size += len(value.encode())
        return value

    def result(self) -> list[dict[str, Any]] | None:
        """The calls in index order, None when there were none."""
        return [self.calls[i] for i in sorted(self.calls)] or None
