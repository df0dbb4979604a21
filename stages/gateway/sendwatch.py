"""Clients that take nothing of what is sent to them: their connections are closed.

aiohttp times nothing once an answer is under way: a client that stops reading (a frozen app, a
network gone with the socket still open) keeps its handler waiting on a write for good, and with it
its engine streams, its concurrency slot and the rest of its answer. Every ``DRAIN_CHECK_S`` the
gateway hands the watch its connections' transports; one whose write buffer has held bytes without
shrinking for ``send_timeout_s`` (nginx's ``send_timeout``) is aborted. Its pending write then fails
as on a disconnect, so its streams are cancelled. One check per connection per tick, nothing per
write: a client that reads, however slowly, shrinks the buffer and is left alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from engine.logs import JsonLogger


class SendWatch:
    def __init__(self, timeout_s: float, log: JsonLogger) -> None:
        self.timeout_s, self.log = timeout_s, log
        self.stalled: dict[asyncio.Transport, tuple[int, float]] = {}  # bytes buffered, since when not fewer
        self.closed = 0

    def check(self, transports: Iterable[asyncio.Transport | None], now: float) -> int:
        """Abort the connections stalled for send_timeout_s; how many it aborted."""
        closed = 0
        stalled: dict[asyncio.Transport, tuple[int, float]] = {}
        for transport in transports:
            if transport is None or transport.is_closing():
                continue
            buffered = transport.get_write_buffer_size()
            if not buffered:
                continue
            before = self.stalled.get(transport)
            since = now if before is None or buffered < before[0] else before[1]
            if now - since < self.timeout_s:
                stalled[transport] = (buffered, since)
                continue
            transport.abort()  # close() would wait for the buffer to be sent: for good
            closed += 1
            self.log.warning("client_not_reading", buffered_bytes=buffered, send_timeout_s=self.timeout_s)
        self.stalled = stalled
        self.closed += closed
        return closed
