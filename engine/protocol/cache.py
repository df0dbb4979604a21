"""The cache worker's ROUTER: its messages and their checks (the clients:
engine/clients/cache.py).

The cache worker binds a ROUTER at ``ipc://<runtime dir>/<worker name>.sock``. A client connects
a DEALER and sends one JSON object (orjson) per frame; every request is answered at once:

    lookup   {key, stream_id, deadline_ns, token} -> hit {stream_id} | miss {stream_id, reason}
    stats    {}                           -> stats {stats}     the worker's counters (docs/cache.md)
    clear    {token}                      -> cleared {entries, bytes}
    snapshot {token}                      -> snapshot {path, entries, bytes, ms}
    (anything else, a bad field or token) -> error {reason}

``token``: a lookup carries the engine's lookup token, clear and snapshot its operator token
(engine/tokens.py, files in the runtime directory): a client given only the socket cannot make
the cache replay a stored stream into another client's stream id, nor empty it.

``lookup``: ``key`` is the request's cache key (engine.protocol.cachekey), ``stream_id`` the id ingest has
already given the request. On ``hit`` the cache replays the stored stream into its output ring
under that id; ingest then writes nothing for it. ``deadline_ns`` (CLOCK_MONOTONIC, the same clock
in every process) is when ingest stops waiting: a lookup the cache reads after it is answered
``miss`` (reason "late") and never replayed, so a stream is never both replayed and fetched.
"""

from __future__ import annotations

from typing import Any

from engine.protocol.control import load_object
from engine.protocol.endpoints import socket_file
from engine.protocol.tokens import LOOKUP, OPERATOR

MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID = 2**63 - 1  # stream ids and deadlines: what the replay table (u8, id + 1) and clocks hold
REQUESTS = ("lookup", "stats", "clear", "snapshot")


class CacheProtocolError(ValueError):
    """A cache message that is not valid; the text names the field."""


def socket_path(runtime_dir: str, worker: str) -> str:
    """The ipc socket file of cache worker ``worker`` in the engine's runtime directory."""
    return socket_file(runtime_dir, worker)


def parse_request(frame: bytes) -> dict[str, Any]:
    """Decode and check one request frame; raises :class:`CacheProtocolError`."""
    msg = load_object(frame, MAX_MESSAGE_BYTES, "cache request", CacheProtocolError)
    kind = msg.get("type")
    if kind not in REQUESTS:
        raise CacheProtocolError(f"type: must be one of {', '.join(REQUESTS)} (got {kind!r})")
    if kind == "lookup":
        if not isinstance(msg.get("key"), str) or not msg["key"]:
            raise CacheProtocolError("key: must be a non-empty string")
        for field in ("stream_id", "deadline_ns"):
            value = msg.get(field)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
                raise CacheProtocolError(f"{field}: must be an integer in 0..{MAX_ID}")
    return msg


def authority(kind: str) -> str | None:
    """The token a request of type ``kind`` must carry: lookup needs ingest's, clear and
    snapshot an operator's, stats none."""
    return {"lookup": LOOKUP, "clear": OPERATOR, "snapshot": OPERATOR}.get(kind)
