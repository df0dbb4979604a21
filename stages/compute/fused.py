"""The numpy backend's per-record path: what :mod:`stages.compute.kernels` computes, in as few
numpy calls as possible.

A record is 1-64 rows, where a numpy call costs about a microsecond whatever its size: the
reference kernels (written for clarity, and what the WGSL shaders are compared with) spend most
of a record's time in call overhead. These functions give the same values as the references
(bit for bit; tests/test_compute_fused.py checks) with fewer, fused calls:

- :func:`token_columns`: ``layout`` and ``entropy`` (of the chosen token's logprob alone, the
  only one the ring carries) in one pass, written straight into the output record's columns.
- :func:`repetition`: ``repetition_match`` over a [streams, history + new] matrix of ids, with
  the n-gram compared two ids at a time (one u64 per pair), no padding and no per-query index
  arrays when a record holds one stream.
"""

from __future__ import annotations

import functools

import numpy as np

from stages.compute import kernels

_SHADE_SCALE = np.array([[0.65], [0.65], [0.65], [0.75]], dtype=np.float32)  # kernels.colour: brightness, alpha
_SHADE_BASE = np.array([[0.35], [0.35], [0.35], [0.25]], dtype=np.float32)


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
            self.xy, self.base = xy, np.ascontiguousarray(_with_alpha(base).T)

    def cells(self, token_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cell centres f32[n, 2], colours before shading f32[4, n]: channel-major, so that the
        shading multiplies contiguous rows) of ``token_id``."""
        d = np.bitwise_and(token_id, self.mask)
        if self.xy is not None:
            return self.xy.take(d, axis=0), self.base.take(d, axis=1)
        xy, base = kernels.cells(d, self.order)
        return xy, np.ascontiguousarray(_with_alpha(base).T)


def _with_alpha(base: np.ndarray) -> np.ndarray:
    out = np.ones((len(base), 4), dtype=np.float32)
    out[:, :3] = base
    return out


def token_columns(curve: CurveTable, token_id: np.ndarray, logprob: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """Fill ``out["hilbert"]`` (f32[n, 2]), ``out["conf"]``, ``out["rgba"]`` (u8[n, 4]) and
    ``out["entropy"]`` (contiguous arrays) for ``n`` tokens: :func:`kernels.layout` and
    :func:`kernels.entropy` of ``logprob[:, None]``, the same values."""
    xy, rgba = curve.cells(token_id)
    out["hilbert"][...] = xy
    # p and r = 1 - p as two contiguous rows: one log and one product give both entropy terms
    pr = np.empty((2, len(logprob)), dtype=np.float32)
    p = pr[0]
    np.fmin(logprob, _ZERO, out=p)  # NaN (no logprob) -> 0 -> confidence 1, entropy 0
    np.exp(p, out=p)
    out["conf"][...] = p
    # kernels.colour: palette x (0.35 + 0.65 conf), alpha 0.25 + 0.75 conf (all within [0, 1]: no clip)
    shade = np.multiply(_SHADE_SCALE, p)
    shade += _SHADE_BASE
    rgba *= shade
    rgba *= _BYTE
    np.rint(rgba, out=rgba)
    out["rgba"][...] = rgba.T
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


def pair_keys(ids: np.ndarray) -> np.ndarray:
    """u64 per position (of each row of ``ids``, [..., L]): the id before it in the high half, its
    own in the low half (a row's first position: high half 0): two ids compared in one go, exactly."""
    keys = np.empty(ids.shape, dtype=np.uint64)
    halves = keys.view(np.uint32).reshape(*ids.shape, 2)  # little-endian: [low, high]
    halves[..., 0] = ids
    halves[..., 0, 1] = 0
    halves[..., 1:, 1] = ids[..., :-1]
    return keys


@functools.cache
def _key_offsets(ngram: int) -> list[int]:
    """How far back from an n-gram's last id each compared pair ends: the pairs cover its ids."""
    if ngram == 1:
        return [0]
    offsets = list(range(0, ngram - 1, 2))
    if ngram % 2:
        offsets.append(ngram - 2)
    return offsets


def repetition(ids: np.ndarray, start: np.ndarray | None, limit: np.ndarray, ngram: int, window: int) -> np.ndarray:
    """bool per query: :func:`kernels.repetition_match` where each row of ``ids`` ([streams, K +
    new]) holds a stream's ids, K = window + ngram - 1 of history then its new ones; a query's
    n-gram ends at flat position ``start + K`` of the rows laid end to end (``start``: None when
    the queries are the first row's new ids, in order) and ``limit`` is how far back (in n-grams)
    it may look without leaving its stream (its position in the stream - ngram + 1)."""
    values = np.ascontiguousarray(ids) if ngram == 1 else pair_keys(ids)  # ids, or pairs of ids
    values = values.reshape(-1)
    offsets = _key_offsets(ngram)
    reach = offsets[-1]  # the farthest pair back from an n-gram's end
    item = values.itemsize
    # row r of ``windows`` is values[r : r + window + 1]: a value, then the window before it
    windows = np.ndarray((len(values) - window, window + 1), values.dtype, values, 0, (item, item))
    if start is None:
        # one stream: compare each value from ``reach`` before the first query on with the window
        # before it once; a query's n-gram matches where all its pairs do (rows ``k`` apart)
        rows = len(limit)
        ends = windows[ngram - 1 - reach : ngram - 1 + rows]
        equal = ends[:, :window] == ends[:, window:]
        same = equal[reach - offsets[0] : reach - offsets[0] + rows]
        for k in offsets[1:]:
            same = same & equal[reach - k : reach - k + rows]
    else:  # one gather of each query's stretch: the window before each of its pairs, then the pairs
        span = window + 1 + reach
        stretches = np.ndarray((len(values) - span + 1, span), values.dtype, values, 0, (item, item))
        context = stretches[start + (ngram - 1 - reach)]
        same = None
        for k in offsets:
            last = span - 1 - k
            equal = context[:, last - window : last] == context[:, last : last + 1]
            same = equal if same is None else np.logical_and(same, equal, out=same)
    if (limit[0] if start is None else limit.min()) < window:  # a stream's first tokens (one stream: in order)
        same &= _LAGS[window] <= limit[:, None]
    return same.any(axis=1)


class _Lags(dict):
    """Column ``c`` of a comparison looks ``window - c`` n-grams back (made once per window)."""

    def __missing__(self, window: int) -> np.ndarray:
        lags = self[window] = np.arange(window, 0, -1)
        return lags


_LAGS = _Lags()
