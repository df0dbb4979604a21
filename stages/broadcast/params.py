"""The broadcast stage's params (a closed pydantic model, engine/params.py): checked when the
config is loaded to run, and read by the stage's start. An error names the key and the reason."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.keys import exposed_without_curve
from engine.params import MIN_PERIOD_S, StageParams
from engine.protocol.wire import ENCODINGS

_SCHEMES = ("tcp://", "ipc://")


def _endpoint_url(value: str) -> str:
    if not value.startswith(_SCHEMES):
        raise ValueError(f"must be a tcp:// or ipc:// endpoint (got {value!r})")
    return value


class Endpoint(StageParams):
    url: str
    encoding: Literal[ENCODINGS] = "json"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _endpoint_url(value)


class BroadcastParams(StageParams):
    endpoints: list[Endpoint] = Field(default_factory=list)  # extra XPUB endpoints, besides the two ipc ones
    snapshot_url: str = ""  # an extra endpoint for the snapshot ROUTER
    sndhwm: int = Field(10_000, ge=0)
    retention_bytes: int = Field(64 << 20, ge=1)
    retention_s: float = Field(300.0, gt=0)
    heartbeat_s: float = Field(1.0, ge=MIN_PERIOD_S)  # else a heartbeat message every duty cycle
    latency_budget_ms: float = Field(50.0, gt=0)
    curve: bool = False  # CURVE on every tcp endpoint (required for one beyond loopback)
    keys_dir: str = ""  # where the server pair and the allow-list are ("": engine.keys.default_keys_dir)

    @field_validator("snapshot_url")
    @classmethod
    def _snapshot_url(cls, value: str) -> str:
        return value and _endpoint_url(value)

    @field_validator("keys_dir")
    @classmethod
    def _keys_dir(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError(f"must be an absolute path (got {value!r})")
        return value

    @model_validator(mode="after")
    def _curve_beyond_loopback(self) -> BroadcastParams:
        exposed = [(f"endpoints[{i}].url", e.url) for i, e in enumerate(self.endpoints)]
        for where, url in [*exposed, ("snapshot_url", self.snapshot_url)]:
            reason = exposed_without_curve(url, self.curve)
            if reason:
                raise ValueError(f"{where}: {reason}")
        return self
