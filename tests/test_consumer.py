"""The consumer client against a fake broadcast (a PUB and a ROUTER bound by the test): one stream
merged in order from live and snapshot messages, holes refilled, what is no longer retained ended
explicitly; every stream from batch messages in position order, holes repaired with ``batches``
requests, what is lost or unreachable ended explicitly; and the wire format's round trips."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest
import zmq
from engine_harness import wait_for

from engine.clients.consumer import ConsumerCore, StreamConsumer
from engine.protocol import wire

EPOCH = 77


def tokens(stream: int, first: int, last: int, encoding: str = "json", **extra: np.ndarray) -> list[bytes]:
    seq = np.arange(first, last + 1, dtype=np.uint64)
    n = len(seq)
    columns = {
        "seq": seq,
        "token_id": np.arange(n, dtype=np.uint32),
        "logprob": np.full(n, np.nan, np.float32),
        "recv_ns": np.full(n, 5, np.int64),
        **extra,
    }
    return list(wire.encode_tokens(stream, columns, [f"t{s} " for s in seq.tolist()], encoding))


def batch(at: int, rows: list[tuple[int, int, int, str]], encoding: str = "binary", epoch: int = EPOCH) -> list[bytes]:
    """A batch message at positions [at, at + 1) of rows (stream, seq, kind, text)."""
    n = len(rows)
    columns = {
        "stream_id": np.array([r[0] for r in rows], np.uint64),
        "seq": np.array([r[1] for r in rows], np.uint64),
        "kind": np.array([r[2] for r in rows], np.uint8),
        "token_id": np.arange(n, dtype=np.uint32),
        "logprob": np.full(n, -0.5, np.float32),
        "recv_ns": np.full(n, 9, np.int64),
        "conf": np.linspace(0, 1, n, dtype=np.float32),
        "hilbert": np.arange(2 * n, dtype=np.uint16).reshape(n, 2),
    }
    texts = wire.Texts.from_list([r[3] for r in rows])
    return list(wire.encode_batch(wire.Batch(epoch, at, at + 1, columns, texts), encoding))


S, T, E = wire.START, wire.TOKEN, wire.END
START_TEXT = '{"model":"m","cached":false}'


@pytest.fixture
def broadcast(tmp_path):
    """A fake broadcast: (PUB, ROUTER) bound in tmp_path."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp_path}/pub.sock")
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp_path}/snap.sock")
    yield pub, router
    pub.close(0)
    router.close(0)


def consumer(broadcast, stream: int | None = None, **options) -> StreamConsumer:
    pub, router = broadcast
    return StreamConsumer(
        pub.getsockopt_string(zmq.LAST_ENDPOINT), router.getsockopt_string(zmq.LAST_ENDPOINT), stream, **options
    )


def request(router: zmq.Socket) -> tuple[bytes, dict]:
    assert router.poll(5000), "no request came"
    identity, raw = router.recv_multipart()
    return identity, orjson.loads(raw)


def end_marker(router: zmq.Socket, identity: bytes, **fields) -> None:
    router.send_multipart([identity, b"", orjson.dumps({"v": 2, **fields}), b""])


def seqs(messages: list[wire.Message]) -> list[int]:
    return [s for m in messages for s in range(m.seq[0], m.seq[1] + 1)]


# ---- one stream ---------------------------------------------------------------------------------


def joined(broadcast, sid: int) -> tuple[StreamConsumer, bytes]:
    """A one-stream consumer whose join request was answered with nothing yet published."""
    c = consumer(broadcast, stream=sid)
    identity, ask = request(broadcast[1])
    assert ask == {"type": "snapshot", "stream": sid, "from_seq": 0, "reason": "join", "encoding": "json"}
    end_marker(broadcast[1], identity, type="snapshot_end", stream=sid, published=0, complete=False)
    wait_for(lambda: c._pump() or not c.streams[sid].asked, 5, "the join answered")
    return c, identity


