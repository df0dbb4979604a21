"""``neuralpipe bench broadcast``: latency from a batch's commit into the broadcast's input ring to
its receipt at a ZeroMQ SUB socket, with 1, 10 and 100 subscribers over ipc and tcp, and the
messages and tokens per second delivered.

A real engine (``python -m engine.cli run``) runs the counting source -> broadcast. The source
writes one stream's batch of BATCH tokens per record and stamps every row's ``recv_ns`` with
CLOCK_MONOTONIC right before it commits the record, so ``time.monotonic_ns() - recv_ns`` at the
subscriber is commit -> SUB receive (CLOCK_MONOTONIC is system-wide). The broadcast publishes the
binary encoding on its ipc endpoint and on an extra tcp endpoint on loopback.

Subscribers are plain SUB sockets subscribed to every stream, spread over up to 4 spawned
processes (100 processes would measure the scheduler of a 2-core machine, not the broadcast). A
subscriber takes the time at once after ``recv_multipart``, then reads ``recv_ns`` from the binary
payload and checks that each stream's sequence numbers continue (a hole is a message ZeroMQ dropped
at the high-water mark). Each process is ready once every one of its sockets has received a
message (so every subscription is in effect: no sleep after subscribing); then all measure for the
same window.

- Paced rows: the source at TARGET_TOKENS_PER_S (the issue's target load).
- Unpaced rows: the source as fast as the ring takes it, 1 and 10 subscribers over ipc: the most the
  broadcast delivers (its latency there is queueing, not the figure of merit).

Everything shares the 2 cores with the engine's other processes; the machine is shared too, so
compare rows of one run, and read the load averages printed with it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import click
import numpy as np
import orjson
import zmq

from . import report
from .proc import BenchError
from .recovery import BenchEngine, wait_for

TARGET_TOKENS_PER_S = 10_000
TARGET_P99_US = 1000.0  # with 100 subscribers at TARGET_TOKENS_PER_S
BATCH = 16  # tokens per ring record, so per message (one stream per record)
STREAMS = 4
MAX_PROCESSES = 4


@dataclass(frozen=True)
class Settings:
    subscribers: tuple[int, ...]
    transports: tuple[str, ...]
    unpaced_subscribers: tuple[int, ...]
    window_s: float


FULL = Settings(subscribers=(1, 10, 100), transports=("ipc", "tcp"), unpaced_subscribers=(1, 10), window_s=5.0)
QUICK = Settings(subscribers=(1, 10), transports=("ipc", "tcp"), unpaced_subscribers=(1,), window_s=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_toml(rate: float, tcp_port: int) -> str:
    return f"""
[engine]
heartbeat_interval_s = 0.2

[ring_defaults]
capacity = {1 << 22}

[workers.source]
stage = "counter"
outputs = ["source-broadcast"]
params = {{ streams = {STREAMS}, batch = {BATCH}, rate = {rate}, total = 0 }}

[workers.broadcast]
stage = "broadcast"
inputs = ["source-broadcast"]
params.endpoints = [{{ url = "tcp://127.0.0.1:{tcp_port}", encoding = "binary" }}]
"""


# ---- subscriber processes ------------------------------------------------------------------------


def _subscriber(url: str, sockets: int, window_s: float, ready, go, results) -> None:
    """``sockets`` SUB sockets on ``url``; after ``go``, every message's latency for ``window_s``."""
    try:
        results.send(("ok", _measure(url, sockets, window_s, ready, go)))
    except BaseException as exc:  # the parent must hear why
        results.send(("error", repr(exc)))
    finally:
        results.close()


def _measure(url: str, sockets: int, window_s: float, ready, go) -> dict[str, Any]:
    ctx = zmq.Context()
    socks = []
    poller = zmq.Poller()
    for _ in range(sockets):
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(url)
        socks.append(sock)
        poller.register(sock, zmq.POLLIN)
    latency = np.empty(4_000_000, dtype=np.int64)
    got = tokens = gaps = 0
    try:
        started = set()
        deadline = time.monotonic() + 20
        while len(started) < sockets:  # each subscription is in effect once a message came through it
            if time.monotonic() > deadline:
                raise BenchError(f"{sockets - len(started)} subscribers got nothing in 20 s")
            for sock, _ in poller.poll(100):
                while sock.poll(0):
                    sock.recv_multipart()
                started.add(sock)
        ready.set()
        go.wait(60)
        warm_until = time.monotonic() + min(1.0, window_s)
        while time.monotonic() < warm_until:  # what queued while the others started is no steady state
            for sock, _ in poller.poll(50):
                while sock.poll(0):
                    sock.recv_multipart()
        last: dict[tuple[int, int], int] = {}
        monotonic_ns, loads = time.monotonic_ns, orjson.loads
        end = time.monotonic() + window_s
        while time.monotonic() < end:
            for sock, _ in poller.poll(50):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    now = monotonic_ns()
                    head = loads(frames[1])
                    if head.get("type") != "tokens":
                        continue
                    recv_ns = next(c for c in head["columns"] if c["name"] == "recv_ns")["offset"]
                    if got < len(latency):
                        latency[got] = now - int.from_bytes(frames[2][recv_ns : recv_ns + 8], "little", signed=True)
                        got += 1
                    first, final = head["seq"]
                    key = (id(sock), head["stream"])
                    if key in last and first != last[key] + 1:
                        gaps += 1
                    last[key] = final
                    tokens += final - first + 1
    finally:
        ctx.destroy(linger=0)
    return {"latency_ns": latency[:got], "tokens": tokens, "gaps": gaps}


