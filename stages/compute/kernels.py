"""The numpy reference of every kernel: the per-token math, the same on every backend.

Each function takes and returns plain arrays (float32 where the shader computes in f32), so a WGSL
shader's output can be compared with it element by element. What runs along a stream (running
perplexity, windowed means) is not here but in :mod:`stages.compute.stage`: cumulative sums over
all the batch's streams at once, in numpy whichever backend computes the per-token part.

- layout: each token's cell on a Hilbert curve of ``order`` (2^order x 2^order cells) from its id,
  the cell's centre in [0, 1]^2; confidence exp(logprob), 1.0 without a logprob; an RGBA colour
  (hue from the position along the curve, brightness and alpha from the confidence).
- entropy: per token, from its top logprobs (NaN-padded; the chosen token's alone when there are
  no alternatives): -sum p ln p over the listed tokens, plus the unlisted rest mass r = 1 - sum p
  taken as one outcome (-r ln r). That is the smallest entropy any distribution with those
  probabilities can have (a lower bound; exact when the list covers the distribution).
- repetition match: whether the n-gram of token ids ending at a token occurred among the previous
  ``window`` n-grams of its stream.
- probe cosine: cosine between each token's embedding (a row of a feature table) and K unit probe
  vectors.
"""

from __future__ import annotations

import functools

import numpy as np

MAX_ORDER = 15  # 4**15 cells: the cell index stays within 31 bits of the token id
_ID_BITS = np.uint32(0x7FFFFFFF)  # bit 31 only marks a hashed id (shm.batch.stable_token_id)
_REPETITION_BLOCK = 4096
_PROBE_BLOCK = 65536
TABLE_ORDER = 10  # curves up to 4**10 cells are tabulated (12 MiB at order 10)
_HUE_PHASES = np.array([0.0, 1.0 / 3.0, 2.0 / 3.0], dtype=np.float32)


def hilbert_cell(token_id: np.ndarray, order: int) -> np.ndarray:
    """The index along the curve of each token's cell: the id's low 2*order bits (u32)."""
    return token_id.astype(np.uint32, copy=False) & _ID_BITS & np.uint32((1 << (2 * order)) - 1)


