"""``GET /health``: whether the engine behind this gateway takes requests now (200) or not (503),
with its PAS. Load balancers and clients poll it; a standby (or an engine still starting or
stopping) answers 503. The engine's state and PAS come from the supervisor's ``status`` reply,
asked at most once per ``REFRESH_S`` however often /health is polled, and only when it is."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import orjson
import zmq
import zmq.asyncio

from engine.protocol import control
from engine.rundir import INFO_FILE

REFRESH_S = 1.0
ASK_TIMEOUT_S = 1.0


class EngineHealth:
    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self._status: dict[str, Any] | None = None
        self._asked_at = -REFRESH_S
        self._asking: asyncio.Future | None = None

    async def status(self) -> dict[str, Any] | None:
        """The supervisor's last status (at most REFRESH_S old), or None when it did not answer."""
        if time.monotonic() - self._asked_at < REFRESH_S:
            return self._status
        if self._asking is None:  # one question in flight, shared by every caller
            self._asking = asyncio.ensure_future(self._ask())
        try:
            return await asyncio.shield(self._asking)
        finally:
            if self._asking is not None and self._asking.done():
                self._asking = None

    async def _ask(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.runtime_dir, INFO_FILE), "rb") as f:
                endpoint = orjson.loads(f.read())["control"]
        except (OSError, ValueError, KeyError, TypeError):
            endpoint = None
        status = None
        if isinstance(endpoint, str):
            sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(endpoint)
                await sock.send(control.encode("status"))
                if await sock.poll(int(ASK_TIMEOUT_S * 1000)):
                    with contextlib.suppress(control.ProtocolError):
                        status = control.decode(await sock.recv(), control.REPLIES)
            finally:
                sock.close(0)
        self._status, self._asked_at = status, time.monotonic()
        return status


def health_body(status: dict[str, Any] | None, following: bool) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of /health: 200 when the engine runs and the gateway follows its
    broadcast, else 503 with the reason."""
    state = status.get("state") if status else None
    ready = state == "running" and following
    if status is None:
        reason = "the supervisor did not answer"
    elif state != "running":
        reason = f"the engine is {state}"
    elif not following:
        reason = "the gateway is not following the broadcast yet"
    else:
        reason = None
    body = {
        "status": "ok" if ready else "unavailable",
        "ready": ready,
        "engine": state,
        "pas": (status or {}).get("pas"),
    }
    if reason:
        body["reason"] = reason
    return (200 if ready else 503), body
