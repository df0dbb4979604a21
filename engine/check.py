"""``neuralpipe check``: inspect every engine segment read-only, without asking any supervisor.

It works from what the kernel and the segments say (the owner's lock, the ring headers, whether
recorded pids exist), so it answers for a hung or dead engine too, and fast: it maps each header
read-only and makes a handful of system calls per segment. Verdicts (docs/check.md):

- critical (exit 2): a header that is not a valid ring, a torn claim whose producer is dead, or a
  stale segment (its owner died) left in /dev/shm (unless ``--clean`` removed it);
- warning (exit 1): a ring at least 90 % full, a heartbeat older than ``heartbeat_stale_s`` while
  its process lives, or a producer/consumer pid recorded but dead;
- healthy (exit 0) otherwise, including when there is no segment at all.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from engine.rundir import live_instances
from shm.naming import NameError_, check_instance, segment_path
from shm.registry import SegmentInfo, list_segments, remove_stale
from shm.ring import RingCorrupt, RingHeader, pid_alive, read_header

if TYPE_CHECKING:
    from engine.config import Config

HEALTHY, WARNING, CRITICAL = "healthy", "warning", "critical"
EXIT_CODES = {HEALTHY: 0, WARNING: 1, CRITICAL: 2}
FULL_OCCUPANCY = 0.9
# A segment younger than this without its magic is being created (the magic is written last).
CREATION_GRACE_S = 5.0


@dataclass
class SegmentReport:
    """What check found in one segment; ``status`` and ``problems`` carry the verdict."""

    name: str
    instance: str
    ring: str
    size: int
    age_s: float
    live: bool  # its owner (the supervisor that created it) still holds the segment's lock
    valid: bool = False
    error: str | None = None
    capacity: int = 0
    used: int = 0
    occupancy: float = 0.0
    producer_pid: int = 0
    producer_alive: bool = False
    producer_heartbeat_age_s: float | None = None  # None: never beat
    consumer_pid: int = 0
    consumer_alive: bool = False
    consumer_heartbeat_age_s: float | None = None
    records_written: int = 0
    records_read: int = 0
    backpressure_events: int = 0
    drops: int = 0
    unblocks: int = 0
    lost_wakeups: int = 0
    pending_claim: bool = False
    torn_claim: bool = False  # a claim left open by a producer that is dead
    status: str = HEALTHY
    problems: list[str] = field(default_factory=list)

    def flag(self, status: str, problem: str) -> None:
        self.problems.append(problem)
        if EXIT_CODES[status] > EXIT_CODES[self.status]:
            self.status = status


@dataclass
class CheckReport:
    segments: list[SegmentReport]
    removed: list[str]
    elapsed_ms: float

    @property
    def status(self) -> str:
        return max((s.status for s in self.segments), key=EXIT_CODES.__getitem__, default=HEALTHY)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "segments": [asdict(s) for s in self.segments],
            "removed": self.removed,
        }


def _heartbeat_age(heartbeat_ns: int, now_ns: int) -> float | None:
    # CLOCK_MONOTONIC is system-wide on Linux, so another process's reading is comparable.
    return None if heartbeat_ns == 0 else round(max(0, now_ns - heartbeat_ns) / 1e9, 6)


def _magic_unwritten(name: str) -> bool:
    """True when the segment's magic word is still zero (its creator has not finished)."""
    try:
        with open(segment_path(name), "rb") as f:
            return int.from_bytes(f.read(8).ljust(8, b"\0"), "little") == 0
    except OSError:
        return False


def _fill_from_header(report: SegmentReport, h: RingHeader, now_ns: int) -> None:
    report.valid = True
    report.capacity = h.capacity
    report.used = h.used
    report.occupancy = round(h.occupancy, 4)
    report.producer_pid, report.consumer_pid = h.producer_pid, h.consumer_pid
    report.producer_alive, report.consumer_alive = pid_alive(h.producer_pid), pid_alive(h.consumer_pid)
    report.producer_heartbeat_age_s = _heartbeat_age(h.producer_heartbeat_ns, now_ns)
    report.consumer_heartbeat_age_s = _heartbeat_age(h.consumer_heartbeat_ns, now_ns)
    report.records_written, report.records_read = h.records_written, h.records_read
    report.backpressure_events, report.drops = h.backpressure_events, h.drops
    report.unblocks, report.lost_wakeups = h.unblocks, h.lost_wakeups
    report.pending_claim = h.pending_claim
    report.torn_claim = h.pending_claim and not report.producer_alive


def _judge(report: SegmentReport, heartbeat_stale_s: float) -> None:
    """Apply the verdict rules to a report whose header has been read."""
    if report.torn_claim:
        report.flag(CRITICAL, "torn claim: its producer died mid-write (a new producer or the owner unblocks it)")
    if report.occupancy >= FULL_OCCUPANCY:
        report.flag(WARNING, f"ring {report.occupancy:.0%} full")
    for side in ("producer", "consumer"):
        pid, alive = getattr(report, f"{side}_pid"), getattr(report, f"{side}_alive")
        age = getattr(report, f"{side}_heartbeat_age_s")
        if pid and not alive:
            report.flag(WARNING, f"{side} pid {pid} is dead")
        elif alive and age is not None and age > heartbeat_stale_s:
            report.flag(WARNING, f"{side} pid {pid} alive but its heartbeat is {age:.1f} s old")


