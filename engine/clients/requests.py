"""A synchronous client of the ingest ROUTER: submit a generation request, cancel a stream
(the protocol itself: engine/protocol/requests.py, docs/request-protocol.md)."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from engine.clients.correlation import CorrelatedDealer
from engine.protocol.requests import MAX_CANCEL_TOKENS, RequestError, submit_message

# how long close() waits for the reply to a submit that timed out (ingest read it before its
# deadline_ns, the reply is in flight): an acceptance then is a stream nobody follows, so cancelled
LATE_REPLY_WAIT_S = 0.5


class RequestClient:
    """A small synchronous client: ``submit`` returns the stream id, ``cancel`` cancels. Replies
    are correlated (engine/clients/correlation.py): one that comes after its call timed out is
    dropped, and a stream accepted after its submit timed out is cancelled."""

    def __init__(
        self, endpoint: str, identity: str | None = None, timeout_s: float = 5.0, operator: bool = False
    ) -> None:
        """``operator``: cancel any stream, with the operator token read from the runtime
        directory of an ``ipc://`` endpoint (only the engine's user can read it)."""
        self._dealer = CorrelatedDealer(endpoint, "ingest", timeout_s, identity)
        self._cancel_tokens: OrderedDict[int, str] = OrderedDict()  # the latest streams submitted here
        self._token = None
        if operator:
            from engine.protocol.tokens import OPERATOR
            from engine.tokens import read_token

            self._token = read_token(os.path.dirname(endpoint.removeprefix("ipc://")), OPERATOR)
            if self._token is None:
                raise RequestError(f"no operator token next to {endpoint} (is the engine running?)")

    def _call(self, msg: dict[str, Any], on_late: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        reply = self._dealer.call(msg, on_late)
        if reply.get("type") == "rejected":
            raise RequestError(str(reply.get("reason")))
        return reply

    def submit(self, body: dict[str, Any], endpoint: str = "chat", client: str | None = None) -> int:
        reply = self._call(submit_message(body, endpoint, client, self._dealer.timeout_s), self._cancel_unfollowed)
        sid = int(reply["stream_id"])
        self._cancel_tokens[sid] = str(reply.get("cancel_token", ""))
        if len(self._cancel_tokens) > MAX_CANCEL_TOKENS:
            self._cancel_tokens.popitem(last=False)
        return sid

    def cancel(self, stream_id: int) -> None:
        """Cancel a stream this client submitted (one of its latest MAX_CANCEL_TOKENS), or any
        stream with ``operator``."""
        token = self._token or self._cancel_tokens.get(stream_id, "")
        self._call({"type": "cancel", "stream_id": stream_id, "token": token})
        self._cancel_tokens.pop(stream_id, None)

    def _cancel_unfollowed(self, reply: dict[str, Any]) -> None:
        """The reply to a submit that timed out: an acceptance is a stream nobody follows."""
        if reply.get("type") == "accepted":
            cancel = {"type": "cancel", "stream_id": reply.get("stream_id"), "token": reply.get("cancel_token")}
            self._dealer.send(cancel)

    def close(self) -> None:
        self._dealer.settle(LATE_REPLY_WAIT_S)
        self._dealer.close()

    def __enter__(self) -> RequestClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
