"""The numpy reference of each compute kernel against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.compute import kernels
from stages.compute.streams import Tokens, extend, keep, put, window_mean


def test_hilbert_curve_of_order_1_and_2_by_hand():
    x, y = kernels.hilbert_xy(np.arange(4), 1)
    assert list(zip(x.tolist(), y.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 1), (1, 0)]
    x, y = kernels.hilbert_xy(np.arange(16), 2)
    assert list(zip(x.tolist(), y.tolist(), strict=True)) == [
        (0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (0, 3), (1, 3), (1, 2),
        (2, 2), (2, 3), (3, 3), (3, 2), (3, 1), (2, 1), (2, 0), (3, 0),
    ]  # fmt: skip


@pytest.mark.parametrize("order", [3, 6])
def test_hilbert_curve_visits_every_cell_once_in_unit_steps(order):
    x, y = kernels.hilbert_xy(np.arange(4**order), order)
    assert len(set(zip(x.tolist(), y.tolist(), strict=True))) == 4**order
    assert set((np.abs(np.diff(x)) + np.abs(np.diff(y))).tolist()) == {1}


def test_layout_by_hand():
    token_id = np.array([0, 1, 2, 3 | 0x80000000], dtype=np.uint32)  # bit 31 (a hashed id) is ignored
    logprob = np.array([np.nan, 0.0, math.log(0.5), 0.3], dtype=np.float32)
    out = kernels.layout(token_id, logprob, 1)
    assert out["hilbert"].tolist() == [[0.25, 0.25], [0.25, 0.75], [0.75, 0.75], [0.75, 0.25]]
    assert out["conf"].tolist() == pytest.approx([1.0, 1.0, 0.5, 1.0])  # no logprob: 1; positive: as 0
    # cell 0, full confidence: hue 0 -> (1, 0.25, 0.25) at full brightness, opaque
    assert out["rgba"][0].tolist() == [255, 64, 64, 255]
    # confidence 0.5: brightness 0.35 + 0.65 * 0.5, alpha 0.25 + 0.75 * 0.5
    base = 0.5 + 0.5 * np.cos(2 * np.pi * (2 / 4 + np.array([0, 1 / 3, 2 / 3])))
    expected = np.rint(np.append(base * 0.675, 0.625) * 255)
    assert np.abs(out["rgba"][2].astype(int) - expected).max() <= 1


def test_layout_tabulated_and_walked_orders_agree():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1 << 32, 500, dtype=np.uint32)
    lp = -rng.random(500, dtype=np.float32)
    d = kernels.hilbert_cell(ids, 10)
    walked_xy, _ = kernels.cells(d, 10)
    assert np.array_equal(kernels.layout(ids, lp, 10)["hilbert"], walked_xy)
    xy = kernels.layout(ids, lp, 12)["hilbert"]
    assert xy.min() > 0 and xy.max() < 1


def test_entropy_by_hand():
    nan = np.nan
    lp = np.log(
        np.array(
            [
                [0.5, nan, nan, nan],  # the chosen token alone: binary entropy of 0.5 (rest as one outcome)
                [0.25, 0.25, 0.25, 0.25],  # the whole distribution
                [0.5, 0.25, nan, nan],  # rest 0.25
                [nan, nan, nan, nan],  # no logprob: 0
                [1.0, nan, nan, nan],  # certain: 0
            ]
        )
    ).astype(np.float32)
    h = kernels.entropy(lp)
    ln2 = math.log(2)
    assert h.tolist() == pytest.approx([ln2, 2 * ln2, 0.5 * ln2 + 2 * 0.25 * 2 * ln2, 0.0, 0.0], abs=1e-6)


def test_repetition_match_by_hand():
    ids = np.array([1, 2, 3, 1, 2, 3, 1, 2], dtype=np.uint32)
    q = np.arange(8, dtype=np.uint32)
    zero = np.zeros(8, dtype=np.uint32)
    # bigram (1, 2) first ends at 1, again at 4 and 7; (2, 3) at 2 and 5; (3, 1) at 3 and 6
    assert kernels.repetition_match(ids, q, zero, 2, 8).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # a window of 2 n-grams back cannot see a period of 3
    assert kernels.repetition_match(ids, q, zero, 2, 2).tolist() == [0] * 8
    # a stream that starts at position 3: nothing before it counts
    first = np.full(8, 3, dtype=np.uint32)
    assert kernels.repetition_match(ids, q, first, 2, 8).tolist() == [0, 0, 0, 0, 0, 0, 0, 1]


def test_probe_cosine_by_hand():
    table = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
    probes = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
    cos = kernels.probe_cosine(np.array([0, 1, 2, 4], dtype=np.uint32), table, probes)
    assert cos.ravel().tolist() == pytest.approx([1, 0, math.sqrt(0.5), 0, 0, 0, math.sqrt(0.5), 0])


def tokens(slots, group, at, position, counts) -> Tokens:
    slots, group, at, position, counts = (np.asarray(v, dtype=np.intp) for v in (slots, group, at, position, counts))
    return Tokens(slice(None), group, position, at, slots, position * 0, counts, single=len(slots) == 1)


def windowed(history: np.ndarray, part: Tokens, values: np.ndarray, window: int) -> np.ndarray:
    """:func:`window_mean` of ``values`` appended to ``history`` (as the stage does it)."""
    width = history.shape[-1]
    joined = extend(history, part)
    put(joined, part, width, slice(None), values)
    keep(history, part, joined)
    return window_mean(joined, part, width, window)


def test_window_mean_across_calls():
    history = np.zeros((1, 1, 2), np.uint8)  # one stream (slot 0), one channel, a window of 2
    first = tokens([0], [0, 0, 0], [0, 1, 2], [0, 1, 2], [3])
    assert windowed(history, first, np.array([[1], [0], [1]]), 2).tolist() == [[1.0], [0.5], [0.5]]
    second = tokens([0], [0, 0], [0, 1], [3, 4], [2])
    assert windowed(history, second, np.array([[1], [1]]), 2).tolist() == [[1.0], [1.0]]
    assert history.tolist() == [[[1, 1]]]
    vectors = np.zeros((1, 2, 4), np.float32)  # two channels, a window of 4
    third = tokens([0], [0, 0], [0, 1], [0, 1], [2])
    assert windowed(vectors, third, np.array([[1, 2], [3, 4]]), 4).tolist() == [[1, 2], [2, 3]]


def test_window_mean_of_two_streams_at_once():
    history = np.zeros((3, 1, 3), np.float32)  # slots 0..2; streams in slots 2 and 0
    history[0, 0] = [0, 4, 8]  # slot 0 has seen 2 values (4, 8); its first column is before its start
    both = tokens([2, 0], [0, 1, 1], [0, 0, 1], [0, 2, 3], [1, 2])
    assert windowed(history, both, np.array([[5], [6], [10]]), 3).ravel().tolist() == [5, 6, 8]
    assert history[:, 0].tolist() == [[8, 6, 10], [0, 0, 0], [0, 0, 5]]


def test_a_window_shorter_than_the_history():
    history = np.zeros((1, 1, 4), np.float32)  # 4 columns kept, a mean over the last 2
    history[0, 0] = [1, 2, 3, 4]
    part = tokens([0], [0, 0], [0, 1], [4, 5], [2])
    assert windowed(history, part, np.array([[6], [8]]), 2).ravel().tolist() == [5, 7]
    assert history[0, 0].tolist() == [3, 4, 6, 8]
