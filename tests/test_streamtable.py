"""engine/protocol/streamtable.py: the open streams a worker leaves to the incarnation after it, in a
file-backed array (as WorkerContext.state_array makes it) that a SIGKILL cannot lose."""

from __future__ import annotations

import numpy as np
import pytest

from engine.protocol.streamtable import StreamTable


def _array(path, slots: int = 4, width: int = 1) -> np.ndarray:
    mode = "r+" if path.exists() else "w+"
    return np.lib.format.open_memmap(str(path), mode, np.uint64, (slots, 1 + width))


def test_a_successor_finds_what_was_open_and_nothing_that_ended(tmp_path):
    first = StreamTable(_array(tmp_path / "t.npy"))
    assert first.open(0, 5) and first.open(7, 0) and first.open(9, 2)
    first.set(7, 3)
    first.advance_past([0, 9, 0], 0, [5, 3, 1])  # one past each seq; a stream twice: its highest
    first.close(9)
    del first  # the process dies: nothing flushed by hand
    second = StreamTable(_array(tmp_path / "t.npy"))
    assert {sid: v.tolist() for sid, v in second.left.items()} == {0: [6], 7: [3]}
    assert len(second.free) == 2 and len(second) == 0
    second.adopt(7)
    assert 7 in second and second.values(7).tolist() == [3]
    assert {sid: v.tolist() for sid, v in second.close_left().items()} == {0: [6]}
    second.close(7)
    assert len(StreamTable(_array(tmp_path / "t.npy")).left) == 0


def test_a_full_table_refuses_and_a_freed_slot_is_taken_again(tmp_path):
    table = StreamTable(_array(tmp_path / "t.npy", slots=2, width=2))
    assert table.open(1, 10, 11) and table.open(2) and table.full
    assert not table.open(3)
    table.close(1)
    assert table.open(3, 1, 2) and table.values(3).tolist() == [1, 2] and table.values(2).tolist() == [0, 0]
    with pytest.raises(KeyError):
        table.close(1)


def test_advancing_past_a_seq_moves_only_forward_and_only_its_column(tmp_path):
    table = StreamTable(_array(tmp_path / "t.npy", slots=3, width=2))
    assert table.open(4, 10, 20) and table.open(5, 0, 0)
    table.advance_past([4, 5, 4], 1, [30, 2**63, 25])
    assert table.values(4).tolist() == [10, 31] and table.values(5).tolist() == [0, 2**63 + 1]
    table.advance_past([4], 1, [3])  # behind what the table holds: kept
    assert table.values(4).tolist() == [10, 31]
    assert table.rows[2].tolist() == [0, 0, 0]  # the free slot untouched
    with pytest.raises(KeyError):
        table.advance_past([6], 0, [1])  # a stream not open
