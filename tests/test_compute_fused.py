"""The numpy backend's fused per-record path against the reference kernels: the same values, bit
for bit (docs/compute.md), on random inputs and on the edge cases of each formula."""

from __future__ import annotations

import numpy as np
import pytest

from stages.compute import fused, kernels

EDGES = [np.nan, 0.0, -0.0, 0.3, -1e-8, -0.5, -1.0, -20.0, -87.0, -88.0, -103.0, -104.0, -200.0, -np.inf, np.inf]


def token_inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 1 << 32, n, dtype=np.uint32)
    lp = np.where(rng.random(n) < 0.1, np.nan, -rng.exponential(2.0, n)).astype(np.float32)
    lp[: len(EDGES)] = EDGES[:n]
    return ids, lp


@pytest.mark.parametrize("order", [1, 8, 10, 12, 15])
@pytest.mark.parametrize("n", [1, 2, 64, 1000])
def test_token_columns_equal_layout_and_entropy(order, n):
    ids, lp = token_inputs(n, seed=order * 1000 + n)
    want = kernels.layout(ids, lp, order) | {"entropy": kernels.entropy(lp[:, None])}
    got = {name: np.full_like(array, 7) for name, array in want.items()}  # not zeros: every cell must be written
    with np.errstate(divide="raise", over="raise", invalid="raise"):  # no warning (underflow is silent)
        fused.token_columns(fused.CurveTable(order), ids, lp, got)
    for name, array in want.items():
        assert got[name].tobytes() == array.tobytes(), name  # bit for bit, the sign of zero included


def test_token_columns_of_every_logprob_bit_pattern_near_the_edges():
    # logprobs where exp underflows to subnormals and to zero, and where 1 - p rounds to 0
    lp = np.concatenate([np.linspace(-110, -80, 3001), -np.logspace(-9, -5, 2001)]).astype(np.float32)
    ids = np.arange(len(lp), dtype=np.uint32)
    want = kernels.layout(ids, lp, 8) | {"entropy": kernels.entropy(lp[:, None])}
    got = {name: np.empty_like(array) for name, array in want.items()}
    fused.token_columns(fused.CurveTable(8), ids, lp, got)
    for name, array in want.items():
        assert got[name].tobytes() == array.tobytes(), name


def repetition_case(rng: np.random.Generator, streams: int, ngram: int, window: int):
    """A [streams, K + new] matrix of small-alphabet ids (histories partly before the stream's
    start: zeros), the fused call's arguments and the reference's (flat ids, query, first)."""
    kept = window + ngram - 1
    counts = rng.integers(1, 20, streams)
    seen = rng.integers(0, 2 * kept, streams)  # tokens each stream had before
    width = kept + int(counts.max())
    joined = np.zeros((streams, width), dtype=np.uint32)
    group, at, position = [], [], []
    for g in range(streams):
        known = min(seen[g], kept)
        joined[g, kept - known : kept + counts[g]] = rng.integers(0, 3, known + counts[g])
        group += [g] * counts[g]
        at += list(range(counts[g]))
        position += list(range(seen[g], seen[g] + counts[g]))
    group, at, position = (np.array(v, dtype=np.intp) for v in (group, at, position))
    first = (np.arange(streams) * width + np.maximum(kept - seen, 0))[group].astype(np.uint32)
    query = (group * width + kept + at).astype(np.uint32)
    return joined, group * width + at, position - (ngram - 1), (joined.ravel(), query, first)


@pytest.mark.parametrize("ngram", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("window", [1, 2, 7, 64])
def test_repetition_equals_the_reference(ngram, window):
    rng = np.random.default_rng(ngram * 100 + window)
    answers = []
    for streams in (1, 2, 9, 9):
        joined, start, limit, (ids, query, first) = repetition_case(rng, streams, ngram, window)
        want = kernels.repetition_match(ids, query, first, ngram, window).astype(bool)
        assert fused.repetition(joined, start, limit, ngram, window).tolist() == want.tolist()
        if streams == 1:  # one stream: the path without index arrays
            got = fused.repetition(joined[:, : window + ngram - 1 + len(limit)], None, limit, ngram, window)
            assert got.tolist() == want.tolist()
        answers += want.tolist()
    assert any(answers) and not all(answers)  # both answers tested


def test_pair_keys_hold_both_ids_exactly():
    ids = np.array([0xFFFFFFFF, 0, 7, 0x80000001], dtype=np.uint32)
    keys = fused.pair_keys(ids)
    assert keys.tolist() == [0xFFFFFFFF, 0xFFFFFFFF << 32, 7, (7 << 32) | 0x80000001]
