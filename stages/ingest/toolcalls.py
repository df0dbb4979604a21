"""A chat stream's ``delta.tool_calls``, checked and put in the shape the engine carries them
(engine/protocol/toolcalls.py): one row text per piece, a call's ``id``, ``type`` and ``name`` once.

Servers differ in how they stream a call: OpenAI and vLLM send the id, type and name in the call's
first piece and then pieces of its arguments; llama-cpp-python repeats the id and name in every
piece. Clients join the pieces by ``index`` and concatenate what repeats (the official client's
stream helpers would read a name sent ten times as the name ten times over), so a field already
sent for a call is left out of later pieces, and a piece with nothing new makes no row. A piece of
the wrong shape is the upstream's malformed stream: ValueError names what is wrong, and the stream
ends with that error rather than without its calls."""

from __future__ import annotations

from typing import Any

from engine.protocol.toolcalls import MAX_TOOL_CALLS, piece_text


class ToolCallPieces:
    """One stream's tool calls so far: which of each call's id, type and name were sent."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent: dict[int, set[str]] = {}

    def add(self, deltas: Any) -> list[str]:
        """The row texts of one chunk's ``delta.tool_calls``; ValueError names a malformed piece."""
        if type(deltas) is not list:
            raise ValueError(f"tool_calls must be a list, got {type(deltas).__name__}")
        texts = []
        for delta in deltas:
            if type(delta) is not dict:
                raise ValueError(f"a tool call delta must be an object, got {type(delta).__name__}")
            index = delta.get("index", 0)
            if type(index) is not int or not 0 <= index < MAX_TOOL_CALLS:
                raise ValueError(f"tool call index {index!r} is not an integer in 0..{MAX_TOOL_CALLS - 1}")
            function = delta.get("function") or {}
            if type(function) is not dict:
                raise ValueError(f"tool call {index}: function must be an object, got {type(function).__name__}")
            sent = self.sent.setdefault(index, set())
            fields = {}
            for key, value in (("id", delta.get("id")), ("type", delta.get("type")), ("name", function.get("name"))):
                if value and key not in sent:
                    fields[key] = _text(value, index, key)
                    sent.add(key)
            arguments = _text(function.get("arguments") or "", index, "function.arguments")
            if fields or arguments:
                texts.append(
                    piece_text(index, arguments, fields.get("id", ""), fields.get("type", ""), fields.get("name", ""))
                )
        return texts


def _text(value: Any, index: int, key: str) -> str:
    if type(value) is not str:
        raise ValueError(f"tool call {index}: {key} must be a string, got {type(value).__name__}")
    return value
