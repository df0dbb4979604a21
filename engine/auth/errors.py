"""Refusals the gateway turns into OpenAI error objects ({"error": {"message", "type", "param",
"code"}}) with the status here: 401/403 for who is calling, 429 for how much."""

from __future__ import annotations

import math
from typing import Literal


class AuthError(Exception):
    """The caller is not known (401) or not allowed (403). ``message`` names the problem and never
    holds the credential presented."""

    type = "invalid_request_error"

    def __init__(self, message: str, status: int = 401, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def openai_error(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


Reason = Literal["rpm", "tpm", "streams", "budget"]


class LimitExceeded(Exception):
    """A limit of the caller's is reached: 429 with ``Retry-After`` (whole seconds, at least 1:
    ``retry_after_header``). ``code`` is OpenAI's: rate_limit_exceeded, or insufficient_quota for
    the budget."""

    status = 429

    def __init__(self, reason: Reason, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.message = message
        self.code = "insufficient_quota" if reason == "budget" else "rate_limit_exceeded"
        self.type = {"rpm": "requests", "tpm": "tokens", "streams": "requests", "budget": "insufficient_quota"}[reason]

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))

    def openai_error(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


class AuthConfigError(ValueError):
    """The gateway's auth cannot be set up (a secret, JWKS or key database unusable); one line
    naming the file or setting."""
