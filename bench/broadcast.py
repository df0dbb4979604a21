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
- Egress CPU rows: a source of records that each hold rows of many streams (bench/egress_source.py,
  as ingest batches at load) at 10,000 tokens/s, and one consumer process (engine.clients.consumer's
  StreamConsumer reading ``messages()`` or ``batches()``): CPU µs per token of the broadcast process
  and of the consumer. ``python -m bench.broadcast OTHER_CHECKOUT`` runs the same for another
  checkout (its broadcast and client) interleaved with this one: before/after, side by side.

Subscribers subscribe to the ``all`` topic: one batch message per ring record (wire format 2).

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

from engine.protocol.endpoints import endpoint

from . import report
from .proc import BenchError
from .recovery import BenchEngine, wait_for

TARGET_TOKENS_PER_S = 10_000
TARGET_P99_US = 1000.0  # with 100 subscribers at TARGET_TOKENS_PER_S
BATCH = 16  # tokens per ring record (one stream per record), so per batch message
STREAMS = 4
MAX_PROCESSES = 4


@dataclass(frozen=True)
class Settings:
    subscribers: tuple[int, ...]
    transports: tuple[str, ...]
    unpaced_subscribers: tuple[int, ...]
    window_s: float
    egress_readers: tuple[str, ...]
    egress_window_s: float


