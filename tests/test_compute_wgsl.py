"""Each WGSL kernel against its numpy reference on a real Vulkan adapter (Mesa lavapipe on a
machine without a GPU; tools/test.sh installs it), on random inputs of several sizes, including
sizes that are not multiples of the workgroup and calls split over the device limits."""

from __future__ import annotations

import numpy as np
import pytest

from stages.compute import gpu
from stages.compute.backends import NumpyBackend
from stages.compute.shaders import WORKGROUP

SIZES = [1, WORKGROUP - 1, WORKGROUP, 1000, 4 * WORKGROUP + 7]


@pytest.fixture(scope="module")
def vulkan_adapter():
    try:
        adapters = gpu.enumerate_adapters()
    except Exception as exc:  # no wgpu-native library or loader
        pytest.skip(f"wgpu cannot enumerate adapters here: {exc!r}")
    choice = gpu.choose_adapter([dict(a.info) for a in adapters], "wgpu", True, None)
    if choice.backend != "wgpu" or choice.api != "Vulkan":
        pytest.skip("no Vulkan adapter (install mesa-vulkan-drivers libvulkan1 for lavapipe; tools/test.sh does)")
    return adapters[choice.index]


@pytest.fixture(scope="module")
def device(vulkan_adapter):
    return gpu.open_device(vulkan_adapter)


def random_call(kernel: str, n: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """Random inputs (never all zero) and params of one call of ``kernel`` with ``n`` rows."""
    ids = rng.integers(1, 1 << 32, n, dtype=np.uint32)
    if kernel == "layout":
        lp = np.where(rng.random(n) < 0.2, np.nan, -rng.exponential(1.0, n)).astype(np.float32)
        return {"token_id": ids, "logprob": lp}, {"order": int(rng.integers(1, 16))}
    if kernel == "entropy":
        lp = np.where(rng.random((n, 5)) < 0.3, np.nan, np.log(rng.dirichlet(np.ones(5), n))).astype(np.float32)
        return {"toplp": lp}, {"k": 5}
    if kernel == "repetition":
        # several streams of small-alphabet ids (so that n-grams do repeat), each after its context
        ids = rng.integers(1, 4, 3 * n, dtype=np.uint32)
        query = np.sort(rng.choice(3 * n, n, replace=False)).astype(np.uint32)
        first = np.maximum(query.astype(np.int64) - rng.integers(0, 40, n), 0).astype(np.uint32)
        return {"ids": ids, "query": query, "first": first}, {"ngram": 3, "window": 16}
    table = rng.standard_normal((257, 24)).astype(np.float32)
    probes = rng.standard_normal((6, 24)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    return {"token_id": ids, "table": table, "probes": probes}, {"rows": 257, "dim": 24, "k": 6}


def assert_same(kernel: str, got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        assert got[name].dtype == expected.dtype, name
        diff = np.abs(got[name].astype(np.float64) - expected.astype(np.float64))
        tolerance = 1 if expected.dtype == np.uint8 else 0 if expected.dtype == np.uint32 else 1e-5
        assert diff.max(initial=0) <= tolerance, f"{kernel}.{name}: max difference {diff.max()}"


def test_the_vulkan_backend_is_the_one_used(device, vulkan_adapter):
    assert vulkan_adapter.info["backend_type"] == "Vulkan"
    assert device.device.adapter.info["backend_type"] == "Vulkan"


@pytest.mark.parametrize("kernel", ["layout", "entropy", "repetition", "probes"])
@pytest.mark.parametrize("n", SIZES)
def test_wgsl_matches_numpy(device, kernel, n):
    rng = np.random.default_rng(n)
    inputs, params = random_call(kernel, n, rng)
    want = NumpyBackend().run(kernel, inputs, params)
    assert_same(kernel, device.run(kernel, inputs, params), want)


@pytest.mark.parametrize("kernel", ["layout", "entropy", "repetition", "probes"])
def test_calls_over_the_device_limits_are_split(vulkan_adapter, kernel):
    # limits shrunk so that 3,000 rows need many bindings and dispatches (65,535 workgroups of
    # 64 and 128 MiB per binding are the real limits: the same code path, at test sizes)
    binding = 32768 if kernel == "probes" else 4096  # the probes table is bound whole: it must fit
    small = gpu.open_device(vulkan_adapter, max_binding_bytes=binding, max_workgroups=3)
    inputs, params = random_call(kernel, 3000, np.random.default_rng(7))
    before = small.dispatches
    assert_same(kernel, small.run(kernel, inputs, params), NumpyBackend().run(kernel, inputs, params))
    assert small.dispatches - before >= 3000 // (3 * WORKGROUP)


def test_empty_call(device):
    out = device.run("layout", {"token_id": np.zeros(0, np.uint32), "logprob": np.zeros(0, np.float32)}, {"order": 8})
    assert out["hilbert"].shape == (0, 2) and out["rgba"].shape == (0, 4)
