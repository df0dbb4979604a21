"""``neuralpipe bench gateway``: the latency and CPU the gateway adds in front of an OpenAI-compatible
upstream, against calling the same upstream directly, and LiteLLM's proxy in the same run.

One embedded upstream (stages/ingest/upstream_server.py in its own process, paced per stream at
model speed, ``stamp_tokens``: each token's text is its send time) serves three targets, each loaded
by the same client (bench/gateway_load.py: aiohttp under uvloop in its own process):

- ``direct``: the upstream itself, the baseline;
- ``gateway``: a real engine in the default topology (ingest -> compute -> cache -> broadcast,
  gateway) whose ingest has the upstream as its one ``[[upstreams]]`` entry. "Gateway overhead"
  here is the whole engine path: ingest reading the upstream's SSE, the rings, compute, cache,
  broadcast and the gateway worker, not the gateway worker alone (its CPU is reported apart);
- ``litellm``: LiteLLM's proxy (bench/litellm_proxy.py) with the upstream as an openai/ model,
  when it is installed and starts (else reported as unavailable, with the reason).

Each load (1 stream making requests one after another; 100 concurrent streams, their starts spread
over one token interval) runs ``repeats`` times on each target in turn (direct, gateway, litellm,
direct, ...: a noisy neighbour hits every target alike), each time after a warm-up at the load's
concurrency. Every prompt is distinct (no cache hit; a hit would replay old stamps and is counted).
A figure is the median over the repeats. Figures:

- per-token latency: client receive time minus the upstream's send stamp, p50/p99/p99.9;
- time to first token: request sent -> first token received, p50/p99;
- added = the target's percentile minus direct's in the same repeat (the difference of
  percentiles, as proxies' published figures are, not the percentile of a per-token difference),
  its median over the repeats;
- CPU µs per token: utime + stime (/proc/<pid>/stat) of each process over the load / tokens
  received: the proxy's processes (gateway: every engine process, and each of them apart; LiteLLM:
  its process group), the upstream and the load generator apart;
- the engine path apart from the gateway worker: a tap (bench/gateway_tap.py, its own process)
  subscribes to the broadcast as the gateway does and reads each token's latency from its stamp
  there; the client's percentile minus the tap's is the gateway worker's part (and its socket).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

import click
import numpy as np

from stages.ingest.upstream_server import UpstreamServerConfig, serve_in_process

from . import report, stage_latency
from .gateway_load import Job, serve
from .gateway_tap import serve as tap
from .litellm_proxy import LiteLLMProxy, Unavailable
from .proc import BenchError, ChildProcess, children, cpu_seconds
from .recovery import BenchEngine, sched_policy_line, wait_for

DOCS = report.DOCS.parent / "gateway.md"
MODEL = "neuralpipe-echo"
ENGINE_STAGES = ("gateway", "ingest", "compute", "cache", "broadcast")
LOAD_TIMEOUT_S = 300.0
KEPT_UP, KEPT_UP_SLACK_S = 1.1, 0.5  # a load that took longer than its paced length x 1.1 + 0.5 s
STAGE_WAIT_S = 5.0  # for the engine's metrics to count a load's tokens
# Targets from issue 15, reported (never asserted).
TARGET_ADDED_P99_US = 1000.0  # per token, 100 streams
TARGET_RATIO = 10.0  # LiteLLM's added / the gateway's added


@dataclass(frozen=True)
class Settings:
    tokens_per_s: float  # per stream, the upstream's pace ("model speed")
    loads: tuple[tuple[int, int, int], ...]  # (streams, requests per stream one after another, tokens each)
    litellm: bool
    # each load runs this many times on every target in turn (direct, gateway, litellm, direct, ...):
    # a figure is the median over the repeats, an added figure the median of each repeat's difference
    repeats: int
    flush_ms: float | None = None  # ingest's flush window (None: the engine's default, 2 ms)
    api: str = "chat"  # what the gateway is asked through: "chat" or "responses" (the Responses API)
    sched_policy: str | None = None  # the workers' scheduling policy (None: the engine's default)


FULL = Settings(tokens_per_s=20.0, loads=((1, 8, 20), (100, 1, 100)), litellm=True, repeats=3)
QUICK = Settings(tokens_per_s=100.0, loads=((1, 2, 10), (10, 1, 20)), litellm=False, repeats=1)


def engine_toml(
    upstream_url: str, state_dir: str, flush_ms: float | None = None, sched_policy: str | None = None
) -> str:
    """The default topology with the bench's upstream as ingest's one upstream; the gateway is one
    client of ingest, so the per-client limits are far above the load. ``flush_ms``: ingest's
    flush window (None: its default)."""
    flush = "" if flush_ms is None else f"params.flush_ms = {flush_ms}"
    return f"""
