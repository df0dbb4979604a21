"""The broadcast stage with real processes and sockets: a counting source -> broadcast engine
(fast: no upstream, no compute), raw SUB sockets on topic prefixes and the consumer client; and the
stage in-process over a real ring for the row kinds and appended columns the source never writes."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import orjson
import pytest
import zmq
from engine_harness import chat, first_end, full_config, wait_for

from engine.clients.consumer import StreamConsumer
from engine.clients.requests import RequestClient
from engine.logs import JsonLogger
from engine.protocol import wire
from engine.protocol.requests import ingest_endpoint
from engine.stage import WorkerContext
from shm.batch import ExtraColumn, Kind, batch_size, write_batch
from shm.naming import segment_name
from shm.ring import Consumer, Producer, Ring
from stages.broadcast.params import Endpoint
from stages.broadcast.stage import Broadcast

STREAMS, BATCH = 6, 8


def counter_config(rate: float, total: int, broadcast: str = "") -> str:
    return f"""
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 1.0

[supervisor]
intensity = 10
backoff_initial_s = 0.01
backoff_max_s = 0.2

[ring_defaults]
capacity = 1048576

[workers.source]
stage = "counter"
outputs = ["source-broadcast"]
params = {{ streams = {STREAMS}, batch = {BATCH}, rate = {rate}, total = {total} }}

[workers.broadcast]
stage = "broadcast"
inputs = ["source-broadcast"]
{broadcast}
"""


def sub_socket(url: str, *prefixes: bytes, hwm: int = 100_000, rcvbuf: int = -1) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RCVBUF, rcvbuf)
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(url)
    return sock


def ipc(engine, name: str) -> str:
    return f"ipc://{os.path.join(engine.info()['runtime_dir'], name)}.sock"


def drain(sock: zmq.Socket, timeout_ms: int = 0) -> list[wire.Message | wire.Batch]:
    """Messages and batches a raw SUB socket holds (heartbeats left out)."""
    out = []
    while sock.poll(timeout_ms):
        message = wire.decode(sock.recv_multipart())
        if message.type != "heartbeat":
            out.append(message)
        timeout_ms = 0
    return out


def take(client: StreamConsumer, seconds: float) -> list[wire.Message]:
    """What the client delivers within ``seconds`` (its iterator only pauses when data stops)."""
    out, until = [], time.monotonic() + seconds
    for message in client.messages(idle_timeout_s=seconds):
        out.append(message)
        if time.monotonic() > until:
            break
    return out


def seqs_by_stream(messages: list[wire.Message | wire.Batch]) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {}
    for m in messages:
        if isinstance(m, wire.Batch):
            for sid, seq in zip(m.columns["stream_id"].tolist(), m.columns["seq"].tolist(), strict=True):
                seen.setdefault(sid, []).append(seq)
        elif m.type == "tokens":
            seen.setdefault(m.stream, []).extend(m.columns["seq"].tolist())
    return seen


@pytest.mark.timeout(60)
def test_subscribers_get_batches_on_all_and_exactly_their_stream_on_its_topic(start_engine):
    per_stream = 20 * BATCH
    engine = start_engine(counter_config(rate=400, total=STREAMS * per_stream))  # ~2.4 s of data
    # raw SUB sockets: one stream's topic, and every stream's batches
    one = sub_socket(ipc(engine, "broadcast-binary"), wire.topic(2))
    every = sub_socket(ipc(engine, "broadcast"), wire.ALL_TOPIC)
    # consumer clients, one per stream (each joins mid-stream: its beginning comes from the snapshot)
    rd = engine.info()["runtime_dir"]
    clients = {sid: StreamConsumer.for_engine(rd, stream=sid, binary=sid % 2 == 1) for sid in range(STREAMS)}
    try:
        # the first waits for the data's end (the counter's streams have no END row); the others
        # have it all by then, in their queues or from the snapshot ROUTER within milliseconds
        got = {
            sid: seqs_by_stream(list(c.messages(idle_timeout_s=2 if sid == 0 else 0.5))) for sid, c in clients.items()
        }
        for sid, seen in got.items():
            got_seqs = seen.get(sid, [])
            assert set(seen) == {sid} and got_seqs == list(range(per_stream)), (
                f"stream {sid}: {len(got_seqs)} rows, missing {sorted(set(range(per_stream)) - set(got_seqs))[:20]}, "
                f"counts {clients[sid].counts}"
            )
            assert clients[sid].counts["gaps"] == 0  # (duplicates: snapshot and live overlap, dropped)
        raw_one = drain(one, 500)
        assert {m.type for m in raw_one} == {"tokens"} and set(seqs_by_stream(raw_one)) == {2}
        seqs = seqs_by_stream(raw_one)[2]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        batches = drain(every, 500)
        assert batches and all(isinstance(b, wire.Batch) for b in batches)
        assert all(b.at == a.next for a, b in itertools.pairwise(batches))  # contiguous positions
        for seqs in seqs_by_stream(batches).values():
            assert seqs == sorted(seqs)
    finally:
        one.close(0)
        every.close(0)
        for c in clients.values():
            c.close()


@pytest.mark.timeout(60)
def test_a_new_subscription_is_welcomed_with_a_heartbeat_at_once(start_engine):
    engine = start_engine(full_config(broadcast="params.heartbeat_s = 30"))
    sock = sub_socket(ipc(engine, "broadcast"), wire.HEARTBEAT_TOPIC)
    try:
        assert sock.poll(10_000), "no heartbeat within 10 s of subscribing (their period is 30 s)"
        assert wire.decode(sock.recv_multipart()).type == "heartbeat"
    finally:
        sock.close(0)


def follow(consumer: StreamConsumer, sid: int) -> list[str]:
    """The types of stream ``sid``'s messages, until its end (or 10 s without a message)."""
    kinds = []
    for message in consumer.messages(idle_timeout_s=10):
        if message.stream == sid:
            kinds.append(message.type)
            if message.type in ("end", "error"):
                break
    return kinds


