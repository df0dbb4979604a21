"""Talk to a running supervisor: find it in the runtime directory, send a control request."""

from __future__ import annotations

import itertools
import os
from typing import Any

import zmq

from engine.protocol import control
from engine.rundir import live_instances

_counter = itertools.count()


class EngineNotFound(RuntimeError):
    """No running engine matches (or several do and none was named)."""


def find_engine(base: str, instance: str | None = None) -> dict[str, Any]:
    """supervisor.json of the running engine ``instance``, or of the only one running."""
    running = live_instances(base)
    if instance is not None:
        for info in running:
            if info.get("instance") == instance:
                return info
        raise EngineNotFound(f"no running engine with instance id {instance!r} under {base}")
    if not running:
        raise EngineNotFound(f"no running engine under {base}")
    if len(running) > 1:
        ids = ", ".join(str(i.get("instance")) for i in running)
        raise EngineNotFound(f"several engines are running ({ids}); name one with --instance")
    return running[0]


# how long a stop waits for the supervisor to read it: a request read after its client's deadline
# is not carried out, and a stop is still wanted from a supervisor whose loop is held up a while
SHUTDOWN_TIMEOUT_S = 15.0


def request(endpoint: str, msg_type: str, timeout_s: float = 3.0, **fields: Any) -> dict[str, Any]:
    """Send one request to the supervisor's control ROUTER and return its reply."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"cli-{os.getpid()}-{next(_counter)}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        # read after its deadline, it is not carried out
        sock.send(control.encode(msg_type, deadline_ns=control.deadline_after(timeout_s), **fields))
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"supervisor at {endpoint} did not answer {msg_type!r} within {timeout_s:g} s")
        return control.decode(sock.recv(), control.REPLIES)
    finally:
        sock.close(0)
