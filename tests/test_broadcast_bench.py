"""``neuralpipe bench broadcast --quick --json`` end to end: a real engine, SUB sockets in spawned
processes, one JSON object with every row and the targets."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest


@pytest.mark.timeout(150)
def test_bench_broadcast_quick_json():
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "broadcast", "--quick", "--json"],
        capture_output=True,
        timeout=140,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-4000:]
    result = orjson.loads(out.stdout)
    assert result["benchmark"] == "broadcast"
    assert [(r["transport"], r["subscribers"]) for r in result["paced"]] == [
        ("ipc", 1), ("ipc", 10), ("tcp", 1), ("tcp", 10)
    ]  # fmt: skip
    for row in result["paced"] + result["unpaced"]:
        assert row["latency_p99_us"] >= row["latency_p50_us"] > 0
        assert row["messages_per_s"] > 0 and row["tokens_per_s"] >= row["messages_per_s"]
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    (egress,) = result["egress"]  # the consumer reading batches(), CPU per token of both processes
    assert egress["reader"] == "batches" and egress["delivered_ratio"] > 0
    assert egress["broadcast_cpu_us_per_token"] > 0 and egress["consumer_cpu_us_per_token"] > 0
