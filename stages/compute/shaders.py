"""The WGSL compute shaders, one per kernel of :mod:`stages.compute.kernels`, with what the
dispatcher needs to bind them: inputs and outputs in binding order and the uniform fields.

Binding 0 is a uniform of eight u32 (``n`` rows first, then the kernel's fields in order);
bindings 1.. are the inputs (read-only storage), then the outputs (read-write storage). WGSL has
no 8-bit or 64-bit storage types: colours leave as one packed u32 per row (little-endian RGBA, so
the buffer reads back as u8[n, 4]), flags as u32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

WORKGROUP = 64
PARAM_WORDS = 8

_HEADER = """
struct Params { n: u32, a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32 }
@group(0) @binding(0) var<uniform> P: Params;

fn is_nan(x: f32) -> bool {  // by its bits: a driver may fold x != x away
    let bits = bitcast<u32>(x);
    return (bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0u;
}
"""

LAYOUT = """
@group(0) @binding(1) var<storage, read> token_id: array<u32>;
@group(0) @binding(2) var<storage, read> logprob: array<f32>;
@group(0) @binding(3) var<storage, read_write> xy: array<f32>;
@group(0) @binding(4) var<storage, read_write> conf: array<f32>;
@group(0) @binding(5) var<storage, read_write> rgba: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= P.n) { return; }
    let order = P.a;
    let d = token_id[i] & 0x7fffffffu & ((1u << (2u * order)) - 1u);
    var t = d;
    var x = 0u;
    var y = 0u;
    var s = 1u;
    for (var k = 0u; k < order; k++) {
        let rx = (t >> 1u) & 1u;
        let ry = (t ^ rx) & 1u;
        if (ry == 0u) {
            if (rx == 1u) { x = s - 1u - x; y = s - 1u - y; }
            let tmp = x; x = y; y = tmp;
        }
        x += s * rx;
        y += s * ry;
        t = t >> 2u;
        s = s << 1u;
    }
    let side = f32(1u << order);
    xy[2u * i] = (f32(x) + 0.5) / side;
    xy[2u * i + 1u] = (f32(y) + 0.5) / side;
    let lp = logprob[i];
    var c = 1.0;
    if (!is_nan(lp)) { c = exp(min(lp, 0.0)); }
    conf[i] = c;
    let hue = f32(d) / (side * side);
    let phase = vec3<f32>(hue, hue + 1.0 / 3.0, hue + 2.0 / 3.0);
    let rgb = (0.5 + 0.5 * cos(6.2831853 * phase)) * (0.35 + 0.65 * c);
    rgba[i] = pack4x8unorm(vec4<f32>(rgb, 0.25 + 0.75 * c));
}
"""

ENTROPY = """
@group(0) @binding(1) var<storage, read> toplp: array<f32>;
@group(0) @binding(2) var<storage, read_write> entropy: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= P.n) { return; }
    let k = P.a;
    var h = 0.0;
    var total = 0.0;
    for (var j = 0u; j < k; j++) {
        let lp = toplp[i * k + j];
        if (!is_nan(lp)) {
            let p = exp(min(lp, 0.0));
            if (p > 0.0) { h -= p * log(p); }
            total += p;
        }
    }
    let rest = max(1.0 - total, 0.0);
    if (rest > 0.0) { h -= rest * log(rest); }
    entropy[i] = h;
}
"""

REPETITION = """
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> query: array<u32>;
@group(0) @binding(3) var<storage, read> first: array<u32>;
@group(0) @binding(4) var<storage, read_write> hit: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= P.n) { return; }
    let q = query[i];
    let f = first[i];
    let n = P.a;
    let w = P.b;
    var found = 0u;
    if (q + 1u >= f + n) {
        var lo = f + n - 1u;
        if (q >= w && q - w > lo) { lo = q - w; }
        for (var j = lo; j < q; j++) {
            var same = true;
            for (var k = 0u; k < n; k++) {
                if (ids[j - k] != ids[q - k]) { same = false; break; }
            }
            if (same) { found = 1u; break; }
        }
    }
    hit[i] = found;
}
"""

PROBES = """
@group(0) @binding(1) var<storage, read> token_id: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read> probes: array<f32>;
@group(0) @binding(4) var<storage, read_write> cosine: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= P.n) { return; }
    let dim = P.b;
    let k = P.c;
    let base = (token_id[i] % P.a) * dim;
    var acc: array<f32, 32>;
    var norm2 = 0.0;
    for (var d = 0u; d < dim; d++) {
        let e = table[base + d];
        norm2 += e * e;
        for (var j = 0u; j < k; j++) { acc[j] += e * probes[j * dim + d]; }
    }
    let inv = 1.0 / max(sqrt(norm2), 1e-12);
    for (var j = 0u; j < k; j++) { cosine[i * k + j] = acc[j] * inv; }
}
"""

MAX_PROBES = 32  # the shader's accumulator


Params = dict[str, int]  # the uniform's fields after ``n``, in order


def _rows(inputs: dict[str, np.ndarray], params: Params, start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: array[start:stop] for name, array in inputs.items()}


def _repetition_rows(inputs: dict[str, np.ndarray], params: Params, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` with the part of ``ids`` they read, positions rebased onto it."""
    ngram, window = params["ngram"], params["window"]
    q = inputs["query"][start:stop].astype(np.int64)
    f = inputs["first"][start:stop].astype(np.int64)
    lo = int(np.maximum(f, q - window - ngram + 1).min())  # the oldest id any row reads
    return {
        "ids": inputs["ids"][lo : int(q.max()) + 1],
        "query": (q - lo).astype(np.uint32),
        "first": (np.maximum(f, lo) - lo).astype(np.uint32),
    }


@dataclass(frozen=True)
class KernelSpec:
    """How to bind and split one shader. A call has ``len(inputs[row_input])`` rows; ``rows``
    slices its non-resident inputs to rows start:stop (the inputs of ``resident`` are bound whole
    and uploaded once, e.g. a feature table). An output's width is a number of values per row or
    the name of the param that gives it."""

    name: str
    wgsl: str
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, str, int | str], ...]  # (name, "u4" | "f4", values per row)
    row_input: str
    resident: tuple[str, ...] = ()
    rows: Callable[[dict[str, np.ndarray], Params, int, int], dict[str, np.ndarray]] = _rows

    @property
    def code(self) -> str:
        return _HEADER + self.wgsl


SPECS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec(
            "layout",
            LAYOUT,
            ("token_id", "logprob"),
            (("hilbert", "f4", 2), ("conf", "f4", 1), ("rgba", "u4", 1)),
            row_input="token_id",
        ),
        KernelSpec("entropy", ENTROPY, ("toplp",), (("entropy", "f4", 1),), row_input="toplp"),
        KernelSpec(
            "repetition",
            REPETITION,
            ("ids", "query", "first"),
            (("match", "u4", 1),),
            row_input="query",
            rows=_repetition_rows,
        ),
        KernelSpec(
            "probes",
            PROBES,
            ("token_id", "table", "probes"),
            (("cosine", "f4", "k"),),
            row_input="token_id",
            resident=("table", "probes"),
        ),
    )
}