@pytest.mark.timeout(120)
def test_a_joined_consumer_gets_a_stream_submitted_after_even_one_that_ends_at_once(start_engine):
    """A cache hit is replayed and ended within a millisecond or two of its submit: before join
    existed, a consumer made just before it could miss it whole, without an error (its start
    position came after the stream), or get it only at the next heartbeat."""
    engine = start_engine(full_config(broadcast="params.heartbeat_s = 30"))
    rd, body = engine.info()["runtime_dir"], chat("a reply the cache replays", max_tokens=8)
    with RequestClient(ingest_endpoint(rd)) as client:
        for attempt in range(12):  # the first one fills the cache, the others are hits
            with StreamConsumer.for_engine(rd) as consumer:
                assert consumer.join(10)
                sid = client.submit(body)
                kinds = follow(consumer, sid)
            assert kinds[:1] == ["start"] and kinds[-1:] == ["end"], (attempt, kinds, consumer.counts)
    wait_for(lambda: engine.worker("cache")["stats"].get("hits", 0) >= 1, 10, "the cache's hits in its stats")


@pytest.mark.timeout(90)
def test_a_paused_broadcast_still_tells_its_consumers_it_is_alive(start_engine):
    """Consumers end every open stream ("engine unreachable") once the broadcast is silent for their
    engine timeout. `neuralpipe pause broadcast` used to silence it: a pause longer than that ended
    every gateway stream. Paused, it publishes nothing, but its heartbeats go on: a consumer whose
    timeout is 2 s keeps its stream through a 3 s pause, and the stream ends whole after it."""
    engine = start_engine(full_config(rate=20))
    rd = engine.info()["runtime_dir"]
    cli = [sys.executable, "-m", "engine.cli"]
    with (
        StreamConsumer.for_engine(rd, engine_timeout_s=2.0) as consumer,
        RequestClient(ingest_endpoint(rd)) as client,
    ):
        assert consumer.join(10)
        # 2 s of tokens: the end waits in the paused broadcast, so the stream is open throughout
        sid = client.submit(chat("held by a paused broadcast", max_tokens=40, temperature=0.9))
        wait_for(lambda: any(m.stream == sid for m in consumer.messages(idle_timeout_s=0.5)), 10, "the stream")
        subprocess.run([*cli, "pause", "broadcast"], env=engine.env(), capture_output=True, timeout=20, check=True)
        paused_at = time.monotonic()
        wait_for(lambda: engine.worker("broadcast")["state"] == "paused", 10, "the broadcast paused")
        heard = []
        while time.monotonic() - paused_at < 3:  # past the consumer's 2 s: it must keep hearing
            heard += [m.type for m in consumer.messages(idle_timeout_s=0.5)]
        subprocess.run([*cli, "resume", "broadcast"], env=engine.env(), capture_output=True, timeout=20, check=True)
        kinds = follow(consumer, sid)
    assert "error" not in heard, f"the consumer gave up on the paused broadcast: {consumer.counts}"
    assert kinds[-1:] == ["end"], (kinds[-3:], consumer.counts)
    assert consumer.counts["unreachable"] == 0


