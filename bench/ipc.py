"""``neuralpipe bench ipc``: one-way latency and throughput of token batches between two processes,
the shared-memory ring (each wait strategy) against multiprocessing.Queue, multiprocessing.Pipe,
pyzmq PUSH/PULL over ipc:// and faster-fifo, in one run on one machine.

Each run spawns a fresh producer and consumer (``spawn`` context) over a fresh channel and goes
through three phases:

- paced: the producer pauses after each message, 40 µs plus 5 ns per byte (so that even the
  slowest transport is idle again), and each message finds the consumer waiting: the one-way
  latency of a live token stream (p50/p99/p99.9);
- idle: a pause of ``idle_gap_us`` (1 ms) instead, long enough for every waiting consumer to be
  really asleep (the block strategy parks after ~50 µs of spinning and yielding, the hypervisor
  stops polling a halted vCPU): the wake-up latency (wake p50/p99);
- flat out: the producer sends as fast as the transport takes them, blocking when it is full;
  throughput is measured at the consumer from the first message to the last.

Every run is repeated and the median of the repeats reported, because this kind of machine (2
shared cores) drifts between time windows.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import statistics
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np

from shm.wait import KINDS

from . import report
from .message import LAST, Message, make_message
from .proc import BenchError, run_child, run_pair, yield_for
from .transports import TRANSPORTS, BenchTimeout, open_channel, open_receiver, open_sender, unavailable

PAYLOADS = (1, 64, 4096)
NATIVE = "native"  # the wait of transports that block in the kernel their own way

# Targets from the issue, reported (never asserted): ring with spin wait, 64-token batches.
TARGET_P50_US = 2.0
TARGET_P99_US = 10.0
TARGET_P50_RATIO = 20.0
TARGET_TOKENS_PER_S = 30e6
TARGET_WAKE_P50_US = 20.0


@dataclass(frozen=True)
class Settings:
    repeats: int
    warmup: int  # paced messages sent first and not measured
    paced_messages: int  # measured paced messages per run (at most)
    paced_max_s: float  # ... and at most this long: fewer messages when the gap is long
    gap_us: float  # producer's pause after each paced message, plus gap_ns_per_byte
    gap_ns_per_byte: float  # so that the slowest transport is idle again before the next message
    idle_messages: int  # messages per run after a long pause
    idle_gap_us: float  # the long pause: the consumer is asleep when the message comes
    throughput_s: float  # how long the producer sends flat out
    timeout_s: float  # a transport that moves nothing for this long fails the run

    def plan(self, message_bytes: int) -> Plan:
        """What the producer and the consumer of a run both follow, for messages of this size."""
        gap_ns = int(self.gap_us * 1000 + self.gap_ns_per_byte * message_bytes)
        measured = max(1, min(self.paced_messages, int(self.paced_max_s * 1e9 / gap_ns)))
        paced = range(self.warmup + measured)
        idle = range(paced.stop, paced.stop + self.idle_messages)
        return Plan(paced, idle, gap_ns, max(gap_ns, int(self.idle_gap_us * 1000)))


class Plan(NamedTuple):
    paced: range  # sequence numbers of the paced phase, warm-up included
    idle: range  # ... of the idle phase; the flat-out phase follows
    gap_ns: int
    idle_gap_ns: int


# multiprocessing.Queue, the slowest transport, takes ~2.7 ns per byte here (450 µs per 4096-token
# batch): pausing 5 ns per byte on top of the 40 µs keeps every transport idle between paced
# messages, so that no latency includes time spent queued behind the previous message.
FULL = Settings(
    repeats=3,
    warmup=300,
    paced_messages=3000,
    paced_max_s=1.0,
    gap_us=40,
    gap_ns_per_byte=5,
    idle_messages=300,
    idle_gap_us=1000,
    throughput_s=0.4,
    timeout_s=10,
)
QUICK = Settings(
    repeats=1,
    warmup=10,
    paced_messages=50,
    paced_max_s=0.05,
    gap_us=40,
    gap_ns_per_byte=5,
    idle_messages=10,
    idle_gap_us=1000,
    throughput_s=0.02,
    timeout_s=10,
)


@dataclass(frozen=True)
class Case:
    """One row of the table: a transport, its wait strategy and the batch size."""

    transport: str
    wait: str
    tokens: int

    @property
    def label(self) -> str:
        return self.transport if self.wait == NATIVE else f"{self.transport}/{self.wait}"


@dataclass(frozen=True)
class RunResult:
    latencies_ns: np.ndarray  # paced phase, after the warm-up
    wake_latencies_ns: np.ndarray  # idle phase
    msgs_per_s: float


def main(
    as_json: bool = False,
    quick: bool = False,
    payloads: tuple[int, ...] = (),
    transports: tuple[str, ...] = (),
    output: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print a table (or one JSON object) and return the results.

    A full, unfiltered run also writes bench/results/ipc-<machine>.json and the generated section
    of docs/benchmarks.md when it runs from a checkout; ``output`` writes the JSON anywhere."""
    payloads = _check_payloads(payloads)
    transports = _check_transports(transports)
    settings = QUICK if quick else FULL
    skipped = {transport: note for transport in transports if (note := unavailable(transport))}
    cases = [
        case
        for tokens in payloads
        for transport in transports
        if transport not in skipped
        for case in _cases(transport, tokens)
    ]
    info, load_before = report.machine(), report.load()
    rows = _measure(cases, settings, progress=not as_json)
    result = {
        "benchmark": "ipc",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": asdict(settings),
        "notes": list(skipped.values()),
        "rows": rows,
        "targets": targets(rows),
    }
    _print(result, as_json)
    if output:
        report.write_json(Path(output), result)
    if not quick and len(payloads) == len(PAYLOADS) and transports == TRANSPORTS:
        report.publish("ipc", info, result, markdown(result))
    return result