FULL = Settings((1, 10, 100), ("ipc", "tcp"), (1, 10), 5.0, egress_readers=("messages", "batches"), egress_window_s=5.0)
QUICK = Settings((1, 10), ("ipc", "tcp"), (1,), 0.5, egress_readers=("batches",), egress_window_s=1.0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        sock.setsockopt(zmq.SUBSCRIBE, b"all")  # every stream: one batch message per record
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
        last: dict[int, int] = {}
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
                    if head.get("type") != "batch" or not head["rows"]:
                        continue
                    recv_ns = next(c for c in head["columns"] if c["name"] == "recv_ns")["offset"]
                    if got < len(latency):
                        latency[got] = now - int.from_bytes(frames[2][recv_ns : recv_ns + 8], "little", signed=True)
                        got += 1
                    key = id(sock)
                    if key in last and head["at"] != last[key]:  # a batch ZeroMQ dropped
                        gaps += 1
                    last[key] = head["next"]
                    tokens += head["rows"]
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


# ---- egress CPU per token (the broadcast and a consumer process) -----------------------------------

EGRESS_RATE = 10_000  # tokens/s: 100 chats at 100 tokens/s
EGRESS_STREAMS = 100
EGRESS_ROWS = 20  # rows per ring record, each of a different stream (ingest's batching at this load)
EGRESS_WARM_S = 2.0

# The consumer process: StreamConsumer (binary) read with ``messages()`` or ``batches()``; after a
# warm-up, its own CPU time and the per-token latency over the window.
_CONSUMER = """
import json, sys, time
import numpy as np
from engine.clients.consumer import StreamConsumer
rd, reader, warm_s, window_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
with StreamConsumer.for_engine(rd, binary=True) as consumer:
    if reader == "batches":
        items = ((b.columns["recv_ns"], b.rows) for b in consumer.batches(idle_timeout_s=10))
    else:
        messages = consumer.messages(idle_timeout_s=10)
        items = ((m.columns["recv_ns"], len(m.text)) for m in messages if m.type == "tokens")
    began, cpu0, tokens, latency = time.monotonic(), None, 0, []
    for recv_ns, n in items:
        now = time.monotonic()
        if cpu0 is None:
            if now - began < warm_s:
                continue
            cpu0, t0 = time.process_time(), now
        latency.append(time.monotonic_ns() - recv_ns.astype(np.int64))
        tokens += n
        if now - t0 >= window_s:
            break
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
lat = np.concatenate(latency) / 1e3
print(json.dumps({"tokens": tokens, "cpu_s": cpu, "wall_s": wall, "p50_us": float(np.percentile(lat, 50)),
                  "p99_us": float(np.percentile(lat, 99)), "counts": consumer.counts}))
"""


def egress_toml(rate: float, rows: int) -> str:
    return f"""
[engine]
heartbeat_interval_s = 0.2

[ring_defaults]
capacity = {1 << 22}

[workers.source]
stage = "egress_source:MixedSource"
outputs = ["source-broadcast"]
params = {{ streams = {EGRESS_STREAMS}, rows = {rows}, rate = {rate} }}

[workers.broadcast]
stage = "broadcast"
inputs = ["source-broadcast"]
params.sndhwm = 1000000
"""


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def egress_cpu(tree: str, reader: str, window_s: float, rate: float = EGRESS_RATE, rows: int = EGRESS_ROWS) -> dict:
    """CPU µs per token of the broadcast process and of a consumer process reading every stream
    (``reader``: messages or batches), for the checkout at ``tree`` (its engine, broadcast and
    client), with the same source (bench/egress_source.py) in front."""
    import shutil
    import subprocess
    import sys
    import tempfile

    tmp = tempfile.mkdtemp(prefix="neuralpipe-egress-")
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "egress_source.py"), tmp)
    env = dict(os.environ, PYTHONPATH=f"{tree}:{tmp}", NEURALPIPE_RUNTIME_DIR=os.path.join(tmp, "run"),
               NEURALPIPE_INSTANCE="egress", NEURALPIPE_METRICS_PORT="0")  # fmt: skip
    config = os.path.join(tmp, "engine.toml")
    with open(config, "w") as f:
        f.write(egress_toml(rate, rows))
    with open(os.path.join(tmp, "engine.log"), "ab") as log:
        engine = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", config], cwd=tree,
                                  env=env, stdout=log, stderr=log)  # fmt: skip
    consumer = None
    try:
        status = wait_for(lambda: _status(tree, env), 60, "the egress engine to run")
        runtime_dir = status["runtime_dir"]
        broadcast_pid = status["workers"]["broadcast"]["pid"]
        consumer = subprocess.Popen(
            [sys.executable, "-c", _CONSUMER, runtime_dir, reader, str(EGRESS_WARM_S), str(window_s)],
            cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(EGRESS_WARM_S + 0.5)  # the consumer's imports and warm-up
        # per token the broadcast published (its heartbeat stats): a broadcast that falls behind
        # the offered load is not credited with tokens it did not handle
        tokens0, cpu0 = _published(tree, env), _cpu_s(broadcast_pid)
        time.sleep(window_s)
        broadcast_cpu, published = _cpu_s(broadcast_pid) - cpu0, _published(tree, env) - tokens0
        out, err = consumer.communicate(timeout=window_s + 60)
        if consumer.returncode:
            raise BenchError(f"egress consumer failed: {err.decode(errors='replace')[-2000:]}")
        read = orjson.loads(out.splitlines()[-1])
    finally:
        for proc in (consumer, engine):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "tree": "this" if os.path.samefile(tree, REPO) else tree,
        "reader": reader,
        "offered_tokens_per_s": rate,
        "rows_per_record": rows,
        "broadcast_cpu_us_per_token": round(broadcast_cpu / max(1, published) * 1e6, 2),
        "broadcast_published_ratio": round(published / (rate * window_s), 3),
        "consumer_cpu_us_per_token": round(read["cpu_s"] / max(1, read["tokens"]) * 1e6, 2),
        "delivered_ratio": round(read["tokens"] / (rate * read["wall_s"]), 3),
        "latency_p50_us": round(read["p50_us"], 1),
        "latency_p99_us": round(read["p99_us"], 1),
    }


def _published(tree: str, env: dict[str, str]) -> int:
    status = _status(tree, env)
    if status is None:
        raise BenchError("the egress engine stopped running")
    return int(status["workers"]["broadcast"]["stats"]["tokens"])


