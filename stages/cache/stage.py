"""Cache: between compute and broadcast. Passes every record through unchanged, stores finished
streams that carry a cache key, and replays a stored stream when ingest's lookup hits.

Duty cycle: serve the ROUTER (lookups and operator commands, engine.protocol.cache; in a turn
after an idle spell, or every SERVE_EVERY_S while records flow back to back), copy up to
64 input records to the output (each input record is released only after its copy is committed,
as in stages/testing/relay.py), then write one batch of each active replay, round robin, so
replays and live traffic share the output ring fairly.

Params (all optional; docs/cache.md and docs/configuration.md):
    max_bytes            LRU budget in bytes (256 MiB)
    ttl_s                an entry's time to live (3600)
    replay               "full" (as fast as the ring takes it) or "paced" (the original stream's pacing)
    batch_rows           rows per replayed batch (64)
    max_stream_bytes     larger streams are not stored (16 MiB)
    max_open_streams     streams collected at once (4096)
    max_replays          replays at once; a lookup beyond it is a miss (1024)
    snapshot_path        default <runtime base dir>/<worker name>.cache-snapshot; "" disables snapshots
    snapshot_interval_s  a changed cache is written this often (60; 0: only on stop and on request)

State surviving a restart of this worker: the snapshot (entries), and a table of replays in
flight (``ctx.state_array``); a replay a killed predecessor left unfinished ends with an ERROR
row "cache restarted; replay lost", never silently.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

import orjson
import zmq

from engine.clients.correlation import split_request
from engine.protocol.cache import MAX_MESSAGE_BYTES, CacheProtocolError, authority, parse_request
from engine.protocol.streamtable import StreamTable
from engine.stage import SocketTurns, Stage, WorkerContext
from engine.tokens import ensure_token, matches
from engine.validated import ModelRef
from shm.batch import RECORD_TYPE, BatchError, Kind, TokenBatch
from stages.cache.collect import Collector
from stages.cache.replay import Replay, lost_replay_stream
from stages.cache.snapshot import SnapshotError, read_snapshot, write_snapshot
from stages.cache.store import LruStore

_HOUSEKEEPING_S = 1.0
SERVE_EVERY_S = 0.005  # records flowing back to back, the ROUTER is read this often: a lookup waits 5 ms at most
REQUESTS_PER_TURN = 64
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_TOKEN = int(Kind.TOKEN)


def default_snapshot_path(runtime_dir: str, worker: str) -> str:
    """A file in the base runtime directory, next to the per-run instance directories: it
    outlives an engine run (the instance directory is deleted on stop) and is not a directory,
    so the start-up sweep of dead instances leaves it alone (engine/rundir.py)."""
    return os.path.join(os.path.dirname(os.path.abspath(runtime_dir)), f"{worker}.cache-snapshot")


class Cache(Stage):
    Params = ModelRef("stages.cache.params:CacheParams")
    # what close() may meet before start() made it (a start that failed part way)
    dirty = False
    router: zmq.Socket | None = None
    replay_table: StreamTable | None = None

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        p = self.parse_params(ctx.params)
        self.inp, self.out = ctx.inputs[0], ctx.outputs[0]
        self.store = LruStore(p.max_bytes, p.ttl_s)
        self.paced = p.replay == "paced"
        self.batch_rows = p.batch_rows
        self.collector = Collector(p.max_stream_bytes, p.max_open_streams)
        path = default_snapshot_path(ctx.runtime_dir, ctx.name) if p.snapshot_path is None else p.snapshot_path
        self.snapshot_path = path or None
        self.snapshot_interval_s = p.snapshot_interval_s
        self.counts = {
            "passed": 0,
            "tokens": 0,
            "undecodable": 0,
            "late_lookups": 0,
            "busy": 0,
            "replays": 0,
            "replay_rows": 0,
            "snapshots": 0,
            "snapshot_errors": 0,
            "restored": 0,
            "refused": 0,
        }
        self.dirty = False
        now = time.monotonic()
        self.next_snapshot = now + self.snapshot_interval_s
        self.next_housekeeping = now + _HOUSEKEEPING_S
        self._rate = (now, 0)
        self.serving = SocketTurns(SERVE_EVERY_S)
        self.replay_rate = 0.0
        self._restore()
        self.replays: dict[int, Replay] = {}
        self.turns: deque[int] = deque()  # round-robin order of the active replays
        self._init_replay_table(p.max_replays)
        # who may replay (ingest) and clear or snapshot (operators): engine/tokens.py
        self.tokens = {name: ensure_token(ctx.runtime_dir, name) for name in ("lookup", "operator")}
        self.zmq = zmq.Context()
        self.router = self.zmq.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # a frame up to twice the message limit gets a clear error; a larger one is never buffered
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_MESSAGE_BYTES)
        self.router.bind(ctx.endpoint())
        ctx.log.info("cache_ready", endpoint=ctx.endpoint(), path=self.snapshot_path, entries=len(self.store))

    def pollables(self) -> list[Any]:
        return [self.router]

    # ---- the duty cycle -----------------------------------------------------------------------

    def do_work(self) -> int:
        now = time.monotonic()
        available = self.inp.available()
        served = self._serve(now) if self.serving.due(now, available) else 0  # engine.stage.SocketTurns
        done = served + (self._pass_through() if available else 0) + (self._replay() if self.turns else 0)
        if now >= self.next_housekeeping:
            self._housekeeping(now)
        self.serving.turn_done(bool(done))
        return done

    def _pass_through(self) -> int:
        inp, out = self.inp, self.out
        moved = 0
        while moved < 64:
            record = inp.try_read()
            if record is None:
                break
            record_type, view = record
            target = out.try_claim(len(view))
            if target is None:
                inp.unread()
                break
            target[:] = view
            out.commit(record_type)
            self._observe(record_type, view)
            moved += 1
        inp.release()
        self.counts["passed"] += moved
        return moved

    def _observe(self, record_type: int, view: memoryview) -> None:
        try:
            batch = TokenBatch.decode(view)
        except BatchError:
            self.counts["undecodable"] += 1
            return
        # one C loop, no temporary array; the metric is set from the count at each heartbeat (stats)
        self.counts["tokens"] += batch.kind.tobytes().count(_TOKEN)
        self.ctx.telemetry.observe_since_ns("neuralpipe_stage_latency_seconds", batch.recv_ns, stage="cache")
        for key, stream in self.collector.observe(batch, record_type):
            if self.store.put(key, stream):
                self.dirty = True

    def _replay(self) -> int:
        """One batch of each active replay whose rows are due."""
        written = 0
        now = time.monotonic_ns()
        for _ in range(len(self.turns)):
            sid = self.turns[0]
            self.turns.rotate(-1)
            replay = self.replays[sid]
            rows = replay.write(self.out, self.batch_rows, now)
            if not rows:
                if self.out.is_full:
                    break
                continue
            written += 1
            self.counts["replay_rows"] += rows
            if replay.done:
                self.replay_table.close(sid)
                del self.replays[sid]
                self.turns.remove(sid)
            else:
                self.replay_table.set(sid, replay.next_seq)
        return written

    def idle_timeout_s(self) -> float | None:
        now_ns = time.monotonic_ns()
        waits = [max(0.0, (r.due_ns() - now_ns) / 1e9) for r in self.replays.values()]
        waits.append(max(0.0, self.next_housekeeping - time.monotonic()))
        return min(waits)

    def drained(self) -> bool:
        return self.inp.available() == 0 and not self.replays

    # ---- requests -------------------------------------------------------------------------------

    def _serve(self, now: float) -> int:
        served = 0
        # asked before each receive: one that finds nothing costs an exception and two system
        # calls more (plain ints: pyzmq's constants are enum flags, and ``&`` on them costs more
        # than the call)
        while served < REQUESTS_PER_TURN and self.router.getsockopt(_EVENTS) & _POLLIN:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            served += 1
            request = split_request(frames)
            if request is None:
                continue  # not a DEALER's request
            envelope, frame = request
            try:
                reply = self._answer(parse_request(frame))
            except CacheProtocolError as exc:
                reply = {"type": "error", "reason": str(exc)}
            self.router.send_multipart([*envelope, orjson.dumps(reply)])
        self.serving.asked(now, served == REQUESTS_PER_TURN)
        return served

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg["type"]
        needed = authority(kind)
        if needed is not None and not matches(msg.get("token"), self.tokens[needed]):
            self.counts["refused"] += 1
            return {"type": "error", "reason": f"{kind}: not authorised (needs the engine's {needed} token)"}
        if kind == "lookup":
            return self._lookup(msg["key"], msg["stream_id"], msg["deadline_ns"])
        if kind == "stats":
            return {"type": "stats", "stats": self.stats()}
        if kind == "clear":
            entries, dropped = self.store.clear()
            self.dirty = True
            self.ctx.log.info("cache_cleared", entries=entries, bytes=dropped)
            return {"type": "cleared", "entries": entries, "bytes": dropped}
        if self.snapshot_path is None:
            return {"type": "error", "reason": 'snapshots are off (snapshot_path is "")'}
        began = time.monotonic()
        try:
            entries, size = self._write_snapshot()
        except OSError as exc:
            return {"type": "error", "reason": f"snapshot to {self.snapshot_path} failed: {exc}"}
        ms = round((time.monotonic() - began) * 1e3, 2)
        return {"type": "snapshot", "path": self.snapshot_path, "entries": entries, "bytes": size, "ms": ms}

    def _lookup(self, key: str, sid: int, deadline_ns: int) -> dict[str, Any]:
        now = time.monotonic_ns()
        if now >= deadline_ns:  # ingest has stopped waiting and goes upstream: never replay it too
            self.counts["late_lookups"] += 1
            return {"type": "miss", "stream_id": sid, "reason": "late"}
        if sid in self.replays or self.replay_table.full:
            self.counts["busy"] += 1
            return {"type": "miss", "stream_id": sid, "reason": "busy"}
        stream = self.store.get(key)
        if stream is None:
            return {"type": "miss", "stream_id": sid, "reason": "not cached"}
        self._begin_replay(Replay(sid, stream, key, paced=self.paced, now_ns=now))
        self.counts["replays"] += 1
        return {"type": "hit", "stream_id": sid}

    # ---- replays that survive a restart ---------------------------------------------------------

    def _init_replay_table(self, max_replays: int) -> None:
        # each replay in flight with the next seq it committed (engine/protocol/streamtable.py)
        self.replay_table = StreamTable(self.ctx.state_array("replays", "u8", (max_replays, 2)))
        lost = lost_replay_stream(RECORD_TYPE)
        for sid, (seq,) in self.replay_table.close_left().items():
            self._begin_replay(Replay(sid, lost, "", paced=False, first_seq=int(seq)))
            self.ctx.log.warning("replay_lost_on_restart", stream_id=sid)

    def _begin_replay(self, replay: Replay) -> None:
        self.replay_table.open(replay.stream_id, replay.first_seq)
        self.replays[replay.stream_id] = replay
        self.turns.append(replay.stream_id)

    # ---- snapshots ------------------------------------------------------------------------------

    def _restore(self) -> None:
        if self.snapshot_path is None or not os.path.exists(self.snapshot_path):
            return
        try:
            entries = read_snapshot(self.snapshot_path)
        except (SnapshotError, OSError) as exc:
            self.counts["snapshot_errors"] += 1
            self.ctx.log.error("cache_snapshot_skipped", path=self.snapshot_path, error=str(exc))
            return
        for key, stored_at, stream in entries:
            self.store.put(key, stream, stored_at=stored_at)
        expired = self.store.purge_expired()
        self.counts["restored"] = len(self.store)
        self.ctx.log.info("cache_restored", path=self.snapshot_path, entries=len(self.store), expired=expired)

    def _write_snapshot(self) -> tuple[int, int]:
        self.store.purge_expired()
        entries, size = write_snapshot(self.snapshot_path, self.store.items())
        self.dirty = False
        self.counts["snapshots"] += 1
        return entries, size

    def _housekeeping(self, now: float) -> None:
        """Drop expired entries; write the periodic snapshot when something changed."""
        self.next_housekeeping = now + _HOUSEKEEPING_S
        if self.store.purge_expired():
            self.dirty = True
        if self.snapshot_path is None or not self.snapshot_interval_s or not self.dirty or now < self.next_snapshot:
            return
        self.next_snapshot = now + self.snapshot_interval_s
        try:
            self._write_snapshot()
        except OSError as exc:
            self.counts["snapshot_errors"] += 1
            self.ctx.log.error("cache_snapshot_failed", path=self.snapshot_path, error=str(exc))

    # ---- stage hooks ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        since, rows = self._rate
        if now - since >= 0.1:  # the rate over the time since the previous call (a heartbeat)
            self.replay_rate = (self.counts["replay_rows"] - rows) / (now - since)
            self._rate = (now, self.counts["replay_rows"])
        counts = self.store.counts
        lookups = counts["hits"] + counts["misses"]
        tel = self.ctx.telemetry  # metrics from the counters kept anyway (engine/telemetry.py)
        tel.total("neuralpipe_tokens_total", self.counts["tokens"], stage="cache")
        tel.total("neuralpipe_cache_hits_total", counts["hits"])
        tel.total("neuralpipe_cache_misses_total", counts["misses"])
        tel.total("neuralpipe_cache_evictions_total", counts["evictions"] + counts["expired"])
        tel.set("neuralpipe_cache_bytes", self.store.bytes)
        tel.set("neuralpipe_cache_entries", len(self.store))
        return {
            **counts,
            **self.counts,
            **self.collector.counts,
            "bytes": self.store.bytes,
            "entries": len(self.store),
            "hit_ratio": round(counts["hits"] / lookups, 4) if lookups else 0.0,
            "replays_active": len(self.replays),
            "replay_rows_per_s": round(self.replay_rate, 1),
        }

    def close(self) -> None:
        if self.dirty and self.snapshot_path is not None:
            try:
                entries, size = self._write_snapshot()
                self.ctx.log.info("cache_snapshot_written", path=self.snapshot_path, entries=entries, bytes=size)
            except OSError as exc:
                self.ctx.log.error("cache_snapshot_failed", path=self.snapshot_path, error=str(exc))
        if self.router is not None:
            self.router.close(0)
            self.zmq.term()
        if self.replay_table is not None:
            self.replay_table.array.flush()
