"""Printing what a :class:`engine.clients.consumer.StreamConsumer` reads: ``neuralpipe tail`` and
``neuralpipe submit --follow``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import orjson

from engine.clients.consumer import StreamConsumer
from engine.protocol import wire
from engine.protocol.toolcalls import merged_pieces

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


def follow(
    consumer: StreamConsumer,
    fmt: str,
    write: Callable[[str], None],
    one_stream: bool,
    first_timeout_s: float | None = None,
) -> str | None:
    """Print messages until the stream ends (one stream) or forever; returns how the last message
    printed ended its stream ("end" or "error"; None when no stream ended), or "timeout" when nothing
    came within ``first_timeout_s`` (None: wait as long as it takes).

    ``text``: one stream's tokens run together as they come (a reasoning model's thinking between
    ``[thinking]`` and ``[/thinking]``, a tool call as ``[tool call I: NAME]`` and its arguments);
    with every stream, one line per message prefixed by its stream id. ``json``: one object per
    token (type tokens, reasoning or tool_calls: its text a piece's JSON) and per start/end/error."""
    ended = None
    timeout = first_timeout_s
    thinking = False  # one stream: its thinking is being printed
    while True:
        seen = False
        for message in consumer.messages(idle_timeout_s=timeout):
            seen = True
            if message.type in ("end", "error"):
                ended = message.type
            if fmt == "json":
                write(_json_lines(message))
            elif one_stream:
                if thinking != (message.type == "reasoning"):
                    thinking = not thinking
                    write("[thinking] " if thinking else " [/thinking]\n")
                write(_stream_text(message))
            else:
                mark = "[thinking] " if message.type == "reasoning" else ""
                write(f"[{message.stream}] {mark}{_stream_text(message).strip()}\n")
            if timeout is not None:
                break  # something came: from now on, wait as long as the stream takes
        if timeout is None:
            return ended
        if not seen:
            return "timeout"
        timeout = None


def _stream_text(message: wire.Message) -> str:
    head = message.header
    if message.type == "tool_calls":
        return "".join(map(_piece_shown, merged_pieces(message.text)))
    if message.type in wire.TOKEN_TYPES:
        return "".join(message.text)
    if message.type == "start":
        return f"[stream {message.stream} model={head.get('model') or '-'}{' cached' if head.get('cached') else ''}]\n"
    if message.type == "end":
        return f"\n[end: {head.get('finish_reason')}, usage {head.get('usage')}]\n"
    return f"\n[error: {head.get('reason')}]\n"


def _piece_shown(piece: dict) -> str:
    """A tool call's piece: its arguments, after a header where the call begins (its name)."""
    function = piece["function"]
    head = f"\n[tool call {piece['index']}: {function['name']}] " if function.get("name") else ""
    return head + function.get("arguments", "")


def _json_lines(message: wire.Message) -> str:
    base = {"stream": message.stream, "type": message.type}
    if message.type not in wire.TOKEN_TYPES:
        fields = {k: v for k, v in message.header.items() if k not in ("v", "type", "stream", "encoding")}
        return orjson.dumps({**base, **fields}, option=_JSON_OPTS).decode()
    cols = message.columns
    lines = []
    for i, text in enumerate(message.text):
        row = {name: values[i] for name, values in cols.items()}
        if np.isnan(row["logprob"]):
            row["logprob"] = None
        lines.append(orjson.dumps({**base, "text": text, **row}, option=_JSON_OPTS).decode())
    return "".join(lines)
