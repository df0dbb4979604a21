"""engine/protocol/wire.py writes the bytes docs/wire-format.md shows: the worked example of a
binary batch, header and payload, byte for byte (the spec is the contract; encoding shortcuts must
not move a byte)."""

from __future__ import annotations

import pathlib
import re

import numpy as np

from engine.protocol import wire
from shm.batch import ending_rows, event_rows

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


def documented_batch() -> tuple[bytes, bytes]:
    """The header and payload of the doc's worked binary batch example."""
    text = DOC.read_text()
    block = text[text.index("topic   all\nheader  {") :]
    block = block[: block.index("```")]
    header_part, dump = block.split("payload ", 1)
    header = "".join(line.strip() for line in header_part.removeprefix("topic   all\nheader").splitlines())
    hex_bytes = []
    for line in dump.splitlines()[1:]:
        match = re.match(r"([0-9a-f]{4})  ((?:[0-9a-f]{2} ?)+)", line)
        if match:
            hex_bytes += match.group(2).split()
    return header.encode(), bytes.fromhex("".join(hex_bytes))


def test_a_binary_batch_is_the_documented_bytes():
    want_header, want_payload = documented_batch()
    columns = {
        "stream_id": np.array([42, 43], "<u8"),
        "seq": np.array([5, 0], "<u8"),
        "kind": np.array([wire.TOKEN, wire.START], "u1"),
        "token_id": np.array([9906, 0x80001234], "<u4"),
        "logprob": np.array([-0.12, np.nan], "<f4"),
        "recv_ns": np.array([81234567890123, 81234568012345], "<i8"),
        "hilbert": np.array([[0.048828125, 0.158203125], [0, 0]], "<f4"),
        "conf": np.array([0.88692045, 0], "<f4"),
    }
    texts = wire.Texts.from_list([" Hello", '{"model":"qwen2.5-7b","cached":false}'])
    batch = wire.Batch(130593710473, 1048576, 1048960, columns, texts)
    topic, header, payload = wire.encode_batch(batch, "binary")
    assert topic == b"all"
    assert header == want_header
    assert payload == want_payload
    # the same columns as views of a wider record (strided) and from an arena encode the same
    wide = np.zeros((2, 3), "<f4")
    wide[:, :2] = columns["hilbert"]
    arena = b"".join(t.encode() for t in texts.list())
    strided = wire.Batch(130593710473, 1048576, 1048960, {**columns, "hilbert": wide[:, :2]},
                         wire.Texts(arena, np.array([6, len(arena)], "<u4")))  # fmt: skip
    assert wire.encode_batch(strided, "binary")[1:] == (want_header, want_payload)


def test_a_binary_tokens_message_decodes_to_what_was_encoded():
    columns = {"seq": np.array([5, 6], "<u8"), "token_id": np.array([9906, 1917], "<u4"),
               "hilbert": np.ones((2, 2), "<f4")}  # fmt: skip
    frames = wire.encode_tokens(42, columns, [" Hello", " world"], "binary")
    assert frames[1].startswith(b'{"v":2,"type":"tokens","stream":42,"seq":[5,6],"encoding":"binary","rows":2,')
    message = wire.decode(list(frames))
    assert message.text == [" Hello", " world"] and message.seq == (5, 6)
    assert {name: values.tolist() for name, values in message.columns.items()} == {
        name: values.tolist() for name, values in columns.items()
    }


def test_thinking_and_tool_call_rows_split_into_their_own_messages():
    """Kind 5 rows (a reasoning model's thinking) make reasoning messages and kind 6 rows (a tool
    call's pieces) tool_calls messages, the body of a tokens message; before, every row that was not
    a token was taken for an event (an "error")."""
    piece = '{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":""}}'
    kinds = [wire.START, wire.REASONING, wire.REASONING, wire.TOKEN, wire.REASONING, wire.TOKEN, wire.END]
    kinds.append(wire.TOOL_CALL)
    n = len(kinds)
    columns = {
        "stream_id": np.array([7, 7, 7, 7, 8, 8, 7, 8], "<u8"),
        "seq": np.array([0, 1, 2, 3, 4, 5, 4, 6], "<u8"),
        "kind": np.array(kinds, "u1"),
        "token_id": np.arange(n, dtype="<u4"),
        "logprob": np.full(n, np.nan, "<f4"),
        "recv_ns": np.arange(n, dtype="<i8"),
    }
    end = '{"finish_reason":"stop","usage":null}'
    texts = ['{"model":"m","cached":false}', "Let", " me", "Yes", "Hm", "No", end, piece]
    batch = wire.Batch(1, 0, 1, columns, wire.Texts.from_list(texts))
    split = [(m.type, m.stream, m.seq, m.text) for m in batch.stream_messages()]
    assert split == [
        ("start", 7, (0, 0), []),
        ("reasoning", 7, (1, 2), ["Let", " me"]),
        ("tokens", 7, (3, 3), ["Yes"]),
        ("end", 7, (4, 4), []),
        ("reasoning", 8, (4, 4), ["Hm"]),
        ("tokens", 8, (5, 5), ["No"]),
        ("tool_calls", 8, (6, 6), [piece]),
    ]
    messages = batch.stream_messages()
    for message, want in ((messages[1], ["Let", " me"]), (messages[-1], [piece])):
        for encoding in wire.ENCODINGS:
            frames = wire.encode_message(message, encoding)
            assert frames[1].startswith(b'{"v":2,"type":"%s","stream":' % message.type.encode())
            decoded = wire.decode(list(frames))
            assert (decoded.type, decoded.text) == (message.type, want)
    assert ending_rows(columns["kind"]).tolist() == [False] * 6 + [True, False]
    assert event_rows(columns["kind"]).tolist() == [True] + [False] * 5 + [True, False]


def test_rows_of_a_kind_this_reader_does_not_know_are_skipped():
    """A later version's kind (or a corrupt one) is skipped, as the format says; before, the split
    raised KeyError (and, earlier still, took such a row for an error ending its stream)."""
    columns = {
        "stream_id": np.array([7, 7, 7], "<u8"),
        "seq": np.array([1, 2, 3], "<u8"),
        "kind": np.array([wire.TOKEN, 9, wire.TOKEN], "u1"),
        "token_id": np.arange(3, dtype="<u4"),
        "logprob": np.zeros(3, "<f4"),
        "recv_ns": np.arange(3, dtype="<i8"),
    }
    batch = wire.Batch(1, 0, 1, columns, wire.Texts.from_list(["a", "?", "b"]))
    assert [(m.type, m.seq, m.text) for m in batch.stream_messages()] == [
        ("tokens", (1, 1), ["a"]),
        ("tokens", (3, 3), ["b"]),
    ]
