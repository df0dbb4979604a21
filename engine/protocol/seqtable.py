"""Per stream, the next sequence number expected, for whole batches at once (numpy, no per-row
Python): the broadcast drops rows it already published with it, the consumer client rows it
already delivered.

The table has a fixed number of slots; a stream lives in slot ``id % slots`` as ``(id + 1, next)``
(0 marks a free slot), and a newer stream that lands on a slot takes it over: only streams that
many ids apart collide, and ids are handed out in sequence.
"""

from __future__ import annotations

import numpy as np

from engine.protocol.wire import stream_order

SLOTS = 1 << 16
# rows up to which a batch is admitted row by row: numpy's ~10-15 calls cost more (paced loads;
# hot, 8 rows 3.3 against 9.4 µs, the two even at ~30 rows)
SMALL = 32
CLOSED = np.uint64(1 << 62)  # the next seq of a stream that has ended: every later row of it is dropped


class SeqTable:
    def __init__(self, table: np.ndarray | None = None) -> None:
        """``table``: a ``(slots, 2)`` uint64 array to keep the state in (e.g. a file-backed one
        that outlives the process); a fresh one by default."""
        self.state = np.zeros((SLOTS, 2), np.uint64) if table is None else table
        # a plain view: a memmap's own indexing goes through Python (several µs a call)
        self.table = self.state.view(np.ndarray)
        # the same memory as one run of words (slot i: words 2i, 2i + 1), for a few rows at a time:
        # a memoryview's item costs a fraction of numpy's indexing of a row
        self._words = memoryview(self.table).cast("B").cast("Q")
        self.slots = len(self.table)
        self.modulus = np.uint64(self.slots)  # a numpy scalar: ``sids % slots`` then stays unsigned

    def next_of(self, sid: int) -> int | None:
        """The stream's next seq, None when its slot holds another stream (or none)."""
        owner, nxt = self.table[sid % self.slots]
        return int(nxt) if int(owner) == sid + 1 else None

    def close(self, sids: np.ndarray) -> None:
        """Mark streams ended (each must hold its slot, i.e. have been admitted last)."""
        self.table[sids % np.uint64(self.slots)] = np.stack([sids + np.uint64(1), np.full(len(sids), CLOSED)], 1)

    def open_streams(self) -> np.ndarray:
        """The streams admitted and not closed (still in the table)."""
        owners, nexts = self.table[:, 0], self.table[:, 1]
        return owners[(owners != 0) & (nexts < CLOSED)] - np.uint64(1)

    def admit(
        self, sids: np.ndarray, seqs: np.ndarray, drop_seen: bool = True, grouped: tuple | None = None
    ) -> tuple[np.ndarray, int]:
        """Mark the rows ``(sids[i], seqs[i])`` as seen; returns which rows are new (a seq at or
        beyond their stream's next; every row when not ``drop_seen``) and how many seqs the new
        rows skipped (rows that never came). Rows of a stream are in seq order within a batch."""
        n = len(sids)
        if not n:
            return np.ones(0, bool), 0
        if grouped is None:
            if n <= SMALL:
                return self._admit_small(sids.tolist(), seqs.tolist(), drop_seen)
            ids = sids.tolist()  # checked in plain Python: cheaper than numpy's sort and compare
            if len(set(ids)) == n and max(ids) - min(ids) < self.slots:  # a slot each (paced loads)
                return self._admit_rows(sids, seqs, drop_seen, sids % self.modulus)
        order, starts = grouped or stream_order(sids)
        # distinct ids less than the table apart never share a slot (the usual case: no check)
        if int(sids[order[-1]]) - int(sids[order[0]]) >= self.slots:
            uniq = sids[order[starts]]
            if len(np.unique(uniq % self.slots)) < len(uniq):
                return self._admit_each(sids, seqs, drop_seen, uniq)
        if len(starts) == n:  # every row its own stream: no grouping needed
            return self._admit_rows(sids, seqs, drop_seen, sids % self.modulus)
        uniq = sids[order[starts]]
        slots = uniq % self.modulus
        pairs = self.table[slots]
        floors = np.where(pairs[:, 0] == uniq + np.uint64(1), pairs[:, 1], np.uint64(0))
        ordered_seqs = seqs[order]
        if drop_seen:
            counts = np.diff(np.append(starts, n))
            ordered_fresh = ordered_seqs >= np.repeat(floors, counts)
            fresh = np.empty(n, bool)
            fresh[order] = ordered_fresh
            kept = np.add.reduceat(ordered_fresh, starts)
            last = np.maximum.reduceat(np.where(ordered_fresh, ordered_seqs, np.uint64(0)), starts)
        else:
            fresh = np.ones(n, bool)
            kept = np.diff(np.append(starts, n))
            last = np.maximum.reduceat(ordered_seqs, starts)
        has = kept > 0
        # a jump past a stream's next is rows lost before they got here
        jumps = last.astype(np.int64) + 1 - floors.astype(np.int64) - kept
        gaps = int(jumps[has & (jumps > 0)].sum())
        self.table[slots, 0] = uniq + np.uint64(1)
        self.table[slots, 1] = np.where(has, np.maximum(floors, last + np.uint64(1)), floors)
        return fresh, gaps

    def _admit_small(self, sids: list[int], seqs: list[int], drop_seen: bool) -> tuple[np.ndarray, int]:
        """:meth:`admit` of a few rows in plain Python, with the same outcome: each stream's floor
        is its next seq before the batch, and its new next is past its last fresh row."""
        words, slots = self._words, self.slots
        floors: dict[int, int] = {}
        kept: dict[int, int] = {}
        last: dict[int, int] = {}
        fresh = []
        for sid, seq in zip(sids, seqs, strict=True):
            if sid not in floors:
                at = sid % slots * 2
                floors[sid] = words[at + 1] if words[at] == sid + 1 else 0
            keep = seq >= floors[sid] or not drop_seen
            fresh.append(keep)
            if keep:
                kept[sid] = kept.get(sid, 0) + 1
                last[sid] = max(last.get(sid, seq), seq)
        gaps = 0
        for sid, floor in floors.items():  # in order of first row: a later stream on a shared slot takes it
            if sid in kept:
                gaps += max(0, last[sid] + 1 - floor - kept[sid])
                floor = max(floor, last[sid] + 1)
            at = sid % slots * 2
            words[at], words[at + 1] = sid + 1, floor
        return np.array(fresh, bool), gaps

    def _admit_rows(
        self, sids: np.ndarray, seqs: np.ndarray, drop_seen: bool, slots: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """:meth:`admit` for rows of distinct streams in distinct ``slots``."""
        pairs = self.table[slots]
        owners = sids + 1
        floors = np.where(pairs[:, 0] == owners, pairs[:, 1], 0)
        fresh = seqs >= floors
        pairs[:, 0] = owners
        if fresh.all():  # every row new (the usual case): no masks; each row skipped what lies below it
            gaps = int((seqs - floors).sum())
            pairs[:, 1] = seqs + 1
        else:
            if not drop_seen:
                fresh = np.ones(len(sids), bool)
            jumps = seqs.astype(np.int64) - floors.astype(np.int64)
            gaps = int(jumps[fresh & (jumps > 0)].sum())
            pairs[:, 1] = np.where(fresh, np.maximum(floors, seqs + 1), floors)
        self.table[slots] = pairs
        return fresh, gaps

    def _admit_each(self, sids: np.ndarray, seqs: np.ndarray, drop_seen: bool, uniq: np.ndarray) -> tuple:
        fresh, gaps = np.ones(len(sids), bool), 0
        for sid in uniq.tolist():
            rows = np.flatnonzero(sids == sid)
            floor = self.next_of(sid) or 0
            keep = seqs[rows] >= floor if drop_seen else np.ones(len(rows), bool)
            fresh[rows] = keep
            if keep.any():
                last = int(seqs[rows][keep].max())
                gaps += max(0, last + 1 - floor - int(keep.sum()))
                floor = max(floor, last + 1)
            self.table[sid % self.slots] = (sid + 1, floor)
        return fresh, gaps
