"""The engine streams this gateway has open, kept where a SIGKILL cannot lose them (a file-backed
array in the runtime directory, ``WorkerContext.state_array``: plain memory stores). A gateway that
dies drops its clients' connections, but the engine would go on generating their streams for no
one; the restarted gateway cancels them with their cancel tokens first thing (docs/gateway.md)."""

from __future__ import annotations

import numpy as np

from engine.stage import WorkerContext

_ID = 8  # bytes of a stream id (little-endian), then the cancel token's 16 bytes
_TOKEN = 16


class InFlight:
    def __init__(self, ctx: WorkerContext, slots: int) -> None:
        self.table = ctx.state_array("inflight", "u1", (slots, _ID + _TOKEN))
        self.free = list(range(slots - 1, -1, -1))
        self.left: list[tuple[int, str]] = []  # what a predecessor left open: (stream id, token)
        for slot in range(slots):
            row = self.table[slot]
            if row.any():
                self.left.append((int.from_bytes(row[:_ID].tobytes(), "little"), row[_ID:].tobytes().hex()))
                row[:] = 0

    def add(self, stream_id: int, cancel_token: str) -> int | None:
        """Note an open stream; its slot (None when every slot is taken: not noted)."""
        try:
            token = bytes.fromhex(cancel_token)
        except ValueError:
            return None
        if not self.free or len(token) != _TOKEN:
            return None
        slot = self.free.pop()
        self.table[slot, _ID:] = np.frombuffer(token, np.uint8)
        self.table[slot, :_ID] = np.frombuffer(stream_id.to_bytes(_ID, "little"), np.uint8)
        return slot

    def remove(self, slot: int | None) -> None:
        if slot is not None:
            self.table[slot] = 0
            self.free.append(slot)