def _status(tree: str, env: dict[str, str]) -> dict | None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "engine.cli", "status", "--json"], cwd=tree, env=env,
                          capture_output=True, timeout=30)  # fmt: skip
    if done.returncode:
        return None
    status = orjson.loads(done.stdout)
    workers = status.get("workers") or {}
    if isinstance(workers, list):
        workers = {w["name"]: w for w in workers}
    broadcast = workers.get("broadcast") or {}
    if status.get("state", "running") != "running" or broadcast.get("state") != "running":  # older: no "state"
        return None
    return {"runtime_dir": status["runtime_dir"], "workers": workers}


# ---- runs ----------------------------------------------------------------------------------------


def run_engine(rate: float, runs: list[tuple[str, int]], window_s: float, progress: bool) -> list[dict]:
    port = free_port()
    rows = []
    with BenchEngine(engine_toml(rate, port), "broadcast") as engine:
        urls = {"ipc": endpoint(engine.info["runtime_dir"], "broadcast", "binary")}  # its binary ipc socket
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
    egress = []
    for reader in settings.egress_readers:
        egress.append(egress_cpu(REPO, reader, settings.egress_window_s))
        if progress:
            click.echo(f"  {egress[-1]}", err=True)
    return {"paced": paced, "unpaced": unpaced, "egress": egress}


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


_EGRESS_COLUMNS: tuple[report.Column, ...] = (
    ("tree", "code", "{}"),
    ("reader", "consumer reads", "{}"),
    ("broadcast_cpu_us_per_token", "broadcast CPU µs/token", "{:.1f}"),
    ("broadcast_published_ratio", "published/offered", "{:.2f}"),
    ("consumer_cpu_us_per_token", "consumer CPU µs/token", "{:.1f}"),
    ("delivered_ratio", "delivered/offered", "{:.2f}"),
    ("latency_p50_us", "p50 µs", "{:,.0f}"),
    ("latency_p99_us", "p99 µs", "{:,.0f}"),
)


def markdown(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            "### Broadcast: ring commit -> SUB receive",
            "",
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            f"Counting source -> broadcast, binary encoding, {BATCH} tokens of one stream per record (one batch "
            "message each), "
            f"{STREAMS} streams; subscribers are SUB sockets spread over up to {MAX_PROCESSES} processes; "
            f"{result['settings']['window_s']:g} s per row; delivered rates summed over all subscribers.",
            "",
            report.markdown_table(result["paced"] + result["unpaced"], _COLUMNS),
            "",
            f"Egress CPU: a source writing records of {EGRESS_ROWS} rows of distinct streams ({EGRESS_STREAMS} "
            f"streams) at {EGRESS_RATE:,} tokens/s -> broadcast -> one consumer process (StreamConsumer, binary); "
            "CPU from /proc (broadcast) and process_time (consumer), per token offered / read.",
            "",
            report.markdown_table(result["egress"], _EGRESS_COLUMNS),
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
    click.echo()
    click.echo(report.text_table(result["egress"], _EGRESS_COLUMNS))
    for line in report.target_lines(result["targets"], "{:,}".format):
        click.echo(line)


def compare(base: str, rounds: int, window_s: float) -> list[dict[str, Any]]:
    """Egress CPU of the checkout at ``base`` (its broadcast and client: ``messages()``) and of this
    one (``messages()`` and ``batches()``), interleaved ``rounds`` times; the median of each."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(rounds):
        for tree, reader in ((base, "messages"), (REPO, "messages"), (REPO, "batches")):
            row = egress_cpu(tree, reader, window_s)
            click.echo(f"  {row}", err=True)
            runs.setdefault((tree, reader), []).append(row)
    medians = []
    for rows in runs.values():
        median = dict(rows[0])
        for key in ("broadcast_cpu_us_per_token", "broadcast_published_ratio", "consumer_cpu_us_per_token"):
            median[key] = float(np.median([r[key] for r in rows]))
        for key in ("delivered_ratio", "latency_p50_us", "latency_p99_us"):
            median[key] = float(np.median([r[key] for r in rows]))
        medians.append(median)
    click.echo(report.text_table(medians, _EGRESS_COLUMNS))
    return medians


if __name__ == "__main__":  # python -m bench.broadcast BASE_CHECKOUT [ROUNDS]: before/after egress CPU
    import sys

    compare(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3, 5.0)