def _check_payloads(payloads: tuple[int, ...]) -> tuple[int, ...]:
    bad = [p for p in payloads if p < 1]
    if bad:
        raise click.BadParameter(f"payloads must be >= 1 token, got {bad}", param_hint="--payload")
    return tuple(payloads) or PAYLOADS


def _check_transports(transports: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown:
        raise click.BadParameter(f"{unknown}: not one of {', '.join(TRANSPORTS)}", param_hint="--transport")
    return tuple(t for t in TRANSPORTS if t in transports) if transports else TRANSPORTS


def _cases(transport: str, tokens: int) -> list[Case]:
    waits = KINDS if transport == "ring" else (NATIVE,)
    return [Case(transport, wait, tokens) for wait in waits]


def _measure(cases: list[Case], settings: Settings, progress: bool) -> list[dict[str, Any]]:
    """Run every case ``settings.repeats`` times, repeats outermost so that a noisy time window
    hurts one repeat of every row rather than every repeat of one row; then take medians."""
    ctx = multiprocessing.get_context("spawn")
    messages = {tokens: make_message(tokens) for tokens in {case.tokens for case in cases}}
    runs: dict[Case, list[RunResult]] = {case: [] for case in cases}
    total = settings.repeats * len(cases)
    for repeat in range(settings.repeats):
        for i, case in enumerate(cases):
            result = run_once(ctx, case, messages[case.tokens], settings)
            runs[case].append(result)
            if progress:
                done = repeat * len(cases) + i + 1
                p50, wake = (np.median(x) / 1e3 for x in (result.latencies_ns, result.wake_latencies_ns))
                click.echo(
                    f"[{done}/{total}] {case.label:<12} {case.tokens:>5} tokens: p50 {p50:8.1f} µs, "
                    f"wake p50 {wake:8.1f} µs, {result.msgs_per_s:10,.0f} msgs/s",
                    err=True,
                )
    return [_row(case, len(messages[case.tokens].template), results) for case, results in runs.items()]


def _row(case: Case, message_bytes: int, results: list[RunResult]) -> dict[str, Any]:
    """The table row of ``case``: the median over repeats of each statistic."""
    paced = [np.percentile(r.latencies_ns, [50, 99, 99.9]) / 1e3 for r in results]
    wake = [np.percentile(r.wake_latencies_ns, [50, 99]) / 1e3 for r in results]
    msgs_per_s = round(statistics.median(r.msgs_per_s for r in results), 1)

    def median_us(quantiles: list[np.ndarray], i: int) -> float:
        return round(float(statistics.median(q[i] for q in quantiles)), 3)

    return {
        "transport": case.transport,
        "payload": case.tokens,
        "wait": case.wait,
        "bytes": message_bytes,
        "p50_us": median_us(paced, 0),
        "p99_us": median_us(paced, 1),
        "p999_us": median_us(paced, 2),
        "wake_p50_us": median_us(wake, 0),
        "wake_p99_us": median_us(wake, 1),
        "msgs_per_s": msgs_per_s,
        "tokens_per_s": round(msgs_per_s * case.tokens, 1),
    }


def run_once(ctx: Any, case: Case, message: Message, settings: Settings) -> RunResult:
    """One producer and one consumer over a fresh channel; the channel and both processes are
    gone when this returns, whether it returns or raises (KeyboardInterrupt included)."""
    with open_channel(case.transport, ctx, len(message.template)) as (producer_end, consumer_end):
        results = run_pair(
            ctx,
            _budget_s(settings, len(message.template)),
            consumer=(_consume, (case, settings, message, consumer_end)),
            producer=(_produce, (case, settings, message, producer_end)),
        )
    paced, idle, msgs_per_s = results["consumer"]
    return RunResult(np.frombuffer(paced, dtype=np.int64), np.frombuffer(idle, dtype=np.int64), msgs_per_s)


def _budget_s(settings: Settings, message_bytes: int) -> float:
    """How long a run may take before the parent gives up on it: generous, because starting two
    interpreters on a loaded 2-core machine is slow."""
    plan = settings.plan(message_bytes)
    paced_s = len(plan.paced) * (plan.gap_ns / 1e9 + 1e-3) + len(plan.idle) * (plan.idle_gap_ns / 1e9 + 1e-3)
    return 30 + paced_s + settings.throughput_s + 2 * settings.timeout_s


def _produce(
    case: Case, settings: Settings, message: Message, end: Any, ready: Any, cpu: int | None, results: Any
) -> None:
    """Producer process: the paced phases, then flat out for ``throughput_s``."""

    def body() -> None:
        if not ready.wait(settings.timeout_s):
            raise BenchTimeout("the consumer never became ready")
        sender = open_sender(case.transport, end, case.wait, message, settings.timeout_s)
        try:
            plan = settings.plan(len(message.template))
            _send_paced(sender.send, plan.paced, yield_for(plan.gap_ns))
            # The whole pipeline is idle between these: the producer sleeps too.
            _send_paced(sender.send, plan.idle, functools.partial(time.sleep, plan.idle_gap_ns / 1e9))
            _send_flat_out(sender.send, plan.idle.stop, settings.throughput_s)
        finally:
            sender.close()

    run_child(body, cpu, results)


def _send_paced(send: Any, seqs: range, pause: Callable[[], None]) -> None:
    for seq in seqs:
        send(seq)
        pause()


def _send_flat_out(send: Any, first_seq: int, seconds: float) -> None:
    """Send for ``seconds`` (at least two messages, so the consumer has an interval to time)."""
    monotonic_ns = time.monotonic_ns
    until = monotonic_ns() + int(seconds * 1e9)
    send(first_seq)
    seq = first_seq + 1
    while monotonic_ns() < until:
        send(seq)
        seq += 1
    send(seq | LAST)


def _consume(
    case: Case, settings: Settings, message: Message, end: Any, ready: Any, cpu: int | None, results: Any
) -> None:
    """Consumer process: latencies of the paced phases, then the flat-out rate."""

    def body() -> tuple[bytes, bytes, float]:
        receiver = open_receiver(case.transport, end, case.wait, settings.timeout_s)
        try:
            ready.set()
            paced, idle, _, _ = settings.plan(len(message.template))
            paced_ns = _receive_paced(receiver, message, paced)[settings.warmup :]
            idle_ns = _receive_paced(receiver, message, idle)
            msgs_per_s = _receive_flat_out(receiver, message, idle.stop)
        finally:
            receiver.close()
        return array("q", paced_ns).tobytes(), array("q", idle_ns).tobytes(), msgs_per_s

    run_child(body, cpu, results)


def _receive_paced(receiver: Any, message: Message, seqs: range) -> list[int]:
    """One-way latency (ns) of each message, checking that the expected ``seqs`` come in order."""
    recv, done, read, monotonic_ns = receiver.recv, receiver.done, message.read, time.monotonic_ns
    latencies = []
    for expected in seqs:
        buf = recv()
        now = monotonic_ns()
        seq, sent = read(buf)
        if expected == seqs.start and not message.matches(buf):
            raise BenchError("a message differs from the template: the transport changed its bytes")
        done()
        _check_seq(seq, expected)
        latencies.append(now - sent)
    return latencies


def _receive_flat_out(receiver: Any, message: Message, first_seq: int) -> float:
    """Messages per second from the first message to the last one (flagged with ``LAST``)."""
    recv, done, read = receiver.recv, receiver.done, message.read
    seq, _ = read(recv())
    first_ns = time.monotonic_ns()
    done()
    expected = first_seq
    while True:
        _check_seq(seq & ~LAST, expected)
        if seq & LAST:
            break
        seq, _ = read(recv())
        done()
        expected += 1
    return (expected - first_seq) * 1e9 / (time.monotonic_ns() - first_ns)


def _check_seq(seq: int, expected: int) -> None:
    if seq != expected:
        raise BenchError(f"expected message {expected}, got {seq}: a message was lost, duplicated or reordered")


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against this run's rows (absent when a row they need was not run)."""
    row = {(r["transport"], r["wait"], r["payload"]): r for r in rows}
    spin, block = row.get(("ring", "spin", 64)), row.get(("ring", "block", 64))
    queue, zmq = row.get(("queue", NATIVE, 64)), row.get(("zmq", NATIVE, 64))
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, goal: str, met: bool) -> None:
        checks.append({"target": name, "value": round(value, 3), "goal": goal, "met": bool(met)})

    if spin:
        check("ring/spin 64 tokens p50 (µs)", spin["p50_us"], f"<= {TARGET_P50_US}", spin["p50_us"] <= TARGET_P50_US)
        check("ring/spin 64 tokens p99 (µs)", spin["p99_us"], f"<= {TARGET_P99_US}", spin["p99_us"] <= TARGET_P99_US)
        ahead_of_zmq = not zmq or spin["tokens_per_s"] > zmq["tokens_per_s"]
        tokens_ok = spin["tokens_per_s"] >= TARGET_TOKENS_PER_S and ahead_of_zmq
        goal = f">= {TARGET_TOKENS_PER_S / 1e6:.0f} M, > zmq"
        check("ring/spin 64 tokens tokens/s", spin["tokens_per_s"], goal, tokens_ok)
        for other in (queue, zmq):
            if other:
                ratio = other["p50_us"] / spin["p50_us"]
                name = f"{other['transport']} p50 / ring/spin p50, 64 tokens"
                check(name, ratio, f">= {TARGET_P50_RATIO:.0f}x", ratio >= TARGET_P50_RATIO)
    if block:
        met = block["wake_p50_us"] < TARGET_WAKE_P50_US
        check("ring/block 64 tokens wake p50 (µs)", block["wake_p50_us"], f"< {TARGET_WAKE_P50_US}", met)
    return checks


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """One line per ring row: how many times lower its p50 is, and how many times more tokens/s
    it moves, than multiprocessing.Queue and pyzmq in the same run."""
    by_key = {(r["transport"], r["payload"]): r for r in rows if r["wait"] == NATIVE}
    lines = []
    for ring in (r for r in rows if r["transport"] == "ring"):
        parts = []
        for other in ("queue", "zmq"):
            base = by_key.get((other, ring["payload"]))
            if base:
                parts.append(
                    f"{base['p50_us'] / ring['p50_us']:6.1f}x lower p50, "
                    f"{ring['tokens_per_s'] / base['tokens_per_s']:6.1f}x tokens/s vs {other}"
                )
        if parts:
            lines.append(f"ring/{ring['wait']:<5} {ring['payload']:>5} tokens: " + "; ".join(parts))
    return lines


