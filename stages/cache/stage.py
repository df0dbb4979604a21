"""Cache: between compute and broadcast. Passes every record through unchanged, stores finished
cacheable streams (with their computed columns) in an LRU bounded by bytes with a TTL, and on a
lookup hit from ingest replays the stored stream into its output ring under the new stream id.

Params (all optional; docs/cache.md):
    max_bytes            byte budget of the LRU (256 MiB)
    ttl_s                an entry's time to live (3600)
    max_stream_bytes     longer streams are not stored (16 MiB)
    replay               "full" (as fast as the ring takes it) or "paced" (the original pacing)
    batch_rows           rows per replayed batch (64)
    snapshot_path        where the cache persists; "" disables (default: <runtime base>/cache/<worker>.snapshot,
                         outside the per-run directory so that it survives the engine)
    snapshot_interval_s  periodic snapshots (60; also one on stop)

Its ROUTER (engine/cache_protocol.py) answers lookups from ingest and operator commands
(``neuralpipe cache stats|clear|snapshot``). Replays in flight are kept in a restart-surviving
state array: a replay cut short by a restart of this worker ends with an ERROR row.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
import zmq

from engine.cache_protocol import CacheProtocolError, parse_request
from engine.stage import Stage, WorkerContext
from shm.batch import TokenBatch
from stages.cache.collect import Collector
from stages.cache.replay import Replay, lost_replay_stream
from stages.cache.snapshot import SnapshotError, read_snapshot, write_snapshot
from stages.cache.store import LruStore

RECORD_TYPE = 16  # the record type ingest writes batches with
_MAX_REPLAYS = 1024


class Cache(Stage):
    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        p = ctx.params
        self.inp, self.out = ctx.inputs[0], ctx.outputs[0]
        self.store = LruStore(int(p.get("max_bytes", 256 << 20)), float(p.get("ttl_s", 3600)))
        self.collector = Collector(int(p.get("max_stream_bytes", 16 << 20)))
        if p.get("replay", "full") not in ("full", "paced"):
            raise ValueError(f"cache param replay must be 'full' or 'paced' (got {p.get('replay')!r})")
        self.paced = p.get("replay", "full") == "paced"
        self.batch_rows = int(p.get("batch_rows", 64))
        default_path = os.path.join(os.path.dirname(ctx.runtime_dir), "cache", f"{ctx.name}.snapshot")
        self.snapshot_path = str(p.get("snapshot_path", default_path))
        self.snapshot_interval_s = float(p.get("snapshot_interval_s", 60))
        self.counts = dict.fromkeys(("replays", "replayed_rows", "lookups_late", "snapshots", "snapshot_errors"), 0)
        self.replays: list[Replay] = []
        self.replay_slots = ctx.state_array("replays", "u8", (_MAX_REPLAYS, 2))  # (stream id + 1, next seq)
        self._resume_lost_replays()
        self._restore()
        self.last_snapshot = time.monotonic()
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ctx.endpoint(ctx.name))
        ctx.log.info("cache_ready", endpoint=ctx.endpoint(ctx.name), entries=len(self.store), path=self.snapshot_path)

    def pollables(self) -> list[Any]:
        return [self.sock]

    def drained(self) -> bool:
        return super().drained() and not self.replays

    def idle_timeout_s(self) -> float | None:
        waits = [self.snapshot_interval_s - (time.monotonic() - self.last_snapshot)] if self.snapshot_path else []
        if self.replays:
            now = time.monotonic_ns()
            waits.append(min(r.due_ns() for r in self.replays) / 1e9 - now / 1e9)
        return max(0.0, min(waits)) if waits else None

    # ---- the duty cycle -------------------------------------------------------------------

    def do_work(self) -> int:
        done = self._serve() + self._pass_through() + self._replay()
        if self.snapshot_path and time.monotonic() - self.last_snapshot >= self.snapshot_interval_s:
            self._snapshot()
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
            for key, stream in self.collector.observe(TokenBatch.decode(view), record_type):
                self.store.put(key, stream)
            moved += 1
        inp.release()  # after the copies are committed: a cache killed at any point loses nothing
        return moved

    def _replay(self) -> int:
        """One batch of each replay that has rows due (fair to the pass-through traffic)."""
        written = 0
        now = time.monotonic_ns()
        for replay in list(self.replays):
            if replay.due_ns() > now:
                continue
            rows = replay.write(self.out, self.batch_rows, now)
            written += rows
            self.counts["replayed_rows"] += rows
            slot = self._slot_of(replay.stream_id)
            if replay.done:
                self.replays.remove(replay)
                self.replay_slots[slot] = (0, 0)
            elif rows:
                self.replay_slots[slot, 1] = replay.next_seq
        return written

    # ---- requests -------------------------------------------------------------------------

    def _serve(self) -> int:
        served = 0
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            try:
                reply = self._handle(parse_request(frames[-1]))
            except CacheProtocolError as exc:
                reply = {"type": "error", "reason": str(exc)}
            self.sock.send_multipart([frames[0], orjson.dumps(reply)])
            served += 1
        return served

    def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg["type"]
        if kind == "lookup":
            return self._lookup(msg)
        if kind == "stats":
            return {"type": "stats", "stats": self.stats()}
        if kind == "clear":
            entries, size = self.store.clear()
            return {"type": "cleared", "entries": entries, "bytes": size}
        began = time.monotonic()
        entries, size = self._snapshot()
        return {"type": "snapshot", "path": self.snapshot_path, "entries": entries, "bytes": size,
                "ms": round((time.monotonic() - began) * 1e3, 2)}  # fmt: skip

    def _lookup(self, msg: dict[str, Any]) -> dict[str, Any]:
        sid = msg["stream_id"]
        if time.monotonic_ns() > msg["deadline_ns"]:  # ingest has gone upstream already
            self.counts["lookups_late"] += 1
            return {"type": "miss", "stream_id": sid, "reason": "late"}
        stream = self.store.get(msg["key"])
        if stream is None:
            return {"type": "miss", "stream_id": sid, "reason": "not cached"}
        free = self._free_slot()
        if free is None:
            return {"type": "miss", "stream_id": sid, "reason": f"{_MAX_REPLAYS} replays in flight"}
        self.replay_slots[free] = (sid + 1, 0)
        self.replays.append(Replay(sid, stream, msg["key"], self.paced))
        self.counts["replays"] += 1
        return {"type": "hit", "stream_id": sid}

    # ---- restart-surviving replay state ---------------------------------------------------

    def _free_slot(self) -> int | None:
        free = (self.replay_slots[:, 0] == 0).nonzero()[0]
        return int(free[0]) if len(free) else None

    def _slot_of(self, sid: int) -> int:
        return int((self.replay_slots[:, 0] == sid + 1).nonzero()[0][0])

    def _resume_lost_replays(self) -> None:
        """Replays a killed predecessor left unfinished end with an explicit error row."""
        for slot in (self.replay_slots[:, 0] != 0).nonzero()[0]:
            sid, next_seq = int(self.replay_slots[slot, 0]) - 1, int(self.replay_slots[slot, 1])
            self.replays.append(Replay(sid, lost_replay_stream(RECORD_TYPE), "", False, first_seq=next_seq))
            self.ctx.log.warning("replay_lost_on_restart", stream_id=sid)

    # ---- snapshots ------------------------------------------------------------------------

    def _restore(self) -> None:
        if not self.snapshot_path or not os.path.exists(self.snapshot_path):
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
        self.ctx.log.info("cache_restored", path=self.snapshot_path, entries=len(self.store), expired=expired)

    def _snapshot(self) -> tuple[int, int]:
        self.last_snapshot = time.monotonic()
        if not self.snapshot_path:
            return 0, 0
        self.store.purge_expired()
        try:
            written = write_snapshot(self.snapshot_path, self.store.items())
        except OSError as exc:
            self.counts["snapshot_errors"] += 1
            self.ctx.log.error("cache_snapshot_failed", path=self.snapshot_path, error=str(exc))
            return 0, 0
        self.counts["snapshots"] += 1
        return written

    # ---- hooks ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if not hasattr(self, "store"):
            return {}
        looked = self.store.counts["hits"] + self.store.counts["misses"]
        return {
            **self.store.counts,
            **self.counts,
            **self.collector.counts,
            "entries": len(self.store),
            "bytes": self.store.bytes,
            "hit_ratio": round(self.store.counts["hits"] / looked, 4) if looked else 0.0,
            "replays_active": len(self.replays),
        }

    def close(self) -> None:
        if hasattr(self, "sock"):
            self._snapshot()
            self.replay_slots.flush()
            self.sock.close(0)
