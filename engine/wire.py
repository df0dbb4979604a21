"""The broadcast wire format: what the broadcast stage publishes and every consumer reads.

A message is three ZeroMQ frames ``[topic, header, payload]`` (docs/wire-format.md):

- topic: the stream id as 16 lower-case hex digits (so a prefix never matches another stream),
  or ``heartbeat``;
- header: a JSON object: ``v`` (1), ``type`` (start | tokens | end | error | heartbeat),
  ``stream``, ``seq`` ([first, last], inclusive), ``encoding`` (json | binary) and per type:
  start ``model``, ``cached``; end ``finish_reason``, ``usage``; error ``reason``; binary tokens
  ``rows`` and ``columns`` (name, dtype, width, offset, bytes of each array in the payload);
- payload: empty except for tokens: JSON ``{column: [values]}``, or the columns' raw
  little-endian arrays one after another (binary; ``text`` is the UTF-8 arena and ``text_end``
  the end offset of each token's text in it).

Both sides use this module, so the format is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

VERSION = 1
HEARTBEAT_TOPIC = b"heartbeat"
ENCODINGS = ("json", "binary")
MESSAGE_TYPES = ("start", "tokens", "end", "error", "heartbeat")
# Base token columns every tokens message carries, besides the text.
BASE_COLUMNS = ("seq", "token_id", "logprob", "recv_ns")
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class WireError(ValueError):
    """A message that does not follow the wire format; the text says what is wrong."""


def topic(stream_id: int) -> bytes:
    """The topic of a stream's messages (also the prefix to subscribe to for one stream)."""
    return b"%016x" % stream_id


@dataclass
class Message:
    """One decoded message. ``columns`` (tokens messages) maps a column name to a numpy array
    (2-D for columns of width > 1) and ``text`` holds the token texts."""

    type: str
    stream: int
    seq: tuple[int, int]
    header: dict[str, Any]
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)

    def trimmed(self, first: int) -> Message:
        """This tokens message without the rows before seq ``first`` (a partial duplicate)."""
        skip = first - self.seq[0]
        columns = {name: values[skip:] for name, values in self.columns.items()}
        return Message(self.type, self.stream, (first, self.seq[1]), self.header, columns, self.text[skip:])


def header(kind: str, stream: int, first: int, last: int, encoding: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "type": kind, "stream": stream, "seq": [first, last], "encoding": encoding, **fields}


def encode_tokens(
    stream: int, columns: dict[str, np.ndarray], texts: list[str], encoding: str
) -> tuple[bytes, bytes, bytes]:
    """Frames of a tokens message; ``columns`` holds seq and the other columns of its rows."""
    seq = columns["seq"]
    first, last = int(seq[0]), int(seq[-1])
    if encoding == "json":
        payload = orjson.dumps({**columns, "text": texts}, option=_JSON_OPTS)
        return topic(stream), orjson.dumps(header("tokens", stream, first, last, "json")), payload
    parts, described, at = [], [], 0
    arena = "".join(texts).encode()
    ends = np.cumsum([len(t.encode()) for t in texts], dtype="<u4")
    for name, values in (*columns.items(), ("text_end", ends)):
        raw = np.ascontiguousarray(values).tobytes()
        width = values.shape[1] if values.ndim > 1 else 1
        described.append({"name": name, "dtype": values.dtype.str, "width": width, "offset": at, "bytes": len(raw)})
        parts.append(raw)
        at += len(raw)
    described.append({"name": "text", "dtype": "|u1", "width": 1, "offset": at, "bytes": len(arena)})
    parts.append(arena)
    head = header("tokens", stream, first, last, "binary", rows=len(seq), columns=described)
    return topic(stream), orjson.dumps(head), b"".join(parts)


def encode_event(kind: str, stream: int, seq: int, encoding: str, **fields: Any) -> tuple[bytes, bytes, bytes]:
    """Frames of a start, end or error message (one row each)."""
    return topic(stream), orjson.dumps(header(kind, stream, seq, seq, encoding, **fields)), b""


def encode_heartbeat(now_ns: int, active_streams: int) -> tuple[bytes, bytes, bytes]:
    head = {"v": VERSION, "type": "heartbeat", "time_ns": now_ns, "active_streams": active_streams}
    return HEARTBEAT_TOPIC, orjson.dumps(head), b""


def decode(frames: list[bytes]) -> Message:
    """Decode the frames of one message; raises :class:`WireError` naming the problem."""
    if len(frames) != 3:
        raise WireError(f"a message has 3 frames [topic, header, payload], got {len(frames)}")
    _, raw_header, payload = frames
    try:
        head = orjson.loads(raw_header)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(head, dict) or head.get("v") != VERSION or head.get("type") not in MESSAGE_TYPES:
        raise WireError(f"header is not a version {VERSION} message: {raw_header[:120]!r}")
    if head["type"] == "heartbeat":
        return Message("heartbeat", -1, (-1, -1), head)
    first, last = head["seq"]
    message = Message(head["type"], int(head["stream"]), (int(first), int(last)), head)
    if head["type"] == "tokens":
        if head["encoding"] == "json":
            _decode_json_tokens(message, payload)
        else:
            _decode_binary_tokens(message, payload)
    return message


def _decode_json_tokens(message: Message, payload: bytes) -> None:
    body = orjson.loads(payload)
    message.text = body.pop("text")
    message.columns = {
        name: np.array([np.nan if v is None else v for v in values], dtype=np.float32)
        if name == "logprob"
        else np.asarray(values)
        for name, values in body.items()
    }


def _decode_binary_tokens(message: Message, payload: bytes) -> None:
    rows = int(message.header["rows"])
    buf = memoryview(payload)
    arrays = {}
    for column in message.header["columns"]:
        end = column["offset"] + column["bytes"]
        if end > len(buf):
            raise WireError(f"column {column['name']!r} overruns the {len(buf)}-byte payload")
        values = np.frombuffer(buf[column["offset"] : end], dtype=np.dtype(column["dtype"]))
        arrays[column["name"]] = values.reshape(rows, column["width"]) if column["width"] > 1 else values
    arena = arrays.pop("text").tobytes()
    ends = arrays.pop("text_end").tolist()
    message.text = [arena[s:e].decode("utf-8", "replace") for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    message.columns = arrays