[engine]
heartbeat_interval_s = 0.2
state_dir = "{state_dir}"
{sched_policy_line(sched_policy)}

[workers.ingest]
stage = "ingest"
outputs = ["ingest-compute"]
params.client_requests_per_s = 1e6
params.client_burst = 1e6
params.client_tokens_per_s = 1e9
params.client_burst_tokens = 1e9
params.queue_bound = 100000
params.upstreams = [{{ name = "bench", base_url = "{upstream_url}", models = ["{MODEL}"], max_concurrency = 4096 }}]
{flush}

[workers.compute]
stage = "compute"
inputs = ["ingest-compute"]
outputs = ["compute-cache"]
params.backend = "numpy"

[workers.cache]
stage = "cache"
inputs = ["compute-cache"]
outputs = ["cache-broadcast"]
params.snapshot_path = ""

[workers.broadcast]
stage = "broadcast"
inputs = ["cache-broadcast"]

[workers.gateway]
stage = "gateway"

[gateway]
listen = "127.0.0.1:0"
models = ["{MODEL}"]
"""


class Target:
    """One thing the load is pointed at: its /v1 URL, the processes whose CPU is its cost, and (the
    gateway) a tap on the broadcast that tells the engine path from the gateway worker."""

    def __init__(
        self,
        name: str,
        url: str,
        processes: Any,
        tap: ChildProcess | None = None,
        metrics_port: int = 0,
        api: str = "chat",
    ) -> None:
        self.name, self.url, self.processes, self.tap = name, url, processes, tap  # processes(): name -> pid
        self.metrics_port = metrics_port  # the engine's /metrics (0: none)
        self.api = api  # the load's requests: chat completions, or the Responses API

    def stages(self, before: stage_latency.Buckets | None, tokens: int) -> dict[str, dict[str, float]] | None:
        """With ``before`` None: a reading to start from; else the engine's per-stage latency since
        it, once the broadcast has counted ``tokens`` more (its figures come with heartbeats)."""
        if not self.metrics_port:
            return None
        if before is None:
            return stage_latency.read(self.metrics_port)
        deadline = time.monotonic() + STAGE_WAIT_S
        while True:
            window = stage_latency.quantiles(before, stage_latency.read(self.metrics_port))
            if window.get("broadcast", {}).get("count", 0) >= tokens or time.monotonic() > deadline:
                return window
            time.sleep(0.1)

    def tapped(self) -> dict[str, list[int]] | None:
        """The tap's latencies since the last call (None without a tap)."""
        if self.tap is None:
            return None
        self.tap.conn.send("report")
        return self.tap.answer(30)


def _group(pid: int) -> dict[str, int]:
    """A process and its descendants (LiteLLM's workers), as one cost."""
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        found[f"litellm-{parent}"] = parent
        todo.extend(children(parent))
    return found


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[name] = cpu_seconds(pid)
    return out


def _pct(values: np.ndarray, q: float, scale: float) -> float:
    return round(float(np.percentile(values, q)) / scale, 3) if len(values) else 0.0


