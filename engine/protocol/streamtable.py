"""The open streams of a worker, kept where its successor finds them after a SIGKILL: one table
for ingest (streams not yet ended in its ring), the cache (replays in flight) and the gateway
(streams its clients follow), each in an array from ``WorkerContext.state_array``.

Layout, the contract between a worker and the incarnation that follows it: a ``(slots, 1 + W)``
uint64 array; a row is ``(stream id + 1, W values)`` and a row of zeros is a free slot. Writes
are plain memory stores into a file-backed array, so they cost what a numpy store costs and a
killed process loses none of them.
"""

from __future__ import annotations

import numpy as np


class StreamTable:
    def __init__(self, array: np.ndarray) -> None:
        """``array``: ``(slots, 1 + W)`` uint64, as a predecessor left it (zeros when new)."""
        self.array = array
        self.rows = array.view(np.ndarray)  # a plain view: a memmap's own indexing goes through Python
        # the same memory as one flat run of words, for updates a few words at a time: a
        # memoryview's item costs less than a numpy call's set-up
        self._words = memoryview(self.rows).cast("B").cast("Q")
        self._width = self.rows.shape[1]
        self.slot_of: dict[int, int] = {}
        used = self.rows[:, 0] != 0
        # what a predecessor left open: stream id -> its values; their slots stay taken until
        # the owner adopts (:meth:`adopt`) or closes them
        self.left: dict[int, np.ndarray] = {
            int(owner) - 1: self.rows[slot, 1:].copy()
            for slot, owner in zip(np.flatnonzero(used).tolist(), self.rows[used, 0].tolist(), strict=True)
        }
        self._left_slots = {sid: slot for sid, slot in zip(self.left, np.flatnonzero(used).tolist(), strict=True)}
        self.free: list[int] = np.flatnonzero(~used)[::-1].tolist()  # lowest slots last: popped first

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, sid: int) -> bool:
        return sid in self.slot_of

    @property
    def full(self) -> bool:
        return not self.free

    def open(self, sid: int, *values: int) -> bool:
        """Note stream ``sid`` open with ``values``; False when every slot is taken (not noted)."""
        if not self.free:
            return False
        slot = self.free.pop()
        self.rows[slot, 1:] = values or 0
        self.rows[slot, 0] = sid + 1
        self.slot_of[sid] = slot
        return True

    def adopt(self, sid: int) -> None:
        """Take over stream ``sid`` that a predecessor left open (one of :attr:`left`)."""
        self.slot_of[sid] = self._left_slots.pop(sid)
        del self.left[sid]

    def set(self, sid: int, *values: int) -> None:
        self.rows[self.slot_of[sid], 1:] = values

    def advance_past(self, sids: list[int], column: int, seqs: list[int]) -> None:
        """Raise value ``column`` (0-based, after the id) of each of ``sids`` to one past the
        matching ``seqs`` entry (the next seq after a committed row); a stream listed more than
        once keeps the highest (a record's rows of one stream, in any order)."""
        words, slot_of, width = self._words, self.slot_of, self._width
        for sid, seq in zip(sids, seqs, strict=True):
            at = slot_of[sid] * width + 1 + column
            if words[at] <= seq:
                words[at] = seq + 1

    def values(self, sid: int) -> np.ndarray:
        return self.rows[self.slot_of[sid], 1:]

    def close(self, sid: int) -> None:
        """Stream ``sid`` ended: its slot is free again (also one a predecessor left)."""
        slot = self.slot_of.pop(sid, None)
        if slot is None:
            slot = self._left_slots.pop(sid)
            del self.left[sid]
        self.rows[slot] = 0
        self.free.append(slot)

    def close_left(self) -> dict[int, np.ndarray]:
        """Free every slot a predecessor left and return what they held (stream id -> values)."""
        left = dict(self.left)
        for sid in left:
            self.close(sid)
        return left