def hilbert_xy(d: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell (x, y) of index ``d`` on the Hilbert curve of ``order`` (the classic d2xy walk)."""
    t = d.astype(np.int64)
    x = np.zeros_like(t)
    y = np.zeros_like(t)
    s = 1
    for _ in range(order):
        rx = (t >> 1) & 1
        ry = (t ^ rx) & 1
        flip = (ry == 0) & (rx == 1)
        x = np.where(flip, s - 1 - x, x)
        y = np.where(flip, s - 1 - y, y)
        swap = ry == 0
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        x += s * rx
        y += s * ry
        t >>= 2
        s <<= 1
    return x, y


def confidence(logprob: np.ndarray) -> np.ndarray:
    """exp(logprob), 1.0 where the upstream gave no logprob (NaN); a positive logprob counts as 0."""
    lp = np.minimum(logprob.astype(np.float32, copy=False), np.float32(0))
    return np.where(np.isnan(lp), np.float32(1), np.exp(lp)).astype(np.float32)


def layout(token_id: np.ndarray, logprob: np.ndarray, order: int) -> dict[str, np.ndarray]:
    """``hilbert`` f32[n, 2] cell centres in [0, 1], ``conf`` f32[n], ``rgba`` u8[n, 4]."""
    d = hilbert_cell(token_id, order)
    xy, base = curve(order) if order <= TABLE_ORDER else cells(d, order)
    if order <= TABLE_ORDER:
        xy, base = xy[d], base[d]
    conf = confidence(logprob)
    return {"hilbert": xy, "conf": conf, "rgba": colour(base, conf)}


def cells(d: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres f32[n, 2] and the colour before shading f32[n, 3] of curve indices ``d``:
    a cosine palette over the position along the curve."""
    x, y = hilbert_xy(d, order)
    side = np.float32(1 << order)
    xy = np.stack([(x + 0.5) / side, (y + 0.5) / side], axis=1).astype(np.float32)
    hue = (d.astype(np.float32) / np.float32(side * side))[:, None]
    base = np.float32(0.5) + np.float32(0.5) * np.cos(np.float32(2 * np.pi) * (hue + _HUE_PHASES))
    return xy, base.astype(np.float32)


@functools.cache
def curve(order: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cells` of every index of a small curve: a row lookup per token instead of an
    ``order``-step walk (the per-batch path is a few microseconds per numpy call)."""
    return cells(np.arange(1 << (2 * order), dtype=np.uint32), order)


def colour(base: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """RGBA u8[n, 4]: the palette colour dimmed, and faded, with low confidence."""
    shade = conf[:, None]
    rgba = np.empty((len(conf), 4), dtype=np.float32)
    np.multiply(base, np.float32(0.35) + np.float32(0.65) * shade, out=rgba[:, :3])
    rgba[:, 3:] = np.float32(0.25) + np.float32(0.75) * shade
    return np.rint(np.clip(rgba, 0, 1) * np.float32(255)).astype(np.uint8)


def entropy(top_logprobs: np.ndarray) -> np.ndarray:
    """f32[n] nats from f32[n, k] logprobs (NaN where absent); 0 for a row with none."""
    lp = top_logprobs.astype(np.float32, copy=False)
    p = np.where(np.isnan(lp), np.float32(0), np.exp(np.minimum(lp, np.float32(0))))
    # log of 1 where a probability is 0: p ln p is then 0 with no warning to silence (np.errstate
    # costs more than the rest of a 64-row call)
    listed = np.float32(0) - np.sum(p * np.log(np.where(p > 0, p, np.float32(1))), axis=1, dtype=np.float32)
    rest = np.maximum(np.float32(1) - p.sum(axis=1, dtype=np.float32), np.float32(0))
    unlisted = -rest * np.log(np.where(rest > 0, rest, np.float32(1)))
    return (listed + unlisted).astype(np.float32)


def repetition_match(ids: np.ndarray, query: np.ndarray, first: np.ndarray, ngram: int, window: int) -> np.ndarray:
    """u32[n]: 1 where the n-gram ``ids[q-ngram+1 .. q]`` equals one ending at a position
    ``j`` in ``[max(f + ngram - 1, q - window), q)``, with ``q = query[i]`` and ``f = first[i]``
    (the first position of that row's stream in ``ids``); 0 when fewer than ``ngram`` ids of its
    stream end at ``q``."""
    out = np.zeros(len(query), dtype=np.uint32)
    span = window + ngram  # the ids a query looks at: its n-gram and the window of n-grams before it
    padded = np.concatenate([np.zeros(span, dtype=np.uint32), ids.astype(np.uint32, copy=False)])
    # row r of ``windows`` is padded[r : r + span]: a strided view (np.ndarray over the buffer costs
    # a fraction of sliding_window_view's setup, which matters for the stage's 64-row calls)
    windows = np.ndarray((len(padded) - span + 1, span), np.uint32, padded, 0, (4, 4))
    lag = np.arange(window, 0, -1)  # column c of ``same`` compares with the n-gram ``lag[c]`` back
    for at in range(0, len(query), _REPETITION_BLOCK):  # bounds the [rows, span] temporary
        q = query[at : at + _REPETITION_BLOCK].astype(np.int64)
        context = windows[q + 1]  # context[:, c] is ids[q - span + 1 + c] (zero padding in front)
        # the n-grams compared one id at a time: k ids back from the query against k back from each candidate
        same = context[:, span - 1 - window : span - 1] == context[:, span - 1 :]
        for k in range(1, ngram):
            same &= context[:, span - 1 - k - window : span - 1 - k] == context[:, span - 1 - k : span - k]
        # a candidate counts when its n-gram lies within the stream; that leaves none for a query
        # with fewer than ngram ids of its stream (lag >= 1)
        same &= lag <= (q - first[at : at + _REPETITION_BLOCK] - (ngram - 1))[:, None]
        out[at : at + len(q)] = same.any(axis=1)
    return out


def probe_cosine(token_id: np.ndarray, table: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """f32[n, k]: cosine between row ``token_id mod rows`` of ``table`` (f32[rows, dim]) and
    each unit vector of ``probes`` (f32[k, dim]); 0 for an all-zero embedding row."""
    rows = token_id.astype(np.uint32, copy=False) % np.uint32(len(table))
    out = np.empty((len(rows), len(probes)), dtype=np.float32)
    for at in range(0, len(rows), _PROBE_BLOCK):  # bounds the gathered [rows, dim] embeddings
        emb = table[rows[at : at + _PROBE_BLOCK]]
        norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))
        out[at : at + len(emb)] = (emb @ probes.T) / np.maximum(norms, np.float32(1e-12))[:, None]
    return out
