"""The compute stage's params (a closed pydantic model, engine/params.py): checked when the config
is loaded to run, and read by the stage's start. What each means: docs/compute.md and the
docstring of ``stages.compute.stage``."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from engine.params import FloatIn, IntIn, StageParams
from stages.compute.backends import BACKENDS
from stages.compute.kernels import MAX_ORDER
from stages.compute.shaders import MAX_PROBES

MAX_WINDOW = 1 << 16  # tokens a running window holds per stream
MAX_COALESCE_ROWS = 1 << 16


class RepetitionParams(StageParams):
    ngram: IntIn(1, 1024) = 4
    window: IntIn(1, MAX_WINDOW) = 64
    threshold: FloatIn(0.0, 1.0) = 0.5
    action: Literal["mark", "cancel"] = "mark"


class ProbeParams(StageParams):
    count: IntIn(0, MAX_PROBES) = 0  # 0: probes off
    vectors: list[list[float]] | None = None  # K probe vectors of the table's dim; None: count random ones
    table: str = "hashed"  # or a GGUF file whose token_embd is the table
    rows: IntIn(1, 1 << 22) = 4096
    dim: IntIn(1, 4096) = 64
    seed: IntIn(0, (1 << 63) - 1) = 0
    window: IntIn(1, MAX_WINDOW) = 32

    @model_validator(mode="after")
    def _vector_count(self) -> ProbeParams:
        if self.vectors is not None and not 1 <= len(self.vectors) <= MAX_PROBES:
            raise ValueError(f"vectors: must hold 1..{MAX_PROBES} probe vectors, got {len(self.vectors)}")
        return self


class ComputeParams(StageParams):
    backend: Literal[BACKENDS] = "auto"  # env NEURALPIPE_COMPUTE_BACKEND overrides
    allow_cpu_adapter: bool = False
    adapter: str | None = None  # a device-name substring
    hilbert_order: IntIn(1, MAX_ORDER) = 8
    coalesce_rows: IntIn(1, MAX_COALESCE_ROWS) = 256
    compiled: bool = True  # the C record kernel (stages/compute/compiled.c) where it is built and applies
    repetition: RepetitionParams = RepetitionParams()
    probes: ProbeParams = ProbeParams()
