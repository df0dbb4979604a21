"""Many distinct clients (issue 13 item 9): what ingest keeps per client stays bounded. 200
distinct 1 MB client names took ingest from 60 to 267 MB RSS, kept; names are now at most 256
bytes and the per-client maps drop idle entries (KeyedBuckets' max_keys, 10,000)."""

from __future__ import annotations

import orjson
import pytest
import zmq
from engine_harness import Engine, chat, wait_for

from engine.protocol.requests import MAX_CLIENT_BYTES, ingest_endpoint

CONFIG = """
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 1.0

[workers.ingest]
stage = "ingest"
outputs = ["ingest-sink"]
params.embedded = { tokens_per_s = 0 }
params.max_streams = 4096

[workers.sink]
stage = "verify"
inputs = ["ingest-sink"]
params = { streams = 100000 }
"""
CLIENTS = 10_500


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.timeout(240)
def test_ten_thousand_distinct_clients_keep_ingest_bounded(tmp_path, instance):
    e = Engine(tmp_path, CONFIG, instance).start()
    try:
        ingest = e.worker("ingest")
        rss_before = rss_kib(ingest["pid"])
        body = chat("x", max_tokens=1)
        accepted = 0
        with zmq.Context.instance().socket(zmq.DEALER) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ingest_endpoint(e.info()["runtime_dir"]))
            for first in range(0, CLIENTS, 200):  # a window of 200 requests in flight
                for i in range(first, min(first + 200, CLIENTS)):
                    client = f"{i:08d}".ljust(MAX_CLIENT_BYTES, "c")  # the longest name allowed
                    sock.send_multipart([b"%d" % i, orjson.dumps({"type": "submit", "body": body, "client": client})])
                for _ in range(first, min(first + 200, CLIENTS)):
                    assert sock.poll(10_000), "no answer from ingest"
                    accepted += orjson.loads(sock.recv_multipart()[-1])["type"] == "accepted"
        assert accepted == CLIENTS
        stats = wait_for(
            lambda: (s := e.worker("ingest")["stats"]).get("completed", 0) >= CLIENTS and s, 120, "every stream done"
        )
        # two bucket maps of at most 10,000 keys each; the queue map empties with the streams
        assert stats["clients_tracked"] <= 2 * 10_000
        assert e.worker("ingest")["restarts"] == 0
        grown_mib = (rss_kib(ingest["pid"]) - rss_before) / 1024
        assert grown_mib < 64, f"ingest grew {grown_mib:.0f} MiB for {CLIENTS} clients"
    finally:
        e.stop()
        e.kill_all()
