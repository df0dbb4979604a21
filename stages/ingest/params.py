"""The ingest stage's scalar params, validated once at start: a bad value is an error naming its
key (``params.flush_ms: ...``), never a worker that crash-loops or a stream that hangs.
The table of what each means: the docstring of ``stages.ingest.stage``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MAX_FLUSH_MS = 100.0  # a longer window only adds latency: batches fill from batch_rows under load
MAX_BATCH_ROWS = 65_536
MAX_STREAMS = 1 << 20


@dataclass(frozen=True)
class IngestParams:
    batch_rows: int = 64
    flush_ms: float = 2.0
    max_streams: int = 4096
    queue_bound: int = 64
    client_requests_per_s: float = 100.0
    client_burst: float = 20.0
    client_tokens_per_s: float = 1e6
    client_burst_tokens: float = 1e5

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> IngestParams:
        """The values of ``params`` (defaults for what it lacks); ValueError names a bad key."""
        values = {}
        for f in fields(cls):
            if f.name in params:
                values[f.name] = _number(f.name, params[f.name], integer=f.type == "int")
        checked = cls(**values)
        checked._check_ranges()
        return checked

    def _check_ranges(self) -> None:
        _within("batch_rows", self.batch_rows, 1, MAX_BATCH_ROWS)
        _within("flush_ms", self.flush_ms, 0.0, MAX_FLUSH_MS)
        _within("max_streams", self.max_streams, 1, MAX_STREAMS)
        _within("queue_bound", self.queue_bound, 1, MAX_STREAMS)
        for name in ("client_requests_per_s", "client_burst", "client_tokens_per_s", "client_burst_tokens"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"params.{name}: must be a finite number > 0, got {value!r}")


def _number(name: str, value: Any, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"params.{name}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"params.{name}: must be in [{low:g}, {high:g}], got {value!r}")
