"""Hostile clients on a real engine's sockets (issue 13 items 5 and "streams have owners"): the
cache replays only for ingest and clears only for an operator, out-of-range ids are refused
without a crash, a client cancels only its own streams, and random junk on the ingest, cache and
snapshot sockets does not stop another client's stream."""

from __future__ import annotations

import random
import threading
import time

import orjson
import pytest
import zmq
from engine_harness import Engine, chat, full_config, wait_for

from engine.clients.cache import CacheClient
from engine.clients.consumer import StreamConsumer
from engine.clients.requests import RequestClient
from engine.protocol.cache import socket_path
from engine.protocol.cachekey import key_for, producer_id
from engine.protocol.requests import RequestError, ingest_endpoint, validate_body


@pytest.fixture
def engine(tmp_path, instance):
    e = Engine(tmp_path, full_config(rate=200), instance).start()
    yield e
    e.stop()
    e.kill_all()


def raw_call(endpoint: str, msg: dict | bytes, timeout_s: float = 5.0) -> dict:
    """One request on a fresh DEALER (a client that knows only the socket path)."""
    with zmq.Context.instance().socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart([b"1", msg if isinstance(msg, bytes) else orjson.dumps(msg)])
        assert sock.poll(int(timeout_s * 1000)), f"no answer from {endpoint}"
        return orjson.loads(sock.recv_multipart()[-1])


def follow(rd: str, sid: int, timeout_s: float = 20.0) -> list:
    """The messages of stream ``sid`` until it ends."""
    got = []
    with StreamConsumer.for_engine(rd, stream=sid) as consumer:
        deadline = time.monotonic() + timeout_s
        for message in consumer.messages(idle_timeout_s=timeout_s):
            if message.stream != sid:
                continue
            got.append(message)
            if message.type in ("end", "error") or time.monotonic() > deadline:
                break
    return got


def restarts(e: Engine) -> dict[str, int]:
    return {w["name"]: w["restarts"] for w in e.status()["workers"]}


def test_cache_lookup_needs_ingests_token_and_ids_are_range_checked(engine):
    rd = engine.info()["runtime_dir"]
    cache = "ipc://" + socket_path(rd, "cache")
    before = restarts(engine)
    body = chat("the attacker's stored answer", max_tokens=8)
    with RequestClient(ingest_endpoint(rd)) as client:
        sid = client.submit(body)
    follow(rd, sid)
    producer = producer_id([{"embedded": ["neuralpipe-echo"]}])  # as ingest names the embedded upstream
    key = key_for(validate_body(body, "chat"), "chat", "deterministic", producer)
    wait_for(lambda: CacheClient(socket_path(rd, "cache")).stats()["entries"] >= 1, 10, "the stream stored")
    deadline = time.monotonic_ns() + 10**9
    # the attack: replay the stored stream into the next (the victim's) stream id
    for token in (None, "", "0" * 64, 12):
        msg = {"type": "lookup", "key": key, "stream_id": sid + 1, "deadline_ns": deadline}
        if token is not None:
            msg["token"] = token
        reply = raw_call(cache, msg)
        assert reply["type"] == "error" and "not authorised" in reply["reason"], reply
    with CacheClient(socket_path(rd, "cache")) as operator:
        assert operator.stats()["replays"] == 0
        assert operator.lookup(key, 10**6)  # the right key: with ingest's token it would replay
        for bad in (2**64 - 1, 2**63, -1, 1.5, "7"):
            with pytest.raises(Exception, match="stream_id: must be an integer"):
                operator.lookup(key, bad)
    for kind in ("clear", "snapshot"):
        reply = raw_call(cache, {"type": kind})
        assert reply["type"] == "error" and "operator token" in reply["reason"], reply
    assert CacheClient(socket_path(rd, "cache")).stats()["entries"] >= 1  # nothing was cleared
    assert restarts(engine) == before


def test_a_client_cancels_only_its_own_streams_unless_operator(engine):
    rd = engine.info()["runtime_dir"]
    endpoint = ingest_endpoint(rd)
    with RequestClient(endpoint) as owner, RequestClient(endpoint) as other:
        sid = owner.submit(chat("a long one", max_tokens=2000, temperature=None))
        with pytest.raises(RequestError, match=f"no active stream {sid} submitted by this client"):
            other.cancel(sid)
        # a guessed "client" name is a claim, not an identity; a made-up token is no proof
        for msg in ({"client": "anything"}, {"token": "f" * 64}, {"token": ""}):
            assert raw_call(endpoint, {"type": "cancel", "stream_id": sid, **msg})["type"] == "rejected"
        owner.cancel(sid)
        sid2 = owner.submit(chat("another long one", max_tokens=2000, temperature=None))
    with RequestClient(endpoint, operator=True) as operator:
        operator.cancel(sid2)
    for s in (sid, sid2):
        assert follow(rd, s)[-1].type == "error"