@pytest.mark.timeout(90)
def test_a_stream_still_open_when_the_engine_stops_ends_saying_so(start_engine):
    """Stopping drains: ingest lets its open streams run for up to stop_timeout_s, then cancels them.
    Their error said "cancelled", as a client's cancel does: nothing told a reader the engine stopped."""
    engine = start_engine(full_config(rate=20).replace("stop_timeout_s = 5.0", "stop_timeout_s = 1.0"))
    rd = engine.info()["runtime_dir"]
    with StreamConsumer.for_engine(rd) as consumer, RequestClient(ingest_endpoint(rd)) as client:
        assert consumer.join(10)
        sid = client.submit(chat("open when the engine stops", max_tokens=300, temperature=0.9))
        wait_for(lambda: any(m.stream == sid for m in consumer.messages(idle_timeout_s=0.5)), 10, "the stream")
        engine.proc.send_signal(signal.SIGTERM)
        ending = first_end(consumer, sid)
    assert engine.wait_exit(30) == 0
    assert ending is not None and ending.type == "error", ending
    assert ending.header["reason"].startswith("engine stopping"), ending.header


@pytest.mark.timeout(90)
def test_kill9_of_broadcast_loses_and_duplicates_nothing(start_engine):
    per_stream = 100 * BATCH
    engine = start_engine(counter_config(rate=2000, total=STREAMS * per_stream))
    raw = sub_socket(ipc(engine, "broadcast"), wire.ALL_TOPIC)
    rows: dict[tuple[int, int], int] = {}
    positions: set[int] = set()
    with StreamConsumer.for_engine(engine.info()["runtime_dir"]) as client:
        received: list[wire.Message] = []

        def collect(until: int) -> bool:
            received.extend(take(client, 0.1))
            for b in drain(raw):
                if b.at in positions:  # a record the restarted broadcast published again
                    continue
                positions.add(b.at)
                for key in zip(b.columns["stream_id"].tolist(), b.columns["seq"].tolist(), strict=True):
                    rows[key] = rows.get(key, 0) + 1
            return sum(len(m.text) for m in received) >= until

        wait_for(lambda: collect(STREAMS * per_stream // 4), 30, "a quarter of the tokens")
        os.kill(engine.worker("broadcast")["pid"], signal.SIGKILL)
        wait_for(lambda: engine.worker("broadcast")["restarts"] == 1, 20, "the broadcast restarted")
        wait_for(lambda: collect(STREAMS * per_stream), 60, "every token at the client")
        stats = engine.worker("broadcast")["stats"]
    raw.close(0)
    assert seqs_by_stream(received) == {sid: list(range(per_stream)) for sid in range(STREAMS)}
    assert client.counts["gaps"] == 0
    assert max(rows.values()) == 1, "a row was published twice (at two positions)"
    assert stats["duplicates"] > 0 or stats["messages"] > 0  # the new incarnation dropped what it re-read


@pytest.mark.timeout(60)
def test_a_slow_subscriber_slows_neither_the_others_nor_the_pipeline(start_engine):
    rate = 4000
    engine = start_engine(counter_config(rate=rate, total=0, broadcast="params.sndhwm = 20"))
    slow = sub_socket(ipc(engine, "broadcast"), wire.ALL_TOPIC, hwm=10, rcvbuf=4096)  # subscribes, then does not read
    try:
        with StreamConsumer.for_engine(engine.info()["runtime_dir"]) as fast:
            got: list[wire.Message] = []
            wait_for(lambda: got.extend(take(fast, 0.1)) or len(got) > 50, 20, "data flowing")
            before_tokens, before_source = engine.worker("broadcast")["stats"]["tokens"], _source_tokens(engine)
            before = _now()
            wait_for(lambda: got.extend(take(fast, 0.1)) or _now() - before > 3, 10, "3 s")
            after_tokens, after_source = engine.worker("broadcast")["stats"]["tokens"], _source_tokens(engine)
            elapsed = _now() - before
        # the pipeline keeps the source's pace, and the broadcast keeps up with the source
        assert (after_source - before_source) / elapsed > 0.8 * rate
        assert after_tokens - before_tokens >= 0.9 * (after_source - before_source)
        # the fast consumer has every row, in order, from the first it saw
        for seqs in seqs_by_stream(got).values():
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert fast.counts["gaps"] == 0
        # ZeroMQ dropped for the slow subscriber only: it holds a fraction of what was published
        published = engine.worker("broadcast")["stats"]["tokens"]
        held = sum(b.rows for b in drain(slow))
        assert held < published / 2, (held, published)
    finally:
        slow.close(0)


def _source_tokens(engine) -> int:
    return engine.worker("source")["stats"]["batches"] * BATCH


def _now() -> float:
    return time.monotonic()


# ---- tail, against ingest -> broadcast (streams with a start and an end) ------------------------

INGEST_CONFIG = """
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 1.0

[workers.ingest]
stage = "ingest"
outputs = ["ingest-broadcast"]
params.client_requests_per_s = 1000
params.client_burst = 1000
params.embedded = { tokens_per_s = 200 }

[workers.broadcast]
stage = "broadcast"
inputs = ["ingest-broadcast"]
"""


@pytest.mark.timeout(60)
def test_tail_prints_one_stream_from_its_start_and_exits_at_its_end(start_engine):
    engine = start_engine(INGEST_CONFIG)
    body = {"messages": [{"role": "user", "content": "tail me"}], "max_tokens": 30, "ignore_eos": True}
    with RequestClient(ingest_endpoint(engine.info()["runtime_dir"])) as client:
        sid = client.submit(body)
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "tail", "--stream", str(sid), "--format", "json"],
        env=engine.env(),
        capture_output=True,
        timeout=40,
    )
    assert out.returncode == 0, out.stderr
    lines = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [line["type"] for line in (lines[0], lines[-1])] == ["start", "end"]
    tokens = [line for line in lines if line["type"] == "tokens"]
    assert [t["seq"] for t in tokens] == list(range(1, 31))
    assert all(line["stream"] == sid and line["recv_ns"] > 0 for line in lines)