def test_one_stream_out_of_order_and_overlapping_messages_come_out_in_order_once(broadcast):
    with consumer(broadcast, stream=1) as c:
        for first, last in ((0, 3), (8, 11), (4, 7), (2, 5), (10, 13)):
            c._accept(wire.decode(tokens(1, first, last)))
        out = list(c.ready)
    assert seqs(out) == list(range(14))
    assert out[-1].text == ["t12 ", "t13 "]  # (10, 13) trimmed to what was new
    assert c.counts["duplicates"] == 1 and c.counts["gaps"] == 0


def test_one_stream_hole_is_refilled_from_the_snapshot_endpoint(broadcast):
    _, router = broadcast
    c, _ = joined(broadcast, 3)
    with c:
        c._accept(wire.decode(tokens(3, 0, 3)))
        c._accept(wire.decode(tokens(3, 8, 11)))  # 4..7 dropped on the way
        identity, ask = request(router)
        assert ask["from_seq"] == 4 and ask["reason"] == "gap"
        router.send_multipart([identity, *tokens(3, 2, 9)])  # the reply overlaps both sides
        end_marker(router, identity, type="snapshot_end", stream=3, published=12, complete=True)
        out = list(c.messages(idle_timeout_s=0.5))
    assert seqs(out) == list(range(12)) and c.counts["gaps"] == 0


def test_one_stream_whose_missing_rows_are_no_longer_retained_ends_explicitly_at_once(broadcast):
    """Issue 12.3: the rows of the hole were published (``published``) and are not in the reply:
    the stream ends at the client with an explicit error instead of being asked for forever."""
    _, router = broadcast
    c, _ = joined(broadcast, 3)
    with c:
        c._accept(wire.decode(tokens(3, 0, 3)))
        c._accept(wire.decode(tokens(3, 8, 11)))
        identity, _ = request(router)
        end_marker(router, identity, type="snapshot_end", stream=3, published=12, complete=False)
        out = list(c.messages(idle_timeout_s=2))  # returns at the stream's (explicit) end
    assert [m.type for m in out] == ["tokens", "error"]
    assert out[-1].header["synthetic"] is True and "4..7 are no longer retained" in out[-1].header["reason"]
    assert c.counts["gaps"] == 4 and c.counts["lost_streams"] == 1


def test_one_stream_hole_that_answers_never_fill_ends_after_a_bounded_number_of_asks(broadcast, monkeypatch):
    """Issue 12.3 (the 470 requests): the broadcast no longer knows the stream (``published`` 0,
    its slot reused), so every answer leaves the hole: after MAX_FRUITLESS_ASKS the stream ends."""
    _, router = broadcast
    c, _ = joined(broadcast, 3)
    asks = 0
    with c:
        c._accept(wire.decode(tokens(3, 0, 3)))
        c._accept(wire.decode(tokens(3, 8, 11)))
        out: list[wire.Message] = []
        deadline = time.monotonic() + 20
        while not out or out[-1].type != "error":
            assert time.monotonic() < deadline, f"still open after {asks} asks"
            if router.poll(0):
                identity, _ = router.recv_multipart()
                asks += 1
                end_marker(router, identity, type="snapshot_end", stream=3, published=0, complete=False)
            out += list(c.messages(idle_timeout_s=0.05))
    assert asks <= 10 and "never came" in out[-1].header["reason"]


def test_one_stream_asks_for_its_beginning_at_once_and_ends_with_it(broadcast):
    _, router = broadcast
    with consumer(broadcast, stream=7, encoding="binary") as c:
        identity, ask = request(router)
        assert ask["stream"] == 7 and ask["from_seq"] == 0 and ask["encoding"] == "binary"
        router.send_multipart([identity, *wire.encode_event("start", 7, 0, "json", model="m", cached=False)])
        router.send_multipart([identity, *tokens(7, 1, 2, "binary")])
        router.send_multipart([identity, *wire.encode_event("end", 7, 3, "json", finish_reason="stop", usage=None)])
        out = list(c.messages())  # returns at the stream's end
    assert [m.type for m in out] == ["start", "tokens", "end"]
    assert seqs(out) == [0, 1, 2, 3] and out[0].header["model"] == "m"


