"""Every refusal the gateway answers, as OpenAI's error object with its HTTP status, and the
reasons an engine stream ends early mapped to them (docs/gateway.md, "Errors")."""

from __future__ import annotations

import re

from aiohttp import web

from engine.protocol.openai_errors import ApiError


def error_response(err: ApiError) -> web.Response:
    return web.Response(body=err.encoded(), status=err.status, content_type="application/json", headers=err.headers())


_UPSTREAM_STATUS = re.compile(r"\bHTTP (\d{3})\b")


def stream_error(reason: str) -> ApiError:
    """An engine stream's ERROR row (its reason) as the error a client gets: the upstream refused
    the request (400; its 429: 429), no upstream serves the model (404), anything else: the
    service failed this request (503, which clients may retry)."""
    if reason.startswith("no upstream serves model"):
        return ApiError(404, reason, "invalid_request_error", "model_not_found", "model")
    found = _UPSTREAM_STATUS.search(reason)
    status = int(found.group(1)) if found else 0
    if status == 429:
        return ApiError(429, reason, "rate_limit_error", "rate_limit_exceeded", retry_after="1")
    if 400 <= status < 500 and status not in (408, 425):
        return ApiError(400, reason, "invalid_request_error", "upstream_rejected")
    if reason == "cancelled":
        return ApiError(503, "the stream was cancelled", "server_error", "cancelled", retry_after="1")
    lost = reason.startswith(("lost", "engine unreachable", "ingest restarted", "engine stopping", "ingest stopped"))
    return ApiError(503, reason, "server_error", "stream_lost" if lost else "upstream_error", retry_after="1")


def rejection(reason: str) -> ApiError:
    """Ingest's ``rejected`` reply to a submit: its limits (429), its capacity or a drain (503),
    else a body it refused (400; the gateway's validation lets few through)."""
    if reason.startswith("rate limit"):
        return ApiError(429, reason, "rate_limit_error", "rate_limit_exceeded", retry_after="1")
    if "capacity" in reason or "draining" in reason:
        return ApiError(503, reason, "server_error", "engine_busy", retry_after="1")
    return ApiError(400, reason, "invalid_request_error", "invalid_request")
