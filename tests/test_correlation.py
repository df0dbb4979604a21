"""Request/reply correlation: a reply that arrives after its call timed out is never taken as the
answer to the next call (it once made ``submit`` return the previous request's stream id)."""

from __future__ import annotations

import threading

import orjson
import pytest
import zmq

from engine.clients.correlation import split_request
from engine.clients.requests import RequestClient
from engine.protocol.requests import RequestError


def _late_then_prompt_server(endpoint: str, ready: threading.Event, done: threading.Event) -> None:
    """A ROUTER that answers its first request only once the second has come, then both."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    ready.set()
    held = []
    try:
        while not done.is_set() and len(held) < 2:
            if router.poll(50):
                held.append(split_request(router.recv_multipart()))
        for n, (envelope, body) in enumerate(held):  # the late reply first, then the prompt one
            answer = {"type": "accepted", "stream_id": 100 + n, "body": orjson.loads(body)["body"]["max_tokens"]}
            router.send_multipart([*envelope, orjson.dumps(answer)])
        done.wait(5)
    finally:
        router.close(0)


@pytest.mark.timeout(30)
def test_a_late_reply_is_not_the_answer_to_the_next_call(tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/ingest.sock"
    ready, done = threading.Event(), threading.Event()
    server = threading.Thread(target=_late_then_prompt_server, args=(endpoint, ready, done), daemon=True)
    server.start()
    assert ready.wait(5)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    try:
        with RequestClient(endpoint, timeout_s=0.3) as client:
            with pytest.raises(TimeoutError):
                client.submit({**body, "max_tokens": 1})
            # the first call's reply (stream 100) comes now, just before this call's own (101)
            assert client.submit({**body, "max_tokens": 2}) == 101
    finally:
        done.set()
        server.join(5)


def test_split_request_accepts_bare_and_tagged_requests_only() -> None:
    assert split_request([b"who", b"{}"]) == ([b"who"], b"{}")
    assert split_request([b"who", b"7", b"{}"]) == ([b"who", b"7"], b"{}")
    assert split_request([b"who", b"x" * 17, b"{}"]) is None  # an id is short
    assert split_request([b"who"]) is None and split_request([b"who", b"1", b"2", b"3"]) is None


def test_a_rejection_still_reaches_the_caller(tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/r.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    raised: list[Exception] = []

    def cancel(client: RequestClient) -> None:
        try:
            client.cancel(5)
        except RequestError as exc:
            raised.append(exc)

    try:
        with RequestClient(endpoint, timeout_s=5) as client:
            sender = threading.Thread(target=cancel, args=(client,), daemon=True)
            sender.start()
            assert router.poll(5000)
            envelope, _ = split_request(router.recv_multipart())
            router.send_multipart([*envelope, orjson.dumps({"type": "rejected", "reason": "no active stream 5"})])
            sender.join(5)
        assert [str(e) for e in raised] == ["no active stream 5"]
    finally:
        router.close(0)
