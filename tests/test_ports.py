"""The ring ports (shm/ports.py): shm.ring's Consumer and Producer and the comparison transports'
adapters (bench/ring_transports.py, through engine/ports.py) all have every member of
RecordConsumer / RecordProducer, so a stage needs no special case for any of them."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
import zmq
from neuralpipe_bench.ring_transports import MessageTransport
from shm_helpers import make_ring

from engine.ports import open_consumer, open_producer
from engine.worker import RingEnd
from shm.ports import RecordConsumer, RecordProducer
from shm.ring import Consumer, Producer
from shm.wait import WaitStrategy


def test_shm_ring_ends_are_ports(tmp_path):
    with make_ring(f"neuralpipe-ports{uuid.uuid4().hex[:8]}", 4096, doorbell_dir=str(tmp_path)) as ring:
        producer, consumer = Producer.attach(ring.name), Consumer.attach(ring.name)
        try:
            assert isinstance(consumer, RecordConsumer) and isinstance(producer, RecordProducer)
            assert consumer.capacity == producer.capacity == 4096 and consumer.durable
        finally:
            consumer.close()
            producer.close()


@pytest.mark.parametrize("kind", ["queue", "zmq"])
def test_comparison_transport_adapters_are_ports(kind, tmp_path):
    (tmp_path / "bells").mkdir()
    ctx = zmq.Context()
    channel = MessageTransport(kind).create("a-b", 1 << 16, 1024, multiprocessing.get_context("spawn"), str(tmp_path))
    end = RingEnd("unused", WaitStrategy(), f"neuralpipe_bench.ring_transports:{kind.upper()}", channel)
    consumer, producer = open_consumer(end, ctx), open_producer(end, ctx)
    try:
        assert isinstance(consumer, RecordConsumer) and isinstance(producer, RecordProducer)
        # capacity is in the unit of position (messages here): what broadcast bounds its held records by
        assert consumer.capacity == producer.capacity == channel.slots
        assert consumer.missed_wakeup() is False and producer.space_freed() is False and not consumer.durable
    finally:
        consumer.close()
        producer.close()
        MessageTransport(channel.kind).close(channel)
        ctx.term()
