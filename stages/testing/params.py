"""The test stages' params (closed pydantic models, engine/params.py), checked at config load
like every stage's."""

from __future__ import annotations

from pydantic import Field

from engine.params import IntIn, StageParams


class CountingParams(StageParams):
    """CountingSource and AsyncCountingSource."""

    streams: IntIn(1, 1 << 20) = 4
    batch: IntIn(1, 65_536) = 16  # tokens per batch
    rate: float = Field(2000.0, ge=0)  # tokens/s; 0: as fast as the ring takes them
    total: int = Field(0, ge=0)  # tokens to emit, then idle; 0: for ever


class RelayParams(StageParams):
    """A relay takes none: any key is an error."""


class VerifyParams(StageParams):
    streams: IntIn(1, 1 << 24) = 4096  # largest stream id + 1 it accepts
    latency_budget_ms: float = Field(50.0, gt=0)
    progress_every_s: float = Field(2.0, gt=0)  # how often it logs sink_progress
