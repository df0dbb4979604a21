"""The cache stage in a real engine: ingest (embedded upstream over HTTP) -> cache -> verifying
sink, requests through ingest's ROUTER, operator commands through the cache's ROUTER."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest
from engine_harness import Engine, wait_for

from engine.clients.cache import CacheClient
from engine.clients.requests import RequestClient
from engine.protocol.cache import socket_path
from engine.protocol.requests import ingest_endpoint

TOKENS = 20
ROWS = TOKENS + 2  # START, tokens, END

CONFIG = """
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 1.0

[supervisor]
backoff_initial_s = 0.01

[workers.ingest]
stage = "ingest"
outputs = ["ingest-cache"]
params.embedded = {{ tokens_per_s = 0 }}

[workers.cache]
stage = "cache"
inputs = ["ingest-cache"]
outputs = ["cache-sink"]
params = {{ {cache} }}

[workers.sink]
stage = "verify"
inputs = ["cache-sink"]
params = {{ streams = 10000 }}
"""


@pytest.fixture
def engine(tmp_path, instance):
    engines: list[Engine] = []

    def start(cache_params: str = "") -> Engine:
        e = Engine(tmp_path, CONFIG.format(cache=cache_params), instance).start()
        engines.append(e)
        return e

    yield start
    for e in engines:
        e.stop()
        e.kill_all()


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}


def stats(e: Engine, worker: str) -> dict:
    return e.worker(worker)["stats"]


def run(e: Engine, text: str, n: int) -> dict:
    """Submit the engine's ``n``-th request and wait until the sink has it whole; ingest's stats
    once they count it (stats come with heartbeats)."""
    with RequestClient(ingest_endpoint(e.info()["runtime_dir"])) as c:
        c.submit(chat(text))
    wait_for(lambda: stats(e, "sink").get("messages", 0) >= n * ROWS, 20, f"the stream of {text!r} at the sink")
    return wait_for(
        lambda: (s := stats(e, "ingest")).get("completed", 0) + s.get("cache_hits", 0) >= n and s, 10, "ingest stats"
    )


def stored(e: Engine, n: int) -> dict:
    return wait_for(lambda: (s := stats(e, "cache")).get("collected", 0) >= n and s, 10, f"{n} streams stored")


def cache_client(e: Engine) -> CacheClient:
    return CacheClient(socket_path(e.info()["runtime_dir"], "cache"))


@pytest.mark.timeout(90)
def test_repeats_hit_and_never_reach_the_upstream_lru_evicts_by_bytes_ttl_expires(engine):
    e = engine("max_bytes = 5000, ttl_s = 3.0, snapshot_path = ''")
    first = run(e, "alpha", 1)
    assert first["tokens"] == TOKENS and first.get("cache_misses") == 1
    stored(e, 1)
    again = run(e, "alpha", 2)  # replayed by the cache: ingest fetched no token
    assert again["tokens"] == TOKENS and again["cache_hits"] == 1
    with cache_client(e) as client:  # asked directly: heartbeat stats may be a beat behind
        cache = client.stats()
    assert cache["hits"] == 1 and cache["replays"] == 1 and cache["replay_rows"] == ROWS
    one_entry = cache["bytes"]
    assert 2 * one_entry <= 5000 < 3 * one_entry  # the budget holds two of these streams
    run(e, "beta", 3)
    run(e, "gamma", 4)  # a third entry: "alpha", the least recently used, is evicted
    cache = stored(e, 3)
    assert cache["entries"] == 2 and cache["evictions"] == 1 and cache["bytes"] <= 5000
    assert run(e, "alpha", 5)["tokens"] == 2 * TOKENS + TOKENS + TOKENS  # a miss again
    # TTL: after ttl_s the entries are gone; a repeat goes upstream
    wait_for(lambda: stats(e, "cache")["entries"] == 0, 10, "entries to expire")
    assert run(e, "gamma", 6)["tokens"] == 5 * TOKENS
    sink = stats(e, "sink")
    assert sink["gaps"] == 0 and sink["duplicates"] == 0 and sink["messages"] == 6 * ROWS


@pytest.mark.timeout(120)
def test_snapshot_survives_a_killed_cache_and_an_engine_restart_and_a_corrupt_one_is_skipped(engine, tmp_path):
    e = engine("snapshot_interval_s = 0.2")
    run(e, "persist me", 1)
    stored(e, 1)
    wait_for(lambda: stats(e, "cache").get("snapshots", 0) >= 1, 10, "a periodic snapshot")
    os.kill(e.worker("cache")["pid"], signal.SIGKILL)
    wait_for(lambda: (w := e.worker("cache"))["restarts"] == 1 and w["state"] == "running", 20, "cache restarted")
    assert stats(e, "cache").get("restored") == 1
    assert run(e, "persist me", 2)["cache_hits"] == 1
    # the whole engine: stopped (a snapshot on stop), started again on the same runtime base
    with cache_client(e) as c:
        assert c.stats()["entries"] == 1
    assert e.stop() == 0
    e2 = engine("snapshot_interval_s = 0.2")
    ingest = run(e2, "persist me", 1)
    assert ingest["cache_hits"] == 1 and ingest["tokens"] == 0
    snapshot = os.path.join(str(tmp_path / "run"), "cache.cache-snapshot")
    assert os.path.isfile(snapshot)
    assert e2.stop() == 0
    with open(snapshot, "r+b") as f:  # flip bytes in the middle: the checksum no longer matches
        f.seek(100)
        f.write(b"\xff" * 16)
    e3 = engine("snapshot_interval_s = 0.2")
    cache = wait_for(lambda: stats(e3, "cache") or None, 10, "cache stats")
    assert cache["snapshot_errors"] == 1 and cache["entries"] == 0
    assert "cache_snapshot_skipped" in e3.log() and "checksum" in e3.log()
    assert run(e3, "persist me", 1)["tokens"] == TOKENS  # it still works, from the upstream


@pytest.mark.timeout(90)
def test_a_snapshot_never_answers_for_another_upstream(tmp_path, instance):
    """Engines sharing a runtime base share the cache snapshot: an engine whose upstream serves
    other models must not replay the first engine's answer as ``cached: true``."""
    first = Engine(tmp_path, CONFIG.format(cache="snapshot_interval_s = 0"), instance).start()
    try:
        run(first, "same prompt", 1)
        stored(first, 1)
    finally:
        assert first.stop() == 0
    other = CONFIG.format(cache="snapshot_interval_s = 0").replace(
        "tokens_per_s = 0 }", 'tokens_per_s = 0, models = ["another-model"] }'
    )
    second = Engine(tmp_path, other, instance + "b").start()
    try:
        # the snapshot was there to be misused
        wait_for(lambda: stats(second, "cache").get("restored") == 1, 10, "the shared snapshot restored")
        ingest = run(second, "same prompt", 1)
        assert ingest.get("cache_hits", 0) == 0 and ingest["tokens"] == TOKENS
    finally:
        second.stop()
        second.kill_all()


@pytest.mark.timeout(60)
def test_cache_cli_stats_snapshot_clear(engine):
    e = engine()
    run(e, "cli", 1)
    stored(e, 1)

    def cli(*args: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "engine.cli", "cache", *args, "--json"], env=e.env(), capture_output=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return orjson.loads(out.stdout)

    assert cli("stats")["entries"] == 1
    snap = cli("snapshot")
    assert snap["entries"] == 1 and os.path.isfile(snap["path"])
    assert cli("clear")["entries"] == 1
    assert cli("stats")["entries"] == 0
