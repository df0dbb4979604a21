"""``neuralpipe demo``: the whole engine in one command.

Starts the engine in the background (the default topology: embedded upstream -> ingest ->
compute -> cache -> broadcast, or a config's), subscribes to its broadcast, submits a handful of
prompts, prints their tokens live with the columns compute appended, submits the first prompt
again (a cache hit: replayed without touching the upstream), then prints throughput, end-to-end
latency percentiles and the PAS, and stops the engine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.clients.consumer import StreamConsumer
from engine.clients.requests import RequestClient
from engine.clients.supervisor import SHUTDOWN_TIMEOUT_S, request
from engine.config import Config
from engine.launcher import launch_detached, wait_exit
from engine.protocol import wire
from engine.protocol.requests import ingest_endpoint

PROMPTS = (
    "Explain a ring buffer to a new engineer.",
    "Why does a shared-memory queue beat a socket on one machine?",
    "Write a haiku about token streams.",
    "What makes a good health score for a pipeline?",
    "Describe a Hilbert curve in one paragraph.",
    "How should a cache decide what to keep?",
)
STREAM_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 10.0


def run_demo(cfg: Config, config_path: str | None, prompts: int, max_tokens: int, write: Callable[[str], None]) -> int:
    """Run the demo; returns the process exit code (0: every stream complete, cache hit seen)."""
    # a demo takes no fixed port: another engine or server on 9464 or 8080 must not stop it
    os.environ.setdefault("NEURALPIPE_METRICS_PORT", "0")
    os.environ.setdefault("NEURALPIPE_GATEWAY_LISTEN", "127.0.0.1:0")
    write("starting the engine ...\n")
    began = time.monotonic()
    info = launch_detached(cfg, config_path, progress=lambda what: write(f"  {what}\n"))
    write(
        f"engine {info['instance']} running after {time.monotonic() - began:.1f} s, every worker ready"
        f" (pid {info['pid']}); log: {info['log']}\n"
    )
    try:
        return _show(info, prompts, max_tokens, write)
    finally:
        request(info["control"], "shutdown", timeout_s=SHUTDOWN_TIMEOUT_S)
        stopped = wait_exit(info["pid"], 30)
        write(f"engine {info['instance']} {'stopped' if stopped else 'did not stop within 30 s'}\n")


def _show(info: dict[str, Any], prompts: int, max_tokens: int, write: Callable[[str], None]) -> int:
    rd = info["runtime_dir"]
    # the run's instance in each prompt: the cache keeps its replies across runs (its snapshot),
    # and the live streams must come from the upstream, not from the last demo's cache
    bodies = [_chat(f"{PROMPTS[i % len(PROMPTS)]} (demo {info['instance']}, {i})", max_tokens) for i in range(prompts)]
    latencies: list[np.ndarray] = []
    with StreamConsumer.for_engine(rd) as consumer, RequestClient(ingest_endpoint(rd)) as client:
        if not consumer.join(JOIN_TIMEOUT_S):  # else a stream that ends at once could pass it by
            write(f"the engine's broadcast did not answer within {JOIN_TIMEOUT_S:g} s\n")
            return 1
        began = time.monotonic()
        sids = [client.submit(body) for body in bodies]
        write(f"submitted {len(sids)} prompts: streams {sids}\n")
        tokens = _follow(consumer, set(sids), latencies, write)
        elapsed = time.monotonic() - began
        write("\nsubmitting prompt 1 again (temperature 0: cacheable) ...\n")
        again = time.monotonic()
        repeat = client.submit(bodies[0])
        replayed = _follow(consumer, {repeat}, [], write)
        repeat_s = time.monotonic() - again
    status = request(info["control"], "status")
    all_latencies = np.concatenate(latencies) / 1e3 if latencies else np.zeros(1)
    p50, p99 = np.percentile(all_latencies, (50, 99))
    pas = status.get("pas") or {}
    cached = replayed["cached"]
    write("\n" + "\n".join(
        [
            f"streams          {len(sids)} live + 1 repeat ({'cache hit' if cached else 'NOT a cache hit'})",
            f"tokens           {tokens['count']} live in {elapsed:.2f} s = {tokens['count'] / elapsed:,.0f} tokens/s",
            f"repeat           {replayed['count']} tokens in {repeat_s * 1e3:.1f} ms (replayed by the cache)",
            f"latency          p50 {p50:,.0f} µs, p99 {p99:,.0f} µs (upstream event parsed -> consumer received)",
            f"PAS              {pas.get('score', float('nan')):.3f} ({pas.get('status', 'n/a')}): integrity "
            f"{pas.get('integrity', 0):.3f}, stability {pas.get('stability', 0):.3f}, symmetry "
            f"{pas.get('symmetry', 0):.3f}, consistency {pas.get('consistency', 0):.3f}",
        ]
    ) + "\n")  # fmt: skip
    complete = tokens["ended"] == len(sids) and tokens["errors"] == 0
    return 0 if complete and cached else 1


def _follow(
    consumer: StreamConsumer, sids: set[int], latencies: list[np.ndarray], write: Callable[[str], None]
) -> dict[str, Any]:
    """Print the messages of ``sids`` until every one has ended; counts."""
    result = {"count": 0, "ended": 0, "errors": 0, "cached": False}
    open_streams = set(sids)
    for message in consumer.messages(idle_timeout_s=STREAM_TIMEOUT_S):
        if message.stream not in sids:
            continue
        now = time.monotonic_ns()
        write(_line(message))
        if message.type == "start":
            result["cached"] = bool(message.header.get("cached"))
        elif message.type == "tokens":
            result["count"] += len(message.text)
            latencies.append(now - message.columns["recv_ns"].astype(np.int64))
        else:
            result["ended"] += message.type == "end"
            result["errors"] += message.type == "error"
            open_streams.discard(message.stream)
            if not open_streams:
                break
    return result


def _line(message: wire.Message) -> str:
    head, sid = message.header, message.stream
    if message.type == "start":
        return f"[{sid}] start{' (cached)' if head.get('cached') else ''}\n"
    if message.type == "end":
        return f"[{sid}] end: {head.get('finish_reason')}\n"
    if message.type == "error":
        return f"[{sid}] error: {head.get('reason')}\n"
    cols = message.columns
    shown = [name for name in ("conf", "hilbert", "entropy", "ppl", "rep") if name in cols]  # compute's, if it ran
    lines = []
    for i, text in enumerate(message.text):
        values = "  ".join(f"{name} {_fmt(cols[name][i])}" for name in shown)
        lines.append(f"[{sid}] {text!r:<16} {values}\n")
    return "".join(lines)


def _fmt(value: np.ndarray) -> str:
    if np.ndim(value):
        return "(" + ", ".join(f"{v:.3f}" for v in value) + ")"
    return f"{value:.2f}"


def _chat(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
    }