def test_one_stream_hole_published_after_the_snapshot_answer_is_asked_again_not_lost(broadcast):
    _, router = broadcast
    c, _ = joined(broadcast, 3)
    with c:
        c._accept(wire.decode(tokens(3, 0, 3)))
        c._accept(wire.decode(tokens(3, 8, 11)))
        identity, _ = request(router)
        router.send_multipart([identity, *tokens(3, 4, 5)])
        end_marker(router, identity, type="snapshot_end", stream=3, published=6, complete=True)
        first = list(c.messages(idle_timeout_s=0.3))
        identity, ask = request(router)
        assert ask["from_seq"] == 6
        router.send_multipart([identity, *tokens(3, 6, 7)])
        end_marker(router, identity, type="snapshot_end", stream=3, published=12, complete=True)
        out = first + list(c.messages(idle_timeout_s=0.3))
    assert seqs(out) == list(range(12)) and c.counts["gaps"] == 0


def test_one_stream_unanswered_snapshot_request_is_sent_again(broadcast, monkeypatch):
    monkeypatch.setattr("engine.clients.consumer.ASK_TIMEOUT_S", 0.2)
    _, router = broadcast
    c, _ = joined(broadcast, 5)
    with c:
        c._accept(wire.decode(tokens(5, 0, 3)))
        c._accept(wire.decode(tokens(5, 8, 11)))  # a hole: asked for ...
        request(router)  # ... and never answered
        out = list(c.messages(idle_timeout_s=0.3))
        identity, ask = request(router)
        assert ask["from_seq"] == 4 and ask["reason"] == "retry"
        router.send_multipart([identity, *tokens(5, 4, 7)])
        end_marker(router, identity, type="snapshot_end", stream=5, published=12, complete=True)
        out += list(c.messages(idle_timeout_s=0.5))
    assert seqs(out) == list(range(12)) and c.counts["gaps"] == 0


# ---- every stream: batches ------------------------------------------------------------------------


def started(broadcast, position: int = 10, **options) -> tuple[StreamConsumer, bytes]:
    """A wildcard consumer that asked where to start and was told ``position``."""
    c = consumer(broadcast, **options)
    identity, ask = request(broadcast[1])
    assert ask == {"type": "batches", "from": None, "encoding": "json"}
    end_marker(broadcast[1], identity, type="batches_end", epoch=EPOCH, first=0, next=position, more=False)
    wait_for(lambda: c._pump() or c.expected == position, 5, "the start position")
    return c, identity


def test_batches_come_in_position_order_once_and_a_hole_is_repaired(broadcast):
    _, router = broadcast
    c, _ = started(broadcast)
    with c:
        c._accept_batch(wire.decode(batch(10, [(1, 0, S, START_TEXT), (2, 0, S, START_TEXT), (1, 1, T, "a")])))
        c._accept_batch(wire.decode(batch(12, [(1, 3, T, "c"), (2, 1, T, "x")])))  # 11 dropped on the way
        identity, ask = request(router)
        assert ask == {"type": "batches", "from": 11, "encoding": "json"}
        router.send_multipart([identity, *batch(10, [(1, 0, S, START_TEXT)], "json")])  # overlap: dropped
        router.send_multipart([identity, *batch(11, [(1, 2, T, "b")], "json")])
        end_marker(router, identity, type="batches_end", epoch=EPOCH, first=5, next=13, more=False)
        got = list(c.batches(idle_timeout_s=0.3))
    assert [(b.at, b.rows) for b in got] == [(10, 3), (11, 1), (12, 2)]
    assert got[0].texts == [START_TEXT, START_TEXT, "a"] and got[2].texts == ["c", "x"]
    assert got[2].columns["hilbert"].tolist() == [[0, 1], [2, 3]]
    assert c.counts["lost_positions"] == 0 and c.counts["gaps"] == 0 and c.counts["duplicates"] == 1


