"""Generation requests: the wire protocol of the ingest ROUTER, its validation (the client:
engine/clients/requests.py).

The ingest worker binds a ROUTER at ``ipc://<runtime dir>/<instance>/ingest.sock``. A client
connects a DEALER and sends one JSON object per frame:

    submit  {body, endpoint?, client?, deadline_ns?} -> accepted {stream_id, cancel_token} | rejected {reason}
    cancel  {stream_id, token}                       -> cancelled {stream_id} | rejected {reason}

``body`` is an OpenAI chat/completions request body (``stream`` is forced on); ``endpoint`` is
"chat" (default) or "completions"; ``client`` names the client identity for rate limits (default:
the DEALER's identity); ``deadline_ns`` (CLOCK_MONOTONIC, the same clock in every process of the
host) is when the client stops waiting for the reply: a submit read at or after it is rejected as
``expired`` and starts nothing (it waited in the sockets while ingest was stalled, and nobody would
follow its stream). The stream id is assigned at once, before any upstream is contacted.
A stream is cancelled with the ``cancel_token`` its ``accepted`` reply carried (only its submitter
was told it) or with the engine's operator token (engine/tokens.py; docs/security.md).
"""

from __future__ import annotations

from typing import Any

from engine.protocol.control import deadline_after, load_object
from engine.protocol.endpoints import endpoint

# A request's bytes: ingest's ``max_request_bytes`` (this by default), the one bound on its size; a
# long document in one message or an image in a data URL is as large as the whole request may be
MAX_REQUEST_BYTES = 1 << 20
SUBMIT_OVERHEAD = 64 << 10  # what a submit adds around the body it carries (a gateway's: docs/gateway.md)
MOST_REQUEST_BYTES = (64 << 20) + SUBMIT_OVERHEAD  # the most max_request_bytes may be set to
MAX_MESSAGES = 4096  # an agent's history runs to hundreds (a call and its result per step); bytes are bounded anyway
# a reply's tokens: today's models write up to 128k (reasoning models need tens of thousands); also
# what a stream that names no max_tokens may bring before the pool ends it (docs/upstreams.md)
MAX_TOKENS_LIMIT = 131_072
MAX_MODEL_BYTES = 256  # a model name travels in every stream's START row: bounded like any field
MAX_CLIENT_BYTES = 256  # a client name keys the rate limits
MAX_STREAM_ID = 2**63 - 1
MAX_CANCEL_TOKENS = 65536  # a RequestClient remembers the cancel tokens of its latest streams
ENDPOINTS = ("chat", "completions")
ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(ValueError):
    """A request that is not valid; the message names the field and the reason."""


def _check_content(content: Any, where: str) -> None:
    if content is None or isinstance(content, str):  # null: an assistant's turn that called tools
        return
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("text", ""), str):
                raise RequestError(f"{where}[{i}]: content parts must be objects with a string 'text'")
        return
    raise RequestError(f"{where}: must be a string or a list of content parts")


def _check_number(body: dict, key: str, low: float, high: float, integer: bool = False) -> None:
    if key not in body or body[key] is None:
        return
    value = body[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise RequestError(f"body.{key}: must be {'an integer' if integer else 'a number'} in [{low}, {high}]")


def validate_body(body: Any, endpoint: str) -> dict[str, Any]:
    """Check an OpenAI request body; return it with ``stream`` forced on."""
    if endpoint not in ENDPOINTS:
        raise RequestError(f"endpoint: must be one of {', '.join(ENDPOINTS)} (got {endpoint!r})")
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object")
    if not isinstance(body.get("model", ""), str):
        raise RequestError("body.model: must be a string")
    if len(body.get("model", "").encode()) > MAX_MODEL_BYTES:
        raise RequestError(f"body.model: longer than {MAX_MODEL_BYTES} bytes")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("body.messages: must be a non-empty list")
        if len(messages) > MAX_MESSAGES:
            raise RequestError(f"body.messages: {len(messages)} messages, at most {MAX_MESSAGES}")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES:
                raise RequestError(f"body.messages[{i}].role: must be one of {', '.join(ROLES)}")
            _check_content(msg.get("content", ""), f"body.messages[{i}].content")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("body.prompt: must be a non-empty string")
    _check_number(body, "max_tokens", 1, MAX_TOKENS_LIMIT, integer=True)
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "top_logprobs", 0, 20, integer=True)
    return {**body, "stream": True}


def submit_message(body: dict[str, Any], endpoint: str, client: str | None, wait_s: float) -> dict[str, Any]:
    """A submit whose client waits ``wait_s`` for the reply: its ``deadline_ns`` is that much from now."""
    msg = {"type": "submit", "body": body, "endpoint": endpoint, "deadline_ns": deadline_after(wait_s)}
    if client:
        msg["client"] = client
    return msg


def _check_count(msg: dict[str, Any], key: str) -> None:
    """``msg[key]`` is an integer in 0..2**63-1 (a stream id, a clock's nanoseconds)."""
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STREAM_ID:
        raise RequestError(f"{key}: must be an integer in 0..{MAX_STREAM_ID}")


def parse_request(frame: bytes, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Decode and validate one request frame of at most ``limit`` bytes; raises :class:`RequestError`."""
    msg = load_object(frame, limit, "request", RequestError)
    kind = msg.get("type")
    if kind == "submit":
        endpoint = msg.get("endpoint", "chat")
        msg["body"] = validate_body(msg.get("body"), endpoint)
        msg["endpoint"] = endpoint
        if not isinstance(msg.get("client", ""), str):
            raise RequestError("client: must be a string")
        if len(msg.get("client", "").encode()) > MAX_CLIENT_BYTES:
            raise RequestError(f"client: longer than {MAX_CLIENT_BYTES} bytes")
        if "deadline_ns" in msg:
            _check_count(msg, "deadline_ns")
        return msg
    if kind == "cancel":
        _check_count(msg, "stream_id")
        if not isinstance(msg.get("token", ""), str):
            raise RequestError("token: must be a string")
        return msg
    if kind == "models":
        return msg
    raise RequestError(f"type: must be 'submit', 'cancel' or 'models' (got {kind!r})")


def ingest_endpoint(runtime_dir: str, worker: str = "ingest") -> str:
    """Where the ingest worker ``worker`` of the engine in ``runtime_dir`` listens."""
    return endpoint(runtime_dir, worker)
