"""Control-plane messages: small JSON objects (orjson) over ZeroMQ.

The supervisor binds a ROUTER on ``ipc://<runtime dir>/control.sock``; each worker connects a
DEALER whose identity is :func:`worker_identity` (its name and the secret token the supervisor
gave that spawn: a client cannot pass for a worker, or take its commands), and CLI clients
connect a DEALER named ``cli-<pid>-<n>``. Every message is one frame holding one JSON object
with a ``type`` field and exactly the fields listed below, each checked (type and bounds) by
:func:`decode`; a message that fails is refused with a :class:`ProtocolError` naming the field,
and no error text ever echoes more than a short excerpt of what was sent.

Worker -> supervisor:

    hello      {worker, pid, incarnation, pausable}       attached to its rings, starting its stage;
                                                          ``pausable``: false for an asyncio stage
    ready      {worker}                                   stage set up (start returned; an asyncio
                                                          stage's setup too); data may flow. The
                                                          engine is "running" once every worker is
    heartbeat  {worker, state, processed, stats,          every heartbeat_interval_s; ``processed`` is
                telemetry}                                the monotonic count of records the stage
                                                          handled, ``stats`` the stage's own counters,
                                                          ``telemetry`` its metrics' cumulative totals
                                                          (engine/telemetry.py, which checks them)
    error      {worker, message, fatal}                   a stage error; fatal ones end the worker

Supervisor -> worker:

    pause      {}                                         stop calling the stage; keep heartbeats
    resume     {}                                         undo pause
    drain      {}                                         finish what is in the input rings, then exit 0
                                                          (a source stops producing first)

(To stop one worker at once the supervisor sends SIGTERM, which a worker obeys even before its
control socket is connected; params are fixed for a worker's life, checked at config load.)

Client -> supervisor, answered on the same socket:

    status     {}          -> status {instance, pid, uptime_s, state, workers: [...], rings: [...], pas}
    shutdown   {}          -> ack {} ; the supervisor then drains and stops
    pause      {worker}    -> ack {} ; forwarded to the worker (resume likewise)
    resume     {worker}    -> ack {}
    (a request the supervisor cannot serve is answered error {message})
    Each may carry deadline_ns (CLOCK_MONOTONIC, when its client stops waiting): read after it,
    it is answered error and not carried out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

MAX_MESSAGE_BYTES = 1 << 20
MAX_NAME = 64  # a worker name (config keys are short)
MAX_TEXT = 4096  # an error message
MAX_STATS = 256  # counters in a heartbeat's stats
_EXCERPT = 40  # characters of a bad value quoted back
_INT64 = (1 << 63) - 1
RUNTIME_STATES = ("starting", "running", "paused", "draining", "stopped")

Check = Callable[[Any], str | None]  # None when the value is fine, else what is wrong


def excerpt(value: Any) -> str:
    """``repr(value)``, cut to a few dozen characters: what an error may quote of hostile input."""
    text = repr(value)
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 3] + "..."


def _int(low: int, high: int = _INT64) -> Check:
    def check(value: Any) -> str | None:
        if type(value) is not int or not low <= value <= high:
            return f"must be an integer in [{low}, {high}]"
        return None

    return check


def _text(limit: int) -> Check:
    def check(value: Any) -> str | None:
        return None if isinstance(value, str) and len(value) <= limit else f"must be a string of <= {limit} characters"

    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _stats(value: Any) -> str | None:
    if not isinstance(value, dict) or len(value) > MAX_STATS:
        return f"must be an object of <= {MAX_STATS} counters"
    if any(len(key) > MAX_NAME for key in value):  # JSON object keys are always strings
        return f"keys must be <= {MAX_NAME} characters"
    return None


Schema = Mapping[str, Check]  # field -> check; every field required (but OPTIONAL_FIELDS), no other allowed
_WORKER = {"worker": _text(MAX_NAME)}

WORKER_TO_SUPERVISOR: Mapping[str, Schema] = {
    "hello": {**_WORKER, "pid": _int(1, (1 << 31) - 1), "incarnation": _int(0), "pausable": _bool},
    "ready": _WORKER,
    "heartbeat": {
        **_WORKER,
        "state": _one_of(RUNTIME_STATES),
        "processed": _int(0),
        "stats": _stats,
        "telemetry": _stats,  # one entry per metric; the supervisor checks the rest (check_snapshot)
    },
    "error": {**_WORKER, "message": _text(MAX_TEXT), "fatal": _bool},
}
SUPERVISOR_TO_WORKER: Mapping[str, Schema] = {
    "pause": {},
    "resume": {},
    "drain": {},
}
# a client's request may carry the CLOCK_MONOTONIC time it stops waiting for the reply: read after
# it, the request is refused, not carried out (its client reported a failure already)
_DEADLINE = {"deadline_ns": _int(0)}
OPTIONAL_FIELDS = frozenset(_DEADLINE)
CLIENT_REQUESTS: Mapping[str, Schema] = {
    "status": _DEADLINE,
    "shutdown": _DEADLINE,
    "pause": {"worker": _text(MAX_NAME), **_DEADLINE},
    "resume": {"worker": _text(MAX_NAME), **_DEADLINE},
}
# a client trusts its own supervisor's replies: only their type is checked
REPLIES: Mapping[str, Schema | None] = {"status": None, "ack": None, "error": None}
ALL_TYPES = frozenset().union(WORKER_TO_SUPERVISOR, SUPERVISOR_TO_WORKER, CLIENT_REQUESTS, REPLIES)


class ProtocolError(ValueError):
    """A control frame that is not a valid message; the text says what is wrong."""


def worker_identity(name: str, token: str) -> bytes:
    """The ZeroMQ identity of one spawn of worker ``name``: unguessable without its token."""
    return f"{name}/{token}".encode()


def encode(msg_type: str, **fields: Any) -> bytes:
    """One message frame of ``msg_type`` with ``fields``."""
    if msg_type not in ALL_TYPES:
        raise ProtocolError(f"unknown control message type {excerpt(msg_type)}")
    return orjson.dumps({"type": msg_type, **fields})


def deadline_after(wait_s: float) -> int:
    """The ``deadline_ns`` of a request whose client waits ``wait_s`` for the reply (CLOCK_MONOTONIC,
    system-wide: the server reads the same clock)."""
    return time.monotonic_ns() + int(wait_s * 1e9)


def expired(msg: dict[str, Any], now_ns: int) -> bool:
    """Whether a parsed request was read at or after its client's ``deadline_ns`` (none: never)."""
    return now_ns >= msg.get("deadline_ns", now_ns + 1)


