"""``neuralpipe bench ingest --quick --json`` end to end: a real engine, real HTTP, one JSON object."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest


@pytest.mark.timeout(180)
def test_bench_ingest_quick_json():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "bench",
            "ingest",
            "--quick",
            "--json",
            "--decode-steps",
            "--sched-policy",
            "normal",
        ],
        capture_output=True,
        timeout=170,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-4000:]
    result = orjson.loads(out.stdout)
    assert result["benchmark"] == "ingest" and result["machine"]["cores"] >= 1
    assert result["settings"]["decode_steps"] is True  # the paced upstream on one clock
    assert result["settings"]["sched_policy"] == "normal"
    assert [r["streams"] for r in result["unpaced"]] == [1, 100, 1000]
    for row in result["unpaced"]:
        assert row["tokens"] == row["streams"] * row["tokens_per_stream"]
        assert row["overall_tokens_per_s"] > 0
    assert [r["streams"] for r in result["paced"]] == [100]
    assert all(r["latency_p99_us"] >= r["latency_p50_us"] > 0 for r in result["paced"])
    assert result["cpu_runs"] == [result["cpu"]] and result["cpu"]["ingest_cpu_us_per_token"] > 0  # --quick: one run
    assert result["settings"]["heartbeat_s"] == 0.5  # the engine's default: what a deployment pays
    assert result["sink"]["gaps"] == 0 and result["sink"]["duplicates"] == 0
    assert {t["target"] for t in result["targets"]} and all(isinstance(t["met"], bool) for t in result["targets"])