def _inspect(info: SegmentInfo, heartbeat_stale_s: float, now_ns: int) -> SegmentReport | None:
    """The report for one segment, or None when it vanished while we looked."""
    report = SegmentReport(info.name, info.instance, info.ring, info.size, round(info.age_s, 3), info.live)
    if not info.live:
        report.flag(CRITICAL, "stale: its owner died and left it behind (`neuralpipe check --clean` removes it)")
    try:
        header = read_header(info.name)
    except FileNotFoundError:
        return None
    except (RingCorrupt, ValueError, OSError) as exc:  # ValueError: mmap of a still-empty segment
        if info.age_s < CREATION_GRACE_S and (info.size == 0 or _magic_unwritten(info.name)):
            report.problems.append("being created (header not written yet)")
        else:
            report.error = str(exc)
            report.flag(CRITICAL, f"invalid header: {exc}")
        return report
    _fill_from_header(report, header, now_ns)
    _judge(report, heartbeat_stale_s)
    return report


def inspect_segments(instance: str | None = None, heartbeat_stale_s: float = 5.0) -> CheckReport:
    """Inspect every ``neuralpipe-*`` segment (of ``instance`` only, if given), read-only."""
    start = time.perf_counter()
    now_ns = time.monotonic_ns()
    reports = [r for info in list_segments(instance) if (r := _inspect(info, heartbeat_stale_s, now_ns)) is not None]
    return CheckReport(reports, [], (time.perf_counter() - start) * 1e3)


def clean_and_inspect(instance: str | None = None, heartbeat_stale_s: float = 5.0) -> CheckReport:
    """Remove stale segments (never a live one's: the owner's lock is re-checked right before each
    unlink), then inspect what is left; ``removed`` names what went, elapsed time covers both."""
    start = time.perf_counter()
    removed = remove_stale(instance)
    report = inspect_segments(instance, heartbeat_stale_s)
    report.removed = removed
    report.elapsed_ms = (time.perf_counter() - start) * 1e3
    return report


def this_engine(cfg: Config) -> str | None:
    """The instance ``check`` looks at by default: the configured one, else the only engine running
    under the configured runtime directory; None (every segment) when there is none or several."""
    if cfg.engine.instance:
        return cfg.engine.instance
    running = live_instances(cfg.engine.resolved_runtime_dir())
    return str(running[0]["instance"]) if len(running) == 1 else None


def run_check(instance: str | None, clean: bool, as_json: bool, heartbeat_stale_s: float = 5.0) -> int:
    """``neuralpipe check``: print the report (table or JSON) and return the exit code."""
    if instance is not None:
        try:
            check_instance(instance)
        except NameError_ as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CODES[CRITICAL]
    inspect = clean_and_inspect if clean else inspect_segments
    report = inspect(instance, heartbeat_stale_s)
    print(json.dumps(report.to_dict()) if as_json else format_report(report))
    return report.exit_code


# -- the human-readable table ---------------------------------------------------------------------

_COLUMNS = (
    "SEGMENT",
    "OWNER",
    "STATUS",
    "CAPACITY",
    "USED",
    "PRODUCER",
    "P.HB",
    "CONSUMER",
    "C.HB",
    "BP",
    "DROPS",
    "UNBL",
)


def _pid_cell(pid: int, alive: bool) -> str:
    return "-" if not pid else f"{pid}{'' if alive else ' dead'}"


def _age_cell(age: float | None) -> str:
    return "-" if age is None else f"{age:.1f}s"


def _row(s: SegmentReport) -> tuple[str, ...]:
    owner = "live" if s.live else "stale"
    if not s.valid:
        return (s.name, owner, s.status, "?", "?", "?", "?", "?", "?", "?", "?", "?")
    return (
        s.name,
        owner,
        s.status,
        _size(s.capacity),
        f"{s.occupancy:.0%}",
        _pid_cell(s.producer_pid, s.producer_alive),
        _age_cell(s.producer_heartbeat_age_s),
        _pid_cell(s.consumer_pid, s.consumer_alive),
        _age_cell(s.consumer_heartbeat_age_s),
        str(s.backpressure_events),
        str(s.drops),
        str(s.unblocks),
    )


def _size(n: int) -> str:
    """Capacities are powers of two, so a whole number of the largest fitting unit."""
    for unit in ("", "Ki", "Mi", "Gi"):
        if n < 1024 or n % 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}Ti"


def format_report(report: CheckReport) -> str:
    """An aligned table, each segment's problems under its row, then a one-line verdict."""
    lines = [f"removed stale segment {name}" for name in report.removed]
    if report.segments:
        rows = [_COLUMNS, *(_row(s) for s in report.segments)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(_COLUMNS, widths, strict=True)).rstrip())
        for s, row in zip(report.segments, rows[1:], strict=True):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            lines.extend(f"    - {problem}" for problem in s.problems)
    counts = {status: sum(s.status == status for s in report.segments) for status in EXIT_CODES}
    lines.append(
        f"{report.status}: {len(report.segments)} segment(s), {counts[WARNING]} warning, "
        f"{counts[CRITICAL]} critical ({report.elapsed_ms:.1f} ms)"
    )
    return "\n".join(lines)