def run_load(
    loadgen: ChildProcess, upstream_pid: int, target: Target, load: tuple[int, int, int], settings: Settings
) -> dict[str, Any]:
    streams, rounds, tokens = load
    job = Job(
        base_url=target.url,
        model=MODEL,
        streams=streams,
        rounds=rounds,
        tokens=tokens,
        spread_s=1.0 / settings.tokens_per_s,
        tag=uuid.uuid4().hex[:12],
        extra={"ignore_eos": True},
        api=target.api,
    )
    # warm-up at the load's concurrency: connections (client -> proxy -> upstream) are open before it
    loadgen.conn.send(Job(**{**asdict(job), "rounds": 1, "tokens": 4, "tag": job.tag + "-warm"}))
    loadgen.answer(LOAD_TIMEOUT_S)
    proxy = target.processes()
    pids = {**{f"proxy:{k}": v for k, v in proxy.items()}, "upstream": upstream_pid, "loadgen": loadgen.proc.pid}
    target.tapped()  # the warm-up's, dropped
    stages_before = target.stages(None, 0)
    before, began = _cpu(pids), time.monotonic()
    loadgen.conn.send(job)
    got = loadgen.answer(LOAD_TIMEOUT_S)
    after, seconds = _cpu(pids), time.monotonic() - began
    tap = target.tapped()
    stages = target.stages(stages_before, got["tokens"])
    received = max(1, got["tokens"])
    used = {name: (after[name] - before[name]) * 1e6 / received for name in before if name in after}
    latency, ttft = np.array(got["latency_ns"], dtype=np.int64), np.array(got["ttft_ns"], dtype=np.int64)
    steady = np.array(got["steady_latency_ns"], dtype=np.int64)
    row = {
        "target": target.name,
        "streams": streams,
        "requests": got["requests"],
        "tokens": got["tokens"],
        "tokens_expected": streams * rounds * tokens,
        "seconds": round(seconds, 2),
        # a load the target keeps up with takes this long: each stream's requests at the upstream's pace
        "paced_seconds": round(rounds * tokens / settings.tokens_per_s + job.spread_s, 2),
        # fell behind the offered load: its latencies measure a queue, not a cost per token
        "kept_up": seconds <= KEPT_UP * (rounds * tokens / settings.tokens_per_s + job.spread_s) + KEPT_UP_SLACK_S,
        "errors": got["error_count"],
        "error_samples": got["errors"],
        "cache_hits": got["cache_hits"],
        "ttft_p50_ms": _pct(ttft, 50, 1e6),
        "ttft_p99_ms": _pct(ttft, 99, 1e6),
        "token_p50_us": _pct(latency, 50, 1e3),
        "token_p99_us": _pct(latency, 99, 1e3),
        "token_p999_us": _pct(latency, 99.9, 1e3),
        # once every stream had its first token: the steady state, without the start of all at once
        "steady_tokens": len(steady),
        "token_steady_p50_us": _pct(steady, 50, 1e3),
        "token_steady_p99_us": _pct(steady, 99, 1e3),
        "proxy_cpu_us_per_token": round(sum(v for k, v in used.items() if k.startswith("proxy:")), 2),
        "upstream_cpu_us_per_token": round(used.get("upstream", 0.0), 2),
        "loadgen_cpu_us_per_token": round(used.get("loadgen", 0.0), 2),
        "proxy_cpu_us_per_token_by_process": {k[6:]: round(v, 2) for k, v in used.items() if k.startswith("proxy:")},
    }
    if tap is not None:
        row["engine_path"] = _engine_path(row, tap)
    if stages is not None:
        row["engine_stages"] = stages
    return row


def _engine_path(row: dict[str, Any], tap: dict[str, list[int]]) -> dict[str, float]:
    """Where the gateway's per-token latency goes, from the tap: upstream -> a broadcast subscriber
    (the engine path); the rest (the client's latency minus the tap's, percentile by percentile) is
    the gateway worker and its socket to the client."""
    broadcast = np.array(tap["broadcast_ns"], dtype=np.int64)
    out: dict[str, float] = {"tokens": len(broadcast)}
    for q in (50, 99):
        out[f"to_broadcast_p{q}_us"] = _pct(broadcast, q, 1e3)
        out[f"gateway_worker_p{q}_us"] = round(row[f"token_p{q}_us"] - out[f"to_broadcast_p{q}_us"], 1)
    return out


def _engine_target(engine: BenchEngine, broadcast_tap: ChildProcess, api: str) -> Target:
    workers = engine.workers()
    url = wait_for(lambda: engine.workers()["gateway"]["stats"].get("url"), 30, "the gateway's URL")
    wait_for(lambda: engine.workers()["gateway"]["stats"].get("following"), 30, "the gateway to follow the broadcast")
    missing = [s for s in ENGINE_STAGES if s not in workers]
    if missing:
        raise BenchError(f"the engine has no {', '.join(missing)} worker")

    def processes() -> dict[str, int]:
        found = engine.processes()
        # everything but the named workers is "supervisor" (the supervisor, its resource tracker)
        named = {s: found[s] for s in ENGINE_STAGES}
        return {**named, **{f"supervisor:{k}": v for k, v in found.items() if k not in ENGINE_STAGES}}

    return Target("gateway", url, processes, broadcast_tap, int(engine.info["metrics_port"]), api)


