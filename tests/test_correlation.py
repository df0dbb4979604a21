"""Request/reply correlation: a reply that arrives after its call timed out is never taken as the
answer to the next call (it once made ``submit`` return the previous request's stream id)."""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import pytest
import zmq

from engine.clients.correlation import split_request
from engine.clients.requests import RequestClient
from engine.clients.requests_async import AsyncRequestClient
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


@pytest.fixture
def refusing_endpoint():
    """A CURVE server's tcp endpoint: a client without keys fails the handshake, and libzmq then
    drops its DEALER's only pipe, so a blocking send waits for ever (it once wedged the caller)."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    router.curve_server, router.curve_publickey, router.curve_secretkey = True, public, secret
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    router.close(0)


@pytest.mark.timeout(30)
def test_a_call_that_cannot_be_sent_times_out(refusing_endpoint) -> None:
    with RequestClient(refusing_endpoint, timeout_s=0.3) as client:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=r"ingest did not answer 'submit' within 0\.3 s"):
                client.submit({"messages": [{"role": "user", "content": "hi"}]})
            assert time.monotonic() - started < 2


@pytest.mark.timeout(30)
def test_an_async_call_that_cannot_be_sent_times_out(refusing_endpoint) -> None:
    async def calls() -> None:
        client = AsyncRequestClient(refusing_endpoint, timeout_s=0.3)
        client.start()
        try:
            for _ in range(3):
                with pytest.raises(TimeoutError, match=r"ingest did not answer 'submit' within 0\.3 s"):
                    await asyncio.wait_for(client.submit({"messages": [{"role": "user", "content": "hi"}]}), 2)
        finally:
            await client.close()

    asyncio.run(calls())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_submit_carries_the_deadline_its_client_waits_until(tmp_path, kind) -> None:
    endpoint = f"ipc://{tmp_path}/r.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    sent = time.monotonic_ns()

    async def submit_async() -> None:
        client = AsyncRequestClient(endpoint, timeout_s=0.5)
        client.start()
        try:
            with pytest.raises(TimeoutError):
                await client.submit(body)
        finally:
            await client.close()

    try:
        if kind == "sync":
            with RequestClient(endpoint, timeout_s=0.5) as client, pytest.raises(TimeoutError):
                client.submit(body)
        else:
            asyncio.run(submit_async())
        assert router.poll(1000)
        _, request = split_request(router.recv_multipart())
        deadline = orjson.loads(request)["deadline_ns"]
        assert sent + 0.5e9 <= deadline <= time.monotonic_ns()
    finally:
        router.close(0)


def _accept_late_then_take_the_cancel(router: zmq.Socket) -> dict:
    """Answer the submit that waits in ``router`` (its caller gave up on it) with an acceptance; the
    first request after it that is not a submit (the cancel), or {} when none came within 3 s."""
    envelope, _ = split_request(router.recv_multipart())
    accepted = {"type": "accepted", "stream_id": 42, "cancel_token": "t0k"}
    router.send_multipart([*envelope, orjson.dumps(accepted)])
    deadline = time.monotonic() + 3
    while router.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        request = orjson.loads(split_request(router.recv_multipart())[1])
        if request["type"] != "submit":
            return request
    return {}


CANCEL_42 = {"type": "cancel", "stream_id": 42, "token": "t0k"}


@pytest.mark.timeout(30)
def test_a_stream_accepted_after_its_submit_timed_out_is_cancelled(tmp_path) -> None:
    """Ingest read the submit before its deadline, but the reply came after the caller gave up:
    nobody follows that stream, so the client cancels it with the token the late reply carried."""
    endpoint = f"ipc://{tmp_path}/r.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)

    async def late() -> dict:
        client = AsyncRequestClient(endpoint, timeout_s=0.2)
        client.start()
        try:
            with pytest.raises(TimeoutError):
                await client.submit({"messages": [{"role": "user", "content": "hi"}]})
            return await asyncio.to_thread(_accept_late_then_take_the_cancel, router)
        finally:
            await client.close()

    try:
        assert asyncio.run(late()) == CANCEL_42
    finally:
        router.close(0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("then", ["call", "close"])
def test_the_sync_client_cancels_a_stream_accepted_after_its_submit_timed_out(tmp_path, then) -> None:
    """The synchronous client too (the CLI's submit, the demo): the late acceptance is read by its
    next call, or by ``close`` (which waits briefly for the replies of calls that timed out)."""
    endpoint = f"ipc://{tmp_path}/r.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    client = RequestClient(endpoint, timeout_s=0.2)
    taken: list[dict] = []
    try:
        with pytest.raises(TimeoutError):
            client.submit({"messages": [{"role": "user", "content": "hi"}]})
        server = threading.Thread(target=lambda: taken.append(_accept_late_then_take_the_cancel(router)))
        server.start()
        if then == "call":
            with pytest.raises(TimeoutError):  # the server answers nothing more
                client.submit({"messages": [{"role": "user", "content": "next"}]})
        else:
            client.close()
        server.join(10)
    finally:
        client.close()
        router.close(0)
    assert taken == [CANCEL_42]
