"""Token batch: a struct-of-arrays record, written in place into a claimed ring record and read in
place as numpy views.

Layout (all little-endian, every column 8-byte aligned, ``n`` rows)::

    0    magic u32 b"NPTB" | version u16 | extra u16 (appended columns in use)
    8    rows u32          | text_bytes u32
    16   reserved u64
    24   column directory: MAX_EXTRA entries of 16 bytes, for columns appended later
         (name 8 bytes ASCII NUL-padded | dtype 2 bytes, e.g. b"f4" | width u16 | offset u32)
    24 + 16*MAX_EXTRA   base columns, in this order:
         stream_id u64[n] | seq u64[n] | recv_ns i64[n] | token_id u32[n] | logprob f32[n]
         | text_end u32[n] | kind u8[n] | text u8[text_bytes]
    then the appended columns, each ``width`` values of ``dtype`` per row

Token ``i``'s text is ``text[text_end[i-1]:text_end[i]]`` (``text_end[-1]`` taken as 0), UTF-8.
``logprob`` is NaN when the upstream gave none. ``token_id`` is the upstream's id when it gives one,
else :func:`stable_token_id` of the token bytes, which sets bit 31 so the two never collide for
vocabularies under 2**31. Appended columns reserve their directory entry in the fixed header, so a
stage adds columns to a batch it writes without moving the base columns.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

MAGIC = int.from_bytes(b"NPTB", "little")
RECORD_TYPE = 16  # the ring record type of a token batch (the first user record type)
VERSION = 1
MAX_EXTRA = 8
_FIXED = struct.Struct("<IHHII8x")
_ENTRY = struct.Struct("<8s2sHI")
DIRECTORY_OFFSET = _FIXED.size
COLUMNS_OFFSET = DIRECTORY_OFFSET + MAX_EXTRA * _ENTRY.size

# (name, dtype) of the base columns in layout order; text follows kind.
BASE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("stream_id", "<u8"),
    ("seq", "<u8"),
    ("recv_ns", "<i8"),
    ("token_id", "<u4"),
    ("logprob", "<f4"),
    ("text_end", "<u4"),
    ("kind", "u1"),
)
_DTYPES = {code: np.dtype("<" + code) for code in ("u1", "i1", "u2", "i2", "u4", "i4", "f4", "u8", "i8", "f8")}
_U1 = _DTYPES["u1"]


# The most UTF-8 bytes one row's text carries; a producer refuses longer (ingest ends the stream with
# an error naming the size), so one row of any stream always fits a ring of min_record_bytes().
MAX_ROW_TEXT = 4096
# Bytes per row set aside for appended columns in that minimum (compute's default columns take 31).
ROW_EXTRA_ALLOWANCE = 512


class Kind(IntEnum):
    """What a row of a batch is."""

    START = 1
    TOKEN = 2
    END = 3
    ERROR = 4
    REASONING = 5  # a token of a reasoning model's thinking, before its reply (docs/data-plane.md)
    TOOL_CALL = 6  # a piece of a tool call, its text JSON (engine/protocol/toolcalls.py)


KINDS = np.array(sorted(int(kind) for kind in Kind), np.uint8)  # the row kinds this version knows


def _kind_table(kinds: list[int]) -> np.ndarray:
    table = np.zeros(256, bool)
    table[kinds] = True
    return table


_EVENTS = _kind_table([Kind.START, Kind.END, Kind.ERROR])
_ENDINGS = _kind_table([Kind.END, Kind.ERROR])
_KNOWN = _kind_table(KINDS.tolist())


def _rows_in(table: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """``table[kind]`` of each row: one lookup for the u1 kind column of every record (a batch of a
    few rows made per-row comparisons cost several µs each); any other dtype (a JSON message, a
    hostile one: wider integers, negatives, floats) compared by value."""
    if kinds.dtype == np.uint8:
        return table[kinds]
    return np.isin(kinds, np.flatnonzero(table))


def event_rows(kinds: np.ndarray) -> np.ndarray:
    """Which rows are start, end or error rows (events), not tokens (of a reply, its thinking, a tool call)."""
    return _rows_in(_EVENTS, kinds)


def ending_rows(kinds: np.ndarray) -> np.ndarray:
    """Which rows end their stream: end and error rows (never ``kind > TOKEN``: kinds 5 and 6 are tokens)."""
    return _rows_in(_ENDINGS, kinds)


def known_rows(kinds: np.ndarray) -> np.ndarray:
    """Which rows are of a kind this version knows (a later version's kind is skipped by readers)."""
    return _rows_in(_KNOWN, kinds)


class BatchError(ValueError):
    """A buffer that does not hold a valid token batch; the message names the field."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class ExtraColumn:
    """A column appended after the base ones: ``width`` values of ``dtype`` (e.g. "f4") per row."""

    name: str
    dtype: str
    width: int = 1

    def __post_init__(self) -> None:
        if not self.name.isascii() or not 0 < len(self.name) <= 8:
            raise BatchError(f"extra column name {self.name!r} must be 1-8 ASCII characters")
        if self.dtype not in _DTYPES:
            raise BatchError(f"extra column {self.name!r}: dtype {self.dtype!r} not one of {sorted(_DTYPES)}")
        if not 0 < self.width < 1 << 16:
            raise BatchError(f"extra column {self.name!r}: width {self.width} out of range")


_ITEMSIZES = tuple(np.dtype(dtype).itemsize for _, dtype in BASE_COLUMNS)
_U8, _I8, _U4, _F4 = (_DTYPES[code] for code in ("u8", "i8", "u4", "f4"))


@functools.lru_cache(maxsize=1 << 12)  # every encode and decode asks; batches repeat their row counts
def _column_offsets(rows: int) -> tuple[int, ...]:
    """Offsets of the base columns and of the text arena."""
    offsets, at = [], COLUMNS_OFFSET
    for itemsize in _ITEMSIZES:
        offsets.append(at)
        at = _align8(at + rows * itemsize)
    offsets.append(at)  # text arena
    return tuple(offsets)


def _base_offsets(rows: int, text_bytes: int) -> tuple[tuple[int, ...], int]:
    """Offsets of the base columns and of the text arena, and the end of the arena. (Cached by
    row count alone: the text's size differs from record to record, so a cache keyed on it
    missed nearly every time.)"""
    offsets = _column_offsets(rows)
    return offsets, _align8(offsets[-1] + text_bytes)


def batch_size(rows: int, text_bytes: int, extra: tuple[ExtraColumn, ...] = ()) -> int:
    """Bytes a batch of ``rows`` rows, ``text_bytes`` of text and the ``extra`` columns occupies."""
    _, at = _base_offsets(rows, text_bytes)
    for column in extra:
        at = _align8(at + rows * column.width * _DTYPES[column.dtype].itemsize)
    return at


def min_record_bytes() -> int:
    """The smallest ``max_record`` a ring of token batches may have: one row with the longest text
    and appended columns. Producers split their records to fit the ring; below this size no split
    helps, so the configuration refuses such a ring."""
    return batch_size(1, MAX_ROW_TEXT) + ROW_EXTRA_ALLOWANCE


class BatchColumns:
    """Numpy views of one batch's columns over the record's memory (zero copy).

    Writable when made by :func:`write_batch` over a claimed record, read-only views of a
    consumer's record otherwise. Valid only until the record is committed or released.
    """

    __slots__ = ("extra", "kind", "logprob", "recv_ns", "rows", "seq", "stream_id", "text", "text_end", "token_id")

    def __init__(self, buf: memoryview, rows: int, text_bytes: int, extra: dict[str, tuple[str, int, int]]):
        at, _ = _base_offsets(rows, text_bytes)
        self.rows = rows
        # one statement per column, frombuffer's arguments by position: every record of every stage
        # makes these views, and a loop with setattr or keyword parsing cost more than the views
        view = np.frombuffer
        self.stream_id = view(buf, _U8, rows, at[0])
        self.seq = view(buf, _U8, rows, at[1])
        self.recv_ns = view(buf, _I8, rows, at[2])
        self.token_id = view(buf, _U4, rows, at[3])
        self.logprob = view(buf, _F4, rows, at[4])
        self.text_end = view(buf, _U4, rows, at[5])
        self.kind = view(buf, _U1, rows, at[6])
        self.text = view(buf, _U1, text_bytes, at[7])
        self.extra = {name: extra_column(buf, rows, extra, name) for name in extra}

    def token_text(self, i: int) -> str:
        """Row ``i``'s text, decoded (invalid UTF-8 replaced)."""
        start = int(self.text_end[i - 1]) if i else 0
        return self.text[start : int(self.text_end[i])].tobytes().decode("utf-8", "replace")

    def texts(self) -> list[str]:
        arena = self.text.tobytes()
        ends = self.text_end.tolist()
        starts = [0, *ends[:-1]] if ends else []
        return [arena[s:e].decode("utf-8", "replace") for s, e in zip(starts, ends, strict=True)]


def write_batch(buf: memoryview, rows: int, text_bytes: int, extra: tuple[ExtraColumn, ...] = ()) -> BatchColumns:
    """Lay out a batch header in ``buf`` (a claimed record of at least :func:`batch_size` bytes)
    and return writable column views to fill in place."""
    _, directory = write_header(buf, rows, text_bytes, extra)
    return BatchColumns(buf, rows, text_bytes, directory)


def write_header(
    buf: memoryview, rows: int, text_bytes: int, extra: tuple[ExtraColumn, ...] = ()
) -> tuple[tuple[int, ...], dict[str, tuple[str, int, int]]]:
    """Lay out a batch header in ``buf`` as :func:`write_batch` does, without making a view:
    where the base columns lie (offsets in ``BASE_COLUMNS`` order, then the text arena's) and the
    extra columns' directory (:func:`extra_column` makes a view of one). For a writer that fills
    the columns itself (ingest's compiled fill)."""
    if len(extra) > MAX_EXTRA:
        raise BatchError(f"{len(extra)} extra columns; a batch has room for {MAX_EXTRA}")
    offsets, need = _base_offsets(rows, text_bytes)
    if extra:
        entries, directory, need = _extra_layout(rows, text_bytes, extra)
    if len(buf) < need:
        raise BatchError(f"buffer of {len(buf)} bytes too small for a batch needing {need}")
    _FIXED.pack_into(buf, 0, MAGIC, VERSION, len(extra), rows, text_bytes)
    if not extra:
        return offsets, _NO_EXTRA
    buf[DIRECTORY_OFFSET : DIRECTORY_OFFSET + len(entries)] = entries
    return offsets, directory


def extra_column(buf: memoryview, rows: int, directory: dict[str, tuple[str, int, int]], name: str) -> np.ndarray:
    """A view of extra column ``name`` of a batch laid out in ``buf`` (``directory`` as
    :func:`write_header` returns it): ``rows`` values, or ``rows`` x width for a wider column."""
    dtype, width, offset = directory[name]
    column = np.frombuffer(buf, _DTYPES[dtype], rows * width, offset)
    return column.reshape(rows, width) if width > 1 else column


_NO_EXTRA: dict[str, tuple[str, int, int]] = {}  # the directory of a batch without extra columns (never changed)


@functools.lru_cache(maxsize=1 << 10)  # a stage writes the same columns batch after batch
def _extra_layout(
    rows: int, text_bytes: int, extra: tuple[ExtraColumn, ...]
) -> tuple[bytes, dict[str, tuple[str, int, int]], int]:
    """The directory entries of ``extra`` columns (packed), where each column lies, and the
    batch's size (:func:`batch_size`)."""
    _, at = _base_offsets(rows, text_bytes)
    entries, directory = bytearray(len(extra) * _ENTRY.size), {}
    for i, column in enumerate(extra):
        _ENTRY.pack_into(entries, i * _ENTRY.size, column.name.encode(), column.dtype.encode(), column.width, at)
        directory[column.name] = (column.dtype, column.width, at)
        at = _align8(at + rows * column.width * _DTYPES[column.dtype].itemsize)
    return bytes(entries), directory, at


class TokenBatch:
    """Decode a batch record: validates the header and returns :class:`BatchColumns` views."""

    @staticmethod
    def decode(buf: memoryview) -> BatchColumns:
        if len(buf) < COLUMNS_OFFSET:
            raise BatchError(f"record of {len(buf)} bytes is shorter than a batch header ({COLUMNS_OFFSET})")
        magic, version, n_extra, rows, text_bytes = _FIXED.unpack_from(buf, 0)
        if magic != MAGIC:
            raise BatchError(f"bad batch magic {magic:#010x}")
        if version != VERSION:
            raise BatchError(f"batch version {version}, this build reads {VERSION}")
        if n_extra > MAX_EXTRA:
            raise BatchError(f"batch claims {n_extra} extra columns, at most {MAX_EXTRA} exist")
        _, at = _base_offsets(rows, text_bytes)
        if at > len(buf):
            raise BatchError(f"batch of {rows} rows and {text_bytes} text bytes overruns its {len(buf)}-byte record")
        if not n_extra:
            return BatchColumns(buf, rows, text_bytes, _NO_EXTRA)
        raw = bytes(buf[DIRECTORY_OFFSET : DIRECTORY_OFFSET + n_extra * _ENTRY.size])
        return BatchColumns(buf, rows, text_bytes, _read_directory(raw, rows, len(buf)))


@functools.lru_cache(maxsize=1 << 12)  # records repeat their columns and sizes (a few MB at most)
def _read_directory(raw: bytes, rows: int, size: int) -> dict[str, tuple[str, int, int]]:
    """The extra columns' directory of a record of ``rows`` rows and ``size`` bytes, checked (the
    caller must not change the dict: it is shared between records with the same directory)."""
    directory: dict[str, tuple[str, int, int]] = {}
    for i in range(len(raw) // _ENTRY.size):
        raw_name, raw_dtype, width, offset = _ENTRY.unpack_from(raw, i * _ENTRY.size)
        dtype = raw_dtype.decode("ascii", "replace")
        if dtype not in _DTYPES or offset + rows * width * _DTYPES[dtype].itemsize > size:
            raise BatchError(f"extra column {i} ({raw_name!r}, {dtype}) overruns the record")
        directory[raw_name.rstrip(b"\0").decode("ascii", "replace")] = (dtype, width, offset)
    return directory


@functools.lru_cache(maxsize=1 << 16)  # a vocabulary repeats: a hit costs a tenth of the hash
def stable_token_id(token: bytes) -> int:
    """A token id from the token's bytes, the same in every process and run (unlike ``hash``);
    bit 31 is set so it cannot collide with an upstream vocabulary id."""
    return int.from_bytes(hashlib.blake2b(token, digest_size=4).digest(), "little") | 0x80000000


def encode_texts(columns: BatchColumns, tokens: list[bytes]) -> None:
    """Write ``tokens`` into the text arena and ``text_end`` of a batch made by :func:`write_batch`."""
    at = 0
    arena = columns.text
    for i, token in enumerate(tokens):
        end = at + len(token)
        arena[at:end] = np.frombuffer(token, dtype=np.uint8)
        columns.text_end[i] = end
        at = end


# ---- top logprobs: one appended column, only in records that carry some --------------------------
#
# Column ``top`` (dtype u1, width ``4 + 4*K + K*S`` per row), every row laid out the same:
#     K u16 | S u16 | logprob f32[K] (NaN: no alternative) | K slots of S bytes: length u8, UTF-8 text
# K is the most alternatives any row of the record has (at most MAX_TOP_LOGPROBS), S the slot size:
# one more than the longest alternative's text (at most MAX_TOP_TEXT bytes), rounded up to 4 so
# the logprobs of every row stay 4-aligned. Rows without alternatives have NaN logprobs and empty
# slots. One column, not two, because compute's columns leave one directory entry free (MAX_EXTRA).
TOP_COLUMN = "top"
MAX_TOP_LOGPROBS = 20  # OpenAI's own cap on top_logprobs
MAX_TOP_TEXT = 255  # bytes of one alternative's text (its length is one byte); longer ones are cut
_TOP_HEAD = 4

TopAlternatives = tuple[tuple[str, float], ...]  # (token text, logprob), most likely first


def _cut_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, at most ``limit`` bytes, cut at a character boundary."""
    data = text.encode("utf-8", "replace")
    return data if len(data) <= limit else data[:limit].decode("utf-8", "ignore").encode()


@dataclass(frozen=True)
class TopRows:
    """What a writer puts in the ``top`` column of one record: its shape and each row's
    alternatives as (UTF-8 bytes, logprob), already cut to the caps."""

    k: int
    slot: int
    rows: list[list[tuple[bytes, float]]]

    @property
    def column(self) -> ExtraColumn:
        return ExtraColumn(TOP_COLUMN, "u1", _TOP_HEAD + 4 * self.k + self.k * self.slot)


def top_rows(tops: list[TopAlternatives | None], slot_limit: int = MAX_TOP_TEXT + 1) -> TopRows:
    """The ``top`` column's content for ``tops`` (one entry per row, None or () for none): at most
    MAX_TOP_LOGPROBS alternatives per row (an upstream's extra ones are dropped), texts within
    ``slot_limit - 1`` bytes (cut at a character; a writer lowers the limit for a small ring record)."""
    slot_limit = max(4, min(slot_limit, MAX_TOP_TEXT + 1))
    rows = [
        [(_cut_utf8(text, slot_limit - 1), float(logprob)) for text, logprob in top[:MAX_TOP_LOGPROBS]] if top else []
        for top in tops
    ]
    k = max(map(len, rows), default=0) or 1
    longest = max((len(text) for row in rows for text, _ in row), default=0)
    return TopRows(k, (longest + 1 + 3) & ~3, rows)


def encode_tops(column: np.ndarray, top: TopRows) -> None:
    """Fill a writable ``top`` column (u1[n, width], from ``top.column``) with ``top``'s rows."""
    n, k, slot = len(top.rows), top.k, top.slot
    out = np.zeros((n, _TOP_HEAD + 4 * k + k * slot), dtype=np.uint8)
    out[:, :_TOP_HEAD] = np.array([k, slot], dtype="<u2").view(np.uint8)
    logprobs = np.full((n, k), np.nan, dtype="<f4")
    for i, row in enumerate(top.rows):
        for j, (text, logprob) in enumerate(row):
            logprobs[i, j] = logprob
            at = _TOP_HEAD + 4 * k + j * slot
            out[i, at] = len(text)
            out[i, at + 1 : at + 1 + len(text)] = np.frombuffer(text, dtype=np.uint8)
    out[:, _TOP_HEAD : _TOP_HEAD + 4 * k] = logprobs.view(np.uint8)
    column[:] = out


def top_shape(column: np.ndarray) -> tuple[int, int]:
    """(K, S) of a ``top`` column (u1[n, width], n >= 1), checked against its width."""
    width = column.shape[1] if column.ndim == 2 else 0
    if not len(column) or width < _TOP_HEAD:
        raise BatchError(f"top column of shape {column.shape} holds no header")
    k, slot = (int(v) for v in column[0, :_TOP_HEAD].copy().view("<u2"))
    if not 0 < k <= MAX_TOP_LOGPROBS or not 0 < slot <= MAX_TOP_TEXT + 1 or _TOP_HEAD + 4 * k + k * slot != width:
        raise BatchError(f"top column of width {width} does not match its header (K={k}, S={slot})")
    return k, slot


def top_logprobs(column: np.ndarray) -> np.ndarray:
    """f32[n, K]: the alternatives' logprobs of a ``top`` column (NaN where a row has fewer)."""
    k, _ = top_shape(column)
    return np.ascontiguousarray(column[:, _TOP_HEAD : _TOP_HEAD + 4 * k]).view("<f4")


def top_alternatives(column: np.ndarray, i: int) -> TopAlternatives:
    """Row ``i``'s alternatives as (text, logprob), most likely first (invalid UTF-8 replaced)."""
    k, slot = top_shape(column)
    row = column[i]
    logprobs = row[_TOP_HEAD : _TOP_HEAD + 4 * k].copy().view("<f4").tolist()
    out = []
    for j, logprob in enumerate(logprobs):
        at = _TOP_HEAD + 4 * k + j * slot
        length = min(int(row[at]), slot - 1)
        if logprob != logprob and not length:  # NaN and no text: padding
            continue
        out.append((row[at + 1 : at + 1 + length].tobytes().decode("utf-8", "replace"), logprob))
    return tuple(out)
