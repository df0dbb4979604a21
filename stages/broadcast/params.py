"""The broadcast worker's params, checked at start: an error names the key and the reason, and
an unknown key is an error (a misspelt one would otherwise silently mean "default")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.keys import exposed_without_curve
from engine.wire import ENCODINGS

_SCHEMES = ("tcp://", "ipc://")


@dataclass(frozen=True)
class Endpoint:
    url: str
    encoding: str


@dataclass(frozen=True)
class BroadcastParams:
    endpoints: tuple[Endpoint, ...] = ()  # extra XPUB endpoints, besides the two ipc ones
    snapshot_url: str = ""  # an extra endpoint for the snapshot ROUTER
    sndhwm: int = 10_000
    retention_bytes: int = 64 << 20
    retention_s: float = 300.0
    heartbeat_s: float = 1.0
    latency_budget_ms: float = 50.0
    curve: bool = False  # CURVE on every tcp endpoint (required for one beyond loopback)
    keys_dir: str = ""  # where the server pair and the allow-list are ("": engine.keys.default_keys_dir)


def parse(params: dict[str, Any]) -> BroadcastParams:
    """``params`` of a broadcast worker as :class:`BroadcastParams`; raises ValueError naming the key."""
    known = set(BroadcastParams.__dataclass_fields__)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"broadcast params: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key in ("sndhwm", "retention_bytes"):
        if key in params:
            values[key] = _number(key, params[key], int, low=0 if key == "sndhwm" else 1)
    for key in ("retention_s", "heartbeat_s", "latency_budget_ms"):
        if key in params:
            values[key] = float(_number(key, params[key], (int, float), low=1e-9))
    if "snapshot_url" in params:
        values["snapshot_url"] = _url("snapshot_url", params["snapshot_url"])
    endpoints = params.get("endpoints", [])
    if not isinstance(endpoints, list):
        raise ValueError("broadcast params: endpoints must be an array of {url, encoding} tables")
    values["endpoints"] = tuple(_endpoint(i, e) for i, e in enumerate(endpoints))
    curve = params.get("curve", False)
    if not isinstance(curve, bool):
        raise ValueError(f"broadcast params: curve must be true or false (got {curve!r})")
    keys_dir = params.get("keys_dir", "")
    if not isinstance(keys_dir, str) or (keys_dir and not keys_dir.startswith("/")):
        raise ValueError(f"broadcast params: keys_dir must be an absolute path (got {keys_dir!r})")
    exposed = [(f"endpoints[{i}].url", e.url) for i, e in enumerate(values["endpoints"])]
    for where, url in [*exposed, ("snapshot_url", values.get("snapshot_url", ""))]:
        reason = exposed_without_curve(url, curve)
        if reason:
            raise ValueError(f"broadcast params: {where}: {reason}")
    return BroadcastParams(**values, curve=curve, keys_dir=keys_dir)


def _number(key: str, value: Any, kind: type | tuple[type, ...], low: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind) or value < low:
        raise ValueError(f"broadcast params: {key} must be a number >= {low:g} (got {value!r})")
    return value


def _url(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(_SCHEMES):
        raise ValueError(f"broadcast params: {key} must be a tcp:// or ipc:// endpoint (got {value!r})")
    return value


def _endpoint(i: int, entry: Any) -> Endpoint:
    where = f"endpoints[{i}]"
    if not isinstance(entry, dict) or set(entry) - {"url", "encoding"}:
        raise ValueError(f"broadcast params: {where} must be a table with url and encoding (got {entry!r})")
    encoding = entry.get("encoding", "json")
    if encoding not in ENCODINGS:
        raise ValueError(f"broadcast params: {where}.encoding must be one of {', '.join(ENCODINGS)} (got {encoding!r})")
    return Endpoint(_url(f"{where}.url", entry.get("url")), encoding)
