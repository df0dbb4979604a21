"""The broadcast wire format, version 2: what the broadcast stage publishes and every consumer reads
(docs/wire-format.md has every frame, with worked examples).

A message is three ZeroMQ frames ``[topic, header, payload]``; the header is JSON with ``v`` (2)
and ``type``:

- topic ``all``, type ``batch``: one message per input ring record, every stream's rows of it.
  ``epoch``, ``at`` and ``next`` place it in the broadcast's input (``at`` of a batch is the
  ``next`` of the one before, so a hole shows); ``rows``; ``encoding`` (json | binary) and for
  binary ``columns`` (name, dtype, width, offset, bytes of each array in the payload). Columns:
  stream_id, seq, kind (1 start, 2 token, 3 end, 4 error, 5 reasoning, 6 tool call), token_id,
  logprob, recv_ns, every column compute appended, and the row texts (JSON: a ``text`` list;
  binary: ``text_end`` offsets into a UTF-8 ``text`` arena). A start row's text is JSON ``{model,
  cached}``, an end row's JSON ``{finish_reason, usage}``, an error row's the reason, a tool call
  row's a piece of the call (engine/protocol/toolcalls.py).
- topic = a stream id as 16 hex digits, type start | tokens | reasoning | tool_calls | end | error:
  that stream's rows (``stream``, ``seq`` [first, last]), published only while someone subscribed
  to that topic.
- topic ``heartbeat``: ``time_ns``, ``active_streams``, ``epoch``, ``next``, ``interval_s``, ``hang_timeout_s``.

Both sides use this module, so the format is written once.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from engine.protocol.rows import read_end, read_start
from shm.batch import Kind, event_rows, known_rows

VERSION = 2
ALL_TOPIC = b"all"
HEARTBEAT_TOPIC = b"heartbeat"
ENCODINGS = ("json", "binary")
STREAM_TYPES = ("start", "tokens", "reasoning", "tool_calls", "end", "error")
MESSAGE_TYPES = (*STREAM_TYPES, "batch", "heartbeat")
# Base token columns every per-stream tokens message carries, besides the text.
BASE_COLUMNS = ("seq", "token_id", "logprob", "recv_ns")
# Base columns of a batch message, in payload order; the appended (compute) columns follow.
BATCH_COLUMNS = ("stream_id", "seq", "kind", "token_id", "logprob", "recv_ns")
START, TOKEN, END, ERROR = int(Kind.START), int(Kind.TOKEN), int(Kind.END), int(Kind.ERROR)
REASONING, TOOL_CALL = int(Kind.REASONING), int(Kind.TOOL_CALL)
KIND_TYPES = {START: "start", END: "end", ERROR: "error"}
# per-stream messages of a run of rows, one body for each: the reply's tokens, a reasoning model's
# thinking, a tool call's pieces (their texts JSON: engine/protocol/toolcalls.py)
RUN_TYPES = {TOKEN: "tokens", REASONING: "reasoning", TOOL_CALL: "tool_calls"}
TOKEN_TYPES = tuple(RUN_TYPES.values())
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class WireError(ValueError):
    """A message that does not follow the wire format; the text says what is wrong."""


def topic(stream_id: int) -> bytes:
    """The topic of a stream's own messages: 16 lower-case hex digits."""
    return b"%016x" % stream_id


def parse_topic(raw: bytes) -> int | None:
    """The stream id of a per-stream topic, None for anything else."""
    if len(raw) != 16:
        return None
    try:
        return int(raw, 16)
    except ValueError:
        return None


# ---- texts -------------------------------------------------------------------------------------


