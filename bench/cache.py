"""``neuralpipe bench cache``: the cache's hit ratio against the offline optimum, and time to
first token on a hit against a miss through a real engine.

1. Hit ratio (offline, one process). A Zipf(1.0) request trace over a fixed set of keys (request
   ``k`` with probability proportional to 1/rank); each key has a stream size drawn once
   (log-normal token count, bytes as the cache counts them: stages.cache.stream). The cache's own
   LRU (stages.cache.store.LruStore) replays the trace at several byte budgets; Belady's policy
   replays the same trace at the same budgets:
   - variable sizes: Belady with bypass — on a miss, evict the entry whose next request is
     farthest in the future until the new one fits, but never evict an entry needed sooner than
     the new one (then the new one is not admitted), and never admit a key that is not requested
     again. For variable sizes the exact optimum is NP-hard; this classic variant is a strong
     offline reference, not a proven bound, so "within 85 % of optimal" is measured against it.
   - equal sizes (every entry 1 unit, budgets in entries): Belady is exactly optimal there; the
     same ratio is reported for that case too.
2. Time to first token (a real engine: ingest with the embedded upstream -> cache -> a sink that
   records when each stream's first token and its end arrive). Each prompt is sent twice: a miss
   (fetched from the upstream over HTTP) and, once the cache has stored it, a hit (replayed).
   Measured from just before the submit to the first TOKEN row at the sink (CLOCK_MONOTONIC,
   shared by the processes), and to the END row. The embedded upstream has no prefill delay, so
   the miss is the engine's own path (HTTP, SSE, ingest); a real model adds its prefill time.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import click
import numpy as np
import orjson

from engine.clients.cache import CacheClient
from engine.clients.requests import RequestClient
from engine.protocol.cache import socket_path
from engine.protocol.requests import ingest_endpoint
from engine.stage import Stage, WorkerContext
from shm.batch import Kind, TokenBatch
from stages.cache.store import LruStore
from stages.cache.stream import ENTRY_OVERHEAD

from . import report
from .proc import BenchError
from .recovery import BenchEngine, wait_for

DOCS = report.DOCS.parent / "cache.md"
TARGET_RATIO = 0.85
ROW_BYTES = 1 + 4 + 4 + 8 + 4 + 8  # kind, token id, logprob, offset, text length, text offset
TEXT_BYTES_PER_TOKEN = 4
SINK_STREAMS = 4096


@dataclass(frozen=True)
class Settings:
    keys: int
    requests: int
    budgets: tuple[float, ...]  # fractions of the bytes of every distinct key
    prompts: int  # for time to first token
    tokens: int  # per prompt
    upstream_tokens_per_s: float


FULL = Settings(keys=10_000, requests=200_000, budgets=(0.01, 0.05, 0.1, 0.25), prompts=40, tokens=32,
                upstream_tokens_per_s=200.0)  # fmt: skip
QUICK = Settings(keys=1_000, requests=10_000, budgets=(0.05, 0.25), prompts=4, tokens=16, upstream_tokens_per_s=200.0)


# ---- 1. hit ratio against Belady -----------------------------------------------------------------


def zipf_trace(keys: int, requests: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(trace of key indices, bytes of each key): Zipf(1.0) popularity, log-normal stream lengths."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, keys + 1)
    trace = rng.choice(keys, size=requests, p=popularity / popularity.sum())
    tokens = np.clip(rng.lognormal(np.log(150), 0.8, keys), 8, 4096).astype(np.int64)
    sizes = ENTRY_OVERHEAD + (tokens + 2) * ROW_BYTES + tokens * TEXT_BYTES_PER_TOKEN
    return trace, sizes


class _Sized:
    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def lru_hits(trace: np.ndarray, sizes: np.ndarray, budget: int) -> int:
    """Hits of the cache's own LRU store (every miss is admitted, as the cache does)."""
    store = LruStore(budget, ttl_s=1e18, clock=lambda: 0.0)
    values = [_Sized(int(s)) for s in sizes]
    hits = 0
    for key in trace.tolist():
        name = str(key)
        if store.get(name) is not None:
            hits += 1
        else:
            store.put(name, values[key])
    return hits


