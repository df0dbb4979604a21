"""The ingest stage's params (a closed pydantic model, engine/params.py): checked when the config
is loaded to run, and read by the stage's set-up. A bad value is an error naming its key
(``workers.ingest.params.flush_ms: ...``), never a worker that crash-loops or a stream that hangs.
The table of what each means: the docstring of ``stages.ingest.stage``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from engine.params import FloatIn, IntIn, StageParams
from engine.protocol.cachekey import POLICIES
from engine.protocol.requests import MAX_REQUEST_BYTES, MOST_REQUEST_BYTES
from engine.upstreams import UpstreamEntry

MAX_FLUSH_MS = 100.0  # a longer window only adds latency: batches fill from batch_rows under load
MAX_BATCH_ROWS = 65_536
MAX_STREAMS = 1 << 20


class IngestParams(StageParams):
    # [[upstreams]] entries (the ingest pool's UpstreamConfig is the same model); none: embedded
    upstreams: list[UpstreamEntry] = Field(default_factory=list)
    # checked at set-up by the classes they configure (PoolPolicy in stages/ingest/pool.py,
    # UpstreamServerConfig in stages/ingest/upstream_server.py), which this light module must not import
    pool: dict[str, Any] = Field(default_factory=dict)
    embedded: dict[str, Any] = Field(default_factory=dict)
    batch_rows: IntIn(1, MAX_BATCH_ROWS) = 64
    flush_ms: FloatIn(0.0, MAX_FLUSH_MS) = 2.0
    max_streams: IntIn(1, MAX_STREAMS) = 4096
    queue_bound: IntIn(1, MAX_STREAMS) = 64
    # a request's bytes (a gateway's max_body_bytes raises it: engine/config.py)
    max_request_bytes: IntIn(64 << 10, MOST_REQUEST_BYTES) = MAX_REQUEST_BYTES
    # rate limits per client: finite (StageParams forbids inf and NaN) and > 0
    client_requests_per_s: float = Field(100.0, gt=0)
    client_burst: float = Field(20.0, gt=0)
    client_tokens_per_s: float = Field(1e6, gt=0)
    client_burst_tokens: float = Field(1e5, gt=0)
    cache: str = "cache"  # the cache worker asked before going upstream; "" disables lookups
    cache_policy: Literal[POLICIES] = "deterministic"  # which requests are cacheable