# ---- the stage in-process over a real ring --------------------------------------------------------

EXTRA = (ExtraColumn("hilbert", "f4", 2), ExtraColumn("rgba", "u1", 4), ExtraColumn("conf", "f4"))


def _write(producer: Producer, rows: list[tuple[int, int, int, bytes]]) -> None:
    texts = [r[3] for r in rows]
    view = producer.try_claim(batch_size(len(rows), sum(map(len, texts)), EXTRA))
    cols = write_batch(view, len(rows), sum(map(len, texts)), EXTRA)
    cols.stream_id[:] = [r[0] for r in rows]
    cols.seq[:] = [r[1] for r in rows]
    cols.kind[:] = [r[2] for r in rows]
    cols.token_id[:] = 7
    cols.logprob[:] = -0.5
    cols.recv_ns[:] = 1234
    cols.text_end[:] = np.cumsum([len(t) for t in texts])
    cols.text[:] = np.frombuffer(b"".join(texts), np.uint8)
    cols.extra["hilbert"][:] = [[i, i + 0.5] for i in range(len(rows))]
    cols.extra["rgba"][:] = [[i, 1, 2, 3] for i in range(len(rows))]
    cols.extra["conf"][:] = 0.25
    del cols
    view.release()
    producer.commit(16)


@pytest.fixture
def stage_on_ring(tmp_path):
    """The broadcast stage in this process over a real ring: (stage, producer, ctx); params from
    ``request.param`` when given."""
    made = []

    def make(**stage_params):
        name = segment_name("t" + uuid.uuid4().hex[:10], "bc")
        ring = Ring.create(name, 1 << 20)
        producer, consumer = Producer.attach(name), Consumer.attach(name)
        ctx = WorkerContext(
            "broadcast", stage_params, [consumer], [], JsonLogger("broadcast", "error"), str(tmp_path),
            str(tmp_path), 0,
        )  # fmt: skip
        stage = Broadcast()
        stage.start(ctx)
        made.append((stage, producer, consumer, ring))
        return stage, producer, ctx

    yield make
    for stage, producer, consumer, ring in made:
        stage.close()
        producer.close()
        consumer.close()
        ring.destroy()


