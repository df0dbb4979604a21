"""Ring transports (bench/ring_transports.py, through engine/ports.py): the same stages over shm
rings, multiprocessing.Queue and zmq PUSH/PULL. Unit tests of the adapters' ring API in one
process, then the counter -> relay -> verify engine delivering every token in order with each
transport."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import zmq
from neuralpipe_bench.ring_transports import REFERENCES, MessageTransport

from engine.check import inspect_segments
from engine.config import ConfigError, load_config
from engine.ports import open_consumer, open_producer, port_factory
from engine.status_view import format_status
from engine.worker import RingEnd
from shm.ring import RecordTooLarge, RingError
from shm.wait import WaitStrategy
from tests.engine_harness import Engine, pipeline_config, wait_for

TOKENS = 4 * 16 * 400  # 400 batches of 16 tokens per stream, 4 streams


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def _pair(kind: str, tmp_path, zmq_ctx, capacity: int = 4096):
    (tmp_path / "bells").mkdir(exist_ok=True)
    channel = MessageTransport(kind).create("a-b", capacity, 1024, multiprocessing.get_context("spawn"), str(tmp_path))
    end = RingEnd("unused", WaitStrategy(), f"neuralpipe_bench.ring_transports:{kind.upper()}", channel)
    consumer = open_consumer(end, zmq_ctx)
    producer = open_producer(end, zmq_ctx)
    return channel, producer, consumer


def _close(channel, producer, consumer) -> None:
    consumer.close()
    producer.close()
    MessageTransport(channel.kind).close(channel)


def _read(consumer, timeout: float = 5.0):
    return wait_for(consumer.try_read, timeout, "a record")


@pytest.mark.parametrize("kind", ["queue", "zmq"])
def test_adapter_rewind_and_release_to_as_the_ring_does(kind, tmp_path, zmq_ctx):
    """compute pushes back a whole group of records (rewind); broadcast releases in part (release_to)."""
    channel, producer, consumer = _pair(kind, tmp_path, zmq_ctx)
    try:
        for payload in (b"a", b"b", b"c"):
            producer.try_claim(1)[:] = payload
            producer.commit(17)
        assert bytes(_read(consumer)[1]) == b"a"
        mark = consumer.position
        assert [bytes(_read(consumer)[1]) for _ in range(2)] == [b"b", b"c"]
        consumer.release_to(mark, 1)
        consumer.rewind()  # b and c come again, a does not
        assert [bytes(_read(consumer)[1]) for _ in range(2)] == [b"b", b"c"]
        assert consumer.try_read() is None
        with pytest.raises(RingError, match="outside what was read"):
            consumer.release_to(consumer.position, 3)
    finally:
        _close(channel, producer, consumer)


@pytest.mark.parametrize("kind", ["queue", "zmq"])
def test_adapter_round_trip_unread_and_backpressure(kind, tmp_path, zmq_ctx):
    channel, producer, consumer = _pair(kind, tmp_path, zmq_ctx)
    try:
        assert consumer.try_read() is None
        view = producer.try_claim(5)
        view[:] = b"hello"
        producer.commit(17)
        record_type, payload = _read(consumer)
        assert (record_type, bytes(payload)) == (17, b"hello")
        consumer.unread()
        assert consumer.available()
        assert bytes(consumer.try_read()[1]) == b"hello"  # pushed back: read again
        consumer.release()
        with pytest.raises(RingError):
            consumer.unread()  # nothing read since the release
        with pytest.raises(RecordTooLarge):
            producer.try_claim(1025)
        producer.try_claim(1)
        producer.abort()  # nothing published
        assert producer.last_committed() is None
        # fill until the transport says full: a bounded transport gives back-pressure, not growth
        sent = 0
        while (view := producer.try_claim(8)) is not None and sent < 100_000:
            view[:] = sent.to_bytes(8, "little")
            producer.commit(16)
            sent += 1
        assert producer.is_full and sent < 100_000
        # full: the caller may sleep on the space bell, unless room came meanwhile (zmq's I/O thread
        # moves queued messages on to the peer in the background), which a claim then finds
        if not producer.prepare_wait():
            assert producer.try_claim(8) is not None
            producer.abort()
        producer.end_wait()
        got = [int.from_bytes(_read(consumer)[1], "little") for _ in range(sent)]
        consumer.release()
        assert got == list(range(sent))  # every record, in order
        assert consumer.prepare_wait()  # empty now
        consumer.end_wait()
        wait_for(lambda: producer.try_claim(8), 5, "space after the consumer took everything")
        producer.abort()
    finally:
        _close(channel, producer, consumer)


def test_queue_consumer_rings_the_space_bell_only_after_taking_from_a_full_queue(tmp_path, zmq_ctx):
    channel, producer, consumer = _pair("queue", tmp_path, zmq_ctx)
    try:
        producer.try_claim(1)
        producer.commit(16)
        _read(consumer)
        consumer.release()
        assert not producer.space_bell._poll.poll(0)  # the queue was not full: no ring
        while producer.try_claim(1) is not None:
            producer.commit(16)
        assert producer.prepare_wait()
        _read(consumer)
        consumer.release()
        assert producer.space_bell.wait(1.0)  # rung: the producer wakes
        producer.end_wait()
    finally:
        while consumer.try_read() is not None:
            pass
        _close(channel, producer, consumer)


def test_transport_key_is_validated(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[engine]\ntransport = "pipe"\n')
    with pytest.raises(ConfigError, match=r'engine\.transport: must be "shm" or a port factory reference'):
        load_config(str(path), env={})
    path.write_text(f'[engine]\ntransport = "{REFERENCES["zmq"]}"\n')
    assert load_config(str(path), env={}).engine.transport == REFERENCES["zmq"]
    assert load_config(None, env={}).engine.transport == "shm"


def test_a_transport_that_is_no_port_factory_is_refused():
    with pytest.raises(TypeError, match="is not a port factory"):
        port_factory("neuralpipe_bench.ring_transports:REFERENCES")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["shm", "queue", "zmq"])
def test_pipeline_delivers_every_token_in_order(kind, tmp_path, instance):
    config = pipeline_config(total=TOKENS, rate=0).replace(
        "[engine]\n", f'[engine]\ntransport = "{REFERENCES[kind]}"\n', 1
    )
    engine = Engine(tmp_path, config, instance).start()
    try:
        sink = wait_for(
            lambda: (s := engine.worker("sink")["stats"]).get("messages", 0) >= TOKENS and s,
            60,
            f"{TOKENS} tokens at the sink over {kind}",
            interval=0.1,
        )
        assert (sink["messages"], sink["gaps"], sink["duplicates"]) == (TOKENS, 0, 0)
        status = engine.status()
        assert status["transport"] == REFERENCES[kind]
        assert status["pas"]["integrity"] == 1.0
        text = format_status(status)  # renders "n/a" for rings without a header
        assert ("n/a (" in text) == (kind != "shm")
        segments = [s for s in inspect_segments(instance).segments]
        assert len(segments) == (2 if kind == "shm" else 0)  # check sees only shm rings
    finally:
        assert engine.stop() == 0
    assert not os.path.exists(os.path.join(engine.base, instance))