def test_messages_split_batches_per_stream_in_seq_order(broadcast):
    c, _ = started(broadcast)
    with c:
        rows = [(1, 0, S, START_TEXT), (2, 0, S, START_TEXT), (1, 1, T, "a"), (2, 1, T, "x"), (1, 2, T, "b"),
                (1, 3, E, '{"finish_reason":"stop","usage":null}')]  # fmt: skip
        c._accept_batch(wire.decode(batch(10, rows)))
        c._accept_batch(wire.decode(batch(11, [(2, 1, T, "x"), (2, 2, T, "y")])))  # (2, 1) again: dropped
        out = list(c.messages(idle_timeout_s=0.2))
    by_stream = {sid: [(m.type, m.seq, m.text) for m in out if m.stream == sid] for sid in (1, 2)}
    assert by_stream[1] == [("start", (0, 0), []), ("tokens", (1, 2), ["a", "b"]), ("end", (3, 3), [])]
    assert by_stream[2] == [("start", (0, 0), []), ("tokens", (1, 1), ["x"]), ("tokens", (2, 2), ["y"])]
    assert out[0].header["model"] == "m" and c.counts["duplicates"] == 1


def test_positions_no_longer_retained_end_every_open_stream_explicitly(broadcast):
    _, router = broadcast
    c, _ = started(broadcast)
    with c:
        c._accept_batch(wire.decode(batch(10, [(1, 0, S, START_TEXT), (2, 0, S, START_TEXT)])))
        c._accept_batch(wire.decode(batch(11, [(2, 1, E, "{}")])))  # stream 2 ends: not open any more
        c._accept_batch(wire.decode(batch(40, [(1, 9, T, "late"), (3, 0, S, START_TEXT)])))
        identity, ask = request(router)
        assert ask["from"] == 12
        end_marker(router, identity, type="batches_end", epoch=EPOCH, first=40, next=41, more=False)
        got = list(c.batches(idle_timeout_s=0.3))
    lost = [b for b in got if b.header.get("synthetic")]
    assert len(lost) == 1 and lost[0].columns["stream_id"].tolist() == [1]
    assert lost[0].columns["kind"].tolist() == [wire.ERROR] and "no longer retains" in lost[0].texts[0]
    # stream 1's later rows are dropped (it ended at the client), stream 3 began after the loss
    assert got[-1].columns["stream_id"].tolist() == [3]
    assert c.counts["lost_streams"] == 1 and c.counts["lost_positions"] == 28


def test_joined_only_once_the_start_is_known_and_a_live_message_came(broadcast):
    pub, router = broadcast
    with consumer(broadcast) as c:
        assert not c.join(0.3)  # nothing answers: not joined, and join says so within its timeout
        identity, ask = request(router)
        assert ask == {"type": "batches", "from": None, "encoding": "json"}
        end_marker(router, identity, type="batches_end", epoch=EPOCH, first=0, next=4, more=False)
        wait_for(lambda: c._pump() or c.expected == 4, 5, "the start position")
        assert not c.joined  # the subscription may not be in place yet: what is published now may be dropped
        heartbeat = wire.encode_heartbeat(1, 0, EPOCH, 4, 1.0, 2.0)
        wait_for(lambda: pub.send_multipart(heartbeat) or c.join(0.05), 5, "joined")
        assert c.joined


def test_a_heartbeat_ahead_of_the_last_batch_shows_it_was_lost(broadcast):
    _, router = broadcast
    c, _ = started(broadcast)
    with c:
        c._accept_batch(wire.decode(batch(10, [(1, 0, S, START_TEXT)])))
        c._heartbeat(orjson.loads(wire.encode_heartbeat(1, 1, EPOCH, 12, 1.0, 2.0)[1]))
        identity, ask = request(router)
        assert ask["from"] == 11
        router.send_multipart([identity, *batch(11, [(1, 1, T, "a")])])
        end_marker(router, identity, type="batches_end", epoch=EPOCH, first=0, next=12, more=False)
        got = list(c.batches(idle_timeout_s=0.3))
    assert [b.at for b in got] == [10, 11]


