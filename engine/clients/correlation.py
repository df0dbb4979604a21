"""Request/reply over DEALER -> ROUTER with correlation: the one helper every synchronous client of
the engine's ROUTERs (ingest requests, cache commands) uses.

A client sends ``[id, request]``: ``id`` is an opaque frame of at most MAX_ID_BYTES that the server
sends back unchanged before its reply, ``[id, reply]``. A reply that comes after its call timed out
thus carries an old id and is dropped; without it, it was taken as the answer to the next call (a
``submit`` then returned the previous request's stream id). Servers also accept the bare
``[request]`` of clients that send no id, and answer those with a bare ``[reply]``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
import zmq

MAX_ID_BYTES = 16
MAX_LATE_CALLS = 64  # calls that timed out whose reply a client still acts on
_names = itertools.count()


def split_request(frames: list[bytes]) -> tuple[list[bytes], bytes] | None:
    """What a ROUTER received, as (the envelope to send back before the reply, the request body);
    None for a shape no client sends (the caller drops it)."""
    if len(frames) == 2:
        return frames[:1], frames[1]
    if len(frames) == 3 and len(frames[1]) <= MAX_ID_BYTES:
        return frames[:2], frames[2]
    return None


def call_frames(tag: bytes, request: dict[str, Any]) -> list[bytes]:
    """What a client sends: ``[id, request]`` (``tag``: at most MAX_ID_BYTES, unique among its
    calls in flight)."""
    return [tag, orjson.dumps(request)]


def split_reply(frames: list[bytes]) -> tuple[bytes, bytes] | None:
    """A reply a client received, as (its id, its body); None for a shape that is not a
    correlated reply (the caller drops it)."""
    return (frames[0], frames[1]) if len(frames) == 2 else None


def decode_reply(raw: bytes, name: str) -> dict[str, Any]:
    """A reply's body as a JSON object; ValueError naming the server ``name`` otherwise."""
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError(f"{name} answered with something that is not JSON") from None
    if isinstance(reply, dict):
        return reply
    raise ValueError(f"{name} answered with JSON that is not an object")


class CorrelatedDealer:
    """A DEALER whose :meth:`call` returns the reply to this call, or raises TimeoutError. A call
    that timed out may name what to do with its reply should it still come (``on_late``): it is
    handed over by a later call, or by :meth:`settle`."""

    def __init__(self, endpoint: str, name: str, timeout_s: float, identity: str | None = None) -> None:
        self.name = name  # the server, for error messages
        self.timeout_s = timeout_s
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 10)  # a restarted server is found within 10 ms, not 100
        self._sock.setsockopt(zmq.IDENTITY, (identity or f"{name}-client-{os.getpid()}-{next(_names)}").encode())
        # a send waits no longer than a call: with no pipe to send on (a peer that refused the
        # handshake drops it; a full queue to a stalled one) it would wait for ever
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._late: OrderedDict[bytes, Callable[[dict[str, Any]], None]] = OrderedDict()

    def call(self, request: dict[str, Any], on_late: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        tag = b"%d" % next(self._ids)
        deadline = time.monotonic() + self.timeout_s
        try:
            self._sock.send_multipart(call_frames(tag, request))
        except zmq.Again:
            raise self._timeout(request) from None
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms):
                if on_late is not None:
                    self._expect_late(tag, on_late)
                raise self._timeout(request)
            reply = split_reply(self._sock.recv_multipart())
            if reply is not None and reply[0] == tag:
                return decode_reply(reply[1], self.name)
            self._take_late(reply)  # a reply to a call that timed out earlier: not ours

    def send(self, request: dict[str, Any]) -> bool:
        """Send ``request`` without waiting for its reply (dropped when it comes); False when it
        could not be sent at once."""
        try:
            self._sock.send_multipart(call_frames(b"%d" % next(self._ids), request), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def settle(self, wait_s: float) -> None:
        """Read replies for up to ``wait_s`` while a call that timed out still waits for its
        ``on_late`` (before closing: the reply may be in flight)."""
        deadline = time.monotonic() + wait_s
        while self._late:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms):
                return
            self._take_late(split_reply(self._sock.recv_multipart()))

    def _expect_late(self, tag: bytes, on_late: Callable[[dict[str, Any]], None]) -> None:
        self._late[tag] = on_late
        if len(self._late) > MAX_LATE_CALLS:  # a server that never answers: the oldest are given up
            self._late.popitem(last=False)

    def _take_late(self, reply: tuple[bytes, bytes] | None) -> None:
        on_late = self._late.pop(reply[0], None) if reply is not None else None
        if on_late is None:
            return
        with contextlib.suppress(ValueError):  # not a JSON object: nothing to act on
            on_late(decode_reply(reply[1], self.name))

    def _timeout(self, request: dict[str, Any]) -> TimeoutError:
        return TimeoutError(f"{self.name} did not answer {request.get('type')!r} within {self.timeout_s:g} s")

    def close(self) -> None:
        self._late.clear()
        self._sock.close(0)