_COLUMNS: tuple[report.Column, ...] = (
    ("transport", "transport", "{}"),
    ("wait", "wait", "{}"),
    ("payload", "tokens", "{:d}"),
    ("bytes", "bytes", "{:,}"),
    ("p50_us", "p50 µs", "{:,.1f}"),
    ("p99_us", "p99 µs", "{:,.1f}"),
    ("p999_us", "p99.9 µs", "{:,.1f}"),
    ("wake_p50_us", "wake p50 µs", "{:,.1f}"),
    ("wake_p99_us", "wake p99 µs", "{:,.1f}"),
    ("msgs_per_s", "msgs/s", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
)


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/benchmarks.md for this result."""
    settings = result["settings"]
    lines = [
        report.machine_line(result["machine"], result["load_before"], result["load_after"]),
        "",
        f"Median of {settings['repeats']} runs per row. Each run: {settings['warmup']} warm-up messages; "
        f"up to {settings['paced_messages']} paced messages (at most {settings['paced_max_s']:g} s), "
        f"{settings['gap_us']:g} µs + {settings['gap_ns_per_byte']:g} ns/byte apart (p50/p99/p99.9); "
        f"{settings['idle_messages']} messages at least {settings['idle_gap_us']:g} µs apart, the producer "
        f"sleeping (wake p50/p99); then {settings['throughput_s']:g} s flat out (msgs/s, tokens/s).",
        "",
        report.markdown_table(result["rows"], _COLUMNS),
        "",
        "Ratios (same run):",
        "",
        "```",
        *ratios(result["rows"]),
        "```",
        "",
        *report.target_table(result["targets"], _number),
    ]
    lines += [f"\nNote: {note}" for note in result["notes"]]
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value / 1e6:,.1f} M" if value >= 1e6 else f"{value:,.2f}"


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo()
    click.echo(report.text_table(result["rows"], _COLUMNS))
    click.echo()
    for line in ratios(result["rows"]):
        click.echo(line)
    if result["targets"]:
        click.echo()
    for line in report.target_lines(result["targets"], _number):
        click.echo(line)
    for note in result["notes"]:
        click.echo(f"note: {note}")
