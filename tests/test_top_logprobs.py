"""Top logprobs end to end (issue 15): the embedded upstream's alternatives, the ring's ``top``
column (shm.batch), compute's entropy from them, the gateway's OpenAI shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shm.batch import (
    MAX_TOP_LOGPROBS,
    MAX_TOP_TEXT,
    BatchError,
    TokenBatch,
    batch_size,
    encode_tops,
    top_alternatives,
    top_logprobs,
    top_rows,
    write_batch,
)
from stages.ingest import corpus


def test_upstream_alternatives_are_a_distribution() -> None:
    """The embedded upstream's top logprobs of a position leave a non-negative rest of the mass:
    the alternatives of a real model's softmax never sum above probability 1."""
    for seed in range(200):
        key = corpus.request_key("m", f"prompt {seed}", None)
        sample = corpus.sample(key, 8)
        for i, (token, logprob) in enumerate(zip(sample.tokens, sample.logprobs, strict=True)):
            top = corpus.top_logprobs(key, i, token, logprob, 20)
            assert top[0] == (token, logprob)
            assert sum(math.exp(lp) for _, lp in top) <= 1.0 + 1e-5, (seed, i, top)
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert top[:3] == corpus.top_logprobs(key, i, token, logprob, 3)  # more only appends


def _roundtrip(tops: list) -> np.ndarray:
    rows = top_rows(tops)
    column = rows.column
    buf = memoryview(bytearray(batch_size(len(tops), 0, (column,))))
    encode_tops(write_batch(buf, len(tops), 0, (column,)).extra["top"], rows)
    return TokenBatch.decode(buf).extra["top"]


def test_top_column_round_trip_and_caps() -> None:
    tops = [
        (("a", -0.1), ("bé", -2.5)),
        None,
        tuple((f"t{j}", -float(j)) for j in range(10_000)),  # a hostile upstream's 10,000 alternatives
        (("x" * 1000, -1.0), ("\u20ac" * 200, float("nan"))),  # oversized texts, a NaN logprob
    ]
    column = _roundtrip(tops)
    assert top_alternatives(column, 0) == (("a", pytest.approx(-0.1)), ("bé", -2.5))
    assert top_alternatives(column, 1) == ()
    assert len(top_alternatives(column, 2)) == MAX_TOP_LOGPROBS
    long_text, euro = top_alternatives(column, 3)
    assert long_text[0] == "x" * MAX_TOP_TEXT
    assert len(euro[0].encode()) <= MAX_TOP_TEXT and set(euro[0]) == {"\u20ac"}  # cut at a character
    assert math.isnan(euro[1])
    lps = top_logprobs(column)
    assert lps.shape == (4, MAX_TOP_LOGPROBS) and np.isnan(lps[1]).all()


def test_top_column_with_a_lying_header_is_refused() -> None:
    column = np.array(_roundtrip([(("a", -0.1),)]))
    column[0, 0] = 7  # K no longer matches the width
    with pytest.raises(BatchError, match="top column"):
        top_logprobs(column)
