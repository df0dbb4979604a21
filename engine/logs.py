"""Structured logs: one JSON object per line on stderr (orjson), with stage, pid and stream id.

{"ts": 1732456789.123, "level": "info", "event": "worker_restarted", "stage": "supervisor",
 "pid": 4242, "worker": "relay", "restarts": 1}
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

import orjson

from engine.redact import redact

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class JsonLogger:
    """Writes events as JSON lines. ``stage`` names the process role (supervisor, a worker name)."""

    def __init__(self, stage: str, level: str = "info", stream: IO[bytes] | None = None) -> None:
        if level not in LEVELS:
            raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
        self.stage = stage
        self.threshold = LEVELS[level]
        self._stream = stream if stream is not None else sys.stderr.buffer

    def log(self, level: str, event: str, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        record = {"ts": round(time.time(), 6), "level": level, "event": event, "stage": self.stage, "pid": os.getpid()}
        record.update(redact(fields))  # an upstream's URL in an error names its credentials
        try:
            self._stream.write(orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE))
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # stderr gone (closed pipe, interpreter shutdown): logging must never take a worker down

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)
