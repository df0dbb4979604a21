"""engine.protocol.seqtable.SeqTable (the broadcast's and the client's de-duplication by stream and seq,
vectorised) against a plain per-row reference, on random batches with repeats, jumps, streams
sharing a table slot and republished rows."""

from __future__ import annotations

import numpy as np
import pytest

from engine.protocol import seqtable
from engine.protocol.seqtable import SLOTS, SeqTable


@pytest.fixture(params=[0, seqtable.SMALL, 1 << 20], ids=["numpy", "as-built", "row-by-row"])
def small(request, monkeypatch) -> int:
    """Each test runs with every batch admitted by numpy, as built (row by row up to SMALL rows),
    and every batch row by row: the paths must agree with the reference and so with each other."""
    monkeypatch.setattr(seqtable, "SMALL", request.param)
    return request.param


def reference(state: dict[int, int], sids: list[int], seqs: list[int], drop_seen: bool) -> tuple[list[bool], int]:
    fresh, gaps, first_fresh = [], 0, {}
    for sid, seq in zip(sids, seqs, strict=True):
        floor = state.get(sid, 0)
        keep = seq >= floor or not drop_seen
        fresh.append(keep)
        if keep:
            first_fresh.setdefault(sid, (floor, 0))
            start, count = first_fresh[sid]
            first_fresh[sid] = (start, count + 1)
            state[sid] = max(state.get(sid, 0), seq + 1)
    for sid, (start, count) in first_fresh.items():
        gaps += max(0, state[sid] - start - count)
    return fresh, gaps


def test_admit_matches_a_per_row_reference_on_random_batches(small):
    rng = np.random.default_rng(7)
    table, state = SeqTable(), {}
    streams = [1, 2, 3, 4 + SLOTS, 4, 99]  # 4 and 4 + SLOTS share a slot
    nexts = dict.fromkeys(streams, 0)
    for _ in range(400):  # each batch: a few streams, each a run of seqs (as records hold them)
        chosen = rng.choice(streams, size=rng.integers(1, 5), replace=False).tolist()
        if 4 in chosen and 4 + SLOTS in chosen:
            chosen.remove(4 + SLOTS)  # in one batch only one of them: the slot holds one stream
        sids, seqs = [], []
        for sid in chosen:
            start = max(0, nexts[sid] + int(rng.integers(-3, 3)))  # repeats and jumps
            count = int(rng.integers(1, 5))
            sids += [sid] * count
            seqs += list(range(start, start + count))
            nexts[sid] = max(nexts[sid], start + count)
        drop_seen = bool(rng.random() > 0.1)
        if 4 + SLOTS in chosen:
            state.pop(4, None)
        if 4 in chosen:
            state.pop(4 + SLOTS, None)
        want_fresh, want_gaps = reference(state, sids, seqs, drop_seen)
        fresh, gaps = table.admit(np.array(sids, np.uint64), np.array(seqs, np.uint64), drop_seen)
        assert fresh.tolist() == want_fresh and gaps == want_gaps, (sids, seqs)
        for sid in chosen:
            assert table.next_of(sid) == state[sid]


def test_admit_of_rows_of_distinct_streams_matches_the_reference(small):
    """Records of the paced load: tens of rows, each of another stream (the vectorised path for
    rows of distinct streams), some repeated or ahead of their stream's next seq, some republished."""
    rng = np.random.default_rng(11)
    table, state = SeqTable(), {}
    nexts = dict.fromkeys(range(1, 101), 0)
    for _ in range(300):
        chosen = rng.choice(100, size=int(rng.integers(9, 40)), replace=False) + 1
        sids, seqs = chosen.tolist(), []
        for sid in sids:
            jump = int(rng.choice([0, 0, 0, 0, -2, -1, 1, 3]))  # mostly the next seq
            seqs.append(max(0, nexts[sid] + jump))
            nexts[sid] = max(nexts[sid], seqs[-1] + 1)
        drop_seen = bool(rng.random() > 0.1)
        want_fresh, want_gaps = reference(state, sids, seqs, drop_seen)
        fresh, gaps = table.admit(np.array(sids, np.uint64), np.array(seqs, np.uint64), drop_seen)
        assert fresh.tolist() == want_fresh and gaps == want_gaps, (sids, seqs, drop_seen)
        assert all(table.next_of(sid) == state[sid] for sid in sids)
