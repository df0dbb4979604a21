"""Rows waiting for ingest's next batch record, kept column by column (one Python list per batch
column, appended to per row) and written into a claimed ring record with one numpy assignment per
column: no tuple per row, no per-row work at commit beyond what the bookkeeping needs.

A batch holds at most ``batch_rows`` rows and never more bytes than the ring's ``max_record``: the
rows that fit go, the rest wait for the next record. A single row always fits, because no row's
text may exceed :attr:`RowBuffer.max_text` (the caller refuses or shortens longer ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, islice

import numpy as np

from shm.batch import (
    BASE_COLUMNS,
    MAX_TOP_LOGPROBS,
    RECORD_TYPE,
    Kind,
    TopAlternatives,
    TopRows,
    batch_size,
    encode_tops,
    extra_column,
    top_rows,
    write_header,
)

ROW_TEXT_LIMIT = 64 * 1024  # bytes of one row's text, whatever the ring could take

_START, _TOKEN, _END, _ERROR = int(Kind.START), int(Kind.TOKEN), int(Kind.END), int(Kind.ERROR)


def assign_columns(record: memoryview, offsets: tuple[int, ...], rows: tuple[list, ...]) -> None:
    """Rows into a batch laid out in ``record`` by :func:`shm.batch.write_header` (``offsets``:
    its base columns in ``BASE_COLUMNS`` order, then the text arena), from the row lists (sids,
    seqs, kinds, token_ids, logprobs, recv_ns, texts), one numpy view and assignment per column:
    what stages/ingest/rows.c's ``fill`` does in one call, its reference and the fallback where it
    is not built."""
    n = len(rows[0])
    sids, seqs, kinds, token_ids, logprobs, received, texts = rows
    values = {"stream_id": sids, "seq": seqs, "kind": kinds, "token_id": token_ids, "logprob": logprobs}
    values |= {"recv_ns": received, "text_end": list(accumulate(map(len, texts)))}
    for (name, dtype), offset in zip(BASE_COLUMNS, offsets, strict=False):
        np.frombuffer(record, dtype, n, offset)[:] = values[name]
    text = b"".join(texts)
    record[offsets[-1] : offsets[-1] + len(text)] = text


def _compiled_fill() -> Callable[[memoryview, tuple[int, ...], tuple[list, ...]], None]:
    """stages/ingest/rows.c's fill where it is built for this batch format, else the numpy path."""
    try:  # built by setup.py where a C compiler is
        from stages.ingest import _rows
    except ImportError:  # pragma: no cover - a build without a compiler
        return assign_columns
    return _rows.fill if _rows.COLUMNS == BASE_COLUMNS else assign_columns


fill = _compiled_fill()


@dataclass(slots=True)
class Committed:
    """What one written record held, for the writer's bookkeeping."""

    stream_id: list[int]  # of each row
    seq: list[int]  # of each row
    ended: list[int]  # the streams whose END or ERROR row it held
    token_recv_ns: list[int]  # receive times of its TOKEN rows