def subscribe_and_measure(url: str, subscribers: int, window_s: float) -> dict[str, Any]:
    """Latency percentiles and delivered rates of ``subscribers`` SUB sockets on ``url``."""
    ctx = multiprocessing.get_context("spawn")
    procs_n = min(subscribers, MAX_PROCESSES)
    shares = [subscribers // procs_n + (i < subscribers % procs_n) for i in range(procs_n)]
    go = ctx.Event()
    children = []
    try:
        for share in shares:
            ready = ctx.Event()
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_subscriber, args=(url, share, window_s, ready, go, send), daemon=True)
            proc.start()
            send.close()
            children.append((proc, ready, receive))
        for proc, ready, _ in children:
            wait_for(lambda r=ready, p=proc: r.is_set() or not p.is_alive(), 60, "subscribers to receive")
        go.set()
        outcomes = []
        for _, _, receive in children:
            if not receive.poll(window_s + 31):
                raise BenchError("a subscriber process sent no result")
            status, value = receive.recv()
            if status != "ok":
                raise BenchError(f"subscriber failed: {value}")
            outcomes.append(value)
    finally:
        for proc, _, receive in children:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            receive.close()
    latency = np.concatenate([o["latency_ns"] for o in outcomes]) / 1e3
    if not len(latency):
        raise BenchError(f"no message reached {subscribers} subscribers on {url}")
    p50, p99 = np.percentile(latency, (50, 99))
    return {
        "subscribers": subscribers,
        "latency_p50_us": round(float(p50), 1),
        "latency_p99_us": round(float(p99), 1),
        "latency_max_us": round(float(latency.max()), 1),
        "messages_per_s": round(len(latency) / window_s),
        "tokens_per_s": round(sum(o["tokens"] for o in outcomes) / window_s),
        "gaps": sum(o["gaps"] for o in outcomes),
    }


# ---- runs ----------------------------------------------------------------------------------------


def run_engine(rate: float, runs: list[tuple[str, int]], window_s: float, progress: bool) -> list[dict]:
    port = free_port()
    rows = []
    with BenchEngine(engine_toml(rate, port), "broadcast") as engine:
        # the broadcast's binary ipc endpoint (stages/broadcast/stage.py)
        urls = {"ipc": f"ipc://{os.path.join(engine.info['runtime_dir'], 'broadcast-binary')}.sock"}
        urls["tcp"] = f"tcp://127.0.0.1:{port}"
        for transport, subscribers in runs:
            row = {"transport": transport, "offered_tokens_per_s": rate or "unpaced"}
            row |= subscribe_and_measure(urls[transport], subscribers, window_s)
            rows.append(row)
            if progress:
                click.echo(f"  {row}", err=True)
        stats = engine.workers()["broadcast"]["stats"]
    for row in rows:
        row["broadcast_duplicates"] = stats.get("duplicates", 0)
    return rows


def measure(settings: Settings, progress: bool) -> dict[str, Any]:
    paced_runs = [(t, n) for t in settings.transports for n in settings.subscribers]
    paced = run_engine(TARGET_TOKENS_PER_S, paced_runs, settings.window_s, progress)
    unpaced = run_engine(0, [("ipc", n) for n in settings.unpaced_subscribers], settings.window_s, progress)
    return {"paced": paced, "unpaced": unpaced}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    most = max(r["subscribers"] for r in result["paced"])
    worst = max(r["latency_p99_us"] for r in result["paced"] if r["subscribers"] == most)
    gaps = sum(r["gaps"] for r in result["paced"])
    return [
        {
            "target": f"p99 commit -> SUB receive, {most} subscribers at {TARGET_TOKENS_PER_S:,} tokens/s (µs)",
            "goal": f"< {TARGET_P99_US:g}",
            "value": worst,
            "met": worst < TARGET_P99_US,
        },
        {"target": "messages dropped at the paced load", "goal": "0", "value": gaps, "met": gaps == 0},
    ]


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results. A full run
    from a checkout also writes bench/results/broadcast-<machine>.json and docs/benchmarks.md."""
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    run = measure(settings, progress=not as_json)
    result = {
        "benchmark": "broadcast",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings) | {"batch": BATCH, "streams": STREAMS, "encoding": "binary"},
        **run,
    }
    result["targets"] = targets(result)
    _print(result, as_json)
    if not quick:
        report.publish("broadcast", info, result, markdown(result))
    return result


# ---- output --------------------------------------------------------------------------------------

_COLUMNS: tuple[report.Column, ...] = (
    ("transport", "transport", "{}"),
    ("subscribers", "subscribers", "{:,}"),
    ("offered_tokens_per_s", "offered tokens/s", "{}"),
    ("latency_p50_us", "p50 µs", "{:.1f}"),
    ("latency_p99_us", "p99 µs", "{:.1f}"),
    ("latency_max_us", "max µs", "{:.1f}"),
    ("messages_per_s", "messages/s delivered", "{:,}"),
    ("tokens_per_s", "tokens/s delivered", "{:,}"),
    ("gaps", "dropped", "{:,}"),
)


def markdown(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            "### Broadcast: ring commit -> SUB receive",
            "",
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            f"Counting source -> broadcast, binary encoding, {BATCH} tokens of one stream per message, "
            f"{STREAMS} streams; subscribers are SUB sockets spread over up to {MAX_PROCESSES} processes; "
            f"{result['settings']['window_s']:g} s per row; delivered rates summed over all subscribers.",
            "",
            report.markdown_table(result["paced"] + result["unpaced"], _COLUMNS),
            "",
            *report.target_table(result["targets"], "{:,}".format),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo()
    click.echo(report.text_table(result["paced"] + result["unpaced"], _COLUMNS))
    for line in report.target_lines(result["targets"], "{:,}".format):
        click.echo(line)