def test_stage_publishes_every_kind_and_appended_column_and_drops_resent_rows(stage_on_ring):
    stage, producer, ctx = stage_on_ring()
    subs = {enc: sub_socket(ctx.endpoint(ep), wire.ALL_TOPIC, wire.topic(9))
            for enc, ep in (("json", ""), ("binary", "binary"))}  # fmt: skip
    try:
        wait_for(lambda: stage.do_work() >= 0 and stage.stats()["subscriptions"] >= 4, 5, "the subscriptions")
        start = orjson.dumps({"model": "m", "cached": True, "cache_key": "ab"})
        end = orjson.dumps({"finish_reason": "stop", "usage": {"completion_tokens": 2}})
        rows = [(9, 0, Kind.START, start), (9, 1, Kind.TOKEN, b"he"), (9, 2, Kind.TOKEN, "llo é".encode()),
                (9, 3, Kind.END, end)]  # fmt: skip
        _write(producer, rows)
        _write(producer, rows[1:3])  # re-sent, as after an upstream restart: dropped
        wait_for(lambda: stage.do_work() == 0, 5, "the ring drained")
        for enc, sock in subs.items():
            got = drain(sock, 2000)
            batches = [m for m in got if isinstance(m, wire.Batch)]
            assert [b.rows for b in batches] == [4, 0], enc  # the re-sent record: a batch of no rows
            assert batches[0].next == batches[1].at and batches[0].at == 0
            first = batches[0]
            assert first.texts == ['{"model":"m","cached":true}', "he", "llo é", end.decode()]  # no cache_key
            assert first.columns["kind"].tolist() == [Kind.START, Kind.TOKEN, Kind.TOKEN, Kind.END]
            assert first.columns["hilbert"].tolist()[1] == [1.0, 1.5] and first.columns["rgba"].tolist()[2] == [
                2,
                1,
                2,
                3,
            ]
            stream = [m for m in got if not isinstance(m, wire.Batch)]
            assert [m.type for m in stream] == ["start", "tokens", "end"], enc
            assert stream[0].header["model"] == "m" and stream[0].header["cached"] is True
            assert "cache_key" not in stream[0].header
            assert stream[2].header["finish_reason"] == "stop" and stream[2].header["usage"] == {"completion_tokens": 2}
            assert all(m.header["recv_ns"] == 1234 for m in (stream[0], stream[2]))
            tokens = stream[1]
            assert tokens.seq == (1, 2) and tokens.text == ["he", "llo é"]
            assert tokens.columns["recv_ns"].tolist() == [1234, 1234]
            assert tokens.columns["hilbert"].tolist() == [[1.0, 1.5], [2.0, 2.5]]
            assert tokens.columns["rgba"].tolist() == [[1, 1, 2, 3], [2, 1, 2, 3]]
            assert tokens.columns["conf"].tolist() == [0.25, 0.25]
        stats = stage.stats()
        assert stats["duplicates"] == 2 and stats["gaps"] == 0 and stats["messages"] == 3 and stats["batches"] == 2
    finally:
        for sock in subs.values():
            sock.close(0)


