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


def pair_case(rng: np.random.Generator, ngram: int, window: int, tokens: int = 60):
    """Tokens at random positions of their streams (small-alphabet ids, zeros before a stream's
    start): the fused call's arguments (each token's pair keys, positions) and the reference's
    (flat ids, query, first)."""
    span = window + ngram - 1
    position = rng.integers(0, 3 * span, tokens)
    ids = rng.integers(0, 3, (tokens, span + 2)).astype(np.uint32)  # the id before each row's first pair too
    ids[np.arange(span + 2) < (span + 1 - position)[:, None]] = 0  # before the stream's start
    keys = ids[:, 1:].astype(np.uint64)
    if ngram > 1:
        keys |= ids[:, :-1].astype(np.uint64) << np.uint64(32)
    rows = np.arange(tokens) * (span + 1)
    first = (rows + np.maximum(span - position, 0)).astype(np.uint32)
    return keys, position, (ids[:, 1:].ravel(), (rows + span).astype(np.uint32), first)


@pytest.mark.parametrize("ngram", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("window", [1, 2, 7, 64])
def test_pair_match_equals_the_reference(ngram, window):
    rng = np.random.default_rng(ngram * 100 + window)
    answers = []
    for _ in range(4):
        keys, position, (ids, query, first) = pair_case(rng, ngram, window)
        want = kernels.repetition_match(ids, query, first, ngram, window).astype(bool)
        assert fused.pair_match(keys, position, ngram, window).tolist() == want.tolist()
        answers += want.tolist()
        grown = position + 3 * (window + ngram)  # no stream start within reach: the path without the mask
        anywhere = kernels.repetition_match(ids, query, np.zeros_like(query), ngram, window).astype(bool)
        assert fused.pair_match(keys, grown, ngram, window).tolist() == anywhere.tolist()
    assert any(answers) and not all(answers)  # both answers tested


@pytest.mark.parametrize("ngram", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("window", [1, 7, 64])
def test_pair_match_run_of_one_stream_equals_pair_match(ngram, window):
    rng = np.random.default_rng(ngram + window)
    span = window + ngram - 1
    for seen in (0, 1, span - 1, span, 3 * span):
        n = int(rng.integers(1, 70))
        ids = np.zeros(span + seen + n + 1, dtype=np.uint32)  # the row: span zero columns, then the stream
        ids[span + 1 :] = rng.integers(0, 3, seen + n)
        keys = ids[1:].astype(np.uint64)  # column c: the id at position c - span
        if ngram > 1:
            keys |= ids[:-1].astype(np.uint64) << np.uint64(32)
        position = np.arange(seen, seen + n)
        first = span + seen
        recent = np.lib.stride_tricks.sliding_window_view(keys, span + 1)[first - span : first - span + n]
        want = fused.pair_match(recent, position, ngram, window)
        assert fused.pair_match_run(keys, first, position, ngram, window).tolist() == want.tolist()
