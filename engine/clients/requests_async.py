"""An asyncio client of the ingest ROUTER (the protocol: engine/protocol/requests.py,
docs/request-protocol.md): many calls in flight on one DEALER, each reply matched to its call by
the request id (engine/clients/correlation.py's framing), so a reply that comes after its call
timed out is dropped, never taken for another's. The gateway's way to submit and cancel.

    client = AsyncRequestClient(ingest_endpoint(runtime_dir))
    submitted = await client.submit({"messages": [...]})      # Submitted(stream_id, cancel_token)
    await client.cancel(submitted.stream_id, submitted.cancel_token)
    await client.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from engine.clients.correlation import call_frames, decode_reply, split_reply
from engine.protocol.requests import RequestError, submit_message

_names = itertools.count()


@dataclass(frozen=True)
class Submitted:
    stream_id: int
    cancel_token: str  # proof of ownership for cancel (only the submitter is told it)


class AsyncRequestClient:
    """Call :meth:`start` on the running loop before the first call (it starts the reply reader)."""

    def __init__(self, endpoint: str, identity: str | None = None, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 10)  # a restarted ingest is found within 10 ms
        self._sock.setsockopt(zmq.IDENTITY, (identity or f"ingest-aclient-{os.getpid()}-{next(_names)}").encode())
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._late_cancels: set[asyncio.Task] = set()
        self.counts = {"calls": 0, "timeouts": 0, "late_replies": 0, "cancelled_late": 0, "malformed": 0}

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """The reply to ``request``; RequestError when ingest rejected it, TimeoutError when it did
        not answer within ``timeout_s``, ValueError when the answer is not a JSON object."""
        tag = b"%d" % next(self._ids)
        reply = self._waiting[tag] = asyncio.get_running_loop().create_future()
        self.counts["calls"] += 1
        try:
            async with asyncio.timeout(self.timeout_s):  # the send too: it waits while there is no pipe
                await self._sock.send_multipart(call_frames(tag, request))
                answer = await reply
        except TimeoutError:
            self.counts["timeouts"] += 1
            raise TimeoutError(f"ingest did not answer {request.get('type')!r} within {self.timeout_s:g} s") from None
        finally:
            self._waiting.pop(tag, None)
        if answer.get("type") == "rejected":
            raise RequestError(str(answer.get("reason")))
        return answer

    async def submit(self, body: dict[str, Any], endpoint: str = "chat", client: str | None = None) -> Submitted:
        reply = await self.call(submit_message(body, endpoint, client, self.timeout_s))
        return Submitted(int(reply["stream_id"]), str(reply.get("cancel_token", "")))

    async def cancel(self, stream_id: int, token: str) -> None:
        await self.call({"type": "cancel", "stream_id": stream_id, "token": token})

    async def _read(self) -> None:
        while True:
            reply = split_reply(await self._sock.recv_multipart())
            waiter = self._waiting.get(reply[0]) if reply is not None else None
            if waiter is None or waiter.done():
                self.counts["late_replies"] += 1  # its call timed out, or not a correlated reply
                if reply is not None:
                    self._cancel_unfollowed(reply[1])
                continue
            try:
                waiter.set_result(decode_reply(reply[1], "ingest"))
            except ValueError as exc:
                self.counts["malformed"] += 1
                waiter.set_exception(exc)

    def _cancel_unfollowed(self, raw: bytes) -> None:
        """A stream accepted after its submit timed out: nobody follows it, so it is cancelled
        (ingest read the submit just before its deadline_ns; the reply came too late)."""
        try:
            reply = decode_reply(raw, "ingest")
            if reply.get("type") != "accepted":
                return
            stream = Submitted(int(reply["stream_id"]), str(reply["cancel_token"]))
        except (ValueError, KeyError, TypeError):
            return  # not JSON, or not an acceptance
        self.counts["cancelled_late"] += 1
        task = asyncio.get_running_loop().create_task(self._cancel_quietly(stream))
        self._late_cancels.add(task)
        task.add_done_callback(self._late_cancels.discard)

    async def _cancel_quietly(self, stream: Submitted) -> None:
        with contextlib.suppress(RequestError, TimeoutError, ValueError, ConnectionError):
            await self.cancel(stream.stream_id, stream.cancel_token)

    async def close(self) -> None:
        for task in list(self._late_cancels):
            task.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the request client was closed"))
        self._sock.close(0)
