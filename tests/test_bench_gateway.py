"""``neuralpipe bench gateway --quick --json`` end to end (a real engine with its gateway, the embedded
upstream over real HTTP, the load generator in its own process), and the embedded upstream's
``stamp_tokens`` that the benchmark reads per-token latency from. Shapes only, never speed."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import orjson
import pytest

from bench.gateway import _medians
from bench.gateway_load import Tally
from stages.ingest.upstream_server import UpstreamServerConfig, serve_in_process


def test_upstream_stamps_each_token_with_its_send_time():
    proc, url = serve_in_process(UpstreamServerConfig(tokens_per_s=200.0, stamp_tokens=True))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True, "stream": True}
        began = time.monotonic_ns()
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            events = answer.read().split(b"\n\n")
        ended = time.monotonic_ns()
    finally:
        proc.terminate()
        proc.join(10)
    chunks = [orjson.loads(e[6:]) for e in events if e.startswith(b"data: {")]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    stamps = [int(t) for t in texts if t]  # the role chunk's "" and the finish chunk's None carry none
    assert len(stamps) == 5 and all(t.endswith(" ") for t in texts if t)
    assert began <= stamps[0] <= stamps[-1] <= ended and stamps == sorted(stamps)


def test_steady_state_is_what_came_once_every_stream_had_its_first_token():
    tally = Tally(streams=2)
    tally.latency_ns, tally.received_ns = [50, 60, 70, 80], [100, 200, 300, 400]
    tally.started_ns = [100, 300]  # the second stream's first token came at 300
    assert tally.steady_latency_ns() == [70, 80]
    tally.started_ns = [100]  # a stream that never had a token: no steady state
    assert tally.steady_latency_ns() == []


def test_a_load_repeated_counts_every_repeat_s_tokens_and_takes_the_median_figures():
    rows = [
        {"target": "gateway", "streams": 100, "repeat": i, "tokens": 10, "steady_tokens": n, "token_steady_p99_us": p}
        for i, (n, p) in enumerate(((7, 3.0), (8, 1.0), (9, 2.0)))
    ]
    (merged,) = _medians(rows)
    assert merged["tokens"] == 30 and merged["steady_tokens"] == 24 and merged["token_steady_p99_us"] == 2.0


def _quick(*args: str) -> dict:
    """``neuralpipe bench gateway --quick --json`` with ``args``: its JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "gateway", "--quick", "--json", *args],
        capture_output=True,
        timeout=140,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-4000:]
    return orjson.loads(out.stdout)


@pytest.mark.timeout(150)
def test_bench_gateway_quick_json():
    result = _quick("--flush-ms", "0.5", "--sched-policy", "normal")
    assert result["benchmark"] == "gateway" and result["machine"]["cores"] >= 1
    assert result["settings"]["flush_ms"] == 0.5  # ingest's window, as the engine was given it
    assert result["settings"]["sched_policy"] == "normal"
    assert result["litellm"] == {"available": False, "reason": "skipped (--quick)", "version": None}
    rows = result["rows"]
    assert [(r["target"], r["streams"]) for r in rows] == [(t, n) for n in (1, 10) for t in ("direct", "gateway")]
    for row in rows:
        assert row["errors"] == 0 and row["cache_hits"] == 0, row["error_samples"]
        assert row["tokens"] == row["tokens_expected"] > 0
        assert row["requests"] == {1: 2, 10: 10}[row["streams"]]  # QUICK: 1 stream x 2 requests, 10 x 1
        assert 0 < row["token_p50_us"] <= row["token_p99_us"] <= row["token_p999_us"]
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert 0 < row["steady_tokens"] <= row["tokens"]
        assert 0 < row["token_steady_p50_us"] <= row["token_steady_p99_us"]
        assert {"added_token_p50_us", "added_token_p99_us", "added_ttft_p50_ms", "proxy_cpu_us_per_token"} <= set(row)
    direct, gateway = rows[2], rows[3]
    assert direct["proxy_cpu_us_per_token"] == 0 and direct["added_token_p99_us"] == 0
    assert all(r["repeats"] == 1 and isinstance(r["kept_up"], bool) for r in rows)
    assert len(result["repeats"]) == len(rows)
    stages = {"gateway", "ingest", "compute", "cache", "broadcast", "supervisor"}
    assert set(gateway["engine_cpu_us_per_token"]) == stages
    assert gateway["gateway_worker_cpu_us_per_token"] == gateway["engine_cpu_us_per_token"]["gateway"]
    assert result["ratios"] == []  # no LiteLLM in a quick run
    assert set(gateway["engine_path"]) >= {"to_broadcast_p50_us", "gateway_worker_p50_us", "gateway_worker_p99_us"}
    assert gateway["engine_path"]["tokens"] == gateway["tokens"]  # the tap saw every token the client got
    assert [t["met"] for t in result["targets"]][3:] == [None, None, None, None]  # LiteLLM's ratios
    assert all(isinstance(t["met"], bool) for t in result["targets"][:3])
    assert result["targets"][1]["value"] == gateway["added_steady_p99_us"]


@pytest.mark.timeout(150)
def test_bench_gateway_quick_through_the_responses_api():
    result = _quick("--api", "responses")
    assert result["settings"]["api"] == "responses"
    gateway = [row for row in result["rows"] if row["target"] == "gateway"]
    assert [row["streams"] for row in gateway] == [1, 10]
    for row in gateway:  # every token's stamp came back through the Responses API's text deltas
        assert row["errors"] == 0 and row["tokens"] == row["tokens_expected"] > 0, row["error_samples"]
        assert 0 < row["token_p50_us"] <= row["token_p99_us"]
