"""OpenAI's error object, the answer every OpenAI-compatible endpoint here gives to what it refuses:
``{"error": {"message", "type", "param", "code"}}`` with an HTTP status (and ``Retry-After`` where
a client may try again). The gateway answers its clients with it, and the embedded upstream answers
ingest with it as real servers do; a client of either reads one shape."""

from __future__ import annotations

from typing import Any

import orjson


def error_object(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered as OpenAI's error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after = retry_after
        self.extra_headers = headers  # e.g. a 429's x-ratelimit-* headers

    def body(self) -> dict[str, Any]:
        return error_object(self.message, self.type, self.code, self.param)

    def encoded(self) -> bytes:
        return orjson.dumps(self.body())

    def headers(self) -> dict[str, str] | None:
        headers = dict(self.extra_headers or {})
        if self.retry_after:
            headers["Retry-After"] = self.retry_after
        return headers or None
