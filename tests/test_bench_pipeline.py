"""``neuralpipe bench pipeline --quick --json`` end to end: the full topology over each transport,
a consumer that must receive every token, one JSON object in the issue's shape."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from neuralpipe_bench import pipeline


@pytest.mark.timeout(240)
def test_bench_pipeline_quick_json():
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "pipeline", "--quick", "--json"],
        capture_output=True,
        timeout=230,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-4000:]
    result = orjson.loads(out.stdout)
    assert result["benchmark"] == "pipeline"
    streams = [streams for streams, _ in pipeline.QUICK.unpaced]
    assert [(r["transport"], r["streams"]) for r in result["rows"]] == [
        (t, s) for t in pipeline.TRANSPORTS for s in streams
    ]
    for row in result["rows"] + result["paced"]:
        assert {"transport", "streams", "tokens_per_s", "p50_us", "p99_us", "p999_us"} <= set(row)
        assert row["tokens_per_s"] > 0 and row["p999_us"] >= row["p99_us"] >= row["p50_us"] > 0
    assert [r["transport"] for r in result["paced"]] == list(pipeline.TRANSPORTS)
    assert {(r["versus"], r["streams"]) for r in result["ratios"]} == {
        (t, s) for t in ("queue", "zmq") for s in streams
    }
    assert len(result["targets"]) == 3 and all(isinstance(t["met"], bool) for t in result["targets"])


def test_unknown_transport_is_refused():
    with pytest.raises(Exception, match="unknown transport"):
        pipeline.main(quick=True, transports=("pipe",))


def test_ratios_and_targets_from_rows():
    rows = [
        {"transport": "shm", "streams": 1, "tokens_per_s": 300},
        {"transport": "queue", "streams": 1, "tokens_per_s": 100},
        {"transport": "zmq", "streams": 1, "tokens_per_s": 150},
    ]
    ratios = pipeline.ratios(rows)
    assert ratios == [
        {"streams": 1, "versus": "queue", "shm_over": 3.0},
        {"streams": 1, "versus": "zmq", "shm_over": 2.0},
    ]
    paced = [{"transport": "shm", "offered_tokens_per_s": pipeline.PACED_TOKENS_PER_S, "p99_us": 1500.0}]
    met = {t["target"]: t["met"] for t in pipeline.targets({"rows": rows, "paced": paced, "ratios": ratios})}
    assert list(met.values()) == [False, True, True]  # 300 tokens/s < 200k; p99 < 2 ms; 3.0x >= 3x
