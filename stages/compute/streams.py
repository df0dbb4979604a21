"""What compute keeps along each stream, and the columns that come from it: ``ppl``, ``rep``,
``repflag`` and the windowed ``probe`` means, for all of a record's streams at once.

Each stream's recent tokens are kept by position in a row of :class:`StreamStates` (pair keys and
match flags), written where they belong and read as contiguous windows, so that a record's tokens
are handled with a few numpy calls whatever their rows or streams (the sorting, and the paths for
a record of one stream or of one token per stream, are in ``stages.compute.stage``). The probe
cosines' history is gathered into a [streams, history + new] matrix (:func:`extend`, :func:`put`,
:func:`keep`) and averaged with one cumulative sum (:func:`window_mean`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_STREAMS = 65536  # per-stream state kept (least recently seen dropped)


class StreamStates:
    """Per-stream running state as dense arrays indexed by a slot per stream (at most
    ``MAX_STREAMS``, the least recently seen dropped first), so that a batch's streams are updated
    with a few numpy calls whatever their number.

    ``keys`` and ``flags`` hold each stream's recent tokens by position: a stream's token at
    position ``p`` is at column ``p - origin[slot]``, a u64 pair key (its id in the low half, the id
    before it in the high half: two ids compared in one go) and a u8 match flag. A row keeps at
    least the last ``span`` positions before the next free column and has ``slack`` free columns
    after them; only when a batch's tokens would run past the row's end are its last ``span``
    columns moved to the front (:meth:`make_room`): no per-record shifting, and every token's
    window is one contiguous run of its row. Columns before a stream's first token are zero."""

    def __init__(self, window: int, ngram: int, probes: int, k: int) -> None:
        self.window = window  # match flags counted per token
        self.span = span = window + ngram - 1  # positions each token looks back at
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.batches = 0  # batches seen: the clock of ``last_seen``
        self.last_seen = np.zeros(0, dtype=np.int64)  # per slot, for dropping the least recently seen
        self.running = np.zeros((0, 3))  # sum of -logprob, tokens with one, tokens seen
        self.fired = np.zeros(0, dtype=bool)
        self.origin = np.zeros(0, dtype=np.int64)  # the position at column 0 of each row
        self.keys = np.zeros((0, span + _SLACK), dtype=np.uint64)
        self.flags = np.zeros((0, span + _SLACK), dtype=np.uint8)
        self.probes = np.zeros((0, k, probes), dtype=np.float32)  # probe cosines of the last probe window tokens
        self._flat_views()

    @property
    def width(self) -> int:
        return self.keys.shape[1]

    def slots(self, sids: list[int]) -> np.ndarray:
        """The slot of each stream (all distinct), a fresh (zeroed) one for a stream not seen before."""
        found = list(map(self.slot_of.get, sids))
        if None in found:
            fresh = [self._take(sid) for sid, slot in zip(sids, found, strict=True) if slot is None]
            found = [self.slot_of[sid] for sid in sids]
            for array in (self.running, self.fired, self.keys, self.flags, self.probes):
                array[fresh] = 0
            self.origin[fresh] = -self.span  # position 0 after ``span`` zero columns
        slots = np.array(found, dtype=np.intp)
        self.batches += 1
        self.last_seen[slots] = self.batches
        return slots

    def row_slots(self, sids: list[int]) -> np.ndarray:
        """The slot of each row's stream (``sids`` may repeat): :meth:`slots` of the distinct ones."""
        distinct = list(dict.fromkeys(sids))
        slots = self.slots(distinct)
        if len(distinct) == len(sids):
            return slots
        return np.array(list(map(self.slot_of.__getitem__, sids)), dtype=np.intp)

    def slot(self, sid: int) -> int:
        """:meth:`slots` of one stream."""
        slot = self.slot_of.get(sid)
        if slot is None:
            return int(self.slots([sid])[0])
        self.batches += 1
        self.last_seen[slot] = self.batches
        return slot

    def make_room(self, slots: np.ndarray, seen: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Make each row of ``slots`` hold ``counts`` more tokens after its ``seen`` ones, and return
        the flat index (in ``keys`` and ``flags`` raveled) of each stream's position 0."""
        origin = self.origin[slots]
        past = seen + counts - origin > self.width
        if past.any():  # rows that would run past their end: their last ``span`` columns to the front
            if counts.max() > self.width - self.span:  # a stream with more new tokens than a row's slack
                self._widen(int(counts.max()))
            for g in np.flatnonzero(past).tolist():
                self.compact(int(slots[g]), int(seen[g]))
            origin = self.origin[slots]
        return slots * self.width - origin

    def make_room_each(self, slots: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """:meth:`make_room` for one new token per stream; returns the flat index of each one's
        column (its position ``seen``)."""
        at = seen - self.origin[slots]
        if np.maximum.reduce(at) >= self.width:  # rows full: their last ``span`` columns to the front
            for g in np.flatnonzero(at >= self.width).tolist():
                self.compact(int(slots[g]), int(seen[g]))
            at = seen - self.origin[slots]
        at += slots * self.width
        return at

    def make_room_one(self, slot: int, seen: int, count: int) -> int:
        """:meth:`make_room` for one stream; returns the column of its position ``seen``."""
        if count > self.width - self.span:
            self._widen(count)
        if seen + count - int(self.origin[slot]) > self.width:
            self.compact(slot, seen)
        return seen - int(self.origin[slot])

    def compact(self, slot: int, seen: int) -> None:
        """Move the last ``span`` columns before position ``seen`` of ``slot``'s row to its front."""
        at = seen - self.span - int(self.origin[slot])
        for array in (self.keys, self.flags):
            array[slot, : self.span] = array[slot, at : at + self.span]
        self.origin[slot] = seen - self.span

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
        self.origin, self.keys, self.flags = grown(self.origin), grown(self.keys), grown(self.flags)
        self.probes = grown(self.probes)
        self._flat_views()
        self.free.extend(range(capacity - 1, old - 1, -1))

    def _widen(self, tokens: int) -> None:
        """Rows with room for ``tokens`` new ones after ``span`` (the slack doubles: rarely again)."""
        width = self.span + max(2 * (self.width - self.span), tokens)
        for name in ("keys", "flags"):
            old = getattr(self, name)
            wider = np.zeros((len(old), width), dtype=old.dtype)
            wider[:, : old.shape[1]] = old
            setattr(self, name, wider)
        self._flat_views()

    def _flat_views(self) -> None:
        """Views of ``keys`` and ``flags`` raveled, indexed by a token's flat index ``i`` (made again
        only when the arrays are: a view costs about a microsecond, per record otherwise):
        ``low``/``high`` the halves of its key, ``recent[i - span]`` its key after the ``span``
        before it and ``flag_runs[i - span]`` the ``window`` flags ending at its own (strided
        views: one gather each)."""
        keys, flags, span = self.keys.reshape(-1), self.flags.reshape(-1), self.span
        halves = keys.view(np.uint32).reshape(-1, 2)  # little-endian: [low, high] per key
        self.flat_keys, self.low, self.high, self.flat_flags = keys, halves[:, 0], halves[:, 1], flags
        rows = max(keys.size - span, 0)
        self.recent = np.ndarray((rows, span + 1), np.uint64, keys, 0, (8, 8))
        first = span + 1 - self.window if rows else 0  # the flags before a window's first: none without rows
        self.flag_runs = np.ndarray((rows, self.window), np.uint8, flags, first, (1, 1))


_SLACK = 64  # free columns after a row's span at first: a row is compacted once per this many tokens


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


def extend(history: np.ndarray, tokens: Tokens) -> np.ndarray:
    """Each stream's history (``history[slots]``: [channels, w], right-aligned) followed by room for
    its new values: a [streams, channels, w + new] matrix, to fill with :func:`put` and write
    back with :func:`keep`."""
    slots, width = tokens.slots, history.shape[-1]
    if tokens.single:
        joined = np.empty((1, history.shape[1], width + len(tokens.at)), dtype=history.dtype)
        joined[0, :, :width] = history[slots[0]]
        return joined
    joined = np.zeros((len(slots), history.shape[1], width + int(tokens.counts.max())), dtype=history.dtype)
    joined[:, :, :width] = history[slots]
    return joined


def put(joined: np.ndarray, tokens: Tokens, width: int, channel: int | slice, values: np.ndarray) -> None:
    """Each token's ``values`` (in ``tokens`` order; [n] or [n, channels]) after its stream's
    ``width`` history columns of ``joined``."""
    if tokens.single:
        joined[0, channel, width:] = values.T
    else:
        joined[tokens.group, channel, width + tokens.at] = values


def keep(history: np.ndarray, tokens: Tokens, joined: np.ndarray) -> None:
    """The last ``w`` columns of each stream's part of ``joined`` as its history."""
    width, counts = history.shape[-1], tokens.counts
    if tokens.single:
        history[tokens.slots[0]] = joined[0, :, len(tokens.at) :]
        return
    # windows[g, :, c] is joined[g, :, c : c + w]: a strided view (no index arrays to build)
    row, channel, step = joined.strides
    windows = np.ndarray((len(counts), joined.shape[1], joined.shape[2] - width + 1, width), joined.dtype, joined, 0,
                         (row, channel, step, step))  # fmt: skip
    history[tokens.slots] = windows[np.arange(len(counts)), :, counts]


def window_mean(joined: np.ndarray, tokens: Tokens, width: int, window: int) -> np.ndarray:
    """[n, channels]: the mean of each new value of ``joined`` (after ``width`` history columns)
    with the ones before it in its stream, over the last ``window`` (fewer at the stream's start)."""
    sums = np.add.accumulate(joined, axis=2, dtype=np.float64)  # np.cumsum's wrapper costs more than this
    if tokens.single:
        count = len(tokens.at)
        total = (sums[0, :, width:] - sums[0, :, width - window : width - window + count]).T
    else:
        total = sums[tokens.group, :, width + tokens.at] - sums[tokens.group, :, width - window + tokens.at]
    if tokens.position.min() >= window - 1:  # the usual case: every token has a full window behind it
        return (total / window).astype(np.float32)
    return (total / np.minimum(tokens.position + 1, window)[:, None]).astype(np.float32)


def group_rows(stream_id: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(order, group, starts, lasts, stream ids): the stable sort that groups the rows by stream
    (None: one stream, already in order), each sorted row's stream, where each stream's rows
    begin and end (sorted row indices)."""
    n = len(stream_id)
    first = stream_id[0]
    if n == 1 or (first == stream_id[-1] and (stream_id == first).all()):  # one stream: no sort
        return None, np.zeros(n, dtype=np.intp), np.zeros(1, dtype=np.intp), np.full(1, n - 1), [int(first)]
    order = np.argsort(stream_id, kind="stable")
    sid = stream_id[order]
    opens = np.empty(n + 1, dtype=bool)  # opens[i]: sorted row i begins a stream; opens[n]: the end
    opens[0] = opens[n] = True
    np.not_equal(sid[1:], sid[:-1], out=opens[1:n])
    bounds = opens.nonzero()[0]
    group = np.add.accumulate(opens[:n], dtype=np.intp)
    group -= 1
    starts = bounds[:-1]
    return order, group, starts, bounds[1:] - 1, sid[starts].tolist()