def _added(rows: list[dict[str, Any]]) -> None:
    """Each row's figures minus direct's at the same load in the same repeat."""
    direct = {(r["streams"], r["repeat"]): r for r in rows if r["target"] == "direct"}
    for row in rows:
        base = direct[row["streams"], row["repeat"]]
        row["added_token_p50_us"] = round(row["token_p50_us"] - base["token_p50_us"], 1)
        row["added_token_p99_us"] = round(row["token_p99_us"] - base["token_p99_us"], 1)
        row["added_steady_p50_us"] = round(row["token_steady_p50_us"] - base["token_steady_p50_us"], 1)
        row["added_steady_p99_us"] = round(row["token_steady_p99_us"] - base["token_steady_p99_us"], 1)
        row["added_ttft_p50_ms"] = round(row["ttft_p50_ms"] - base["ttft_p50_ms"], 3)
        row["added_ttft_p99_ms"] = round(row["ttft_p99_ms"] - base["ttft_p99_ms"], 3)


def _engine_breakdown(row: dict[str, Any]) -> dict[str, float]:
    """The gateway row's proxy CPU per token by stage; the supervisor and helpers summed."""
    by = row["proxy_cpu_us_per_token_by_process"]
    out = {s: by.get(s, 0.0) for s in ENGINE_STAGES}
    out["supervisor"] = round(sum(v for k, v in by.items() if k.startswith("supervisor:")), 2)
    return out


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LiteLLM's added latency and CPU over the gateway's, per load (where both are above zero)."""
    out = []
    for streams in sorted({r["streams"] for r in rows}):
        at = {r["target"]: r for r in rows if r["streams"] == streams}
        if "litellm" not in at:
            continue
        entry: dict[str, Any] = {"streams": streams}
        for key in ("added_token_p50_us", "added_token_p99_us", "added_ttft_p50_ms", "proxy_cpu_us_per_token"):
            entry[key] = _ratio(at["litellm"][key], at["gateway"][key])
        # LiteLLM's whole cost against the gateway worker's alone (the engine path left out)
        entry["gateway_worker_cpu_us_per_token"] = _ratio(
            at["litellm"]["proxy_cpu_us_per_token"], at["gateway"]["gateway_worker_cpu_us_per_token"]
        )
        out.append(entry)
    return out


def _ratio(theirs: float, ours: float) -> float | None:
    return round(theirs / ours, 2) if ours > 0 and theirs > 0 else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    most = max(r["streams"] for r in result["rows"])
    gateway = next(r for r in result["rows"] if r["target"] == "gateway" and r["streams"] == most)
    out = [
        {
            "target": f"gateway added p99 per token (µs), {most} streams",
            "goal": f"<= {TARGET_ADDED_P99_US:g}",
            "value": gateway["added_token_p99_us"],
            "met": gateway["added_token_p99_us"] <= TARGET_ADDED_P99_US,
        },
        {
            "target": f"gateway added p99 per token once every stream had its first token (µs), {most} streams",
            "goal": f"<= {TARGET_ADDED_P99_US:g}",
            "value": gateway["added_steady_p99_us"],
            "met": gateway["added_steady_p99_us"] <= TARGET_ADDED_P99_US,
        },
        {
            "target": f"gateway worker alone, p99 per token (µs; client - broadcast tap), {most} streams",
            "goal": f"<= {TARGET_ADDED_P99_US:g}",
            "value": gateway["engine_path"]["gateway_worker_p99_us"],
            "met": gateway["engine_path"]["gateway_worker_p99_us"] <= TARGET_ADDED_P99_US,
        },
    ]
    ratio = next((r for r in result["ratios"] if r["streams"] == most), {})
    for key, what in (
        ("added_token_p50_us", "added p50 per token"),
        ("added_token_p99_us", "added p99 per token"),
        ("proxy_cpu_us_per_token", "proxy CPU per token"),
        ("gateway_worker_cpu_us_per_token", "proxy CPU per token against the gateway worker alone"),
    ):
        value = ratio.get(key)
        out.append(
            {
                "target": f"LiteLLM / gateway, {what}, {most} streams",
                "goal": f">= {TARGET_RATIO:g}x",
                "value": value,
                "met": None if value is None else value >= TARGET_RATIO,
            }
        )
    return out


def measure(settings: Settings, progress: bool) -> dict[str, Any]:
    state_dir = tempfile.mkdtemp(prefix="neuralpipe-bench-gateway-state-")
    upstream = None
    litellm: dict[str, Any] = {"available": False, "reason": "skipped (--quick)", "version": None}
    rows: list[dict[str, Any]] = []
    try:
        upstream, upstream_url = serve_in_process(
            UpstreamServerConfig(tokens_per_s=settings.tokens_per_s, max_concurrency=8192, stamp_tokens=True)
        )
        config = engine_toml(upstream_url, state_dir, settings.flush_ms, settings.sched_policy)
        with (
            BenchEngine(config, "gateway") as engine,
            ChildProcess(serve, (), "load generator", 30) as loadgen,
            ChildProcess(tap, (engine.info["runtime_dir"],), "broadcast tap", 30) as broadcast_tap,
            contextlib.ExitStack() as stack,
        ):
            found = [Target("direct", f"{upstream_url}/v1", dict), _engine_target(engine, broadcast_tap, settings.api)]
            if settings.litellm and settings.api != "chat":
                # its openai provider passes /v1/responses on to the upstream, which serves chat only
                litellm = {"available": False, "reason": f"skipped (--api {settings.api})", "version": None}
            elif settings.litellm:
                try:
                    proxy = stack.enter_context(LiteLLMProxy(upstream_url, MODEL))
                    litellm = {"available": True, "reason": None, "version": proxy.version}
                    found.append(Target("litellm", proxy.url, lambda: _group(proxy.pid)))
                except Unavailable as exc:
                    litellm = {"available": False, "reason": str(exc), "version": None}
            if progress:
                click.echo(f"litellm: {_litellm_text(litellm)}", err=True)
            for load in settings.loads:
                for repeat in range(settings.repeats):
                    for target in found:
                        rows.append({"repeat": repeat} | run_load(loadgen, upstream.pid, target, load, settings))
                        if progress:
                            click.echo(f"  {_progress(rows[-1])}", err=True)
    finally:
        if upstream is not None:
            upstream.terminate()
            upstream.join(10)
            if upstream.is_alive():
                upstream.kill()
                upstream.join()
        shutil.rmtree(state_dir, ignore_errors=True)
    _added(rows)
    for row in rows:
        if row["target"] == "gateway":
            row["engine_cpu_us_per_token"] = _engine_breakdown(row)
            row["gateway_worker_cpu_us_per_token"] = row["engine_cpu_us_per_token"]["gateway"]
    return {"rows": _medians(rows), "repeats": rows, "litellm": litellm}


ERROR_SAMPLES = 5
SUMMED = ("requests", "tokens", "tokens_expected", "steady_tokens", "errors", "cache_hits", "count")


def _medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target and load: counts summed over its repeats, every other figure their median."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["target"], row["streams"]), []).append(row)
    return [_merge(group) | {"repeats": len(group)} for group in groups.values()]


def _merge(group: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, first in group[0].items():
        values = [row[key] for row in group if key in row]
        if key == "repeat":
            continue
        if isinstance(first, dict):
            out[key] = _merge(values)
        elif isinstance(first, list):
            out[key] = [item for value in values for item in value][:ERROR_SAMPLES]
        elif isinstance(first, str) or key == "streams":
            out[key] = first
        elif isinstance(first, bool):  # kept_up: most repeats did
            out[key] = 2 * sum(values) > len(values)
        elif key in SUMMED:
            out[key] = sum(values)
        else:
            out[key] = round(float(np.median(values)), 3)
    return out


def _progress(row: dict[str, Any]) -> str:
    return (
        f"{row['target']:8} {row['streams']:4} streams: {row['tokens']:,} tokens, {row['errors']} errors, "
        f"ttft p50 {row['ttft_p50_ms']:.2f} ms, token p50 {row['token_p50_us']:.0f} µs p99 "
        f"{row['token_p99_us']:.0f} µs, proxy CPU {row['proxy_cpu_us_per_token']:.1f} µs/token"
    )


def _litellm_text(litellm: dict[str, Any]) -> str:
    return f"LiteLLM {litellm['version']}" if litellm["available"] else f"unavailable ({litellm['reason']})"


def main(
    as_json: bool = False,
    quick: bool = False,
    flush_ms: float | None = None,
    api: str = "chat",
    sched_policy: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results. A full run
    from a checkout with the engine's defaults and chat completions also writes
    bench/results/gateway-<machine>.json and the generated section of docs/gateway.md."""
    settings = replace(QUICK if quick else FULL, flush_ms=flush_ms, api=api, sched_policy=sched_policy)
    info, load_before = report.machine(), report.load()
    began = time.monotonic()
    run = measure(settings, progress=not as_json)
    result = {
        "benchmark": "gateway",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "seconds": round(time.monotonic() - began, 1),
        "settings": asdict(settings),
        "load_generator": "aiohttp streaming client under uvloop, own process (not the openai client)",
        **run,
    }
    result["ratios"] = ratios(result["rows"])
    result["targets"] = targets(result)
    _print(result, as_json)
    if not quick and flush_ms is None and api == "chat" and sched_policy is None:
        report.publish("gateway", info, result, markdown(result), docs=DOCS)
    return result