class Texts:
    """Row texts, kept as a UTF-8 arena with end offsets (decoded only when asked) or as a list."""

    __slots__ = ("_arena", "_ends", "_list")

    def __init__(self, arena: bytes = b"", ends: np.ndarray | None = None, texts: list[str] | None = None) -> None:
        self._arena = arena
        self._ends = ends
        self._list = texts

    @classmethod
    def from_list(cls, texts: list[str]) -> Texts:
        return cls(texts=texts)

    def __len__(self) -> int:
        return len(self._list) if self._list is not None else len(self._ends)

    def list(self) -> list[str]:
        if self._list is None:
            ends = self._ends.tolist()
            arena = self._arena
            starts = [0, *ends[:-1]] if ends else []
            self._list = [arena[s:e].decode("utf-8", "replace") for s, e in zip(starts, ends, strict=True)]
        return self._list

    def arena(self) -> tuple[bytes, np.ndarray]:
        """The UTF-8 arena and the ``<u4`` end offset of each row's text in it."""
        if self._ends is None:
            encoded = [t.encode() for t in self._list]
            self._arena = b"".join(encoded)
            self._ends = np.cumsum([len(t) for t in encoded], dtype="<u4")
        return self._arena, self._ends

    def take(self, rows: np.ndarray) -> Texts:
        """The texts of ``rows`` (indices, in the order given)."""
        if self._list is not None:
            return Texts(texts=[self._list[i] for i in rows.tolist()])
        ends = self._ends.astype(np.int64)
        starts = np.concatenate(([0], ends[:-1]))[rows]
        lengths = ends[rows] - starts
        if not len(rows) or lengths.sum() == 0:
            return Texts(b"", np.cumsum(lengths, dtype="<u4"))
        # byte i of the result comes from starts[row] + (i - where that row's text begins in the result)
        new_ends = np.cumsum(lengths)
        index = np.arange(int(new_ends[-1])) + np.repeat(starts - (new_ends - lengths), lengths)
        return Texts(np.frombuffer(self._arena, np.uint8)[index].tobytes(), new_ends.astype("<u4"))


# ---- messages ----------------------------------------------------------------------------------


@dataclass
class Message:
    """One decoded per-stream message (start, tokens, end, error) or heartbeat. ``columns``
    (tokens messages) maps a column name to a numpy array (2-D for columns of width > 1) and
    ``text`` holds the token texts."""

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


@dataclass
class Batch:
    """One decoded batch message: every stream's rows of one input record. ``columns`` maps a
    column name (stream_id, seq, kind, token_id, logprob, recv_ns and the appended ones) to a numpy
    array; ``texts`` decodes the row texts on first use."""

    epoch: int
    at: int
    next: int
    columns: dict[str, np.ndarray]
    text: Texts
    header: dict[str, Any] = field(default_factory=dict)
    type: str = "batch"

    @property
    def rows(self) -> int:
        return len(self.columns["seq"])

    @property
    def texts(self) -> list[str]:
        return self.text.list()

    def take(self, rows: np.ndarray) -> Batch:
        """The batch of ``rows`` only (indices in order), at the same position."""
        columns = {name: values[rows] for name, values in self.columns.items()}
        return Batch(self.epoch, self.at, self.next, columns, self.text.take(rows), self.header)

    def streams(self) -> list[tuple[int, np.ndarray]]:
        """``(stream id, its row indices in order)`` for each stream in the batch, by stream id."""
        order, starts = stream_order(self.columns["stream_id"])
        sids = self.columns["stream_id"]
        return [(int(sids[rows[0]]), rows) for rows in np.split(order, starts[1:])] if len(order) else []

    def stream_messages(self) -> list[Message]:
        """The per-stream messages the batch's rows make: per stream, runs of token rows become
        one tokens message (of reasoning rows one reasoning message, of tool call rows one
        tool_calls message), each start, end or error row one message (one numpy gather per column
        for the whole batch, then slices)."""
        n = self.rows
        if not n:
            return []
        order, _ = stream_order(self.columns["stream_id"])
        columns = {name: values[order] for name, values in self.columns.items()}
        texts = self.texts
        texts = [texts[i] for i in order.tolist()]
        sids, kinds = columns.pop("stream_id"), columns.pop("kind")
        events = event_rows(kinds)
        unknown = ~known_rows(kinds)  # a later version's kind (or a corrupt row): skipped, as documented
        apart = events | unknown
        # a message starts where the stream or the kind of row changes, and at and after each row apart
        changes = (sids[1:] != sids[:-1]) | (kinds[1:] != kinds[:-1]) | apart[1:] | apart[:-1]
        starts = np.flatnonzero(np.concatenate(([True], changes)))
        seqs, recv_ns = columns["seq"], columns["recv_ns"]
        encoding = self.header.get("encoding", "binary")
        flags = {"synthetic": True} if self.header.get("synthetic") else {}  # ended at the client, not by the engine
        out: list[Message] = []
        for a, b in zip(starts.tolist(), [*starts[1:].tolist(), n], strict=True):
            sid = int(sids[a])
            if unknown[a]:
                continue
            if events[a]:
                out.append(event_message(int(kinds[a]), sid, int(seqs[a]), texts[a], int(recv_ns[a]), **flags))
                continue
            first, last = int(seqs[a]), int(seqs[b - 1])
            kind = RUN_TYPES[int(kinds[a])]
            head = header(kind, sid, first, last, encoding)
            part = {name: values[a:b] for name, values in columns.items()}
            out.append(Message(kind, sid, (first, last), head, part, texts[a:b]))
        return out


