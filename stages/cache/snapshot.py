"""The cache's snapshot file: written atomically, checked whole before anything is restored.

Layout (little-endian)::

    0   magic  b"NPCACHE\\0"
    8   version u32 | reserved u32
    16  meta_len u64 | body_len u64
    32  BLAKE2b-256 of meta + body (32 bytes)
    64  meta: orjson {"entries": [{key, stored_at, model, record_type, rows, extras: [[name, dtype, width]]}]}
        body: each entry's arrays in StoredStream.arrays() order, back to back

Entries are in LRU order (least recently used first), so a restore rebuilds the same order.
Writing: a temporary file next to the target, fsync, rename over the target, fsync the
directory; a crash at any point leaves the old snapshot or the new one, never half of one.
Reading raises :class:`SnapshotError` saying what is wrong (not a snapshot, another version,
checksum mismatch, bad entry); the caller reports it and starts empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Iterable

import numpy as np
import orjson

from engine.files import UnusableFile, read_regular_file
from shm.batch import KINDS, BatchError, ExtraColumn
from stages.cache.stream import BASE_ARRAYS, StoredStream

MAGIC = b"NPCACHE\0"
# 2: a reply's tool calls are TOOL_CALL rows, no longer its END row's (a version 1 snapshot
# replayed would give those replies without their calls: it is skipped, the cache starts empty)
VERSION = 2
_HEADER = struct.Struct("<8sII QQ 32s")


class SnapshotError(ValueError):
    """A snapshot file that cannot be restored; the message says why."""


def write_snapshot(path: str, entries: Iterable[tuple[str, float, StoredStream]]) -> tuple[int, int]:
    """Write ``entries`` (key, stored_at, stream) to ``path`` atomically; (entries, file bytes)."""
    meta, arrays = [], []
    for key, stored_at, s in entries:
        meta.append(
            {
                "key": key,
                "stored_at": stored_at,
                "model": s.model,
                "record_type": s.record_type,
                "rows": s.rows,
                "text_bytes": len(s.text),
                "extras": [[c.name, c.dtype, c.width] for c, _ in s.extras],
            }
        )
        arrays.extend(np.ascontiguousarray(a) for a in s.arrays())
    meta_bytes = orjson.dumps({"entries": meta})
    digest = hashlib.blake2b(meta_bytes, digest_size=32)
    body_len = 0
    for array in arrays:
        digest.update(memoryview(array).cast("B"))
        body_len += array.nbytes
    header = _HEADER.pack(MAGIC, VERSION, 0, len(meta_bytes), body_len, digest.digest())
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(meta_bytes)
            for array in arrays:
                f.write(memoryview(array).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash only once the directory is synced
    finally:
        os.close(dir_fd)
    return len(meta), _HEADER.size + len(meta_bytes) + body_len


def with_suppressed_unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_snapshot(path: str) -> list[tuple[str, float, StoredStream]]:
    """The entries of the snapshot at ``path`` (least recently used first); SnapshotError if unusable."""
    try:
        data = read_regular_file(path)
    except UnusableFile as exc:
        raise SnapshotError(str(exc)) from None
    if len(data) < _HEADER.size:
        raise SnapshotError(f"{path}: {len(data)} bytes, shorter than a snapshot header")
    magic, version, _, meta_len, body_len, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{path}: not a neuralpipe cache snapshot (magic {magic!r})")
    if version != VERSION:
        raise SnapshotError(f"{path}: snapshot version {version}, this build reads {VERSION}")
    if _HEADER.size + meta_len + body_len != len(data):
        raise SnapshotError(f"{path}: header says {meta_len} + {body_len} bytes, file has {len(data) - _HEADER.size}")
    payload = memoryview(data)[_HEADER.size :]
    if hashlib.blake2b(payload, digest_size=32).digest() != digest:
        raise SnapshotError(f"{path}: checksum mismatch (the file is corrupt)")
    try:
        meta = orjson.loads(payload[:meta_len])["entries"]
        return _entries(meta, payload[meta_len:])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, BatchError) as exc:
        raise SnapshotError(f"{path}: bad entry: {exc!r}") from None


def _entries(meta: list[dict], body: memoryview) -> list[tuple[str, float, StoredStream]]:
    at, out = 0, []

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal at
        size = count * np.dtype(dtype).itemsize
        if at + size > len(body):
            raise ValueError("arrays overrun the snapshot body")
        array = np.frombuffer(body, dtype=dtype, count=count, offset=at).copy()
        at += size
        return array

    for m in meta:
        rows = int(m["rows"])
        base = {name: take(dtype, rows) for name, dtype in BASE_ARRAYS}
        text = take("u1", int(m["text_bytes"])).tobytes()
        extras = []
        for name, dtype, width in m["extras"]:
            column = ExtraColumn(str(name), str(dtype), int(width))
            array = take("<" + column.dtype, rows * column.width)
            extras.append((column, array.reshape(rows, column.width) if column.width > 1 else array))
        if int(base["text_len"].sum()) != len(text):
            raise ValueError(f"entry {m['key']!r}: row texts do not add up to its text")
        unknown = np.setdiff1d(base["kind"], KINDS)
        if len(unknown):
            raise ValueError(f"entry {m['key']!r}: a row of kind {int(unknown[0])}, not one of {KINDS.tolist()}")
        stream = StoredStream(
            model=str(m["model"]), record_type=int(m["record_type"]), text=text, extras=tuple(extras), **base
        )
        out.append((str(m["key"]), float(m["stored_at"]), stream))
    if at != len(body):
        raise ValueError(f"{len(body) - at} bytes after the last entry")
    return out
