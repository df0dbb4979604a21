"""Property test: random claim/commit/abort/read/release/rewind sequences against a model.

The model is a deque of the committed, not yet released records ``(type, bytes, end cursor)``
plus the two cursors, computed with the layout rules of ``shm.descriptor``: a record takes
``record_size(length)`` bytes, and one that does not fit before the end of the data area first
pads the tail. Small rings (4096 and 8192 bytes) with records up to ``max_record`` (the default or
twice that) make the producer wrap and pad every few records and hit a full ring all the time.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shm import descriptor as d
from shm.naming import segment_name
from shm.ring import Consumer, Producer, Ring, _Side
from shm.wait import WaitStrategy

SPIN = WaitStrategy.named("spin")


class RingModel(RuleBasedStateMachine):
    """Drives one producer and one consumer of a fresh ring and checks them against the model."""

    name = ""  # set per test by ring_machine()

    def __init__(self) -> None:
        super().__init__()
        self.ring: Ring | None = None
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None

    @initialize(capacity=st.sampled_from([4096, 8192]), doubled=st.booleans())
    def create(self, capacity: int, doubled: bool) -> None:
        self.capacity = capacity
        self.max_record = d.default_max_record(capacity) * (2 if doubled else 1)
        self.held: list[tuple[memoryview, bytes]] = []  # views read and not released
        self.claim: tuple[memoryview, bytes, int] | None = None  # open claim: view, payload, end
        self.ring = Ring.create(self.name, capacity, max_record=self.max_record)
        self.producer = Producer.attach(self.name, SPIN)
        self.consumer = Consumer.attach(self.name, SPIN)
        self.write = 0  # model write cursor
        self.read = 0  # model read cursor (released)
        self.published: deque[tuple[int, bytes, int]] = deque()  # committed, not released
        self.n_read = 0  # how many of ``published`` the consumer has read
        self.full = False
        self.backpressure = 0
        self.committed = 0
        self.committed_published = 0  # ``committed`` as of the producer's last heartbeat
        self.released = 0
        self.unblocks = 0
        self.payloads = 0

    def teardown(self) -> None:
        self.held = []
        self.claim = None
        for side in (self.producer, self.consumer):
            if side is not None:
                side.close()
        if self.ring is not None:
            self.ring.destroy()

    # --- model arithmetic ------------------------------------------------------------------

    def end_after_claim(self, length: int) -> int:
        """Write cursor after a claim of ``length`` bytes at the model's write cursor."""
        size = d.record_size(length)
        to_end = self.capacity - self.write % self.capacity
        return self.write + size if size <= to_end else self.write + to_end + size

    def payload(self, length: int) -> bytes:
        self.payloads += 1
        return random.Random(self.payloads).randbytes(length)

    # --- producer ------------------------------------------------------------------------------

    @precondition(lambda self: self.claim is None)
    @rule(data=st.data())
    def try_claim(self, data) -> None:
        length = data.draw(
            st.one_of(st.integers(0, 64), st.integers(0, self.max_record), st.just(self.max_record)), label="length"
        )
        end = self.end_after_claim(length)
        fits = end <= self.read + self.capacity
        view = self.producer.try_claim(length)
        assert (view is not None) == fits, f"try_claim({length}) at write={self.write} read={self.read}"
        if view is None:
            self.backpressure += not self.full
            self.full = True
            return
        self.full = False
        payload = self.payload(length)
        view[:] = payload
        self.claim = (view, payload, end)

    @precondition(lambda self: self.claim is not None)
    @rule(record_type=st.integers(d.TYPE_MIN_USER, d.TYPE_MAX_USER))
    def commit(self, record_type: int) -> None:
        _, payload, end = self.claim
        self.producer.commit(record_type)
        self.published.append((record_type, payload, end))
        self.write = end
        self.committed += 1
        self.claim = None

    @precondition(lambda self: self.claim is not None)
    @rule()
    def abort(self) -> None:
        self.producer.abort()
        self.claim = None

    @rule()
    def restart_producer(self) -> None:
        """A producer that closes cleanly (aborting any open claim) and a successor attaching."""
        self.claim = None
        self.producer.close()
        self.committed_published = self.committed  # closing publishes the counters
        self.producer = Producer.attach(self.name, SPIN)
        self.full = False

    @precondition(lambda self: self.claim is not None)
    @rule()
    def producer_dies_mid_claim(self) -> None:
        """A producer that vanishes with a claim open (its mapping dropped, no abort, its pid left
        in the header) and a successor attaching: it finds the torn claim, clears and counts it.
        The real SIGKILL case runs in test_ring_faults.py."""
        self.claim = None
        _Side.close(self.producer)
        assert self.ring.header().pending_claim
        self.producer = Producer.attach(self.name, SPIN)
        self.unblocks += 1
        self.full = False
        # records_written is published by heartbeats: a dead producer's commits since its last
        # one are not counted, and the successor counts on from the published value
        self.committed = self.committed_published

    # --- consumer ------------------------------------------------------------------------------

    @rule()
    def try_read(self) -> None:
        record = self.consumer.try_read()
        if self.n_read == len(self.published):
            assert record is None
            return
        record_type, payload, _ = self.published[self.n_read]
        assert record is not None
        assert record[0] == record_type
        assert bytes(record[1]) == payload
        self.held.append((record[1], payload))
        self.n_read += 1

    @rule()
    def release(self) -> None:
        # what was read and not released must still be intact: the producer never writes over it
        for view, payload in self.held:
            assert bytes(view) == payload
        self.consumer.release()
        if self.n_read:
            self.read = self.published[self.n_read - 1][2]
        for _ in range(self.n_read):
            self.published.popleft()
        self.released += self.n_read
        self.n_read = 0
        self.held.clear()

    @rule()
    def rewind(self) -> None:
        self.consumer.rewind()
        self.n_read = 0
        self.held.clear()

    @rule()
    def restart_consumer(self) -> None:
        """A consumer that goes away without releasing: its successor starts at the read cursor."""
        self.consumer.close()
        self.consumer = Consumer.attach(self.name, SPIN)
        self.n_read = 0
        self.held.clear()

    @rule()
    def heartbeat(self) -> None:
        self.producer.heartbeat()
        self.consumer.heartbeat()
        self.committed_published = self.committed
        h = self.ring.header()
        assert (h.records_written, h.records_read) == (self.committed, self.released)

    # --- the header agrees with the model after every step -------------------------------------

    @invariant()
    def header_matches_model(self) -> None:
        if self.ring is None:
            return
        h = self.ring.header()
        assert (h.write_cursor, h.read_cursor) == (self.write, self.read)
        assert 0 <= h.used <= self.capacity
        assert h.pending_claim == (self.claim is not None)
        assert h.backpressure_events == self.backpressure
        assert self.producer.is_full == self.full
        assert (h.drops, h.unblocks) == (0, self.unblocks)
        assert h.producer_pid == h.consumer_pid


def ring_machine(name: str) -> type[RingModel]:
    return type("RingModelFor" + name.replace("-", "_"), (RingModel,), {"name": name})


@pytest.mark.timeout(120)
def test_ring_matches_model(instance: str) -> None:
    run_state_machine_as_test(
        ring_machine(segment_name(instance, "model")),
        settings=settings(
            max_examples=300,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
