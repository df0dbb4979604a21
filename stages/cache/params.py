"""The cache stage's params (a closed pydantic model, engine/params.py): checked when the config
is loaded to run, and read by the stage's start. What each means: docs/cache.md and the docstring
of ``stages.cache.stage``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.params import IntIn, StageParams

REPLAY_MODES = ("full", "paced")
MAX_COUNT = 1 << 20  # streams, replays: each takes a slot of a table made at start


class CacheParams(StageParams):
    max_bytes: IntIn(1, 1 << 40) = 256 << 20  # the LRU budget
    ttl_s: float = Field(3600.0, gt=0)
    replay: Literal[REPLAY_MODES] = "full"
    batch_rows: IntIn(1, 65_536) = 64  # rows per replayed batch
    max_stream_bytes: IntIn(1, 1 << 40) = 16 << 20
    max_open_streams: IntIn(1, MAX_COUNT) = 4096
    max_replays: IntIn(1, MAX_COUNT) = 1024
    snapshot_path: str | None = None  # None: <runtime base dir>/<worker>.cache-snapshot; "": no snapshots
    snapshot_interval_s: float = Field(60.0, ge=0)  # 0: only on stop and on request
