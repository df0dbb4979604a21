"""The benchmark message: a real token batch (``shm.batch`` layout) of N short tokens.

Every transport moves the same bytes: a template batch built once, copied per message, with the
message's sequence number patched into ``seq[0]`` and the send time (``time.monotonic_ns``, i.e.
CLOCK_MONOTONIC, the same clock in every process) into ``recv_ns[0]``.
"""

from __future__ import annotations

import itertools
import struct
import time
from dataclasses import dataclass

import numpy as np

from shm.batch import Kind, batch_size, encode_texts, stable_token_id, write_batch

# Short token texts as a BPE tokenizer emits them: leading spaces, word pieces, punctuation, some
# multi-byte UTF-8. Cycled to fill a batch of any size.
TOKENS: tuple[bytes, ...] = tuple(
    t.encode()
    for t in (
        "The",
        " model",
        " generates",
        " one",
        " token",
        " at",
        " a",
        " time",
        ",",
        " and",
        " each",
        " token",
        " is",
        " streamed",
        " to",
        " the",
        " client",
        " as",
        " soon",
        " as",
        " it",
        " exists",
        ".",
        "\n",
        " Shared",
        " memory",
        " rings",
        " avoid",
        " copies",
        ";",
        " sockets",
        " carry",
        " control",
        " only",
        ":",
        " é",
        "té",
        " 日本",
        "語",
        " —",
        " ok",
        "ing",
        "ed",
        " un",
        "likely",
        " 42",
        "%",
        ")",
        "\n\n",
    )
)

# Marks the sequence number of the last message of a run, so the consumer knows when to stop.
LAST = 1 << 63

_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Message:
    """A template batch and where its sequence number and send timestamp live."""

    tokens: int
    template: bytes
    seq_offset: int
    ts_offset: int

    def stamp(self, buf: bytearray | memoryview, seq: int) -> None:
        """Patch ``seq`` and the send time into ``buf`` (a copy of the template): the last thing
        done before the transport's send, so the latency covers the send alone."""
        _U64.pack_into(buf, self.seq_offset, seq)
        _U64.pack_into(buf, self.ts_offset, time.monotonic_ns())

    def read(self, buf: bytes | bytearray | memoryview) -> tuple[int, int]:
        """``(seq, send time in ns)`` of a received message."""
        return _U64.unpack_from(buf, self.seq_offset)[0], _U64.unpack_from(buf, self.ts_offset)[0]

    def matches(self, buf: bytes | bytearray | memoryview) -> bool:
        """True when ``buf`` is the template apart from the two patched words."""
        got = bytearray(buf)
        for offset in (self.seq_offset, self.ts_offset):
            got[offset : offset + 8] = self.template[offset : offset + 8]
        return got == self.template


def make_message(tokens: int) -> Message:
    """Build the template batch of ``tokens`` rows (deterministic, so both processes agree)."""
    texts = list(itertools.islice(itertools.cycle(TOKENS), tokens))
    text_bytes = sum(map(len, texts))
    buf = bytearray(batch_size(tokens, text_bytes))
    columns = write_batch(memoryview(buf), tokens, text_bytes)
    columns.stream_id[:] = 7
    columns.seq[:] = np.arange(tokens)
    columns.recv_ns[:] = time.monotonic_ns()
    columns.token_id[:] = [stable_token_id(t) for t in texts]
    columns.logprob[:] = -np.linspace(0.01, 3.0, tokens, dtype=np.float32)
    columns.kind[:] = Kind.TOKEN
    encode_texts(columns, texts)
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    # shm.batch gives column views, not offsets: the views' addresses give them.
    seq_offset = columns.seq.ctypes.data - base
    ts_offset = columns.recv_ns.ctypes.data - base
    return Message(tokens, bytes(buf), seq_offset, ts_offset)