# ---- output ------------------------------------------------------------------------------------

_COLUMNS: tuple[report.Column, ...] = (
    ("target", "target", "{}"),
    ("streams", "streams", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("errors", "errors", "{:,}"),
    ("seconds", "seconds", "{:.1f}"),
    ("paced_seconds", "paced s", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.2f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.2f}"),
    ("token_p50_us", "token p50 µs", "{:,.0f}"),
    ("token_p99_us", "token p99 µs", "{:,.0f}"),
    ("added_ttft_p50_ms", "added TTFT p50 ms", "{:.2f}"),
    ("added_token_p50_us", "added p50 µs", "{:,.0f}"),
    ("added_token_p99_us", "added p99 µs", "{:,.0f}"),
    ("proxy_cpu_us_per_token", "proxy CPU µs/token", "{:.1f}"),
    ("upstream_cpu_us_per_token", "upstream CPU µs/token", "{:.1f}"),
    ("loadgen_cpu_us_per_token", "client CPU µs/token", "{:.1f}"),
)
_ENGINE_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    *((stage, f"{stage} µs/token", "{:.1f}") for stage in (*ENGINE_STAGES, "supervisor")),
)


_PATH_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    ("to_broadcast_p50_us", "-> broadcast p50 µs", "{:,.0f}"),
    ("to_broadcast_p99_us", "-> broadcast p99 µs", "{:,.0f}"),
    ("token_p50_us", "-> client p50 µs", "{:,.0f}"),
    ("token_p99_us", "-> client p99 µs", "{:,.0f}"),
    ("gateway_worker_p50_us", "gateway worker p50 µs", "{:,.0f}"),
    ("gateway_worker_p99_us", "gateway worker p99 µs", "{:,.0f}"),
)