def next_uses(trace: np.ndarray) -> list[int]:
    """For each request, the index of the next request of the same key (len(trace): never)."""
    never = len(trace)
    following = [never] * len(trace)
    last: dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        key = int(trace[i])
        following[i] = last.get(key, never)
        last[key] = i
    return following


def belady_hits(trace: np.ndarray, sizes: np.ndarray, budget: int, following: list[int]) -> int:
    """Hits of Belady's farthest-next-use policy with bypass (see the module docstring)."""
    never = len(trace)
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped lazily
    used = hits = 0
    for i, key in enumerate(trace.tolist()):
        nxt = following[i]
        if key in cached:
            hits += 1
            cached[key] = nxt
            heapq.heappush(heap, (-nxt, key))
            continue
        size = int(sizes[key])
        if nxt == never or size > budget:
            continue
        while used + size > budget:
            far, victim = heap[0]
            if cached.get(victim) != -far:
                heapq.heappop(heap)  # stale
                continue
            if -far <= nxt:
                break  # every cached entry is needed before this one: do not admit it
            heapq.heappop(heap)
            del cached[victim]
            used -= int(sizes[victim])
        if used + size <= budget:
            cached[key] = nxt
            heapq.heappush(heap, (-nxt, key))
            used += size
    return hits


def hit_ratios(settings: Settings) -> list[dict[str, Any]]:
    trace, sizes = zipf_trace(settings.keys, settings.requests)
    following = next_uses(trace)
    total = int(sizes.sum())
    ones = np.ones_like(sizes)
    rows = []
    for fraction in settings.budgets:
        for case, case_sizes, budget in (
            ("variable sizes", sizes, int(total * fraction)),
            ("equal sizes", ones, max(1, int(settings.keys * fraction))),
        ):
            lru = lru_hits(trace, case_sizes, budget) / len(trace)
            opt = belady_hits(trace, case_sizes, budget, following) / len(trace)
            rows.append(
                {
                    "sizes": case,
                    "budget_fraction": fraction,
                    "budget": budget,
                    "lru_hit_ratio": round(lru, 4),
                    "belady_hit_ratio": round(opt, 4),
                    "lru_over_belady": round(lru / opt, 4) if opt else 0.0,
                }
            )
    return rows


# ---- 2. time to first token through a real engine ----------------------------------------------


class FirstTokenSink(Stage):
    """The benchmark's sink: per stream id, when its first TOKEN row and its END/ERROR row
    arrived (CLOCK_MONOTONIC ns) and whether its START said ``cached``, in state arrays that
    the benchmark reads from the runtime directory."""

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        self.inp = ctx.inputs[0]
        n = int(ctx.params.get("streams", SINK_STREAMS))
        self.first = ctx.state_array("first_token_ns", "i8", n)
        self.ended = ctx.state_array("end_ns", "i8", n)
        self.cached = ctx.state_array("cached", "u1", n)

    def do_work(self) -> int:
        handled = 0
        while handled < 64 and (record := self.inp.try_read()) is not None:
            self._record(TokenBatch.decode(record[1]), time.monotonic_ns())
            handled += 1
        self.inp.release()
        return handled

    def _record(self, batch, now: int) -> None:
        for i in range(batch.rows):
            sid, kind = int(batch.stream_id[i]), int(batch.kind[i])
            if sid >= len(self.first):
                continue
            if kind == Kind.START:
                self.cached[sid] = bool(orjson.loads(batch.token_text(i)).get("cached"))
            elif kind == Kind.TOKEN and not self.first[sid]:
                self.first[sid] = now
            elif kind in (Kind.END, Kind.ERROR):
                self.ended[sid] = now


