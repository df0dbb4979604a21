"""Control-plane messages: small JSON objects (orjson) over ZeroMQ.

The supervisor binds a ROUTER on ``ipc://<runtime dir>/control.sock``; each worker connects a
DEALER whose identity is its name, and CLI clients connect a DEALER named ``cli-<pid>-<n>``.
Every message is one frame holding one JSON object with a ``type`` field.

Worker -> supervisor:

    hello      {worker, pid, incarnation}                 attached to its rings, starting its stage
    ready      {worker}                                   stage set up (start returned; an asyncio
                                                          stage's setup too); data may flow. The
                                                          engine is "running" once every worker is
    heartbeat  {worker, state, processed, stats}          every heartbeat_interval_s; ``processed`` is
                                                          the monotonic count of records the stage
                                                          handled, ``stats`` the stage's own counters
    error      {worker, message, fatal}                   a stage error; fatal ones end the worker

Supervisor -> worker:

    pause      {}                                         stop calling the stage; keep heartbeats
    resume     {}                                         undo pause
    drain      {}                                         finish what is in the input rings, then exit 0
                                                          (a source stops producing first)
    stop       {}                                         exit 0 now (rings keep any unread records)
    reconfigure {params}                                  hand new params to the stage

Client -> supervisor, answered on the same socket:

    status     {}          -> status {instance, pid, uptime_s, state, workers: [...], rings: [...], pas}
    shutdown   {}          -> ack {} ; the supervisor then drains and stops
    pause      {worker}    -> ack {} ; forwarded to the worker (resume likewise)
    resume     {worker}    -> ack {}
    (a request the supervisor cannot serve is answered error {message})
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_MESSAGE_BYTES = 1 << 20

WORKER_TO_SUPERVISOR = frozenset({"hello", "ready", "heartbeat", "error"})
SUPERVISOR_TO_WORKER = frozenset({"pause", "resume", "drain", "stop", "reconfigure"})
CLIENT_REQUESTS = frozenset({"status", "shutdown", "pause", "resume"})
REPLIES = frozenset({"status", "ack", "error"})
ALL_TYPES = WORKER_TO_SUPERVISOR | SUPERVISOR_TO_WORKER | CLIENT_REQUESTS | REPLIES


class ProtocolError(ValueError):
    """A control frame that is not a valid message; the text says what is wrong."""


def encode(msg_type: str, **fields: Any) -> bytes:
    """One message frame of ``msg_type`` with ``fields``."""
    if msg_type not in ALL_TYPES:
        raise ProtocolError(f"unknown control message type {msg_type!r}")
    return orjson.dumps({"type": msg_type, **fields})


def load_object(frame: bytes, max_bytes: int, what: str, error: type[ValueError]) -> dict[str, Any]:
    """One JSON object from a frame of at most ``max_bytes``; else ``error`` naming ``what``."""
    if len(frame) > max_bytes:
        raise error(f"{what} of {len(frame)} bytes exceeds {max_bytes}")
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise error(f"{what} is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise error(f"{what} must be a JSON object")
    return msg


def decode(frame: bytes, allowed: frozenset[str] = ALL_TYPES) -> dict[str, Any]:
    """Parse and check one frame; raises :class:`ProtocolError` naming the problem."""
    msg = load_object(frame, MAX_MESSAGE_BYTES, "control message", ProtocolError)
    msg_type = msg.get("type")
    if msg_type not in allowed:
        raise ProtocolError(f"control message type {msg_type!r} not one of {sorted(allowed)}")
    return msg
