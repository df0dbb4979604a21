"""Request/reply over DEALER -> ROUTER with correlation: the one helper every synchronous client of
the engine's ROUTERs (ingest requests, cache commands) uses.

A client sends ``[id, request]``: ``id`` is an opaque frame of at most MAX_ID_BYTES that the server
sends back unchanged before its reply, ``[id, reply]``. A reply that comes after its call timed out
thus carries an old id and is dropped; without it, it was taken as the answer to the next call (a
``submit`` then returned the previous request's stream id). Servers also accept the bare
``[request]`` of clients that send no id, and answer those with a bare ``[reply]``.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import orjson
import zmq

MAX_ID_BYTES = 16
_names = itertools.count()


def split_request(frames: list[bytes]) -> tuple[list[bytes], bytes] | None:
    """What a ROUTER received, as (the envelope to send back before the reply, the request body);
    None for a shape no client sends (the caller drops it)."""
    if len(frames) == 2:
        return frames[:1], frames[1]
    if len(frames) == 3 and len(frames[1]) <= MAX_ID_BYTES:
        return frames[:2], frames[2]
    return None


class CorrelatedDealer:
    """A DEALER whose :meth:`call` returns the reply to this call, or raises TimeoutError."""

    def __init__(self, endpoint: str, name: str, timeout_s: float, identity: str | None = None) -> None:
        self.name = name  # the server, for error messages
        self.timeout_s = timeout_s
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 10)  # a restarted server is found within 10 ms, not 100
        self._sock.setsockopt(zmq.IDENTITY, (identity or f"{name}-client-{os.getpid()}-{next(_names)}").encode())
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        tag = b"%d" % next(self._ids)
        self._sock.send_multipart([tag, orjson.dumps(request)])
        deadline = time.monotonic() + self.timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms):
                raise TimeoutError(f"{self.name} did not answer {request.get('type')!r} within {self.timeout_s:g} s")
            frames = self._sock.recv_multipart()
            if len(frames) == 2 and frames[0] == tag:
                try:
                    reply = orjson.loads(frames[1])
                except orjson.JSONDecodeError:
                    raise ValueError(f"{self.name} answered with something that is not JSON") from None
                if isinstance(reply, dict):
                    return reply
                raise ValueError(f"{self.name} answered with JSON that is not an object")
            # a reply to a call that timed out earlier: not ours

    def close(self) -> None:
        self._sock.close(0)
