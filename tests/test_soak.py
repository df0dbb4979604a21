"""Soak: many short chats through a real engine (embedded upstream -> ingest -> compute -> cache ->
broadcast), back to back. Once the bounded parts are full (the broadcast's retention, the cache,
the memos), no worker's memory grows with the number of streams. Running an engine like this
found four bounds that did not hold (docs/wire-format.md "Snapshots", docs/cache.md).

The default run is short (STREAMS chats, ~20 s); a long one on demand:
``NEURALPIPE_SOAK_STREAMS=300000 python3 -m pytest tests/test_soak.py``.
"""

from __future__ import annotations

import os

import orjson
import pytest
import zmq
from engine_harness import chat, full_config, wait_for

from engine.protocol.requests import ingest_endpoint

STREAMS = int(os.environ.get("NEURALPIPE_SOAK_STREAMS", "24000"))
IN_FLIGHT = 250  # chats submitted before waiting for them to complete
BOUND = 4 << 20  # the broadcast's retention and the cache's budget: full within the warm-up
SLACK_MIB = 12  # what a worker may still grow by over the last third (allocator, interpreter caches)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90 + STREAMS // 150)]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_memory_stays_flat_over_many_short_chats(start_engine):
    engine = start_engine(
        full_config(
            cache=f'params.max_bytes = {BOUND}\nparams.snapshot_path = ""',
            broadcast=f"params.retention_bytes = {BOUND}",
        )
    )
    pids = {w["name"]: w["pid"] for w in engine.status()["workers"]}
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ingest_endpoint(engine.info()["runtime_dir"]))
    submitted = 0

    def run(chats: int) -> dict[str, float]:
        """``chats`` more deterministic chats of 4 tokens (each stored by the cache), every one
        complete; then each worker's RSS."""
        nonlocal submitted
        for _ in range(chats // IN_FLIGHT):
            for _ in range(IN_FLIGHT):
                body = chat(f"soak {submitted}", max_tokens=4)  # temperature 0: every one cached
                sock.send(orjson.dumps({"type": "submit", "body": body}))
                submitted += 1
            for _ in range(IN_FLIGHT):
                assert sock.poll(10_000), "ingest did not answer a submit"
                assert orjson.loads(sock.recv())["type"] == "accepted"
            wait_for(
                lambda total=submitted: engine.worker("ingest")["stats"].get("completed", 0) >= total,
                30,
                "the chats to complete",
            )
        return {name: _rss_mib(pid) for name, pid in pids.items()}

    try:
        run(STREAMS // 3)  # warm-up: the bounded parts fill
        middle = run(STREAMS // 3)
        last = run(STREAMS // 3)
    finally:
        sock.close(0)
    cache = engine.worker("cache")["stats"]
    broadcast = engine.worker("broadcast")["stats"]
    assert cache["evictions"] > 0 and broadcast["evicted"] > 0  # both bounds were reached
    assert cache["bytes"] <= BOUND and broadcast["retained_bytes"] <= BOUND
    grown = {name: round(last[name] - middle[name], 1) for name in last}
    assert all(mib <= SLACK_MIB for mib in grown.values()), f"MiB grown over the last {STREAMS // 3} chats: {grown}"
    assert engine.worker("ingest")["stats"]["errors"] == 0
