"""The transports under test, each in three parts: the channel the parent makes (and always
removes), the sending end the producer process opens and the receiving end the consumer opens.

Every transport may hold about 1 MiB in flight (at least four messages), and a full one blocks
the sender.
The ring is written in place (claim, copy the template, stamp, commit) and read in place; every
other transport sends a fresh private copy of the template, as its users would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from shm.naming import new_instance_id, segment_name
from shm.ring import Consumer, Producer, Ring
from shm.wait import WaitStrategy

from .message import Message

TRANSPORTS = ("ring", "queue", "pipe", "zmq", "faster-fifo")
BUFFER_BYTES = 1 << 20
RECORD_TYPE = 16  # the first user record type


class BenchTimeout(Exception):
    """A transport delivered nothing (or took no message) within the run's timeout."""


def unavailable(transport: str) -> str | None:
    """Why ``transport`` cannot run here, or None when it can."""
    if transport == "faster-fifo":
        try:
            import faster_fifo  # noqa: F401
        except ImportError as exc:
            return f"faster-fifo skipped: {exc}"
    return None


@contextlib.contextmanager
def open_channel(transport: str, ctx: Any, message_bytes: int) -> Iterator[tuple[Any, Any]]:
    """Make ``transport``'s channel in the parent; yields (producer end, consumer end), picklable
    for spawned children, and removes everything on exit, however the run ended."""
    buffer_bytes = max(BUFFER_BYTES, 1 << (4 * message_bytes - 1).bit_length())  # a power of two, for the ring
    slots = buffer_bytes // message_bytes
    if transport == "ring":
        name = segment_name(new_instance_id(), "bench-ipc")
        ring = Ring.create(name, buffer_bytes)
        try:
            yield name, name
        finally:
            ring.destroy()
    elif transport == "queue":
        queue = ctx.Queue(maxsize=slots)
        try:
            yield queue, queue
        finally:
            queue.close()
    elif transport == "pipe":
        reader, writer = ctx.Pipe(duplex=False)
        try:
            yield writer, reader
        finally:
            writer.close()
            reader.close()
    elif transport == "zmq":
        directory = tempfile.mkdtemp(prefix="neuralpipe-bench-")
        address = f"ipc://{os.path.join(directory, 'ipc.sock')}"
        # The consumer's close tells the producer's that it has read what it wanted: libzmq drops
        # what is still queued when a PUSH socket closes while its peer is at its high-water mark,
        # whatever LINGER says (zeromq/libzmq#4660), so the producer keeps its socket open till then.
        received = ctx.Event()
        try:
            yield (address, slots, received), (address, slots, received)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    elif transport == "faster-fifo":
        import faster_fifo

        queue = faster_fifo.Queue(max_size_bytes=buffer_bytes)
        try:
            yield queue, queue
        finally:
            queue.close()
    else:
        raise ValueError(f"unknown transport {transport!r}; one of {', '.join(TRANSPORTS)}")


class Sender:
    """The producer's end: ``send(seq)`` sends one stamped copy of the message."""

    def __init__(self, message: Message, put: Callable[[bytearray], None], close: Callable[[], None]) -> None:
        self._message = message
        self._put = put
        self.close = close

    def send(self, seq: int) -> None:
        msg = bytearray(self._message.template)
        self._message.stamp(msg, seq)
        self._put(msg)


class RingSender:
    """The ring's producer: the message is built in place in the claimed record."""

    def __init__(self, name: str, wait: str, message: Message, timeout_s: float) -> None:
        self._producer = Producer.attach(name, WaitStrategy.named(wait))
        self._message = message
        self._timeout_s = timeout_s

    def send(self, seq: int) -> None:
        message = self._message
        view = self._producer.claim(len(message.template), self._timeout_s)
        if view is None:
            raise BenchTimeout(f"ring stayed full for {self._timeout_s} s")
        view[:] = message.template
        message.stamp(view, seq)
        self._producer.commit(RECORD_TYPE)

    def close(self) -> None:
        self._producer.close()


class Receiver:
    """The consumer's end: ``recv()`` returns the next message's bytes; ``done()`` hands its
    buffer back (the ring's release; a no-op for transports that gave a private copy)."""

    def __init__(self, recv: Callable[[], Any], done: Callable[[], None], close: Callable[[], None]) -> None:
        self.recv = recv
        self.done = done
        self.close = close


def open_sender(transport: str, end: Any, wait: str, message: Message, timeout_s: float) -> Sender | RingSender:
    """Open the producer's end of a channel made by :func:`open_channel`."""
    if transport == "ring":
        return RingSender(end, wait, message, timeout_s)
    if transport == "queue":
        return Sender(message, lambda msg: end.put(msg, timeout=timeout_s), _close_queue(end))
    if transport == "pipe":
        return Sender(message, end.send_bytes, end.close)
    if transport == "zmq":
        import zmq

        address, slots, received = end
        context = zmq.Context()
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, slots)
        sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        sock.setsockopt(zmq.LINGER, 0)  # what is queued once the consumer is done is not wanted
        sock.connect(address)

        def close() -> None:
            received.wait(timeout_s)  # a consumer that died is given up on after timeout_s
            sock.close()
            context.term()

        return Sender(message, sock.send, close)
    if transport == "faster-fifo":
        return Sender(message, lambda msg: end.put(msg, timeout=timeout_s), _nothing)
    raise ValueError(f"unknown transport {transport!r}")


def open_receiver(transport: str, end: Any, wait: str, timeout_s: float) -> Receiver:
    """Open the consumer's end of a channel made by :func:`open_channel`."""
    if transport == "ring":
        return _ring_receiver(end, wait, timeout_s)
    if transport == "queue":
        # Blocking gets, as users write them; a consumer that hangs is killed by the parent.
        return Receiver(end.get, _nothing, _close_queue(end))
    if transport == "pipe":
        return Receiver(end.recv_bytes, _nothing, end.close)
    if transport == "zmq":
        import zmq

        address, slots, received = end
        context = zmq.Context()
        sock = context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, slots)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)

        def close() -> None:
            received.set()
            sock.close()
            context.term()

        return Receiver(sock.recv, _nothing, close)
    if transport == "faster-fifo":
        return Receiver(lambda: end.get(timeout=timeout_s), _nothing, _nothing)
    raise ValueError(f"unknown transport {transport!r}")


def _ring_receiver(name: str, wait: str, timeout_s: float) -> Receiver:
    consumer = Consumer.attach(name, WaitStrategy.named(wait))

    def recv() -> memoryview:
        record = consumer.read(timeout_s)
        if record is None:
            raise BenchTimeout(f"ring: no record for {timeout_s} s")
        return record[1]

    return Receiver(recv, consumer.release, consumer.close)


def _nothing() -> None:
    pass


def _close_queue(queue: Any) -> Callable[[], None]:
    def close() -> None:
        queue.close()
        queue.join_thread()  # flush the feeder thread, so nothing sent is lost at exit

    return close