class RowBuffer:
    """The rows not yet written, in order. Not thread-safe (one event loop)."""

    __slots__ = (
        "batch_rows",
        "kind",
        "logprob",
        "max_text",
        "out",
        "recv_ns",
        "seq",
        "stream_id",
        "text",
        "token_id",
        "tops",
    )

    def __init__(self, out, batch_rows: int) -> None:
        self.out = out
        self.batch_rows = batch_rows
        room = out.max_record - batch_size(1, 0)
        if room < 256:
            raise ValueError(f"ring {out.name!r}: max_record {out.max_record} cannot carry a row of ingest")
        self.max_text = min(ROW_TEXT_LIMIT, room - 8)  # 8: the text arena is 8-aligned
        self._new_columns()
        # Top logprobs by (stream id, seq), only for rows that have some: the usual row costs nothing
        self.tops: dict[tuple[int, int], TopAlternatives] = {}

    def _new_columns(self) -> None:
        self.stream_id: list[int] = []
        self.seq: list[int] = []
        self.kind: list[int] = []
        self.token_id: list[int] = []
        self.logprob: list[float] = []
        self.recv_ns: list[int] = []
        self.text: list[bytes] = []

    def __len__(self) -> int:
        return len(self.stream_id)

    def append(self, sid: int, seq: int, kind: int, token_id: int, logprob: float, recv_ns: int, text: bytes) -> None:
        """One row; ``text`` must be at most :attr:`max_text` bytes."""
        self.stream_id.append(sid)
        self.seq.append(seq)
        self.kind.append(kind)
        self.token_id.append(token_id)
        self.logprob.append(logprob)
        self.recv_ns.append(recv_ns)
        self.text.append(text)

    def add_tokens(
        self,
        sid: int,
        seq: int,
        token_ids: list[int],
        logprobs: list[float],
        recv_ns: int,
        texts: list[bytes],
        kinds: list[int] | None = None,
    ) -> None:
        """The TOKEN rows (or those ``kinds`` gives: REASONING, TOOL_CALL) of one network read of one stream
        (seq, seq + 1, ...), all received at ``recv_ns``; every text at most :attr:`max_text` bytes."""
        n = len(texts)
        self.stream_id += [sid] * n
        self.seq += range(seq, seq + n)
        self.kind += [_TOKEN] * n if kinds is None else kinds
        self.token_id += token_ids
        self.logprob += logprobs
        self.recv_ns += [recv_ns] * n
        self.text += texts

    def write(self, limit: int) -> Committed | None:
        """Write up to ``limit`` rows (the first ones) as one record; None when the ring is full."""
        n = min(limit, len(self.stream_id))
        text_bytes = sum(map(len, islice(self.text, n)))
        top = self._top_rows(n) if self.tops else None
        extra = (top.column,) if top is not None else ()
        size = batch_size(n, text_bytes, extra)
        while size > self.out.max_record:  # large texts: fewer rows
            if n == 1 and top is not None:  # a row whose text leaves no room for its alternatives: without them
                top, extra = None, ()
            else:
                n //= 2
                text_bytes = sum(map(len, islice(self.text, n)))
                if top is not None:
                    top = self._top_rows(n)
                    extra = (top.column,) if top is not None else ()
            size = batch_size(n, text_bytes, extra)
        view = self.out.try_claim(size)
        if view is None:
            return None
        sids, seqs, kinds, token_ids, logprobs, recv_ns, texts = self._take(n)
        specials = n - kinds.count(_TOKEN)  # START, END, ERROR, REASONING and TOOL_CALL rows
        offsets, directory = write_header(view, n, text_bytes, extra)
        if top is not None:
            encode_tops(extra_column(view, n, directory, "top"), top)
        fill(view, offsets, (sids, seqs, kinds, token_ids, logprobs, recv_ns, texts))
        view.release()
        self.out.commit(RECORD_TYPE)
        if self.tops:
            for key in zip(sids, seqs, strict=True):
                self.tops.pop(key, None)
        if not specials:
            return Committed(sids, seqs, [], recv_ns)
        ended = [sid for sid, kind in zip(sids, kinds, strict=True) if kind in (_END, _ERROR)]
        received = [ns for ns, kind in zip(recv_ns, kinds, strict=True) if kind not in (_START, _END, _ERROR)]
        return Committed(sids, seqs, ended, received)

    def _take(self, n: int) -> tuple[list, list, list, list, list, list, list[bytes]]:
        """Remove the first ``n`` rows and return their columns."""
        columns = (self.stream_id, self.seq, self.kind, self.token_id, self.logprob, self.recv_ns, self.text)
        if n == len(self.stream_id):  # the usual write, every row: the lists themselves, new ones here
            self._new_columns()
            return columns
        taken = tuple(column[:n] for column in columns)
        for column in columns:
            del column[:n]
        return taken

    def _top_rows(self, n: int) -> TopRows | None:
        """The first ``n`` rows' top logprobs, or None when none of them has any. Alternatives'
        texts are cut so that one row with its longest text still fits a record."""
        tops = [self.tops.get(key) for key in zip(self.stream_id[:n], self.seq[:n], strict=True)]
        if not any(tops):
            return None
        room = self.out.max_record - batch_size(1, max(map(len, self.text[:n])))
        return top_rows(tops, (room - 12 - 4 * MAX_TOP_LOGPROBS) // MAX_TOP_LOGPROBS)
