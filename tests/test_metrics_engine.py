"""/metrics of a running engine under load: every stage's tokens and latency, streams by outcome,
the upstream's series, cache and broadcast counters, each worker's CPU and memory, build and
worker info; counters that survive a worker's restart; promtool accepts the scrape; `neuralpipe
status` shows upstream health."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
from engine_harness import chat, full_config, wait_for
from prometheus_client.parser import text_string_to_metric_families

from engine.clients.consumer import StreamConsumer
from engine.clients.requests import RequestClient
from engine.protocol.requests import ingest_endpoint
from engine.telemetry import METRICS

pytestmark = pytest.mark.timeout(180)
STAGES = ("ingest", "compute", "cache", "broadcast")
WORKERS = ("ingest", "compute", "cache", "broadcast")


def scrape(engine) -> str:
    info = engine.info()
    with urllib.request.urlopen(f"http://{info['metrics_host']}:{info['metrics_port']}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels without engine) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "engine"))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def run_streams(engine, bodies: list[dict]) -> None:
    """Submit ``bodies`` and wait until every stream has ended at the broadcast."""
    rd = engine.info()["runtime_dir"]
    with StreamConsumer.for_engine(rd) as consumer, RequestClient(ingest_endpoint(rd)) as client:
        assert consumer.join(10)
        sids = {client.submit(body) for body in bodies}
        for message in consumer.messages(idle_timeout_s=15):
            if message.type in ("end", "error"):
                sids.discard(message.stream)
                if not sids:
                    return
    raise AssertionError(f"streams {sorted(sids)} never ended")


def test_a_loaded_engine_shows_what_an_operator_needs(start_engine):
    engine = start_engine(full_config(rate=2000))
    repeated = chat("asked twice", 20)
    run_streams(engine, [chat(f"load {i}", 30, temperature=0.7) for i in range(8)] + [repeated])
    wait_for(lambda: engine.worker("ingest")["stats"].get("completed") == 9, 10, "ingest's 9 completed streams")
    run_streams(engine, [repeated])  # a cache hit

    def complete() -> dict | None:
        found = samples(scrape(engine))
        ok = all(value(found, "neuralpipe_tokens_total", stage=s) >= 260 for s in ("ingest", "compute", "broadcast"))
        ok &= value(found, "neuralpipe_streams_total", outcome="cache_hit") == 1
        # the cache's own count comes with the cache worker's heartbeat, not ingest's
        ok &= value(found, "neuralpipe_cache_hits_total") == 1
        ok &= all(value(found, "neuralpipe_worker_cpu_seconds_total", worker=w) > 0 for w in WORKERS)
        return found if ok else None

    found = wait_for(complete, 15, "every stage's tokens, the cache hit and the workers' CPU on /metrics", 0.2)
    # tokens per stage: 8 x 30 + 20 from the upstream; the cache hit's 20 are replayed by the cache
    assert value(found, "neuralpipe_tokens_total", stage="ingest") == 260
    assert value(found, "neuralpipe_tokens_total", stage="compute") == 260
    assert value(found, "neuralpipe_tokens_total", stage="cache") == 260
    assert value(found, "neuralpipe_tokens_total", stage="broadcast") == 280
    for stage in STAGES:
        count = value(found, "neuralpipe_stage_latency_seconds_count", stage=stage)
        assert count >= 260, stage
        assert value(found, "neuralpipe_stage_latency_seconds_bucket", stage=stage, le="+Inf") == count
        assert 0 < value(found, "neuralpipe_stage_latency_seconds_sum", stage=stage) < count * 10, stage
    assert value(found, "neuralpipe_streams_total", outcome="completed") == 9
    assert value(found, "neuralpipe_streams_total", outcome="error") == 0
    assert value(found, "neuralpipe_streams_active") == 0
    # the embedded upstream: one request per stream that went upstream, none failed
    assert value(found, "neuralpipe_upstream_up", upstream="embedded") == 1
    assert value(found, "neuralpipe_upstream_requests_total", upstream="embedded") == 9
    assert value(found, "neuralpipe_time_to_first_token_seconds_count", upstream="embedded") == 9
    assert value(found, "neuralpipe_upstream_in_flight", upstream="embedded") == 0
    assert not any(name == "neuralpipe_upstream_errors_total" for name, _ in found)
    assert value(found, "neuralpipe_cache_hits_total") == 1 and value(found, "neuralpipe_cache_misses_total") >= 1
    assert value(found, "neuralpipe_cache_entries") >= 1 and value(found, "neuralpipe_cache_bytes") > 0
    assert value(found, "neuralpipe_broadcast_messages_total") > 0
    assert value(found, "neuralpipe_broadcast_gap_refills_total") >= 2  # each consumer's catch-up on joining
    for worker in WORKERS:
        assert value(found, "neuralpipe_worker_resident_memory_bytes", worker=worker) > 10 << 20
    build = [labels for name, labels in found if name == "neuralpipe_build_info"]
    assert len(build) == 1 and dict(build[0])["python"] == ".".join(map(str, sys.version_info[:3]))
    info = {dict(labels)["worker"]: dict(labels) for name, labels in found if name == "neuralpipe_worker_info"}
    assert set(info) == set(WORKERS)
    assert info["compute"]["stage"] == "compute" and info["compute"]["backend"] == "numpy"
    # every family of the registry is described, even those without a sample (the gateway's here)
    text = scrape(engine)
    for name, metric in METRICS.items():
        family = name.removesuffix("_total") if metric.kind == "counter" else name
        assert f"# TYPE {name} " in text or f"# TYPE {family} " in text, name

    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    elif os.environ.get("CI"):
        pytest.fail("promtool is missing in CI: tools/test.sh installs it (Debian package prometheus)")

    # `neuralpipe status` shows upstream health, as text and as JSON
    status = [sys.executable, "-m", "engine.cli", "status"]
    reply = json.loads(subprocess.run([*status, "--json"], env=engine.env(), capture_output=True, check=True).stdout)
    (upstream,) = reply["upstreams"]
    assert upstream["name"] == "embedded" and upstream["up"] is True and upstream["requests"] == 9
    assert upstream["errors"] == 0 and upstream["in_flight"] == 0 and upstream["ttft_p50_s"] > 0
    shown = subprocess.run(status, env=engine.env(), capture_output=True, check=True, text=True).stdout
    line = next(line for line in shown.splitlines() if line.startswith("embedded"))
    assert line.split()[:4] == ["embedded", "up", "0", "9"], shown
    assert engine.stop() == 0


def test_counters_survive_a_worker_restart(start_engine):
    engine = start_engine(full_config(rate=2000))
    run_streams(engine, [chat(f"before {i}", 25, temperature=0.7) for i in range(4)])
    before = wait_for(
        lambda: (v := value(samples(scrape(engine)), "neuralpipe_tokens_total", stage="compute")) == 100 and v,
        15,
        "compute's 100 tokens on /metrics",
        0.2,
    )
    cpu_before = value(samples(scrape(engine)), "neuralpipe_worker_cpu_seconds_total", worker="compute")
    os.kill(engine.worker("compute")["pid"], signal.SIGKILL)
    wait_for(lambda: (w := engine.worker("compute"))["restarts"] == 1 and w["ready"], 15, "compute restarted")
    run_streams(engine, [chat(f"after {i}", 25, temperature=0.7) for i in range(2)])
    found = wait_for(
        lambda: (f := samples(scrape(engine))) and value(f, "neuralpipe_tokens_total", stage="compute") >= 150 and f,
        15,
        "compute's tokens after its restart",
        0.2,
    )
    # counted across both processes: what the dead one counted is kept (a counter never goes back)
    assert before == 100 and value(found, "neuralpipe_tokens_total", stage="compute") == 150
    assert value(found, "neuralpipe_stage_latency_seconds_count", stage="compute") >= 150
    assert value(found, "neuralpipe_worker_cpu_seconds_total", worker="compute") >= cpu_before
    assert value(found, "neuralpipe_worker_restarts_total", worker="compute") == 1
    assert engine.stop() == 0
