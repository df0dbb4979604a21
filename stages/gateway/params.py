"""The gateway's params (a closed pydantic model, engine/params.py): the ``[gateway]`` table of the
configuration (merged into the gateway worker's params by engine/config.py), checked when the
config is loaded to run. What each means: docs/gateway.md and the docstring of
``stages.gateway.stage``."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.listen import AUTH_MODES, exposed_without_auth, parse_listen
from engine.params import FloatIn, IntIn, StageParams
from engine.protocol.requests import MAX_REQUEST_BYTES, MOST_REQUEST_BYTES, SUBMIT_OVERHEAD

MAX_BODY_BYTES = MOST_REQUEST_BYTES - SUBMIT_OVERHEAD  # the most max_body_bytes may be set to (64 MiB)
MAX_MODEL_NAMES = 1024
MAX_CORS_ORIGINS = 256
# an origin as browsers send it: lower-case scheme://host[:port], an IPv6 host in brackets, no path
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(?:\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(\d{1,5}))?")
DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origin(value: str) -> str:
    """One ``cors_origins`` entry, exactly as a browser's Origin header will carry it."""
    found = ORIGIN.fullmatch(value)
    if found is None:
        raise ValueError(
            f'{value!r} is not an origin: scheme://host[:port] in lower case, without a path or a trailing "/" '
            f'(e.g. "https://app.example.com"), or "*" alone'
        )
    port = found.group(1)
    if port is not None and int(port) > 65535:
        raise ValueError(f"{value!r}: port {port} is out of range")
    if port is not None and DEFAULT_PORTS.get(value.split(":", 1)[0]) == port:
        raise ValueError(f"{value!r}: browsers leave the default port out of an origin: write it without :{port}")
    return value


def _absolute_or_empty(value: str) -> str:
    if value and not os.path.isabs(value):
        raise ValueError(f'must be "" or an absolute path (got {value!r})')
    return value


class GatewayParams(StageParams):
    listen: str = "127.0.0.1:8080"  # host:port; port 0: any free port (status --json shows gateway.url)
    # who may call (contract B, engine/auth/): "off" only on a loopback listen
    auth: Literal[AUTH_MODES] = "off"
    jwt_secret_file: str = ""  # HS256: a file holding the shared secret
    jwks_file: str = ""  # RS256/EdDSA: a JWKS file of public keys
    audience: str = ""  # required "aud" of a JWT ("": not checked)
    issuer: str = ""  # required "iss" of a JWT ("": not checked)
    # the API keys' database and the usage ledger; filled in from [engine] state_dir (engine/statedir.py)
    state_dir: str = ""
    # larger bodies: 413; ingest takes what this lets through (its max_request_bytes follows: engine/config.py)
    max_body_bytes: IntIn(1024, MAX_BODY_BYTES) = MAX_REQUEST_BYTES
    body_timeout_s: FloatIn(0.1, 300.0) = 10.0  # a body not received whole this soon: 408 (slow clients)
    # a whole (non-streamed) answer is held until it ends: past this estimate of its JSON, 400
    # response_too_large (stream it instead); its memory in the gateway is several times this
    max_whole_bytes: IntIn(1 << 20, 1 << 30) = 64 << 20
    # every whole answer being collected together: past this the largest is ended with 503 gateway_busy
    max_total_whole_bytes: IntIn(1 << 20, 1 << 40) = 256 << 20
    # a stream's tokens waiting for a client that reads slower than they come: past this, the
    # request's streams are cancelled and it ends in an error event (client_too_slow)
    max_stream_backlog: IntIn(1024, 1 << 24) = 65536
    # every stream's waiting tokens together: past this, the stream furthest behind is cut the same
    # way (its client_too_slow names this key), so slow clients' memory is bounded for the gateway
    max_total_backlog: IntIn(1024, 1 << 30) = 1 << 19
    keepalive_s: FloatIn(0.05, 55.0) = 10.0  # an SSE comment after this long without a token
    first_token_timeout_s: FloatIn(0.1, 3600.0) = 120.0  # no first token this soon: the stream ends in an error
    submit_timeout_s: FloatIn(0.1, 60.0) = 5.0  # ingest must answer a submit this soon (else 503)
    # what /v1/models lists and a request's model is checked against; empty: asked from ingest
    models: list[str] = Field(default_factory=list, max_length=MAX_MODEL_NAMES)
    feed_queue: IntIn(1, 1_000_000) = 1000  # broadcast messages queued per browser feed before it is dropped
    # browser feeds of one stream open at once (each its own subscription: two ZeroMQ sockets, four
    # descriptors); beyond: 503 before the upgrade. Feeds of every stream share one and are not counted
    max_stream_feeds: IntIn(1, 65536) = 256
    max_connections: IntIn(1, 1 << 20) = 4096  # open requests and feeds at once; beyond: 503
    # a connection must complete a request head this soon after it opens or its last answer ends
    # (slow-header clients; idle keep-alive connections are closed as late)
    header_timeout_s: FloatIn(0.1, 300.0) = 10.0
    # a connection whose client takes none of what is sent to it this long is closed, its streams
    # cancelled (nginx's send_timeout; a stalled reader held its stream, slot and answer for good)
    send_timeout_s: FloatIn(0.5, 3600.0) = 60.0
    # browser apps on these origins may call the API (CORS); ["*"]: any; empty: no CORS headers
    cors_origins: list[str] = Field(default_factory=list, max_length=MAX_CORS_ORIGINS)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("cors_origins")
    @classmethod
    def _cors_origins(cls, value: list[str]) -> list[str]:
        if "*" in value:
            if value != ["*"]:
                raise ValueError(f'"*" allows every origin, so it stands alone (got {value!r})')
            return value
        return [_origin(origin) for origin in value]

    @field_validator("jwt_secret_file", "jwks_file", "state_dir")
    @classmethod
    def _paths(cls, value: str) -> str:
        return _absolute_or_empty(value)

    @model_validator(mode="after")
    def _auth(self) -> GatewayParams:
        reason = exposed_without_auth(self.listen, self.auth)
        if reason:
            raise ValueError(f"listen: {reason}")
        if self.auth == "jwt" and not (self.jwt_secret_file or self.jwks_file):
            raise ValueError('auth = "jwt" needs jwt_secret_file (HS256) or jwks_file (RS256/EdDSA)')
        if self.max_total_whole_bytes < self.max_whole_bytes:  # a lone large answer would get a 503 to retry
            raise ValueError(
                f"max_total_whole_bytes ({self.max_total_whole_bytes}) must be >= max_whole_bytes"
                f" ({self.max_whole_bytes}): raise it with max_whole_bytes"
            )
        return self