_STEADY_COLUMNS: tuple[report.Column, ...] = (
    ("target", "target", "{}"),
    ("streams", "streams", "{:,}"),
    ("steady_tokens", "tokens", "{:,}"),
    ("token_steady_p50_us", "token p50 µs", "{:,.0f}"),
    ("token_steady_p99_us", "token p99 µs", "{:,.0f}"),
    ("added_steady_p50_us", "added p50 µs", "{:,.0f}"),
    ("added_steady_p99_us", "added p99 µs", "{:,.0f}"),
)


def _path_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "streams": r["streams"],
            "token_p50_us": r["token_p50_us"],
            "token_p99_us": r["token_p99_us"],
            **r["engine_path"],
        }
        for r in result["rows"]
        if "engine_path" in r
    ]


_STAGE_COLUMNS: tuple[report.Column, ...] = (
    ("streams", "streams", "{:,}"),
    ("stage", "stage", "{}"),
    ("p50_us", "recv -> stage p50 µs", "{:,.0f}"),
    ("p99_us", "recv -> stage p99 µs", "{:,.0f}"),
    ("count", "rows", "{:,}"),
)


def _stage_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"streams": r["streams"], "stage": stage, **r["engine_stages"][stage]}
        for r in result["rows"]
        if "engine_stages" in r
        for stage in ("ingest", "compute", "cache", "broadcast")
        if stage in r["engine_stages"]
    ]