def test_no_heartbeat_for_the_engine_timeout_ends_every_open_stream(broadcast):
    """Issue 12.4: the broadcast (or the whole engine) is gone: the client says so per open stream."""
    c, _ = started(broadcast, engine_timeout_s=0.5)
    with c:
        c._accept_batch(wire.decode(batch(10, [(1, 0, S, START_TEXT), (2, 0, S, START_TEXT)])))
        began = time.monotonic()
        out = []
        for message in c.messages(idle_timeout_s=3):
            out += [message] if message.type == "error" else []
            if len(out) == 2:
                break
    assert sorted(m.stream for m in out) == [1, 2] and time.monotonic() - began < 3
    assert all("engine unreachable" in m.header["reason"] and m.header["synthetic"] for m in out)
    assert c.counts["unreachable"] == 2


def test_one_stream_ends_when_the_engine_is_unreachable(broadcast):
    with consumer(broadcast, stream=4, engine_timeout_s=0.5) as c:
        out = list(c.messages(idle_timeout_s=5))
    assert [m.type for m in out] == ["error"] and "engine unreachable" in out[0].header["reason"]


def test_live_batches_and_heartbeats_through_the_socket(broadcast):
    pub, _ = broadcast
    c, _ = started(broadcast, position=0)
    with c:
        wait_for(lambda: pub.send_multipart(list(wire.encode_heartbeat(1, 0, EPOCH, 0, 1.0, 2.0))) or c._pump()
                 or (c.heartbeat_s == 1.0 and c.last_heard > 0), 5, "a heartbeat")  # fmt: skip
        for at in range(3):
            pub.send_multipart(batch(at, [(5, at, T, f"r{at}")]))
        got = []
        wait_for(lambda: got.extend(c.batches(idle_timeout_s=0.1)) or len(got) == 3, 5, "three batches")
    assert [b.texts[0] for b in got] == ["r0", "r1", "r2"]


# ---- the wire format ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_batch_round_trip_and_per_stream_split(encoding):
    rows = [(2**40, 0, S, START_TEXT), (3, 5, T, "é"), (2**40, 1, T, ""), (3, 6, T, "z z")]
    decoded = wire.decode(batch(100, rows, encoding))
    assert isinstance(decoded, wire.Batch) and (decoded.at, decoded.next, decoded.epoch) == (100, 101, EPOCH)
    assert decoded.columns["stream_id"].tolist() == [2**40, 3, 2**40, 3] and decoded.texts == [r[3] for r in rows]
    assert np.allclose(decoded.columns["conf"], np.linspace(0, 1, 4))
    taken = decoded.take(np.array([3, 1]))
    assert taken.texts == ["z z", "é"] and taken.columns["seq"].tolist() == [6, 5]
    split = [(m.type, m.stream, m.seq, m.text) for m in decoded.stream_messages()]
    assert split == [("tokens", 3, (5, 6), ["é", "z z"]), ("start", 2**40, (0, 0), []), ("tokens", 2**40, (1, 1), [""])]


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_tokens_round_trip_with_appended_columns(encoding):
    hilbert = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    rgba = np.array([[1, 2, 3, 4]] * 3, dtype=np.uint8)
    message = wire.decode(tokens(2**40, 10, 12, encoding, hilbert=hilbert, rgba=rgba))
    assert message.stream == 2**40 and message.seq == (10, 12)
    assert message.columns["hilbert"].tolist() == hilbert.tolist()
    assert message.columns["rgba"].tolist() == rgba.tolist()
    assert np.isnan(message.columns["logprob"]).all()
    trimmed = message.trimmed(12)
    assert trimmed.seq == (12, 12) and trimmed.text == ["t12 "] and trimmed.columns["hilbert"].tolist() == [[5, 6]]


