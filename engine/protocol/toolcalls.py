"""A chat reply's tool calls as the engine carries them: one TOOL_CALL row (shm.batch.Kind) per
piece, in seq order with the stream's other rows, its text one JSON object in OpenAI's streamed
shape::

    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\\"q"}}
    {"index": 0, "function": {"arguments": "\\": 1}"}}

``index`` says which call; the call's ``id``, ``type`` and ``function.name`` come once (in its first
piece, as a rule); ``function.arguments`` is a piece of the call's JSON arguments, whole only once
every piece is joined. Ingest writes them (stages/ingest/toolcalls.py checks the upstream's); the
broadcast publishes them (``tool_calls`` messages, docs/wire-format.md); a consumer relays them as
they come or joins them (:class:`ToolCallJoiner`)."""

from __future__ import annotations

from typing import Any

import orjson

MAX_TOOL_CALLS = 128  # calls per reply: an index past it is a malformed piece


def piece_text(index: int, arguments: str, call_id: str = "", kind: str = "", name: str = "") -> str:
    """The row text of one piece (the fields given: those that are not empty)."""
    piece: dict[str, Any] = {"index": index}
    if call_id:
        piece["id"] = call_id
    if kind:
        piece["type"] = kind
    function = {"name": name} if name else {}
    function["arguments"] = arguments
    piece["function"] = function
    return orjson.dumps(piece).decode()


def read_piece(text: str) -> dict[str, Any] | None:
    """A piece row's text as a dict of the documented shape (every field a string, ``index`` an
    integer in range); None for a text that is not one (never from ingest; a consumer skips it)."""
    try:
        piece = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if type(piece) is not dict or type(piece.get("function")) is not dict:
        return None
    index, function = piece.get("index"), piece["function"]
    if type(index) is not int or not 0 <= index < MAX_TOOL_CALLS:
        return None
    fields = (piece.get("id", ""), piece.get("type", ""), function.get("name", ""), function.get("arguments", ""))
    if not all(type(value) is str for value in fields):
        return None
    return piece


class ToolCallJoiner:
    """A reply's pieces joined into its whole calls, as a non-streaming answer gives them."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, text: str) -> None:
        piece = read_piece(text)
        if piece is None:
            return
        call = self.calls.get(piece["index"])
        if call is None:
            call = self.calls[piece["index"]] = {
                "id": "",
                "type": "function",
                "function": {"name": "", "arguments": ""},
            }
        call["id"] = piece.get("id") or call["id"]
        call["type"] = piece.get("type") or call["type"]
        function = piece["function"]
        call["function"]["name"] = function.get("name") or call["function"]["name"]
        call["function"]["arguments"] += function.get("arguments", "")

    def result(self) -> list[dict[str, Any]] | None:
        """The calls in index order, None when there were none."""
        return [self.calls[i] for i in sorted(self.calls)] or None


def merged_pieces(texts: list[str]) -> list[dict[str, Any]]:
    """A run of pieces as one delta's ``tool_calls``: consecutive pieces of one call in one entry
    (the first's id, type and name, the arguments joined)."""
    out: list[dict[str, Any]] = []
    for text in texts:
        piece = read_piece(text)
        if piece is None:
            continue
        if out and out[-1]["index"] == piece["index"] and not (set(piece) - {"index", "function"}):
            last = out[-1]["function"]
            if "name" not in piece["function"]:
                last["arguments"] = last.get("arguments", "") + piece["function"].get("arguments", "")
                continue
        out.append(piece)
    return out