def engine_toml(tokens_per_s: float) -> str:
    return f"""
[engine]
heartbeat_interval_s = 0.1

[workers.ingest]
stage = "ingest"
outputs = ["ingest-cache"]
params.client_requests_per_s = 1e6
params.client_burst = 1e6
params.embedded = {{ tokens_per_s = {tokens_per_s} }}

[workers.cache]
stage = "cache"
inputs = ["ingest-cache"]
outputs = ["cache-sink"]
params.snapshot_path = ""

[workers.sink]
stage = "neuralpipe_bench.cache:FirstTokenSink"
inputs = ["cache-sink"]
params.streams = {SINK_STREAMS}
"""


class _SinkView:
    """The sink's state arrays, mapped read-only."""

    def __init__(self, runtime_dir: str) -> None:
        state = os.path.join(runtime_dir, "state")
        wait_for(lambda: os.path.exists(os.path.join(state, "sink.cached.bin")), 10, "the sink's state")
        self.first, self.ended = (
            np.memmap(os.path.join(state, f"sink.{name}.bin"), dtype="i8", mode="r")
            for name in ("first_token_ns", "end_ns")
        )
        self.cached = np.memmap(os.path.join(state, "sink.cached.bin"), dtype="u1", mode="r")


def time_to_first_token(settings: Settings) -> dict[str, Any]:
    samples: dict[str, list[tuple[float, float]]] = {"miss": [], "hit": []}
    with BenchEngine(engine_toml(settings.upstream_tokens_per_s), "cache") as engine:
        runtime_dir = engine.info["runtime_dir"]
        sink = _SinkView(runtime_dir)
        cache_sock = socket_path(runtime_dir, "cache")
        wait_for(lambda: os.path.exists(cache_sock), 10, "the cache's socket")
        with RequestClient(ingest_endpoint(runtime_dir)) as client, CacheClient(cache_sock) as cache:

            def one(body: dict) -> tuple[str, float, float]:
                began = time.monotonic_ns()
                sid = client.submit(body)
                if sid >= SINK_STREAMS:
                    raise BenchError(f"stream id {sid} beyond the sink's {SINK_STREAMS}")
                wait_for(lambda: sink.ended[sid] != 0, 30, f"stream {sid} to end")
                case = "hit" if sink.cached[sid] else "miss"
                return case, (sink.first[sid] - began) / 1e6, (sink.ended[sid] - began) / 1e6

            for i in range(settings.prompts):
                body = {
                    "messages": [{"role": "user", "content": f"cache bench prompt {i}"}],
                    "max_tokens": settings.tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                case, *times = one(body)
                if case != "miss":
                    raise BenchError(f"prompt {i} was a hit the first time it was sent")
                samples["miss"].append(times)
                wait_for(lambda n=i + 1: cache.stats()["collected"] >= n, 10, "the stream to be stored")
                case, *times = one(body)  # a miss here: a lookup timed out (counted, not a hit sample)
                samples[case].append(times)
            stats = cache.stats()
        ingest = wait_for(  # its stats come with heartbeats: wait until they count every lookup
            lambda: (
                (s := engine.workers()["ingest"]["stats"]).get("cache_hits", 0) + s.get("cache_misses", 0)
                >= 2 * settings.prompts
                and s
            ),
            5,
            "ingest's lookup counters",
        )
    if not samples["hit"]:
        raise BenchError(f"no repeat was a cache hit (ingest: {ingest})")
    rows = []
    for case, values in samples.items():
        ttft, whole = np.array(values).T
        rows.append(
            {
                "case": case,
                "streams": len(values),
                "ttft_p50_ms": round(float(np.median(ttft)), 3),
                "ttft_p90_ms": round(float(np.percentile(ttft, 90)), 3),
                "stream_p50_ms": round(float(np.median(whole)), 3),
            }
        )
    miss, hit = rows
    return {
        "rows": rows,
        "ttft_speedup": round(miss["ttft_p50_ms"] / hit["ttft_p50_ms"], 2),
        "repeats_missed": settings.prompts - len(samples["hit"]),
        "cache": {k: stats[k] for k in ("hits", "misses", "replays", "entries", "bytes", "hit_ratio", "late_lookups")},
        "ingest": {k: ingest.get(k, 0) for k in ("cache_hits", "cache_misses", "cache_timeouts", "cache_skipped")},
    }


# ---- report --------------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for case in ("variable sizes", "equal sizes"):
        worst = min((r for r in result["hit_ratio"] if r["sizes"] == case), key=lambda r: r["lru_over_belady"])
        out.append(
            {
                "target": f"LRU / Belady hit ratio, {case}, worst budget ({worst['budget_fraction']:.0%})",
                "goal": f">= {TARGET_RATIO:.2f}",
                "value": worst["lru_over_belady"],
                "met": worst["lru_over_belady"] >= TARGET_RATIO,
            }
        )
    return out


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Run both parts, print them and return the result; a full run from a checkout also writes
    bench/results/cache-<machine>.json and the generated section of docs/cache.md."""
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    began = time.monotonic()
    ratios = hit_ratios(settings)
    offline_s = time.monotonic() - began
    ttft = time_to_first_token(settings)
    result = {
        "benchmark": "cache",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings),
        "hit_ratio": ratios,
        "offline_seconds": round(offline_s, 2),
        "ttft": ttft,
    }
    result["targets"] = targets(result)
    _print(result, as_json)
    if not quick:
        report.publish("cache", info, result, markdown(result), docs=DOCS)
    return result


_RATIO_COLUMNS: tuple[report.Column, ...] = (
    ("sizes", "sizes", "{}"),
    ("budget_fraction", "budget", "{:.0%}"),
    ("lru_hit_ratio", "LRU hit ratio", "{:.4f}"),
    ("belady_hit_ratio", "Belady hit ratio", "{:.4f}"),
    ("lru_over_belady", "LRU / Belady", "{:.3f}"),
)
_TTFT_COLUMNS: tuple[report.Column, ...] = (
    ("case", "case", "{}"),
    ("streams", "streams", "{:,}"),
    ("ttft_p50_ms", "first token p50 ms", "{:.2f}"),
    ("ttft_p90_ms", "first token p90 ms", "{:.2f}"),
    ("stream_p50_ms", "whole stream p50 ms", "{:.2f}"),
)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            f"Hit ratio: Zipf(1.0) trace of {s['requests']:,} requests over {s['keys']:,} keys; budget = share of "
            "the bytes of every distinct key (equal sizes: share of the keys). Belady: farthest next use with "
            "bypass (exact optimum for equal sizes; a strong reference, not a proven optimum, for variable sizes).",
            "",
            report.markdown_table(result["hit_ratio"], _RATIO_COLUMNS),
            "",
            f"Time to first token, {s['prompts']} prompts of {s['tokens']} tokens, each sent twice (miss, then "
            f"hit); embedded upstream at {s['upstream_tokens_per_s']:g} tokens/s per stream, no prefill delay; "
            f"from submit to the sink (medians, one run, a shared machine):",
            "",
            report.markdown_table(result["ttft"]["rows"], _TTFT_COLUMNS),
            "",
            f"First token on a hit is {result['ttft']['ttft_speedup']:g}x sooner than on a miss (p50). "
            f"Repeats that were not hits: {result['ttft']['repeats_missed']} (ingest's lookup counters: "
            f"{result['ttft']['ingest']}).",
            "",
            *report.target_table(result["targets"], "{:.3f}".format),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo()
    click.echo(report.text_table(result["hit_ratio"], _RATIO_COLUMNS))
    click.echo()
    click.echo(report.text_table(result["ttft"]["rows"], _TTFT_COLUMNS))
    click.echo(f"first token on a hit {result['ttft']['ttft_speedup']:g}x sooner (p50)")
    for line in report.target_lines(result["targets"], "{:.3f}".format):
        click.echo(line)