def test_a_later_connection_with_the_submitters_identity_cannot_cancel(engine):
    """A routing identity is claimed, not proven: once the submitter has gone, another DEALER may
    connect with the same identity. The cancel token of the accepted reply is the proof."""
    rd = engine.info()["runtime_dir"]
    endpoint = ingest_endpoint(rd)
    submit = {"type": "submit", "body": chat("the victim's", max_tokens=2000, temperature=None)}
    with zmq.Context.instance().socket(zmq.DEALER) as victim:
        victim.setsockopt(zmq.LINGER, 0)
        victim.setsockopt(zmq.IDENTITY, b"victim")
        victim.connect(endpoint)
        victim.send_multipart([b"1", orjson.dumps(submit)])
        assert victim.poll(5000)
        accepted = orjson.loads(victim.recv_multipart()[-1])
    sid, cancel_token = accepted["stream_id"], accepted["cancel_token"]
    assert wait_for(lambda: _cancel_as(endpoint, b"victim", sid), 10, "the identity free again") == "rejected"
    # the token works from any connection: the submitter may reconnect
    assert raw_call(endpoint, {"type": "cancel", "stream_id": sid, "token": cancel_token})["type"] == "cancelled"


def _cancel_as(endpoint: str, identity: bytes, sid: int) -> str | None:
    """A cancel from a DEALER claiming ``identity``; None while the ROUTER still holds that
    identity for an earlier connection (it drops the newcomer's messages then)."""
    with zmq.Context.instance().socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(endpoint)
        sock.send_multipart([b"2", orjson.dumps({"type": "cancel", "stream_id": sid})])
        return orjson.loads(sock.recv_multipart()[-1])["type"] if sock.poll(300) else None


JUNK_SHAPES = [
    b"",
    b"\xff" * 7,
    b"{}",
    b"[]",
    b"null",
    b'{"type": "lookup"}',
    b'{"type": "cancel", "stream_id": 18446744073709551615}',
    b'{"type": "submit", "body": {"messages": 1}}',
    b'{"type": "stream", "stream_id": -1}',
    b'{"type": "batches", "start": 1e400}',
    b'{"type": "clear"}',
    b'{"type": 1e308}',
]


def _junk(rng: random.Random) -> list[bytes]:
    frames = [rng.choice(JUNK_SHAPES)]
    if rng.random() < 0.5:
        frames.append(rng.randbytes(rng.randrange(0, 200)))
    if rng.random() < 0.3:
        frames.insert(0, rng.randbytes(rng.randrange(0, 20)))
    return frames


@pytest.mark.timeout(90)
def test_random_junk_on_ingest_cache_and_snapshot_sockets_leaves_other_streams_whole(engine):
    rd = engine.info()["runtime_dir"]
    targets = [ingest_endpoint(rd), "ipc://" + socket_path(rd, "cache"), f"ipc://{rd}/broadcast-snapshot.sock"]
    before = restarts(engine)
    stop = threading.Event()
    sent = [0]

    def attack() -> None:
        rng = random.Random(1313)
        ctx = zmq.Context.instance()
        socks = []
        for target in targets:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(target)
            socks.append(sock)
        try:
            while not stop.is_set():
                for sock in socks:
                    try:
                        sock.send_multipart(_junk(rng), zmq.NOBLOCK)
                        sent[0] += 1
                    except zmq.Again:
                        pass
                    while sock.poll(0):
                        sock.recv_multipart()
                time.sleep(0.001)
        finally:
            for sock in socks:
                sock.close(0)

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        with RequestClient(ingest_endpoint(rd)) as victim:
            sid = victim.submit(chat("the victim's stream", max_tokens=120, temperature=None))
        messages = follow(rd, sid, 30)
    finally:
        stop.set()
        attacker.join(10)
    assert sent[0] > 100
    assert messages[-1].type == "end", messages[-1]
    assert sum(len(m.text) for m in messages if m.type == "tokens") == 120
    assert restarts(engine) == before
