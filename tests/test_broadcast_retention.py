"""The broadcast's retention (stages/broadcast/retention.py): ``retention_bytes`` bounds the memory
it holds, index and bookkeeping included, for short streams and long ones; what it returns per
stream stays right as batches are evicted."""

from __future__ import annotations

import gc
import os
import tracemalloc

import pytest

from stages.broadcast.retention import Retention

pytestmark = pytest.mark.timeout(60)

TOPIC = b"\x00all"  # shared by every batch, as wire.ALL_TOPIC is


def _batch(at: int, streams: list[int], payload: int) -> tuple[tuple[bytes, bytes, bytes], list[int]]:
    head = b'{"v":2,"type":"batch","at":%d}' % at
    return (TOPIC, head, os.urandom(payload)), streams


def _fill(retention: Retention, batches: int, streams_per_batch: int, span: int, payload: int) -> None:
    """``batches`` batches of ``streams_per_batch`` streams each; a stream is in ``span`` batches
    in a row (1: a new set of short streams every batch), then ends."""
    for at in range(batches):
        first = (at // span) * streams_per_batch + 10**12  # stream ids as large as the engine's
        streams = list(range(first, first + streams_per_batch))
        frames, streams = _batch(at, streams, payload)
        ended = tuple(streams) if at % span == span - 1 else ()
        retention.add(at, at + 1, frames, streams, ended)


@pytest.mark.parametrize(
    ("streams_per_batch", "span", "payload"),
    [
        (20, 1, 600),  # many short streams: a new set every batch (an agent's tool calls)
        (5, 1, 300),
        (60, 1, 3000),
        (50, 400, 2000),  # long streams, in every batch for a while (100 chats at model speed)
        (1, 5000, 200),  # one long stream
    ],
)
def test_retention_bytes_bounds_the_memory_it_holds(streams_per_batch, span, payload):
    """Before, a stream's index entry (a deque, ~760 bytes) and each batch's objects were not
    counted: with short streams the retention held 14-28 times its ``max_bytes`` (the broadcast
    of an engine serving 1,000 short chats a second grew to 278 MiB for 64 MiB of retention)."""
    limit = 4 << 20
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        retention = Retention(limit, 1e9)
        _fill(retention, 12_000, streams_per_batch, span, payload)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retention.evicted > 0  # the bound was reached
    assert retention.bytes <= limit
    assert held <= 1.25 * limit, f"{held / limit:.2f} x max_bytes"
    # what is counted is what is held: a budget not spent on accounting's slack either
    assert held >= 0.75 * retention.bytes, f"{held / retention.bytes:.2f} x the count"


def test_a_stream_s_batches_are_the_retained_ones_as_the_oldest_go():
    retention = Retention(1 << 40, 1e9)
    for at in range(10):
        frames, streams = _batch(at, [7] if at % 2 else [7, 8], 100)
        retention.add(at, at + 1, frames, streams, (8,) if at == 8 else ())
    assert [kept.at for kept in retention.of_stream(8)] == [0, 2, 4, 6, 8]
    assert retention.open_from(99) == 0  # stream 7's first batch
    for _ in range(5):
        retention._evict_oldest()
    assert [kept.at for kept in retention.of_stream(7)] == [5, 6, 7, 8, 9]
    assert [kept.at for kept in retention.of_stream(8)] == [6, 8]
    assert retention.open_from(99) == 5 and retention.streams() == 2
    for _ in range(4):
        retention._evict_oldest()
    assert retention.of_stream(8) == [] and 8 not in retention.ended  # gone with its last batch
    assert [kept.at for kept in retention.of_stream(7)] == [9] and retention.streams() == 1
    retention._evict_oldest()
    assert retention.bytes == 0 and retention.streams() == 0 and retention.of_stream(7) == []
