"""The consumer client against a fake broadcast (a ROUTER and a PUB bound by the test): merge in
order, duplicates dropped, holes refilled from the snapshot endpoint, rows the broadcast no longer
retains counted as gaps; and the wire format's round trip in both encodings."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import zmq

from engine import wire
from engine.consumer import StreamConsumer


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


@pytest.fixture
def broadcast(tmp_path):
    """A fake broadcast: (PUB url, ROUTER) bound in tmp_path."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp_path}/snap.sock")
    yield f"ipc://{tmp_path}/pub.sock", router
    router.close(0)


def consumer(broadcast, stream: int | None = None) -> StreamConsumer:
    pub_url, router = broadcast
    return StreamConsumer(pub_url, router.getsockopt_string(zmq.LAST_ENDPOINT), stream)


def seqs(messages: list[wire.Message]) -> list[int]:
    return [s for m in messages for s in range(m.seq[0], m.seq[1] + 1)]


def test_out_of_order_and_overlapping_messages_come_out_in_order_once(broadcast):
    with consumer(broadcast) as c:
        for first, last in ((0, 3), (8, 11), (4, 7), (2, 5), (10, 13)):
            c._accept(wire.decode(tokens(1, first, last)))
        out = list(c.ready)
    assert seqs(out) == list(range(14))
    assert out[-1].text == ["t12 ", "t13 "]  # (10, 13) trimmed to what was new
    assert c.counts["duplicates"] == 1 and c.counts["gaps"] == 0


def test_a_hole_is_refilled_from_the_snapshot_endpoint(broadcast):
    _, router = broadcast
    with consumer(broadcast) as c:
        c._accept(wire.decode(tokens(3, 0, 3)))
        c._accept(wire.decode(tokens(3, 8, 11)))  # 4..7 dropped on the way
        assert router.poll(5000)
        identity, raw = router.recv_multipart()
        request = orjson.loads(raw)
        assert request == {"type": "snapshot", "stream": 3, "from_seq": 4, "reason": "gap"}
        router.send_multipart([identity, *tokens(3, 2, 9)])  # retention overlaps both sides
        router.send_multipart([identity, b"", orjson.dumps({"type": "snapshot_end", "stream": 3}), b""])
        out = list(c.messages(idle_timeout_s=0.5))
    assert seqs(out) == list(range(12))
    assert c.counts["gaps"] == 0


def test_rows_no_longer_retained_are_skipped_and_counted(broadcast):
    _, router = broadcast
    with consumer(broadcast) as c:
        c._accept(wire.decode(tokens(3, 0, 3)))
        c._accept(wire.decode(tokens(3, 8, 11)))
        assert router.poll(5000)
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, b"", orjson.dumps({"type": "snapshot_end", "stream": 3}), b""])
        out = list(c.messages(idle_timeout_s=0.5))
    assert seqs(out) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert c.counts["gaps"] == 4


def test_one_stream_asks_for_its_beginning_at_once_and_ends_with_it(broadcast):
    _, router = broadcast
    with consumer(broadcast, stream=7) as c:
        assert router.poll(5000)
        identity, raw = router.recv_multipart()
        assert orjson.loads(raw) | {"reason": None} == {"type": "snapshot", "stream": 7, "from_seq": 0, "reason": None}
        router.send_multipart([identity, *wire.encode_event("start", 7, 0, "json", model="m", cached=False)])
        router.send_multipart([identity, *tokens(7, 1, 2)])
        router.send_multipart([identity, *wire.encode_event("end", 7, 3, "json", finish_reason="stop", usage=None)])
        out = list(c.messages())  # returns at the stream's end
    assert [m.type for m in out] == ["start", "tokens", "end"]
    assert seqs(out) == [0, 1, 2, 3] and out[0].header["model"] == "m"


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_wire_round_trip_with_appended_columns(encoding):
    hilbert = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    rgba = np.array([[1, 2, 3, 4]] * 3, dtype=np.uint8)
    message = wire.decode(tokens(2**40, 10, 12, encoding, hilbert=hilbert, rgba=rgba))
    assert message.stream == 2**40 and message.seq == (10, 12)
    assert message.columns["hilbert"].tolist() == hilbert.tolist()
    assert message.columns["rgba"].tolist() == rgba.tolist()
    assert np.isnan(message.columns["logprob"]).all()
    trimmed = message.trimmed(12)
    assert trimmed.seq == (12, 12) and trimmed.text == ["t12 "] and trimmed.columns["hilbert"].tolist() == [[5, 6]]


def test_topics_never_prefix_another_stream():
    assert wire.topic(1) == b"0000000000000001" and len(wire.topic(2**64 - 1)) == 16
    assert not wire.topic(0x10).startswith(wire.topic(0x1))


def test_malformed_messages_raise_a_wire_error_naming_the_problem():
    with pytest.raises(wire.WireError, match="3 frames"):
        wire.decode([b"x"])
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.decode([b"t", b"{", b""])


def test_a_hole_published_after_the_snapshot_answer_is_asked_again_not_lost(broadcast):
    """The race of a late subscription: the snapshot was answered before rows 6..7 were published
    and the live subscription took effect after them; the answer says so (``published``)."""
    _, router = broadcast
    with consumer(broadcast) as c:
        c._accept(wire.decode(tokens(3, 0, 3)))
        c._accept(wire.decode(tokens(3, 8, 11)))
        assert router.poll(5000)
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, *tokens(3, 4, 5)])
        end = {"type": "snapshot_end", "stream": 3, "published": 6}
        router.send_multipart([identity, b"", orjson.dumps(end), b""])
        first = list(c.messages(idle_timeout_s=0.3))
        assert router.poll(5000)
        identity, raw = router.recv_multipart()
        assert orjson.loads(raw)["from_seq"] == 6
        router.send_multipart([identity, *tokens(3, 6, 7)])
        router.send_multipart([identity, b"", orjson.dumps(end | {"published": 12}), b""])
        out = first + list(c.messages(idle_timeout_s=0.3))
    assert seqs(out) == list(range(12)) and c.counts["gaps"] == 0


def test_an_unanswered_snapshot_request_is_sent_again(broadcast, monkeypatch):
    """A broadcast killed with a request in flight never answers it: the client asks again."""
    monkeypatch.setattr("engine.consumer.ASK_TIMEOUT_S", 0.2)
    _, router = broadcast
    with consumer(broadcast) as c:
        c._accept(wire.decode(tokens(5, 0, 3)))
        c._accept(wire.decode(tokens(5, 8, 11)))  # a hole: asked for
        assert router.poll(5000)
        router.recv_multipart()  # ... and never answered
        out = list(c.messages(idle_timeout_s=0.3))  # 0..3, then nothing: the hole waits
        assert router.poll(5000)  # the request again, from the same seq
        identity, raw = router.recv_multipart()
        assert orjson.loads(raw)["from_seq"] == 4 and orjson.loads(raw)["reason"] == "retry"
        router.send_multipart([identity, *tokens(5, 4, 7)])
        router.send_multipart([identity, b"", orjson.dumps({"type": "snapshot_end", "stream": 5}), b""])
        out += list(c.messages(idle_timeout_s=0.5))
    assert seqs(out) == list(range(12)) and c.counts["gaps"] == 0
