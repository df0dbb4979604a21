"""WGSL compute shaders: one per kernel of :mod:`stages.compute.kernels`, the same math in f32.

Every shader takes a uniform ``Params {n, a, b, c}`` (rows, then two kernel-specific values) and
indexes rows in two dispatch dimensions, so more than 65,535 workgroups fit one dispatch.
"""

WORKGROUP = 64
ROWS_PER_Y = 65535 * WORKGROUP  # rows covered by one step of the dispatch's y dimension

_COMMON = f"""
struct Params {{ n: u32, a: u32, b: u32, c: u32 }};
@group(0) @binding(0) var<uniform> params: Params;

fn row(gid: vec3<u32>) -> u32 {{ return gid.y * {ROWS_PER_Y}u + gid.x; }}

fn is_nan(v: f32) -> bool {{ return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u; }}
"""

# a = order. Outputs the cell centre, exp(logprob) (1 without one) and an RGBA colour packed in a u32.
LAYOUT = (
    _COMMON
    + f"""
@group(0) @binding(1) var<storage, read> token_id: array<u32>;
@group(0) @binding(2) var<storage, read> logprob: array<f32>;
@group(0) @binding(3) var<storage, read_write> xy: array<f32>;
@group(0) @binding(4) var<storage, read_write> conf: array<f32>;
@group(0) @binding(5) var<storage, read_write> rgba: array<u32>;

fn byte(v: f32) -> u32 {{ return u32(round(clamp(v, 0.0, 1.0) * 255.0)); }}

@compute @workgroup_size({WORKGROUP})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let i = row(gid);
    if (i >= params.n) {{ return; }}
    let order = params.a;
    let d = token_id[i] & 0x7fffffffu & ((1u << (2u * order)) - 1u);
    var t = d;
    var x = 0u;
    var y = 0u;
    var s = 1u;
    for (var k = 0u; k < order; k++) {{
        let rx = (t >> 1u) & 1u;
        let ry = (t ^ rx) & 1u;
        if (ry == 0u) {{
            if (rx == 1u) {{ x = s - 1u - x; y = s - 1u - y; }}
            let swap = x; x = y; y = swap;
        }}
        x += s * rx;
        y += s * ry;
        t = t >> 2u;
        s = s << 1u;
    }}
    let side = f32(1u << order);
    xy[2u * i] = (f32(x) + 0.5) / side;
    xy[2u * i + 1u] = (f32(y) + 0.5) / side;
    let lp = logprob[i];
    var c = 1.0;
    if (!is_nan(lp)) {{ c = exp(min(lp, 0.0)); }}
    conf[i] = c;
    let hue = f32(d) / (side * side);
    let shade = 0.35 + 0.65 * c;
    let two_pi = 6.283185307179586;
    let r = (0.5 + 0.5 * cos(two_pi * hue)) * shade;
    let g = (0.5 + 0.5 * cos(two_pi * (hue + 0.33333334))) * shade;
    let b = (0.5 + 0.5 * cos(two_pi * (hue + 0.6666667))) * shade;
    let alpha = 0.25 + 0.75 * c;
    rgba[i] = byte(r) | (byte(g) << 8u) | (byte(b) << 16u) | (byte(alpha) << 24u);
}}
"""
)

# a = k (logprobs per row, NaN-padded). Lower-bound entropy in nats, as kernels.entropy.
ENTROPY = (
    _COMMON
    + f"""
@group(0) @binding(1) var<storage, read> top: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size({WORKGROUP})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let i = row(gid);
    if (i >= params.n) {{ return; }}
    var listed = 0.0;
    var mass = 0.0;
    for (var j = 0u; j < params.a; j++) {{
        let lp = top[i * params.a + j];
        if (!is_nan(lp)) {{
            let p = exp(min(lp, 0.0));
            if (p > 0.0) {{ listed -= p * log(p); }}
            mass += p;
        }}
    }}
    let rest = max(1.0 - mass, 0.0);
    var unlisted = 0.0;
    if (rest > 0.0) {{ unlisted = -rest * log(rest); }}
    out[i] = listed + unlisted;
}}
"""
)

# a = table rows, b = dim, c = k probes (unit vectors). Cosine of each token's embedding row with each probe.
PROBES = (
    _COMMON
    + f"""
@group(0) @binding(1) var<storage, read> token_id: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read> probes: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size({WORKGROUP})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let i = row(gid);
    if (i >= params.n) {{ return; }}
    let dim = params.b;
    let base = (token_id[i] % params.a) * dim;
    var norm = 0.0;
    for (var j = 0u; j < dim; j++) {{ let e = table[base + j]; norm += e * e; }}
    let inv = 1.0 / max(sqrt(norm), 1e-12);
    for (var p = 0u; p < params.c; p++) {{
        var dot = 0.0;
        for (var j = 0u; j < dim; j++) {{ dot += table[base + j] * probes[p * dim + j]; }}
        out[i * params.c + p] = dot * inv;
    }}
}}
"""
)
