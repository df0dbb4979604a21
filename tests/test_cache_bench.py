"""``neuralpipe bench cache --quick --json`` end to end, and the offline policies on tiny traces."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import orjson
import pytest
from neuralpipe_bench.cache import belady_hits, lru_hits, next_uses


def test_belady_is_optimal_on_a_known_trace_and_lru_is_not():
    trace = np.array([0, 1, 2, 0, 1, 3, 0, 1, 2, 3])
    sizes = np.ones(4, dtype=np.int64)
    # 2 slots: Belady keeps 0 and 1 and bypasses 2 and 3 -> 4 hits; LRU cycles through three keys -> 0
    assert belady_hits(trace, sizes, 2, next_uses(trace)) == 4
    assert lru_hits(trace, sizes, 2) < 4


def test_belady_never_admits_what_does_not_fit():
    trace = np.array([0, 1, 0, 1])
    assert belady_hits(trace, np.array([5, 3]), 4, next_uses(trace)) == 1


@pytest.mark.timeout(120)
def test_bench_cache_quick_json():
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "cache", "--quick", "--json"], capture_output=True, timeout=110
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-4000:]
    result = orjson.loads(out.stdout)
    assert result["benchmark"] == "cache"
    for row in result["hit_ratio"]:
        assert 0 < row["lru_hit_ratio"] <= row["belady_hit_ratio"] < 1
    miss, hit = result["ttft"]["rows"]
    assert (miss["case"], hit["case"]) == ("miss", "hit")
    # a repeat whose lookup timed out on a loaded machine is a miss: counted, never a hit sample
    assert miss["streams"] + hit["streams"] == 8 and hit["streams"] == result["ttft"]["cache"]["hits"] >= 1
    assert all(isinstance(t["met"], bool) for t in result["targets"])
