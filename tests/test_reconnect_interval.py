"""Clients of a restartable worker retry its endpoint every 10 ms, not zmq's default 100 ms: a
restarted broadcast or ingest binds again within its start-up, and the clients' retry interval
was the largest part of "flowing again" after a broadcast restart (docs/recovery.md; issue 12
item 8). Checked on the real sockets the clients create, without asserting any timing."""

from __future__ import annotations

from pathlib import Path

import zmq

from engine.clients.consumer import StreamConsumer
from engine.clients.requests import RequestClient


def test_consumer_sockets_retry_a_restarted_broadcast_every_10_ms(tmp_path: Path) -> None:
    # nothing listens there: connecting is enough, zmq retries in the background
    consumer = StreamConsumer(f"ipc://{tmp_path}/b.sock", f"ipc://{tmp_path}/s.sock", engine_timeout_s=None)
    try:
        assert consumer.sub.getsockopt(zmq.RECONNECT_IVL) == 10
        assert consumer.snap.getsockopt(zmq.RECONNECT_IVL) == 10
    finally:
        consumer.close()


def test_request_client_retries_a_restarted_ingest_every_10_ms(tmp_path: Path) -> None:
    client = RequestClient(f"ipc://{tmp_path}/ingest.sock", timeout_s=0.1)
    try:
        assert client._dealer._sock.getsockopt(zmq.RECONNECT_IVL) == 10
    finally:
        client.close()
