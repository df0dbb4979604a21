"""Configuration: one TOML file, validated at start; every value has a default; env overrides.

Precedence, highest first: environment (``NEURALPIPE_*``, see ``ENV_OVERRIDES``), the file, the
built-in defaults (which include a demo topology, so no file is needed). Every error names where
the bad value came from (file or environment variable), its key path and the reason::

    config.toml: workers.relay.restart: must be one of permanent, transient, temporary (got 'always')

The models are pydantic v2, strict (TOML is typed: ``capacity = "4096"`` is an error, not a
conversion), frozen and closed (unknown keys are errors, so a typo never silently means "default").
Stage modules are never imported here: ``engine`` must not depend on ``stages``; a stage reference
is only checked for its shape and resolved by the worker that runs it. See docs/configuration.md.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.files import UnusableFile, read_regular_file
from engine.keys import exposed_without_curve
from engine.listen import exposed_without_auth
from engine.notify import MAX_WEBHOOKS, check_webhook_url
from engine.params import MIN_PERIOD_S
from engine.ports import REFERENCE
from engine.protocol.requests import MAX_REQUEST_BYTES, SUBMIT_OVERHEAD
from engine.redact import redact
from engine.statedir import state_dir_path
from engine.upstreams import UpstreamEntry
from shm import descriptor as d
from shm.batch import MAX_ROW_TEXT, min_record_bytes
from shm.naming import NameError_, check_ring
from shm.wait import WaitStrategy

STAGE_ALIASES = {
    "counter": "stages.testing.counter:CountingSource",
    "relay": "stages.testing.relay:Relay",
    "verify": "stages.testing.verify:VerifyingSink",
    "async_counter": "stages.testing.async_counter:AsyncCountingSource",
    "ingest": "stages.ingest.stage:Ingest",
    "compute": "stages.compute.stage:Compute",
    "cache": "stages.cache.stage:Cache",
    "broadcast": "stages.broadcast.stage:Broadcast",
    "gateway": "stages.gateway.stage:Gateway",
}

# Environment variable -> (section, key) it overrides. Only what operators change per host.
ENV_OVERRIDES = {
    "NEURALPIPE_INSTANCE": ("engine", "instance"),
    "NEURALPIPE_RUNTIME_DIR": ("engine", "runtime_dir"),
    "NEURALPIPE_STATE_DIR": ("engine", "state_dir"),
    "NEURALPIPE_METRICS_HOST": ("engine", "metrics_host"),
    "NEURALPIPE_METRICS_PORT": ("engine", "metrics_port"),
    "NEURALPIPE_LOG_LEVEL": ("engine", "log_level"),
    "NEURALPIPE_GATEWAY_LISTEN": ("gateway", "listen"),
}
_ENV_INTEGERS = {"NEURALPIPE_METRICS_PORT"}

MIN_LOG_BYTES = 1 << 20  # a log cut smaller than a megabyte would lose its story too soon
_INSTANCE = re.compile(r"[A-Za-z0-9_]{1,32}")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_STAGE_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """An unusable configuration. ``str()`` is one line per problem; ``problems`` lists them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _KeyedError(ValueError):
    """A validator's error about a key below the one being validated (``path`` is relative).

    pydantic places model-level validator errors at the model's own location; this carries the
    precise key so the message can name it."""

    def __init__(self, path: tuple[str | int, ...], reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


# -- reusable field types -------------------------------------------------------------------------


def _power_of_two_capacity(value: int) -> int:
    if not d.MIN_CAPACITY <= value <= d.MAX_CAPACITY or value & (value - 1):
        raise ValueError(f"must be a power of two in {d.MIN_CAPACITY}..2**40 (got {value})")
    return value


def _park_timeout(value: float) -> float:
    if not 0 < value <= 60:
        raise ValueError(f"must be in (0, 60] seconds (got {value})")
    return value


def _ring_name(value: str) -> str:
    try:
        return check_ring(value)
    except NameError_ as exc:
        raise ValueError(str(exc)) from None


Capacity = Annotated[int, AfterValidator(_power_of_two_capacity)]
ParkTimeout = Annotated[float, AfterValidator(_park_timeout)]
NonNegativeInt = Annotated[int, Field(ge=0)]
WaitKind = Literal["spin", "yield", "block"]
FullPolicy = Literal["block", "drop"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# -- sections -------------------------------------------------------------------------------------


class EngineConfig(_Model):
    instance: str = ""
    runtime_dir: str = ""
    state_dir: str = ""  # what outlives a run (the gateway's keys and ledger): engine/statedir.py
    metrics_host: str = Field("127.0.0.1", min_length=1)
    metrics_port: int = 9464
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # 10 ms at least: every worker's heartbeat is a message the supervisor handles (a microsecond
    # flooded it: it never reported running)
    heartbeat_interval_s: float = Field(0.5, ge=MIN_PERIOD_S)
    heartbeat_timeout_s: float = 2.0
    stop_timeout_s: float = Field(5.0, gt=0)
    health_interval_s: float = Field(1.0, ge=MIN_PERIOD_S)
    # a detached engine's log past this is cut, its content kept in <instance>.log.1 (engine/logfile.py)
    log_max_bytes: int = 64 << 20
    health_window_s: float = 60.0
    latency_budget_ms: float = Field(50.0, gt=0)
    # What carries records between workers: the shared-memory rings, or a port factory named
    # "package.module:NAME" (engine/ports.py; `neuralpipe bench pipeline` compares bench's own)
    transport: str = "shm"
    # The Linux scheduling policy of the worker processes: "batch" (SCHED_BATCH) keeps a woken
    # worker from preempting the process that woke it, so a record's hand-off costs no context
    # switch pair; "normal" keeps the policy the engine was started with (docs/benchmarks.md,
    # "Scheduling policy")
    sched_policy: Literal["batch", "normal"] = "batch"

    @field_validator("transport")
    @classmethod
    def _transport(cls, value: str) -> str:
        if value != "shm" and not REFERENCE.fullmatch(value):
            raise ValueError(f'must be "shm" or a port factory reference "package.module:NAME" (got {value!r})')
        return value

    @field_validator("instance")
    @classmethod
    def _instance(cls, value: str) -> str:
        if value and not _INSTANCE.fullmatch(value):
            raise ValueError(f'must be "" (random per run) or 1-32 characters of [A-Za-z0-9_] (got {value!r})')
        return value

    @field_validator("runtime_dir", "state_dir")
    @classmethod
    def _runtime_dir(cls, value: str) -> str:
        # Relative paths would depend on the cwd of whoever runs `status`/`stop` later.
        if value and not os.path.isabs(value):
            raise ValueError(f'must be "" (default) or an absolute path (got {value!r})')
        return value

    @field_validator("metrics_host")
    @classmethod
    def _metrics_host(cls, value: str) -> str:
        # checked here: a bad host used to surface as a traceback from the bind at start
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        if not _HOSTNAME.fullmatch(value) or value.replace(".", "").isdigit():
            raise ValueError(f"must be an IP address or a host name (got {value[:80]!r})")
        return value

    @field_validator("metrics_port")
    @classmethod
    def _metrics_port(cls, value: int) -> int:
        if not -1 <= value <= 65535:
            raise ValueError(f"must be 1..65535, 0 (any free port) or -1 (disabled) (got {value})")
        return value

    @field_validator("log_max_bytes")
    @classmethod
    def _log_max_bytes(cls, value: int) -> int:
        if value != 0 and not MIN_LOG_BYTES <= value <= 1 << 40:
            raise ValueError(f"must be 0 (no limit) or {MIN_LOG_BYTES}..2**40 bytes (got {value})")
        return value

    @model_validator(mode="after")
    def _relations(self) -> EngineConfig:
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise _KeyedError(
                ("heartbeat_timeout_s",),
                f"must be >= 2 x heartbeat_interval_s = {2 * self.heartbeat_interval_s:g} "
                f"(got {self.heartbeat_timeout_s:g})",
            )
        if self.health_window_s < self.health_interval_s:
            raise _KeyedError(
                ("health_window_s",),
                f"must be >= health_interval_s = {self.health_interval_s:g} (got {self.health_window_s:g})",
            )
        return self

    def resolved_runtime_dir(self, env: Mapping[str, str] | None = None) -> str:
        """The base runtime directory: ``runtime_dir``, else $XDG_RUNTIME_DIR/neuralpipe, else
        /tmp/neuralpipe-<uid>."""
        if self.runtime_dir:
            return self.runtime_dir
        xdg = (os.environ if env is None else env).get("XDG_RUNTIME_DIR", "")
        if xdg:
            return os.path.join(xdg, "neuralpipe")
        return f"/tmp/neuralpipe-{os.getuid()}"


class SupervisorConfig(_Model):
    strategy: Literal["one_for_one", "rest_for_one"] = "one_for_one"
    intensity: NonNegativeInt = 5
    period_s: float = Field(30.0, gt=0)
    backoff_initial_s: float = Field(0.01, ge=0)
    backoff_max_s: float = 2.0

    @model_validator(mode="after")
    def _relations(self) -> SupervisorConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise _KeyedError(
                ("backoff_max_s",),
                f"must be >= backoff_initial_s = {self.backoff_initial_s:g} (got {self.backoff_max_s:g})",
            )
        return self


def _webhook_url(value: str) -> str:
    return check_webhook_url(value)


class NotifyConfig(_Model):
    """``[notify]``: webhooks the supervisor posts to (engine/notify.py, docs/observability.md)."""

    webhooks: list[Annotated[str, AfterValidator(_webhook_url)]] = []
    timeout_s: float = Field(2.0, gt=0, le=30)  # per attempt
    retries: int = Field(3, ge=0, le=10)  # attempts after the first, for a 5xx, 408/425/429 or no answer
    backoff_s: float = Field(0.5, gt=0, le=60)  # before the first retry, doubling after
    queue_size: int = Field(100, ge=1, le=10_000)  # per webhook; the oldest is dropped beyond
    storm_restarts: int = Field(3, ge=2, le=1000)  # restarts of one worker within storm_window_s
    storm_window_s: float = Field(300.0, gt=0, le=86_400)

    @field_validator("webhooks")
    @classmethod
    def _bounded(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_WEBHOOKS:
            raise ValueError(f"at most {MAX_WEBHOOKS} webhooks (got {len(value)})")
        for i, url in enumerate(value):
            if url in value[:i]:
                raise _KeyedError((i,), "webhook listed twice")
        return value


def _max_record_limit(capacity: int) -> int:
    return d.default_max_record(capacity) * 2  # capacity // 2 - 16, what Ring.create accepts


class RingConfig(_Model):
    """The effective settings of one ring."""

    capacity: Capacity = 1 << 20
    max_record: NonNegativeInt = 0
    wait: WaitKind = "block"
    full: FullPolicy = "block"
    spins: NonNegativeInt = 200
    yields: NonNegativeInt = 20
    park_timeout_s: ParkTimeout = 0.05

    @model_validator(mode="after")
    def _relations(self) -> RingConfig:
        limit = _max_record_limit(self.capacity)
        if self.max_record > limit:
            raise _KeyedError(
                ("max_record",),
                f"must be 0 (capacity // 4 - 8) or 1..{limit} for capacity {self.capacity} (got {self.max_record})",
            )
        return self

    def resolved_max_record(self) -> int:
        """The largest record payload in bytes (``max_record``, or the default for 0)."""
        return self.max_record or d.default_max_record(self.capacity)

    def wait_strategy(self) -> WaitStrategy:
        return WaitStrategy(self.wait, spins=self.spins, yields=self.yields, park_timeout_s=self.park_timeout_s)


class RingOverride(_Model):
    """Per-ring settings under ``[rings.<name>]``: each key left out falls back to ``[ring_defaults]``.

    A separate model (not ``RingConfig``) because relations such as max_record vs capacity can only
    be checked once merged with the defaults; ``Config.ring(name)`` does that."""

    capacity: Capacity | None = None
    max_record: NonNegativeInt | None = None
    wait: WaitKind | None = None
    full: FullPolicy | None = None
    spins: NonNegativeInt | None = None
    yields: NonNegativeInt | None = None
    park_timeout_s: ParkTimeout | None = None


class WorkerConfig(_Model):
    stage: str
    restart: Literal["permanent", "transient", "temporary"] = "permanent"
    inputs: list[Annotated[str, AfterValidator(_ring_name)]] = []
    outputs: list[Annotated[str, AfterValidator(_ring_name)]] = []
    params: dict[str, Any] = {}
    # the CPUs the worker's process may run on (its threads and children too); empty: any
    cpus: list[int] = []

    @field_validator("stage")
    @classmethod
    def _stage(cls, value: str) -> str:
        value = STAGE_ALIASES.get(value, value)
        if not _STAGE_REF.fullmatch(value):
            raise ValueError(f"must be one of {', '.join(STAGE_ALIASES)} or 'package.module:ClassName' (got {value!r})")
        return value

    @model_validator(mode="after")
    def _no_exposed_tcp(self) -> WorkerConfig:
        """A tcp endpoint in any stage's params beyond loopback needs ``curve = true`` there
        (checked here for every stage, so the refusal comes at load, before anything starts)."""
        curve = self.params.get("curve") is True
        for path, url in _tcp_urls(self.params):
            reason = exposed_without_curve(url, curve)
            if reason:
                raise _KeyedError(("params", *path), reason)
        return self

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: list[int]) -> list[int]:
        usable = os.sched_getaffinity(0)
        for cpu in value:
            if cpu not in usable:
                raise ValueError(f"CPU {cpu} is not one this engine may run on ({', '.join(map(str, sorted(usable)))})")
        if len(set(value)) != len(value):
            raise ValueError(f"a CPU listed twice in {value}")
        return value

    @field_validator("inputs", "outputs")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        seen = set()
        for ring in value:
            if ring in seen:
                raise ValueError(f"ring {ring!r} listed twice")
            seen.add(ring)
        return value


def _tcp_urls(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """(key path, url) of every ``tcp://`` string in a params table (tables and arrays walked,
    32 levels at most)."""
    if isinstance(value, str):
        return [(path, value)] if value.startswith("tcp://") else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    if len(path) >= 32:
        return []
    return [found for key, item in items for found in _tcp_urls(item, (*path, key))]


def _default_workers() -> dict[str, WorkerConfig]:
    """The default topology: (embedded upstream) -> ingest -> compute -> cache -> broadcast, and
    the gateway (the OpenAI-compatible front door: a client of ingest and broadcast, no ring)."""
    return {
        "ingest": WorkerConfig(stage="ingest", outputs=["ingest-compute"]),
        "compute": WorkerConfig(stage="compute", inputs=["ingest-compute"], outputs=["compute-cache"]),
        "cache": WorkerConfig(stage="cache", inputs=["compute-cache"], outputs=["cache-broadcast"]),
        "broadcast": WorkerConfig(stage="broadcast", inputs=["cache-broadcast"]),
        "gateway": WorkerConfig(stage="gateway"),
    }


class Config(_Model):
    # key path -> the environment variable that set it (load_config): a stage's params checked
    # later (check_stage_params) blame the variable, not the file
    _from_env: dict[tuple[str, str], str] = PrivateAttr(default_factory=dict)
    engine: EngineConfig = EngineConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    notify: NotifyConfig = NotifyConfig()
    ring_defaults: RingConfig = RingConfig()
    rings: dict[str, RingOverride] = {}
    # Insertion order is the topology order (rest_for_one restarts the workers after a failed one).
    workers: dict[str, WorkerConfig] = Field(default_factory=_default_workers)
    upstreams: list[UpstreamEntry] = []
    # [params.<worker>]: merged over that worker's own params (tables key by key, anything else
    # replaced), so one worker of the default topology can be tuned without restating it
    params: dict[str, dict[str, Any]] = {}
    # [gateway]: the params of every gateway worker (stages/gateway/params.py checks them whole
    # with the other stage params; the listen/auth rule is checked here, at load)
    gateway: dict[str, Any] = {}

    @field_validator("rings", "workers")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            try:
                check_ring(name)
            except NameError_ as exc:
                raise _KeyedError((name,), str(exc).replace("ring name", "name")) from None
        return value

    @model_validator(mode="after")
    def _topology(self) -> Config:
        if not self.workers:
            raise _KeyedError(("workers",), "at least one worker is required")
        producers = _ends(self.workers, "outputs")
        consumers = _ends(self.workers, "inputs")
        for name, worker in self.workers.items():
            both = set(worker.inputs) & set(worker.outputs)
            if both:
                ring = sorted(both)[0]
                raise _KeyedError(("workers", name, "outputs"), f"ring {ring!r} is also an input of this worker")
        _check_one_each(producers, consumers, "outputs", "producer", "inputs")
        _check_one_each(consumers, producers, "inputs", "consumer", "outputs")
        names = [u.name for u in self.upstreams]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _KeyedError(("upstreams", i, "name"), f"upstream name {name!r} is used twice")
        for ring in self.rings:
            if ring not in producers and ring not in consumers:
                raise _KeyedError(("rings", ring), "ring is used by no worker (in no worker's inputs or outputs)")
            self._merged_ring(ring)
        for ring in self.ring_names():
            self._check_carries_a_row(ring)
        self._check_param_overrides()
        self._check_gateway()
        self._check_cache_names()
        return self

    def _gateway_workers(self) -> list[str]:
        return [name for name, worker in self.workers.items() if worker.stage == STAGE_ALIASES["gateway"]]

    def _check_gateway(self) -> None:
        """A gateway reachable from other hosts needs auth. (``[gateway]`` in a topology without a
        gateway worker is unused, not an error: NEURALPIPE_GATEWAY_LISTEN is set for any topology.)"""
        for name in self._gateway_workers():
            params = self.worker_params(name)
            listen, auth = params.get("listen", "127.0.0.1:8080"), params.get("auth", "off")
            reason = exposed_without_auth(listen, auth) if isinstance(listen, str) else ""
            if reason:
                key = ("gateway",) if "listen" in self.gateway or "auth" in self.gateway else ("params", name)
                raise _KeyedError((*key, "listen"), reason)
        self._check_request_limit()

    def _check_request_limit(self) -> None:
        """An ingest's max_request_bytes set below what a gateway takes would refuse its requests."""
        needed = self._gateway_body_bytes() + SUBMIT_OVERHEAD
        for name, worker in self.workers.items():
            if worker.stage != STAGE_ALIASES["ingest"]:
                continue
            limit = self.worker_params(name).get("max_request_bytes")
            if type(limit) is int and limit < needed:
                key = ("workers", name, "params") if "max_request_bytes" in worker.params else ("params", name)
                raise _KeyedError(
                    (*key, "max_request_bytes"),
                    f"{limit:,} bytes, less than the gateway's max_body_bytes + {SUBMIT_OVERHEAD:,}"
                    f" ({needed:,}): ingest would refuse requests the gateway takes; raise it, or leave"
                    " it out (it follows the gateway)",
                )

    def _cache_workers(self) -> list[str]:
        return [name for name, worker in self.workers.items() if worker.stage == STAGE_ALIASES["cache"]]

    def _default_cache(self) -> str:
        """The cache worker an ingest asks when its params name none: the one named "cache" (the
        default topology's), else the topology's only one; none ("", no lookups) when it has none
        (before, ingest retried a socket that never came, 100 times a second) or several."""
        caches = self._cache_workers()
        if "cache" in caches:
            return "cache"
        return caches[0] if len(caches) == 1 else ""

    def _check_cache_names(self) -> None:
        """An ingest's ``cache`` set to a name that is no cache worker of this topology: no socket
        of that name ever appears, so every lookup would be skipped, silently (a typo turned the
        cache off). Left out, it follows the topology (worker_params)."""
        caches = self._cache_workers()
        for name, worker in self.workers.items():
            if worker.stage != STAGE_ALIASES["ingest"]:
                continue
            own, override = worker.params.get("cache"), self.params.get(name, {}).get("cache")
            cache = override if override is not None else own
            if cache is None or cache == "" or cache in caches or not isinstance(cache, str):
                continue  # a value of another type: the params check names it
            key = ("params", name) if override is not None else ("workers", name, "params")
            known = f"the cache workers: {', '.join(caches)}" if caches else "this topology has no cache worker"
            raise _KeyedError((*key, "cache"), f'no cache worker named {cache!r} ({known}); "" turns lookups off')

    def _gateway_body_bytes(self) -> int:
        """The largest body a gateway of this topology takes (an invalid value: the params check names it)."""
        sizes = [self.worker_params(name).get("max_body_bytes", MAX_REQUEST_BYTES) for name in self._gateway_workers()]
        return max((size for size in sizes if type(size) is int), default=0)

    def _check_param_overrides(self) -> None:
        """Each ``[params.<worker>]`` names a worker; a tcp endpoint it adds beyond loopback
        needs ``curve = true`` in the merged params (as WorkerConfig checks for its own)."""
        for name, override in self.params.items():
            if name not in self.workers:
                raise _KeyedError(("params", name), f"no worker named {name!r} (workers: {', '.join(self.workers)})")
            curve = self.worker_params(name).get("curve") is True
            for path, url in _tcp_urls(override):
                reason = exposed_without_curve(url, curve)
                if reason:
                    raise _KeyedError(("params", name, *path), reason)

    def _check_carries_a_row(self, name: str) -> None:
        """A ring that cannot hold one row of the longest text stalls its producer for good (a
        4096-byte ring held one row per stream, while PAS said healthy): refuse it, naming the key
        that sets its size."""
        ring, least = self._merged_ring(name), min_record_bytes()
        if ring.resolved_max_record() >= least:
            return
        override = self.rings.get(name)
        if override is not None and override.max_record is not None:
            key: tuple[str, ...] = ("rings", name, "max_record")
        elif override is not None and override.capacity is not None:
            key = ("rings", name, "capacity")
        else:
            key = ("ring_defaults", "max_record" if self.ring_defaults.max_record else "capacity")
        fix = f"max_record >= {least:,}" if key[-1] == "max_record" else f"capacity >= {_least_capacity(least):,}"
        raise _KeyedError(
            key,
            f"ring {name!r} takes records of at most {ring.resolved_max_record():,} bytes; a token batch record"
            f" needs up to {least:,} (one row of {MAX_ROW_TEXT:,} text bytes and its columns): set {fix}",
        )

    def _merged_ring(self, name: str) -> RingConfig:
        override = self.rings.get(name)
        if override is None:
            return self.ring_defaults
        merged = self.ring_defaults.model_dump() | override.model_dump(exclude_none=True)
        try:
            return RingConfig.model_validate(merged)
        except ValidationError as exc:
            loc, reason = _describe(exc.errors()[0])
            raise _KeyedError(("rings", name, *loc), reason) from None

    def worker_params(self, name: str) -> dict[str, Any]:
        """The params worker ``name`` starts with: its own with ``[params.<name>]`` merged over
        them, plus the top-level ``[[upstreams]]`` for an ingest worker that lists none itself (so
        a file of only ``[[upstreams]]`` points the default topology at real servers)."""
        worker = self.workers[name]
        params = _merged(worker.params, self.params.get(name, {}))
        if worker.stage == STAGE_ALIASES["gateway"]:
            params = _merged(self.gateway, params)  # a worker's own params win over [gateway]
            # where `neuralpipe keys` put the API keys: the engine's state directory
            params.setdefault("state_dir", state_dir_path(self.engine.instance, self.engine.state_dir or None))
        if worker.stage == STAGE_ALIASES["ingest"] and self.upstreams and "upstreams" not in params:
            params["upstreams"] = [u.model_dump(mode="json") for u in self.upstreams]  # as TOML gives them
        if worker.stage == STAGE_ALIASES["ingest"] and "cache" not in params:
            params["cache"] = self._default_cache()
        if worker.stage == STAGE_ALIASES["ingest"] and "max_request_bytes" not in params:
            # what a gateway lets through, ingest takes: a submit is the body and a little more
            needed = self._gateway_body_bytes() + SUBMIT_OVERHEAD
            if needed > MAX_REQUEST_BYTES:
                params["max_request_bytes"] = needed
        return params

    def ring(self, name: str) -> RingConfig:
        """The effective settings of ring ``name``: its ``[rings.<name>]`` over ``[ring_defaults]``."""
        if name not in self.ring_names():
            raise KeyError(f"ring {name!r} is not in the topology")
        return self._merged_ring(name)

    def ring_names(self) -> list[str]:
        """Every ring of the topology, in the order of the workers that produce them."""
        return [ring for worker in self.workers.values() for ring in worker.outputs]


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: a table in both is merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        merged[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _least_capacity(record: int) -> int:
    """The smallest capacity whose default max_record holds ``record`` bytes."""
    capacity = d.MIN_CAPACITY
    while d.default_max_record(capacity) < record:
        capacity *= 2
    return capacity


def _ends(workers: Mapping[str, WorkerConfig], side: str) -> dict[str, list[str]]:
    """ring -> names of the workers that list it in ``side`` (inputs or outputs)."""
    ends: dict[str, list[str]] = {}
    for name, worker in workers.items():
        for ring in getattr(worker, side):
            ends.setdefault(ring, []).append(name)
    return ends


def _check_one_each(
    ends: dict[str, list[str]], others: dict[str, list[str]], side: str, role: str, other_side: str
) -> None:
    """Each ring in ``ends`` has exactly one worker on this side and at least one on the other
    (exactly one there is checked by the mirrored call)."""
    for ring, names in ends.items():
        if len(names) > 1:
            raise _KeyedError(
                ("workers", names[1], side),
                f"ring {ring!r} already has the {role} {names[0]!r} (a ring has exactly one {role})",
            )
        if ring not in others:
            missing = "consumer" if role == "producer" else "producer"
            raise _KeyedError(
                ("workers", names[0], side), f"ring {ring!r} has no {missing} (no worker lists it in {other_side})"
            )


# -- loading --------------------------------------------------------------------------------------


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the configuration; raises :class:`ConfigError`.

    ``path`` None means no file (the built-in defaults and demo topology); ``env`` defaults to
    ``os.environ``. A file without ``[workers]`` gets the demo topology too."""
    data = _read_toml(path) if path is not None else {}
    from_env = _apply_env(data, os.environ if env is None else env)
    try:
        cfg = Config.model_validate(data)
        cfg._from_env = from_env
        return cfg
    except ValidationError as exc:
        source = path if path is not None else "defaults"
        raise ConfigError([_message(error, source, from_env) for error in exc.errors()]) from None


MAX_CONFIG_BYTES = 1 << 20  # a config with hundreds of upstreams is a few KB


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(read_regular_file(path, MAX_CONFIG_BYTES).decode())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnusableFile as exc:
        raise ConfigError([str(exc)]) from None
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    except RecursionError:  # tomllib recurses per level of nested arrays and inline tables
        raise ConfigError([f"{path}: arrays or inline tables nested too deeply"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """Write the environment overrides into ``data``; returns key path -> variable, for messages.

    An empty variable counts as unset (the usual convention of env files and containers)."""
    from_env: dict[tuple[str, str], str] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        raw = env.get(var, "")
        if not raw:
            continue
        value: str | int = raw
        if var in _ENV_INTEGERS:
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError([f"{var}: {section}.{key}: must be an integer (got {raw!r})"]) from None
        table = data.setdefault(section, {})
        if isinstance(table, dict):  # else the file's own error about the section is reported
            table[key] = value
            from_env[(section, key)] = var
    return from_env


def _message(error: Any, source: str, from_env: Mapping[tuple[str, str], str]) -> str:
    loc, reason = _describe(error)
    source = from_env.get(tuple(loc[:2]), source)
    return f"{source}: {_key_path(loc)}: {reason}" if loc else f"{source}: {reason}"


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "list": "an array",
    "dict": "a table",
    "model": "a table",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(error: Any, root: type[BaseModel] | None = None) -> tuple[tuple[str | int, ...], str]:
    """(key path, reason) of one pydantic error, in the words of a TOML file's author (``root``:
    the model validated, for suggestions of known keys; default :class:`Config`)."""
    kind, loc, ctx = error["type"], tuple(error["loc"]), error.get("ctx") or {}
    got = f" (got {_short(error['input'])})"
    if isinstance(ctx.get("error"), _KeyedError):
        return loc + ctx["error"].path, ctx["error"].reason
    if kind == "value_error":
        return loc, str(ctx.get("error", error["msg"]))
    if kind == "extra_forbidden":
        return loc, "unknown key" + _suggestion(loc, root or Config)
    if kind == "missing":
        return loc, "required key is missing"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx["expected"])
        return loc, f"must be one of {', '.join(choices)}" + got
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return loc, f"must be {_BOUNDS[kind]} {bound:g}" + got
    if kind == "finite_number":
        return loc, "must be a finite number" + got
    if kind == "string_too_short":
        return loc, "must not be empty"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        wanted = _TYPE_NAMES.get(kind.split("_")[0], kind)
        return loc, f"must be {wanted}" + got
    return loc, error["msg"] + got


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggestion(loc: tuple[str | int, ...], root: type[BaseModel]) -> str:
    """A close known key, for typos: ``(did you mean 'heartbeat_interval_s'?)``."""
    model = _model_at(loc[:-1], root)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(loc: tuple[str | int, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class that validates the table at ``loc`` (dict and array levels skip their key)."""
    model = root
    parts = list(loc)
    while parts:
        field = model.model_fields.get(parts.pop(0))
        if field is None:
            return None
        annotation = field.annotation
        if getattr(annotation, "__origin__", None) in (dict, list, tuple):  # skip the key or the index
            annotation = annotation.__args__[-1]
            if not parts:
                return None
            parts.pop(0)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _key_path(loc: tuple[str | int, ...]) -> str:
    """Dotted TOML key path, quoting parts that are not bare keys (ring names may hold dots);
    array items as ``[index]``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + (part if _BARE_KEY.fullmatch(part) else json.dumps(part))
    return path


def describe_error(error: Any, model: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error of validating ``model`` as ``key.path: reason`` (under ``prefix``)."""
    loc, reason = _describe(error, model)
    path = _key_path((*prefix.split("."), *loc) if prefix else loc)
    return f"{path}: {reason}" if path else reason


# -- stage params ---------------------------------------------------------------------------------


def check_stage_params(cfg: Config, source: str = "config") -> dict[str, Any]:
    """Validate every worker's params with its stage's ``Params`` model (engine/params.py);
    :class:`ConfigError` with one line per problem, each naming its key path. Returns each worker's
    params to hand it: the validated values (engine.validated.ValidatedParams), or the dict as
    given for a stage with no model or one that cannot be imported.

    This imports each worker's stage module, by its reference (data, not a static import:
    ``engine`` must not depend on ``stages``): call it where the stages will run (``neuralpipe
    run``, the supervisor's set-up, ``config show``), never in the light commands. A stage that
    cannot be imported is left to its worker, which fails its start-up with the reason."""
    from engine.params import validated
    from engine.worker import stage_class

    problems = []
    handed: dict[str, Any] = {}
    for name, worker in cfg.workers.items():
        handed[name] = params = cfg.worker_params(name)
        try:
            model = stage_class(worker.stage).Params
        except Exception:
            continue
        if model is None:
            continue
        try:
            handed[name] = validated(model.model_validate(params))
        except ValidationError as exc:
            for error in exc.errors():
                loc, reason = _describe(error, model)
                where = ("params", name) if loc and loc[0] in cfg.params.get(name, {}) else ("workers", name, "params")
                if loc and loc[0] in cfg.gateway and name in cfg._gateway_workers():
                    where = ("gateway",)
                key = (*where, *loc)
                problems.append(f"{cfg._from_env.get(key[:2], source)}: {_key_path(key)}: {reason}")
    if problems:
        raise ConfigError(problems)
    return handed


# -- rendering ------------------------------------------------------------------------------------


def render_config(cfg: Config, as_json: bool = False) -> str:
    """The configuration as TOML, which :func:`load_config` reads back to an equal Config (but for
    secrets: API keys and URL credentials are shown as ``***``, engine/redact.py), or as JSON for
    tools.

    ``[rings]`` shows the overrides as written; every other ring uses ``[ring_defaults]``."""
    if as_json:  # mode="json": TOML dates and times in params become ISO strings
        return json.dumps(redact(cfg.model_dump(mode="json", exclude_none=True)), indent=2) + "\n"
    import tomli_w

    return tomli_w.dumps(redact(cfg.model_dump(exclude_none=True)))