def _engine_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"streams": r["streams"], **r["engine_cpu_us_per_token"]} for r in result["rows"] if r["target"] == "gateway"
    ]


def _ratio_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in result["ratios"]:
        parts = [
            f"{what} {_x(r[key])}"
            for key, what in (
                ("added_token_p50_us", "added p50 per token"),
                ("added_token_p99_us", "added p99 per token"),
                ("added_ttft_p50_ms", "added TTFT p50"),
                ("proxy_cpu_us_per_token", "proxy CPU per token"),
                ("gateway_worker_cpu_us_per_token", "proxy CPU per token against the gateway worker alone"),
            )
        ]
        behind = [
            f"{row['target']} fell behind the offered load ({row['seconds']:g} s for a "
            f"{row['paced_seconds']:g} s load): its latency there is a queue's"
            for row in result["rows"]
            if row["streams"] == r["streams"] and not row["kept_up"]
        ]
        lines.append(f"LiteLLM / gateway at {r['streams']} streams: " + ", ".join(parts + behind) + ".")
    return lines


def _x(value: float | None) -> str:
    return "- (one side not above zero)" if value is None else f"{value:g}x"


def _ratio_value(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    loads = "; ".join(f"{n} stream(s) x {r} request(s) of {t} tokens" for n, r, t in s["loads"])
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            f"Embedded upstream paced at {s['tokens_per_s']:g} tokens/s per stream, each token stamped with its send "
            f"time; loads: {loads}, each {s['repeats']} times on every target in turn (a figure: the median over "
            "the repeats; an added figure: the median of each repeat's difference to direct). "
            f"Client: {result['load_generator']}. Per-token latency = client receive time - upstream send stamp; "
            "added = the target's percentile - direct's. Gateway = the whole engine path (ingest, compute, cache, "
            "broadcast, gateway worker); its proxy CPU is every engine process. "
            f"LiteLLM: {_litellm_text(result['litellm'])}.",
            "",
            report.markdown_table(result["rows"], _COLUMNS),
            "",
            "The same loads once every stream had its first token (the tokens that came after the last stream's "
            "first one: the steady state, without the start of every stream at once):",
            "",
            report.markdown_table(result["rows"], _STEADY_COLUMNS),
            "",
            "CPU per token of each engine process on the gateway path (the gateway worker alone is its column):",
            "",
            report.markdown_table(_engine_rows(result), _ENGINE_COLUMNS),
            "",
            "Where the gateway's per-token latency goes (from the upstream's send stamp; a tap subscribed to the "
            "broadcast like the gateway; gateway worker = client - broadcast tap, percentile by percentile):",
            "",
            report.markdown_table(_path_rows(result), _PATH_COLUMNS),
            "",
            "The engine's own stage latency over the same loads (ingest's recv_ns -> the stage committed or "
            "published; from its /metrics histograms, coarse buckets: which stage the time goes to):",
            "",
            report.markdown_table(_stage_rows(result), _STAGE_COLUMNS),
            "",
            *_ratio_lines(result),
            "",
            *report.target_table(result["targets"], _ratio_value),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo(f"litellm: {_litellm_text(result['litellm'])}")
    click.echo()
    click.echo(report.text_table(result["rows"], _COLUMNS))
    click.echo()
    click.echo("once every stream had its first token:")
    click.echo(report.text_table(result["rows"], _STEADY_COLUMNS))
    click.echo()
    click.echo(report.text_table(_engine_rows(result), _ENGINE_COLUMNS))
    click.echo()
    click.echo(report.text_table(_path_rows(result), _PATH_COLUMNS))
    click.echo()
    click.echo(report.text_table(_stage_rows(result), _STAGE_COLUMNS))
    for line in _ratio_lines(result):
        click.echo(line)
    for line in report.target_lines(result["targets"], _ratio_value):
        click.echo(line)
