"""What compute keeps along each stream, and the columns that come from it: ``ppl``, ``rep``,
``repflag`` and the windowed ``probe`` means, for all of a record's streams at once.

Rows are grouped by stream with one stable sort (a record of one stream skips the gathers), each
stream's running sums continue from its saved state through one cumulative sum, and each history
(ids, match flags, probe cosines) is gathered into a [streams, history + new] matrix: the count of
numpy calls per record does not grow with its rows or streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_STREAMS = 65536  # per-stream state kept (least recently seen dropped)


class StreamStates:
    """Per-stream running state as dense arrays indexed by a slot per stream (at most
    ``MAX_STREAMS``, the least recently seen dropped first), so that a batch's streams are updated
    with a few numpy calls whatever their number. Histories are right-aligned: a stream's latest
    value is in the last column; columns before its first token are zero."""

    def __init__(self, history: int, flags: int, probes: int, k: int) -> None:
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.batches = 0  # batches seen: the clock of ``last_seen``
        self.last_seen = np.zeros(0, dtype=np.int64)  # per slot, for dropping the least recently seen
        self.running = np.zeros((0, 3))  # sum of -logprob, tokens with one, tokens seen
        self.fired = np.zeros(0, dtype=bool)
        self.history = np.zeros((0, history), dtype=np.uint32)  # the last window + ngram - 1 token ids
        self.flags = np.zeros((0, flags), dtype=np.uint8)  # match flags of the last window tokens
        self.probes = np.zeros((0, probes, k), dtype=np.float32)  # probe cosines of the last probe window tokens

    def slots(self, sids: list[int]) -> np.ndarray:
        """The slot of each stream (all distinct), a fresh (zeroed) one for a stream not seen before."""
        get = self.slot_of.get
        found = [get(sid) for sid in sids]
        if None in found:
            fresh = [self._take(sid) for sid, slot in zip(sids, found, strict=True) if slot is None]
            found = [self.slot_of[sid] for sid in sids]
            for array in (self.running, self.fired, self.history, self.flags, self.probes):
                array[fresh] = 0
        slots = np.array(found, dtype=np.intp)
        self.batches += 1
        self.last_seen[slots] = self.batches
        return slots

    def drop(self, sids: list[int]) -> None:
        for sid in sids:
            self.free.append(self.slot_of.pop(sid))

    def __len__(self) -> int:
        return len(self.slot_of)

    def _take(self, sid: int) -> int:
        if not self.free:
            if len(self.last_seen) < MAX_STREAMS:
                self._grow(min(max(2 * len(self.last_seen), 64), MAX_STREAMS))
            else:  # full: the least recently seen stream gives its slot up (only ever when full)
                slot = int(np.argmin(self.last_seen))
                del self.slot_of[next(s for s, at in self.slot_of.items() if at == slot)]
                self.free.append(slot)
        slot = self.slot_of[sid] = self.free.pop()
        self.last_seen[slot] = self.batches + 1  # not the least recent while this batch takes slots
        return slot

    def _grow(self, capacity: int) -> None:
        def grown(array: np.ndarray) -> np.ndarray:
            bigger = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
            bigger[: len(array)] = array
            return bigger

        old = len(self.last_seen)
        self.last_seen, self.running, self.fired = grown(self.last_seen), grown(self.running), grown(self.fired)
        self.history, self.flags, self.probes = grown(self.history), grown(self.flags), grown(self.probes)
        self.free.extend(range(capacity - 1, old - 1, -1))


@dataclass
class Tokens:
    """A record's token rows grouped by stream: ``rows`` (record rows, in stream order), ``group``
    (each one's stream, 0 .. streams - 1), ``position`` (its index in its stream), ``at`` (its index
    among its stream's tokens in this record); per stream ``slots``, ``seen`` (tokens before this
    record) and ``counts`` (in it). ``single``: one stream, its rows in record order."""

    rows: np.ndarray | slice
    group: np.ndarray
    position: np.ndarray
    at: np.ndarray
    slots: np.ndarray
    seen: np.ndarray
    counts: np.ndarray
    single: bool


def extend(history: np.ndarray, tokens: Tokens, values: np.ndarray) -> np.ndarray:
    """Each stream's history row (``history[slots]``, right-aligned, ``w`` columns) with its new
    ``values`` appended (in ``tokens`` order): a [streams, w + counts.max()] matrix. The last ``w``
    columns of each stream's part are written back as its history."""
    width = history.shape[1]
    slots, counts = tokens.slots, tokens.counts
    if tokens.single:
        joined = np.empty((1, width + len(values), *history.shape[2:]), dtype=history.dtype)
        joined[0, :width] = history[slots[0]]
        joined[0, width:] = values
        history[slots[0]] = joined[0, len(values) :]
        return joined
    joined = np.zeros((len(slots), width + int(counts.max()), *history.shape[2:]), dtype=history.dtype)
    joined[:, :width] = history[slots]
    joined[tokens.group, width + tokens.at] = values
    # windows[g, c] is joined[g, c : c + w]: a strided view (no index arrays to build)
    row, step = joined.strides[:2]
    windows = np.ndarray((len(slots), joined.shape[1] - width + 1, *history.shape[1:]), joined.dtype, joined, 0,
                         (row, step, step, *joined.strides[2:]))  # fmt: skip
    history[slots] = windows[np.arange(len(slots)), counts]
    return joined


def window_mean(joined: np.ndarray, tokens: Tokens, window: int) -> np.ndarray:
    """The mean of each new value of :func:`extend`'s ``joined`` (a ``window``-column history) with
    the ones before it in its stream, over the last ``window`` (fewer at the stream's start)."""
    sums = np.add.accumulate(joined, axis=1, dtype=np.float64)  # np.cumsum's wrapper costs more than this
    if tokens.single:
        total = sums[0, window:] - sums[0, : len(tokens.at)]
    else:
        total = sums[tokens.group, window + tokens.at] - sums[tokens.group, tokens.at]
    counts = np.minimum(tokens.position + 1, window).reshape(-1, *[1] * (joined.ndim - 2))
    return (total / counts).astype(np.float32)


def group_rows(stream_id: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, list[int]]:
    """(order, group, starts, stream ids): the stable sort that groups the rows by stream (None: one
    stream, already in order), each sorted row's stream, where each stream's rows begin."""
    n = len(stream_id)
    order = np.argsort(stream_id, kind="stable") if n > 1 else None
    sid = stream_id if order is None else stream_id[order]
    if n == 1 or sid[0] == sid[-1]:  # sorted: first == last means one stream
        return None, np.zeros(n, dtype=np.intp), np.zeros(1, dtype=np.intp), [int(sid[0])]
    opens = np.empty(n, dtype=bool)
    opens[0] = True
    np.not_equal(sid[1:], sid[:-1], out=opens[1:])
    starts = np.flatnonzero(opens)
    group = np.cumsum(opens, dtype=np.intp)
    group -= 1
    return order, group, starts, sid[starts].tolist()