def test_junk_from_a_subscriber_never_stops_publishing(stage_on_ring):
    """Issue 13.6: an XSUB can send any bytes up to the XPUB; they are not subscriptions."""
    stage, producer, ctx = stage_on_ring()
    good = sub_socket(ctx.endpoint(), wire.ALL_TOPIC)
    junk = zmq.Context.instance().socket(zmq.XSUB)
    junk.setsockopt(zmq.LINGER, 0)
    junk.connect(ctx.endpoint())
    try:
        wait_for(lambda: stage.do_work() >= 0 and stage.stats()["subscriptions"] >= 1, 5, "the subscription")
        for frame in (b"", b"\x02junk", b"\x00all", b"\x00all", b"\x00nobody", b"x" * 1000, b"\x00"):
            junk.send(frame)
        wait_for(lambda: stage.do_work() >= 0 and stage.stats()["subscription_junk"] >= 2, 5, "the junk counted")
        _write(producer, [(1, 0, Kind.TOKEN, b"still here")])
        wait_for(lambda: stage.do_work() == 0, 5, "the ring drained")
        got = drain(good, 2000)
        assert [b.texts for b in got] == [["still here"]]
    finally:
        good.close(0)
        junk.close(0)


def test_a_flood_of_subscriptions_gets_one_welcome_per_duty_cycle_and_publishing_goes_on(stage_on_ring):
    """Each new subscription is welcomed with a heartbeat; an XSUB subscribing over and over must
    not turn that into a heartbeat per message, nor hold up publishing."""
    stage, producer, ctx = stage_on_ring(heartbeat_s=60)
    good = sub_socket(ctx.endpoint(), wire.ALL_TOPIC, wire.HEARTBEAT_TOPIC)
    flood = zmq.Context.instance().socket(zmq.XSUB)
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect(ctx.endpoint())
    cycles = 0

    def turn() -> int:
        nonlocal cycles
        cycles += 1
        return stage.do_work()

    try:
        wait_for(lambda: turn() >= 0 and good.poll(0), 5, "the good subscriber's welcome")
        drain(good)
        cycles = 0
        for i in range(3000):  # what ZeroMQ's queues hold of it reaches the stage (1,000 at least)
            with contextlib.suppress(zmq.Again):
                flood.send(b"\x01" + wire.topic(i % 7 + 1), zmq.NOBLOCK)
        wait_for(lambda: turn() >= 0 and stage.stats()["subscriptions"] >= 1002, 5, "the flood read")
        _write(producer, [(1, 0, Kind.TOKEN, b"still here")])
        wait_for(lambda: turn() == 0, 5, "the ring drained")
        got = []
        while good.poll(200):
            got.append(wire.decode(good.recv_multipart()))
        heartbeats = [m for m in got if m.type == "heartbeat"]
        assert 1 <= len(heartbeats) <= cycles  # 1,000+ subscriptions, one welcome per duty cycle at most
        assert [b.texts for b in got if isinstance(b, wire.Batch)] == [["still here"]]
    finally:
        good.close(0)
        flood.close(0)


def snapshot_client(ctx) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ctx.endpoint("snapshot"))
    return sock


def replies(stage, sock: zmq.Socket, end_type: str) -> tuple[list, dict]:
    """What the stage sends ``sock`` up to the end marker: (messages, the marker)."""
    got = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stage.do_work()
        while sock.poll(10):
            frames = sock.recv_multipart()
            if frames[0] == b"":
                marker = orjson.loads(frames[1])
                assert marker["type"] == end_type, marker
                return got, marker
            got.append(wire.decode(frames))
    raise AssertionError("no end marker")


def test_batches_request_repairs_from_a_position_and_names_what_was_evicted(stage_on_ring):
    stage, producer, ctx = stage_on_ring(retention_bytes=6000)
    for i in range(20):
        _write(producer, [(1, i, Kind.TOKEN, b"x" * 100)])
    wait_for(lambda: stage.do_work() == 0, 5, "the ring drained")
    sock = snapshot_client(ctx)
    try:
        sock.send(orjson.dumps({"type": "batches", "from": 0, "encoding": "binary"}))
        got, marker = replies(stage, sock, "batches_end")
        assert marker["first"] > 0 and got[0].at == marker["first"]  # the oldest were evicted: named
        assert [b.columns["seq"].tolist() for b in got] == [[i] for i in range(20 - len(got), 20)]
        assert marker["next"] == got[-1].next == stage.stats()["position"] and marker["more"] is False
        sock.send(orjson.dumps({"type": "snapshot", "stream": 1, "from_seq": 18}))
        got, marker = replies(stage, sock, "snapshot_end")
        assert [m.seq for m in got] == [(18, 18), (19, 19)] and marker["published"] == 20
        sock.send(b"not json")
        _, marker = replies(stage, sock, "snapshot_end")
        assert "bad request" in marker["error"]
    finally:
        sock.close(0)