def stream_order(sids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows grouped by stream (a stable sort: a stream's rows keep their order) and where
    each stream's rows begin in that order."""
    n = len(sids)
    if not n or (sids[0] == sids[-1] and (sids == sids[0]).all()):  # one stream: no sort
        return np.arange(n), np.zeros(min(n, 1), np.int64)
    order = np.argsort(sids, kind="stable")
    grouped = sids[order]
    return order, np.concatenate((_FIRST, grouped[1:] != grouped[:-1])).nonzero()[0]


_FIRST = np.ones(1, bool)  # the first row begins a stream (a constant: no list to convert per call)


def event_fields(kind: int, text: str) -> dict[str, Any]:
    """The header fields of a start, end or error row from its text (the internal fields a stage
    keeps in a start row, such as the cache key, are left out; engine/protocol/rows.py has the row texts)."""
    if kind == START:
        start = read_start(text)
        return {"model": start.model, "cached": start.cached}
    if kind == END:
        end = read_end(text)
        return {"finish_reason": end.finish_reason, "usage": end.usage}
    return {"reason": text}


def event_text(kind: int, text: str) -> str:
    """The published text of a start, end or error row: its documented fields only."""
    return text if kind not in (START, END) else orjson.dumps(event_fields(kind, text)).decode()


def event_message(kind: int, sid: int, seq: int, text: str, recv_ns: int, **flags: Any) -> Message:
    name = KIND_TYPES.get(kind, "error")
    head = header(name, sid, seq, seq, "json", **event_fields(kind, text), recv_ns=recv_ns, **flags)
    return Message(name, sid, (seq, seq), head)


# ---- encoding ----------------------------------------------------------------------------------


def header(kind: str, stream: int, first: int, last: int, encoding: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "type": kind, "stream": stream, "seq": [first, last], "encoding": encoding, **fields}


def encode_message(message: Message, encoding: str) -> tuple[bytes, bytes, bytes]:
    """Frames of a per-stream message."""
    if message.type in TOKEN_TYPES:
        return encode_tokens(message.stream, message.columns, message.text, encoding, message.type)
    fields = {k: v for k, v in message.header.items() if k not in ("v", "type", "stream", "seq", "encoding")}
    return encode_event(message.type, message.stream, message.seq[0], encoding, **fields)


def encode_tokens(
    stream: int, columns: dict[str, np.ndarray], texts: list[str], encoding: str, kind: str = "tokens"
) -> tuple[bytes, bytes, bytes]:
    """Frames of a tokens (reasoning, tool_calls) message; ``columns`` holds seq and the other columns of its rows."""
    seq = columns["seq"]
    first, last = int(seq[0]), int(seq[-1])
    if encoding == "json":
        payload = orjson.dumps({**columns, "text": texts}, option=_JSON_OPTS)
        return topic(stream), orjson.dumps(header(kind, stream, first, last, "json")), payload
    described, payload = _binary_columns(columns, Texts.from_list(texts))
    head = header(kind, stream, first, last, "binary", rows=len(seq), columns=described)
    return topic(stream), orjson.dumps(head), payload


def encode_event(kind: str, stream: int, seq: int, encoding: str, **fields: Any) -> tuple[bytes, bytes, bytes]:
    """Frames of a start, end or error message (one row each)."""
    return topic(stream), orjson.dumps(header(kind, stream, seq, seq, encoding, **fields)), b""


def encode_batch(batch: Batch, encoding: str) -> tuple[bytes, bytes, bytes]:
    """Frames of a batch message."""
    head = {"v": VERSION, "type": "batch", "epoch": batch.epoch, "at": batch.at, "next": batch.next}
    head |= {"rows": batch.rows, "encoding": encoding}
    if encoding == "json":
        payload = orjson.dumps({**batch.columns, "text": batch.texts}, option=_JSON_OPTS)
        return ALL_TOPIC, orjson.dumps(head), payload
    described, payload = _binary_columns(batch.columns, batch.text)
    return ALL_TOPIC, orjson.dumps(head | {"columns": described}), payload


def _binary_columns(columns: dict[str, np.ndarray], texts: Texts) -> tuple[list[dict[str, Any]], bytes]:
    """The payload's directory and the payload: the arrays back to back, then the texts."""
    arena, ends = texts.arena()
    arrays = [*columns.values(), ends]
    described, at = _directory((*columns, "text_end"), tuple(map(_DTYPE_AND_SHAPE, arrays)))
    try:  # numpy arrays are bytes-like: joined without a copy of each first
        payload = b"".join([*arrays, arena])
    except TypeError:  # a strided column (a slice of a wider one) is not bytes-like
        payload = b"".join([*map(np.ascontiguousarray, arrays), arena])
    text = {"name": "text", "dtype": "|u1", "width": 1, "offset": at, "bytes": len(arena)}
    return [*described, text], payload


_DTYPE_AND_SHAPE = operator.attrgetter("dtype", "shape")


@functools.lru_cache(maxsize=1 << 12)  # records repeat their columns and row counts
def _directory(
    names: tuple[str, ...], layouts: tuple[tuple[np.dtype, tuple[int, ...]], ...]
) -> tuple[tuple[dict[str, Any], ...], int]:
    """The directory's entries up to the text's (shared between calls: never changed) and where
    the text begins."""
    described, at = [], 0
    for name, (dtype, shape) in zip(names, layouts, strict=True):
        size = dtype.itemsize * math.prod(shape)
        width = shape[1] if len(shape) > 1 else 1
        described.append({"name": name, "dtype": dtype.str, "width": width, "offset": at, "bytes": size})
        at += size
    return tuple(described), at


def encode_heartbeat(
    now_ns: int, active_streams: int, epoch: int, next_position: int, interval_s: float, hang_timeout_s: float
) -> tuple:
    """``hang_timeout_s``: how long the broadcast may be silent before its supervisor kills it as
    hung and starts another (consumers wait that, and a restart's time, before giving up)."""
    head = {"v": VERSION, "type": "heartbeat", "time_ns": now_ns, "active_streams": active_streams}
    head |= {"epoch": epoch, "next": next_position, "interval_s": interval_s, "hang_timeout_s": hang_timeout_s}
    return HEARTBEAT_TOPIC, orjson.dumps(head), b""


# ---- decoding ----------------------------------------------------------------------------------


def decode(frames: list[bytes]) -> Message | Batch:
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
    try:
        if head["type"] == "batch":
            return _decode_batch(head, payload)
        if head["type"] == "heartbeat":
            return Message("heartbeat", -1, (-1, -1), head)
        first, last = head["seq"]
        message = Message(head["type"], int(head["stream"]), (int(first), int(last)), head)
        if head["type"] in TOKEN_TYPES:
            message.columns, texts = _decode_columns(head, payload, int(last) - int(first) + 1)
            message.text = texts.list()
        return message
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise WireError(f"bad {head.get('type')} message: {exc!r}"[:300]) from None


def _decode_batch(head: dict[str, Any], payload: bytes) -> Batch:
    columns, texts = _decode_columns(head, payload, int(head["rows"]))
    for name in BATCH_COLUMNS:
        if name not in columns:
            raise WireError(f"batch message without its {name!r} column")
    return Batch(int(head.get("epoch", 0)), int(head["at"]), int(head["next"]), columns, texts, head)


def _decode_columns(head: dict[str, Any], payload: bytes, rows: int) -> tuple[dict[str, np.ndarray], Texts]:
    if head["encoding"] == "json":
        body = orjson.loads(payload)
        texts = body.pop("text")
        columns = {
            name: np.array([np.nan if v is None else v for v in values], dtype=np.float32)
            if name == "logprob"
            else np.asarray(values, dtype=np.uint64 if name in ("stream_id", "seq") else None)
            for name, values in body.items()
        }
        if any(len(values) != rows for values in columns.values()) or len(texts) != rows:
            raise WireError(f"a column's length is not the header's {rows} rows")
        return columns, Texts.from_list(texts)
    buf = memoryview(payload)
    arrays = {}
    for column in head["columns"]:
        end = column["offset"] + column["bytes"]
        if end > len(buf):
            raise WireError(f"column {column['name']!r} overruns the {len(buf)}-byte payload")
        values = np.frombuffer(buf[column["offset"] : end], dtype=np.dtype(column["dtype"]))
        width = int(column["width"])
        if column["name"] != "text" and len(values) != rows * width:
            raise WireError(f"column {column['name']!r} holds {len(values)} values, not {rows} x {width}")
        arrays[column["name"]] = values.reshape(rows, width) if width > 1 else values
    arena = arrays.pop("text").tobytes()
    ends = arrays.pop("text_end")
    if len(ends) and int(ends[-1]) > len(arena):
        raise WireError("text_end points past the text arena")
    return arrays, Texts(arena, ends)
