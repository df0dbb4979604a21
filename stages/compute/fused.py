"""The numpy backend's per-record path: what :mod:`stages.compute.kernels` computes, in as few
numpy calls as possible.

A record is 1-64 rows, where a numpy call costs about a microsecond whatever its size: the
reference kernels (written for clarity, and what the WGSL shaders are compared with) spend most
of a record's time in call overhead. These functions give the same values as the references
(bit for bit; tests/test_compute_fused.py checks) with fewer, fused calls:

- :func:`token_columns`: ``layout`` and ``entropy`` (of the chosen token's logprob alone, the
  only one the ring carries) in one pass, written straight into the output record's columns.
- :func:`pair_match`, :func:`pair_match_run`: ``repetition_match`` from the pair keys compute
  keeps per position (an id and the one before it in one u64), the n-gram compared two ids at a
  time: over each token's gathered window, or over one stream's consecutive tokens with one
  comparison shared by the n-gram's pairs (no gather).
"""

from __future__ import annotations

import functools

import numpy as np

from stages.compute import kernels

_SHADE_SCALE = np.array([0.65, 0.65, 0.65, 0.75], dtype=np.float32)  # kernels.colour: brightness, alpha
_SHADE_BASE = np.array([0.35, 0.35, 0.35, 0.25], dtype=np.float32)


class CurveTable:
    """The Hilbert curve of ``order`` as lookup tables: cell centre and RGBA colour before shading
    (alpha 1) per cell, for orders up to the reference's tabulated ones (the walk otherwise)."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.mask = np.uint32(0x7FFFFFFF & ((1 << (2 * order)) - 1))  # kernels.hilbert_cell's bits
        self.xy: np.ndarray | None = None
        self.base: np.ndarray | None = None
        if order <= kernels.TABLE_ORDER:
            xy, base = kernels.curve(order)
            self.xy, self.base = xy, _with_alpha(base)

    def cells(self, token_id: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """The cell centres of ``token_id`` into ``xy`` (f32[n, 2], contiguous); returns their
        colours before shading (f32[n, 4])."""
        d = np.bitwise_and(token_id, self.mask)
        if self.xy is not None:  # "clip" never clips (d is a cell) and, unlike "raise", takes straight into xy
            self.xy.take(d, axis=0, out=xy, mode="clip")
            return self.base.take(d, axis=0)
        centres, base = kernels.cells(d, self.order)
        xy[...] = centres
        return _with_alpha(base)


def _with_alpha(base: np.ndarray) -> np.ndarray:
    out = np.ones((len(base), 4), dtype=np.float32)
    out[:, :3] = base
    return out


def token_columns(curve: CurveTable, token_id: np.ndarray, logprob: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """Fill ``out["hilbert"]`` (f32[n, 2]), ``out["conf"]``, ``out["rgba"]`` (u8[n, 4]) and
    ``out["entropy"]`` (contiguous arrays) for ``n`` tokens: :func:`kernels.layout` and
    :func:`kernels.entropy` of ``logprob[:, None]``, the same values."""
    rgba = curve.cells(token_id, out["hilbert"])
    # p and r = 1 - p as two contiguous rows: one log and one product give both entropy terms
    pr = np.empty((2, len(logprob)), dtype=np.float32)
    p = pr[0]
    np.fmin(logprob, _ZERO, out=p)  # NaN (no logprob) -> 0 -> confidence 1, entropy 0
    np.exp(p, out=p)
    out["conf"][...] = p
    # kernels.colour: palette x (0.35 + 0.65 conf), alpha 0.25 + 0.75 conf (all within [0, 1]: no clip)
    shade = np.multiply(p[:, None], _SHADE_SCALE)
    shade += _SHADE_BASE
    rgba *= shade
    rgba *= _BYTE
    np.rint(rgba, out=out["rgba"], casting="unsafe")  # within [0, 255]: the cast to u8 as an assignment's
    # kernels.entropy: -(p ln p) - (r ln r); the log of the smallest f32 instead of ln 0 (p 0: 0 x -103)
    np.subtract(_ONE, p, out=pr[1])
    terms = np.maximum(pr, _TINY)
    np.log(terms, out=terms)
    terms *= pr
    entropy = out["entropy"]
    np.add(terms[0], terms[1], out=entropy)
    np.subtract(_ZERO, entropy, out=entropy)  # 0 - x: never a negative zero, as the reference


# 0-d arrays: a Python or numpy scalar operand costs a conversion on every call
_ZERO, _ONE, _BYTE = (np.array(v, dtype=np.float32) for v in (0, 1, 255))
_TINY = np.array(np.finfo(np.float32).smallest_subnormal)


@functools.cache
def _key_offsets(ngram: int) -> list[int]:
    """How far back from an n-gram's last id each compared pair ends: the pairs cover its ids."""
    if ngram == 1:
        return [0]
    offsets = list(range(0, ngram - 1, 2))
    if ngram % 2:
        offsets.append(ngram - 2)
    return offsets


def pair_match(recent: np.ndarray, position: np.ndarray, ngram: int, window: int) -> np.ndarray:
    """bool per token: :func:`kernels.repetition_match` from ``recent`` ([tokens, span + 1] u64,
    span = window + ngram - 1: each token's pair key last, after those of the span positions before
    it in its stream; a pair key holds a position's id in its low half and the id before it in its
    high half, only the id when ``ngram`` is 1) and ``position`` (each token's index in its stream:
    how far back its n-grams stay within the stream). The n-gram is compared a pair of ids at a
    time: 2 comparisons for a 4-gram."""
    span = recent.shape[1] - 1
    same = None
    for k in _key_offsets(ngram):
        last = span - k  # the pair k back from the n-gram's end, and the window of pairs before it
        equal = recent[:, last - window : last] == recent[:, last : last + 1]
        same = equal if same is None else np.logical_and(same, equal, out=same)
    if np.minimum.reduce(position) < span:  # a stream's first tokens: candidates that begin before it do not count
        same &= _LAGS[window] <= (position - (ngram - 1))[:, None]
    return np.logical_or.reduce(same, axis=1)  # the ufunc itself: ndarray.any's wrapper costs more than the work


def pair_match_run(keys: np.ndarray, first: int, position: np.ndarray, ngram: int, window: int) -> np.ndarray:
    """:func:`pair_match` of consecutive positions of one stream: ``keys`` its row of pair keys,
    the tokens at columns ``first ..``. Each key is compared with the window before it once, and
    the n-gram's pairs are rows of that one comparison (no gather)."""
    offsets = _key_offsets(ngram)
    reach, n = offsets[-1], len(position)
    # row r: the key at column first - reach + r after the window of keys before it
    runs = np.ndarray((n + reach, window + 1), np.uint64, keys, 8 * (first - reach - window), (8, 8))
    equal = runs[:, :window] == runs[:, window:]
    same = equal[reach : reach + n]
    for k in offsets[1:]:
        same = same & equal[reach - k : reach - k + n]
    if position[0] < window + ngram - 1:  # the stream's first tokens (in order: the first is the least)
        same &= _LAGS[window] <= (position - (ngram - 1))[:, None]
    return np.logical_or.reduce(same, axis=1)


class _Lags(dict):
    """Column ``c`` of a comparison looks ``window - c`` n-grams back (made once per window)."""

    def __missing__(self, window: int) -> np.ndarray:
        lags = self[window] = np.arange(window, 0, -1)
        return lags


_LAGS = _Lags()