def load_object(frame: bytes, max_bytes: int, what: str, error: type[ValueError]) -> dict[str, Any]:
    """One JSON object from a frame of at most ``max_bytes``; else ``error`` naming ``what``."""
    if len(frame) > max_bytes:
        raise error(f"{what} of {len(frame)} bytes exceeds {max_bytes}")
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise error(f"{what} is not JSON: {excerpt(str(exc))}") from None
    if not isinstance(msg, dict):
        raise error(f"{what} must be a JSON object")
    return msg


def decode(frame: bytes, allowed: Mapping[str, Schema | None]) -> dict[str, Any]:
    """Parse and check one frame against the types in ``allowed`` and their fields; raises
    :class:`ProtocolError` naming the problem (quoting at most an excerpt of the input)."""
    msg = load_object(frame, MAX_MESSAGE_BYTES, "control message", ProtocolError)
    msg_type = msg.get("type")
    if not isinstance(msg_type, str) or msg_type not in allowed:
        raise ProtocolError(f"control message type {excerpt(msg_type)} not one of {sorted(allowed)}")
    schema = allowed[msg_type]
    if schema is None:
        return msg
    for name, value in msg.items():
        if name == "type":
            continue
        check = schema.get(name)
        if check is None:
            raise ProtocolError(f"{msg_type} message: unknown field {excerpt(name)}")
        problem = check(value)
        if problem is not None:
            raise ProtocolError(f"{msg_type} message: {name} {problem} (got {excerpt(value)})")
    missing = [name for name in schema if name not in msg and name not in OPTIONAL_FIELDS]
    if missing:
        raise ProtocolError(f"{msg_type} message: missing {', '.join(missing)}")
    return msg
