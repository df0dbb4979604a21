"""A frame far past a socket's message limit is never buffered: the sender is cut off (ZMQ_MAXMSGSIZE),
while a frame a little over the limit still gets a clear rejection, and other clients go on."""

from __future__ import annotations

import orjson
import pytest
import zmq
from engine_harness import full_config

from engine.clients.requests import RequestClient
from engine.protocol.requests import MAX_REQUEST_BYTES, ingest_endpoint

pytestmark = pytest.mark.timeout(60)


def test_a_huge_frame_is_dropped_a_large_one_rejected_and_others_served(start_engine):
    engine = start_engine(full_config())
    endpoint = ingest_endpoint(engine.info()["runtime_dir"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"1", b"x" * (MAX_REQUEST_BYTES + 10)])  # over the limit: a clear answer
        assert sock.poll(10_000)
        tag, reply = sock.recv_multipart()
        assert tag == b"1" and "exceeds" in orjson.loads(reply)["reason"]
        sock.send_multipart([b"2", b"x" * (8 * MAX_REQUEST_BYTES)])  # far over: cut off, no answer
        assert not sock.poll(1000)
    finally:
        sock.close(0)
    with RequestClient(endpoint) as client:  # everyone else is still served
        assert client.submit({"messages": [{"role": "user", "content": "still here"}], "max_tokens": 2}) > 0
    assert engine.worker("ingest")["restarts"] == 0
