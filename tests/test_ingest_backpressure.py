"""Back-pressure from the rings is not the upstream's silence: while compute is paused (or slow) and
ingest's output ring is full, ingest stops reading its upstreams, and streams must go on once the
ring drains, however long that took. Before, a pause longer than the pool's ``idle_timeout_s`` (60 s
by default) ended every open stream with "idle timeout: no data from <upstream>", counted against
the upstream's health."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from engine_harness import chat, follow_ends, full_config, held_for, wait_for

from engine.clients.requests import RequestClient
from engine.protocol.requests import ingest_endpoint

IDLE_TIMEOUT_S = 1.0
STREAMS = 20


@pytest.mark.timeout(90)
def test_a_pause_longer_than_the_idle_timeout_loses_no_stream(start_engine):
    pool = f"params.pool = {{ idle_timeout_s = {IDLE_TIMEOUT_S} }}"
    engine = start_engine(full_config(rate=100, capacity=1 << 16, ingest=pool))
    runtime_dir = engine.info()["runtime_dir"]
    ended: dict[int, tuple[str, str]] = {}
    joined, done = threading.Event(), threading.Event()
    reader = threading.Thread(target=follow_ends, args=(runtime_dir, ended, joined, done), daemon=True)
    reader.start()
    cli = [sys.executable, "-m", "engine.cli"]
    try:
        assert joined.wait(15), "the consumer did not join the broadcast"
        with RequestClient(ingest_endpoint(runtime_dir), timeout_s=5.0) as client:
            ids = [client.submit(chat(f"held {i}", 300, temperature=0.9)) for i in range(STREAMS)]
        subprocess.run([*cli, "pause", "compute"], env=engine.env(), capture_output=True, timeout=20, check=True)

        def ring_full() -> bool:
            ring = next(r for r in engine.status()["rings"] if r["name"] == "ingest-compute")
            return ring["used"] > ring["capacity"] // 2  # ingest is held: it waits for room

        # ingest held, reading nothing, for three times the upstream's idle timeout
        held_for(ring_full, 3 * IDLE_TIMEOUT_S, 30, "ingest held by a full ring")
        subprocess.run([*cli, "resume", "compute"], env=engine.env(), capture_output=True, timeout=20, check=True)
        wait_for(lambda: set(ids) <= set(ended), 60, "every stream to end")
        errors = {sid: reason for sid, (kind, reason) in ended.items() if kind == "error"}
        assert not errors, f"{len(errors)} of {STREAMS} streams failed: {list(errors.values())[:2]}"
    finally:
        done.set()
        reader.join(10)


def test_the_rooms_attribute_follows_its_event():
    """Every read checks ``open`` instead of calling ``is_set``: the two never disagree, and a
    stream waiting for room wakes when it is set."""
    import asyncio

    from stages.ingest.stage import _Room

    async def scenario() -> list:
        room = _Room()
        seen = [(room.open, room.is_set())]
        room.clear()
        seen.append((room.open, room.is_set()))
        waiter = asyncio.ensure_future(room.wait())
        await asyncio.sleep(0)
        seen.append(waiter.done())
        room.set()
        await asyncio.wait_for(waiter, 5)
        seen.append((room.open, room.is_set()))
        return seen

    assert asyncio.run(scenario()) == [(True, True), (False, False), False, (True, True)]
