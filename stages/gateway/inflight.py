"""The engine streams this gateway has open, kept where a SIGKILL cannot lose them (the worker's
restart-surviving stream table, engine/protocol/streamtable.py). A gateway that dies drops its
clients' connections, but the engine would go on generating their streams for no one; the
restarted gateway cancels them with their cancel tokens first thing (docs/gateway.md)."""

from __future__ import annotations

import numpy as np

from engine.protocol.streamtable import StreamTable
from engine.stage import WorkerContext

_TOKEN_BYTES = 16  # a cancel token (32 hex digits), kept as two u8 values beside the stream id


class InFlight:
    def __init__(self, ctx: WorkerContext, slots: int) -> None:
        self.table = StreamTable(ctx.state_array("inflight", "u8", (slots, 1 + _TOKEN_BYTES // 8)))
        # what a predecessor left open: (stream id, cancel token)
        self.left = [(sid, values.astype("<u8").tobytes().hex()) for sid, values in self.table.close_left().items()]

    def add(self, stream_id: int, cancel_token: str) -> bool:
        """Note an open stream; False when every slot is taken or the token is not one (not noted)."""
        try:
            token = bytes.fromhex(cancel_token)
        except ValueError:
            return False
        if len(token) != _TOKEN_BYTES:
            return False
        return self.table.open(stream_id, *np.frombuffer(token, "<u8").tolist())

    def remove(self, stream_id: int) -> None:
        if stream_id in self.table:
            self.table.close(stream_id)
