"""docs/wire-format.md is enough to read the broadcast: live messages and snapshot replies of a
real engine (ingest -> broadcast; a reply that thinks, then calls a tool: kinds 5 and 6), decoded
here with raw pyzmq sockets, json, struct and numpy only, as a consumer in another language would
(this file must not import engine.protocol.wire or the consumer client)."""

from __future__ import annotations

import itertools
import json
import os
import struct
import time

import numpy as np
import pytest
import zmq

from engine.clients.requests import RequestClient
from engine.protocol.requests import ingest_endpoint

CONFIG = """
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
params.heartbeat_s = 0.2
"""
TOKENS = 12
THINKING = 8  # the embedded upstream thinks 8 tokens at reasoning_effort "low", then calls the tool
KIND = {1: "start", 2: "token", 3: "end", 4: "error", 5: "reasoning", 6: "tool call"}


def decode_binary_columns(header: dict, payload: bytes) -> tuple[dict[str, np.ndarray], list[str]]:
    """The doc's binary payload: arrays at ``offset``, ``bytes`` long, of ``dtype`` x ``width``;
    ``text_end`` ends each row's text in the UTF-8 ``text`` arena."""
    rows, columns = header["rows"], {}
    for column in header["columns"]:
        raw = payload[column["offset"] : column["offset"] + column["bytes"]]
        if column["name"] == "seq" and rows:  # plain struct reads it too (unaligned, little-endian)
            assert struct.unpack_from("<Q", payload, column["offset"])[0] == int(np.frombuffer(raw, "<u8")[0])
        values = np.frombuffer(raw, dtype=np.dtype(column["dtype"]))
        columns[column["name"]] = values.reshape(rows, column["width"]) if column["width"] > 1 else values
    arena = columns.pop("text").tobytes()
    ends = [int(e) for e in columns.pop("text_end")]
    texts = [arena[s:e].decode() for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    return columns, texts


def decode(frames: list[bytes]) -> tuple[bytes, dict, dict[str, np.ndarray], list[str]]:
    topic, raw_header, payload = frames
    header = json.loads(raw_header)
    assert header["v"] == 2
    if header["type"] not in ("batch", "tokens", "reasoning", "tool_calls"):
        assert payload == b""
        return topic, header, {}, []
    if header["encoding"] == "json":
        body = json.loads(payload)
        texts = body.pop("text")
        return topic, header, {name: np.array(values, dtype=object) for name, values in body.items()}, texts
    columns, texts = decode_binary_columns(header, payload)
    return topic, header, columns, texts


@pytest.mark.timeout(90)
def test_live_and_snapshot_messages_decode_from_the_documented_format(start_engine):
    engine = start_engine(CONFIG)
    rd = engine.info()["runtime_dir"]
    ctx = zmq.Context.instance()
    subs = {}
    for name in ("broadcast", "broadcast-binary"):
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{os.path.join(rd, name)}.sock")
        sock.setsockopt(zmq.SUBSCRIBE, b"all")
        sock.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
        subs[name] = sock
    snap = ctx.socket(zmq.DEALER)
    snap.setsockopt(zmq.LINGER, 0)
    snap.connect(f"ipc://{os.path.join(rd, 'broadcast-snapshot')}.sock")
    try:
        epochs = set()
        for sock in subs.values():  # subscribed once a heartbeat came through
            assert sock.poll(5000)
            heartbeat = json.loads(sock.recv_multipart()[1])
            assert heartbeat["type"] == "heartbeat" and heartbeat["interval_s"] == 0.2
            epochs.add(heartbeat["epoch"])
        with RequestClient(ingest_endpoint(rd)) as client:
            body = {"messages": [{"role": "user", "content": "raw"}], "max_tokens": THINKING + TOKENS}
            tool = {"type": "function", "function": {"name": "lookup"}}
            body |= {"ignore_eos": True, "reasoning_effort": "low", "tools": [tool], "tool_choice": "required"}
            sid = client.submit(body)
        got = {name: {"rows": [], "positions": [], "heartbeats": []} for name in subs}
        deadline = time.monotonic() + 30
        while not all(any(r[2] == "end" for r in g["rows"]) for g in got.values()):
            assert time.monotonic() < deadline, "the stream did not end on both sockets"
            for name, sock in subs.items():
                while sock.poll(10):
                    topic, header, columns, texts = decode(sock.recv_multipart())
                    if header["type"] == "heartbeat":
                        assert topic == b"heartbeat" and isinstance(header["next"], int)
                        got[name]["heartbeats"].append(header)
                        continue
                    assert topic == b"all" and header["type"] == "batch" and header["rows"] == len(texts)
                    got[name]["positions"].append((header["at"], header["next"]))
                    for i, text in enumerate(texts):
                        row = (int(columns["stream_id"][i]), int(columns["seq"][i]), KIND[int(columns["kind"][i])])
                        got[name]["rows"].append((*row, text, int(columns["recv_ns"][i])))
        for name, g in got.items():
            rows = [r for r in g["rows"] if r[0] == sid]
            assert [r[1] for r in rows] == list(range(THINKING + TOKENS + 2)), name
            assert [r[2] for r in rows] == ["start", *["reasoning"] * THINKING, *["tool call"] * TOKENS, "end"], name
            pieces = [json.loads(r[3]) for r in rows if r[2] == "tool call"]
            assert pieces[0]["function"]["name"] == "lookup" and {p["index"] for p in pieces} == {0}
            assert set(json.loads("".join(p["function"]["arguments"] for p in pieces))) == {"text"}
            assert json.loads(rows[0][3]) == {"model": json.loads(rows[0][3])["model"], "cached": False}
            assert json.loads(rows[-1][3])["finish_reason"] in ("length", "stop")
            assert all(r[4] > 0 for r in rows)
            positions = g["positions"]
            assert all(b[0] == a[1] for a, b in itertools.pairwise(positions)), name  # no hole
        first_at = got["broadcast"]["positions"][0][0]

        # the stream so far, per stream, binary: start, tokens..., end; then snapshot_end
        snap.send(json.dumps({"type": "snapshot", "stream": sid, "from_seq": 0, "encoding": "binary"}).encode())
        messages, end = [], None
        while end is None:
            assert snap.poll(5000)
            frames = snap.recv_multipart()
            if frames[0] == b"":
                end = json.loads(frames[1])
                continue
            topic, header, columns, texts = decode(frames)
            assert topic == b"%016x" % sid and header["stream"] == sid
            messages.append((header["type"], tuple(header["seq"]), texts))
        last = THINKING + TOKENS + 1
        assert end == {"v": 2, "type": "snapshot_end", "stream": sid, "complete": True, "ended": True,
                       "published": last + 1, "more": False}  # fmt: skip
        assert messages[0][:2] == ("start", (0, 0)) and messages[-1][:2] == ("end", (last, last))
        runs = [(m[0], s) for m in messages[1:-1] for s in range(m[1][0], m[1][1] + 1)]
        assert runs == [("reasoning", s) for s in range(1, THINKING + 1)] + [
            ("tool_calls", s) for s in range(THINKING + 1, last)
        ]

        # the retained batches from a position, JSON, then batches_end
        snap.send(json.dumps({"type": "batches", "from": first_at}).encode())
        positions, end = [], None
        while end is None:
            assert snap.poll(5000)
            frames = snap.recv_multipart()
            if frames[0] == b"":
                end = json.loads(frames[1])
                continue
            _, header, _, _ = decode(frames)
            positions.append((header["at"], header["next"]))
        assert positions[0][0] <= first_at and end["type"] == "batches_end" and end["more"] is False
        assert end["next"] == positions[-1][1] and end["first"] <= first_at
        assert epochs == {end["epoch"]}
    finally:
        for sock in (*subs.values(), snap):
            sock.close(0)