def test_topics_never_prefix_another_stream_and_parse_back():
    assert wire.topic(1) == b"0000000000000001" and len(wire.topic(2**64 - 1)) == 16
    assert not wire.topic(0x10).startswith(wire.topic(0x1))
    assert wire.parse_topic(wire.topic(2**64 - 1)) == 2**64 - 1
    assert wire.parse_topic(b"all") is None and wire.parse_topic(b"zzzzzzzzzzzzzzzz") is None


def test_malformed_messages_raise_a_wire_error_naming_the_problem():
    with pytest.raises(wire.WireError, match="3 frames"):
        wire.decode([b"x"])
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.decode([b"t", b"{", b""])
    good = batch(0, [(1, 0, T, "a")])
    head = orjson.loads(good[1])
    head["columns"][0]["bytes"] = 10_000
    with pytest.raises(wire.WireError, match="overruns"):
        wire.decode([good[0], orjson.dumps(head), good[2]])
    head = orjson.loads(good[1]) | {"rows": 5}
    with pytest.raises(wire.WireError, match="holds 1 values"):
        wire.decode([good[0], orjson.dumps(head), good[2]])


@pytest.mark.parametrize(
    ("hang_timeout_s", "gives_up_after_s"),
    [(8.0, 13.0), (2, 7.0), (0.0, 5.0), (True, 5.0), (-1.0, 5.0), ("8", 5.0), (1e9, 5.0), (None, 5.0)],
)
def test_the_engine_timeout_waits_out_the_broadcasts_hang_timeout(hang_timeout_s, gives_up_after_s):
    """A broadcast stalled under its supervisor's hang timeout resumes and loses nothing; one past it
    is restarted and publishes what its predecessor had not released. A consumer that gave up after a
    fixed 5 s ended streams the engine then delivered (tests/test_gateway_restarts.py). It now waits
    the hang timeout its heartbeats announce, and 5 s more; a value that is no such time is ignored."""
    core = ConsumerCore(lambda frame: None, stream=7)
    head = orjson.loads(wire.encode_heartbeat(1, 1, EPOCH, 0, 1.0, 2.0)[1]) | {"hang_timeout_s": hang_timeout_s}
    core._heartbeat(head)
    heard = core.last_heard
    for t in np.arange(0.25, gives_up_after_s - 0.1, 0.25):  # ticking as a running consumer does
        core.tick(heard + t)
    core.tick(heard + gives_up_after_s - 0.1)
    assert core.counts["unreachable"] == 0 and not core.ready
    core.tick(heard + gives_up_after_s)
    assert [m.header["reason"] for m in core.ready] == [
        f"engine unreachable: nothing from the broadcast for {gives_up_after_s:g} s"
    ]


def test_time_the_consumer_was_not_running_is_not_the_engines_silence():
    """A consumer process stopped for 20 s (a suspended laptop, a debugger, SIGSTOP) resumes with the
    broadcast's messages of that time still unread in its socket: judged by its clock at once, the
    engine had been silent for 20 s and every open stream ended "unreachable". Silence is counted
    only while the consumer ran (ticks come every RESYNC_S / 4); a dead engine is still noticed."""
    core = ConsumerCore(lambda frame: None, stream=7)
    core._heartbeat(orjson.loads(wire.encode_heartbeat(1, 1, EPOCH, 0, 1.0, 2.0)[1]))
    start = core.last_heard
    core.tick(start + 0.25)
    core.tick(start + 20.25)  # the first tick after the stall: nothing read yet
    assert core.counts["unreachable"] == 0 and not core.ready
    for t in np.arange(20.5, 27.5, 0.25):  # resumed, and truly silent: 7 s of its own time
        core.tick(start + t)
    assert core.counts["unreachable"] == 1
