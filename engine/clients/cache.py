"""Clients of the cache worker's ROUTER: a synchronous one for the CLI, tests and benchmarks, and
the asynchronous lookup that ingest runs before going upstream (the protocol itself:
engine/protocol/cache.py, docs/cache.md)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import orjson
import zmq

from engine.clients.correlation import CorrelatedDealer
from engine.protocol.cache import CacheProtocolError, authority
from engine.tokens import read_token

if TYPE_CHECKING:
    import asyncio


class CacheClient:
    """Synchronous requests to a cache worker: ``stats()``, ``clear()``, ``snapshot()``, ``lookup()``.
    Replies are correlated (engine/clients/correlation.py). An operator's client (the CLI, tests,
    benchmarks, run as the engine's user): it presents the tokens it finds in the runtime
    directory that holds the socket."""

    def __init__(self, path: str, timeout_s: float = 5.0) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no cache socket at {path} (is a cache worker of that name running?)")
        self._runtime_dir = os.path.dirname(os.path.abspath(path))
        self._dealer = CorrelatedDealer("ipc://" + path, "cache", timeout_s)

    def call(self, msg_type: str, **fields: Any) -> dict[str, Any]:
        needed = authority(msg_type)
        if needed is not None and "token" not in fields:
            fields["token"] = read_token(self._runtime_dir, needed)
        reply = self._dealer.call({"type": msg_type, **fields})
        if reply.get("type") == "error":
            raise CacheProtocolError(str(reply.get("reason")))
        return reply

    def stats(self) -> dict[str, Any]:
        return self.call("stats")["stats"]

    def clear(self) -> dict[str, Any]:
        return self.call("clear")

    def snapshot(self) -> dict[str, Any]:
        return self.call("snapshot")

    def lookup(self, key: str, stream_id: int, timeout_s: float = 1.0) -> bool:
        deadline = time.monotonic_ns() + int(timeout_s * 1e9)
        return self.call("lookup", key=key, stream_id=stream_id, deadline_ns=deadline)["type"] == "hit"

    def close(self) -> None:
        self._dealer.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CacheLookup:
    """Ingest's side: ``await lookup(key, stream_id)`` is True when the cache replays the stream.

    Never waits long on a dead cache: no socket file means no lookup; no connected cache within
    ``timeout_s``, or no answer within twice that (a hit decided before the deadline may be on its
    way), is a miss, and lookups then pause for ``pause_s`` so a dead or hung cache costs one
    timeout, not one per request."""

    def __init__(self, path: str, token: str, timeout_s: float = 0.05, pause_s: float = 1.0) -> None:
        self.path = path
        self.token = token  # the engine's lookup token (engine/tokens.py)
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.counts = {"cache_hits": 0, "cache_misses": 0, "cache_timeouts": 0, "cache_skipped": 0}
        self._sock = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._paused_until = 0.0

    def start(self) -> None:
        """Connect (from the running event loop); the socket file may appear later, ZeroMQ
        connects when it does. Connecting ahead of the first lookup matters: with IMMEDIATE a
        send before the connection is up is refused, which would make that lookup a miss."""
        import asyncio  # here and in lookup: the cache worker imports this module, and needs no asyncio

        import zmq.asyncio

        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a peer that is not there
        self._sock.setsockopt(zmq.RECONNECT_IVL, 10)  # find a restarted cache within 10 ms, not 100
        self._sock.connect("ipc://" + self.path)
        self._reader = asyncio.create_task(self._read_replies())

    async def lookup(self, key: str, stream_id: int) -> bool:
        import asyncio

        if self._sock is None or time.monotonic() < self._paused_until or not os.path.exists(self.path):
            self.counts["cache_skipped"] += 1
            return False
        deadline_ns = time.monotonic_ns() + int(self.timeout_s * 1e9)
        reply = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = reply
        msg = {"type": "lookup", "key": key, "stream_id": stream_id, "deadline_ns": deadline_ns, "token": self.token}
        frame = orjson.dumps(msg)
        try:
            # POLLOUT: a connected cache (IMMEDIATE); one just restarted is reconnected within 10 ms
            if not await self._sock.poll(int(self.timeout_s * 1000), zmq.POLLOUT):
                raise TimeoutError
            await self._sock.send(frame, zmq.NOBLOCK)
            # twice the deadline: a hit the cache decided before it is already on its way
            hit = await asyncio.wait_for(reply, 2 * self.timeout_s)
        except zmq.Again:  # the connection went between poll and send
            self.counts["cache_skipped"] += 1
            return False
        except TimeoutError:  # no cache to talk to, or one that does not answer
            self.counts["cache_timeouts"] += 1
            self._paused_until = time.monotonic() + self.pause_s
            hit = False
        finally:
            self._pending.pop(stream_id, None)
        self.counts["cache_hits" if hit else "cache_misses"] += 1
        return hit

    async def _read_replies(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg = orjson.loads(frame)
                reply = self._pending.get(int(msg["stream_id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if reply is not None and not reply.done():
                reply.set_result(msg.get("type") == "hit")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close(0)