def test_a_flood_of_snapshot_requests_does_not_starve_publishing(stage_on_ring):
    """Issue 13.4: each duty cycle reads a bounded number of requests, and a client over its rate
    gets no answers; records keep being published between them."""
    stage, producer, ctx = stage_on_ring()
    sub = sub_socket(ctx.endpoint(), wire.ALL_TOPIC)
    flood = snapshot_client(ctx)
    flood.setsockopt(zmq.SNDHWM, 0)  # queue the whole flood at the client
    try:
        wait_for(lambda: stage.do_work() >= 0 and stage.stats()["subscriptions"] >= 1, 5, "the subscription")
        request = orjson.dumps({"type": "snapshot", "stream": 1, "from_seq": 0})
        for _ in range(5000):
            flood.send(request)
        wait_for(lambda: stage.router.poll(0), 5, "requests arriving")
        _write(producer, [(1, 0, Kind.TOKEN, b"through")])
        began = time.monotonic()
        stage.do_work()  # one cycle: a bounded number of requests, then the record
        assert time.monotonic() - began < 1.0
        assert [b.texts for b in drain(sub, 2000)] == [["through"]]
        wait_for(lambda: stage.do_work() == 0 and stage.stats()["snapshots_refused"] > 0, 20, "the flood read")
        stats = stage.stats()
        assert stats["snapshots"] < 2000 < stats["snapshots"] + stats["snapshots_refused"], stats  # not 5000 answers
    finally:
        sub.close(0)
        flood.close(0)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"sndhwm": -1}, "params.sndhwm: must be >= 0"),
        ({"retention_s": "long"}, "params.retention_s: must be a number"),
        ({"endpoints": [{"url": "tcp://127.0.0.1:1", "encoding": "xml"}]}, r"endpoints\[0\].encoding: must be one of"),
        ({"endpoints": [{"url": "http://x"}]}, r"endpoints\[0\].url: must be a tcp:// or ipc://"),
        ({"heartbeat": 1}, "params.heartbeat: unknown key"),
        ({"heartbeat_s": 1e-9}, "params.heartbeat_s: must be >= 0.01"),  # a heartbeat every duty cycle
    ],
)
def test_bad_params_are_refused_with_the_key_named(given, message):
    with pytest.raises(ValueError, match=message):
        Broadcast.parse_params(given)


def test_params_defaults_and_extra_endpoints():
    p = Broadcast.parse_params(
        {"endpoints": [{"url": "tcp://0.0.0.0:5556", "encoding": "binary"}], "retention_s": 10, "curve": True}
    )
    assert p.endpoints == [Endpoint(url="tcp://0.0.0.0:5556", encoding="binary")]
    assert p.retention_s == 10.0 and p.sndhwm == 10_000


def test_requests_and_subscriptions_are_read_while_records_flow_back_to_back(stage_on_ring):
    """A turn with a record waiting does not ask every socket (each asking is a system call), but
    one does every SOCKETS_EVERY_S: records that never let a turn idle starve no snapshot request
    and hide no new subscriber."""
    stage, producer, ctx = stage_on_ring()
    sock = snapshot_client(ctx)
    sub = sub_socket(ctx.endpoint(), wire.ALL_TOPIC)
    try:
        sock.send(orjson.dumps({"type": "batches", "from": None, "encoding": "binary"}))
        answer, received, seq = None, [], 0
        deadline = time.monotonic() + 5
        while (answer is None or not received) and time.monotonic() < deadline:
            _write(producer, [(1, seq, Kind.TOKEN, b"x")])
            seq += 1
            assert stage.do_work() >= 1  # a record in every turn: none idle
            if sock.poll(0):
                answer = orjson.loads(sock.recv_multipart()[1])
            received += drain(sub)
        assert answer is not None and answer["type"] == "batches_end"
        assert received and all(isinstance(b, wire.Batch) for b in received)
    finally:
        sock.close(0)
        sub.close(0)
