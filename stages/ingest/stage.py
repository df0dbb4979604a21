"""Ingest: the source of every stream. An asyncio worker (uvloop) that takes generation requests
on its ROUTER, streams them from the upstream pool and writes token batches into its output ring.

Params (all optional):
    upstreams        list of {name, base_url, models, max_concurrency}; empty: the embedded
                     upstream is started in a child process (``embedded`` = its config)
    pool             PoolPolicy fields (strategy, retries, mid_stream, ...)
    batch_rows       rows per batch record (64)
    client_requests_per_s, client_burst, client_tokens_per_s, queue_bound   rate limits
    max_streams      concurrent streams tracked for restart recovery (4096)
    cache            name of the cache worker to ask before going upstream ("cache"; "" disables;
                     no lookup while its socket does not exist; docs/cache.md)
    cache_policy     which requests are cacheable: "deterministic" (temperature 0 or a seed), "all", "off"

Rows: one START row (text: JSON {model, cached, cache_key}), one TOKEN row per token, then one END
row (text: JSON {finish_reason, usage}) or one ERROR row (text: the reason), with seq 0, 1, 2, ...
per stream. The row texts are the contract with later stages (docs/data-plane.md, "Rows of a stream").
A stream cut short by a restart of this worker ends with an ERROR row "ingest restarted".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import numpy as np
import orjson
import zmq
import zmq.asyncio

from engine.cache_protocol import CacheLookup, socket_path
from engine.cachekey import check_policy, key_for, producer_id
from engine.requests import RequestError, parse_request
from engine.stage import AsyncStage, WorkerContext, wait_writable
from shm.batch import RECORD_TYPE, Kind, TokenBatch, batch_size, stable_token_id, write_batch
from stages.ingest.openai_client import TokenEvent
from stages.ingest.pool import PoolPolicy, UpstreamConfig, UpstreamPool
from stages.ingest.ratelimit import KeyedBuckets, take

_TOKEN = int(Kind.TOKEN)
_KINDS = {"start": Kind.START, "token": Kind.TOKEN, "end": Kind.END, "error": Kind.ERROR}
_LATENCY_SAMPLES = 4096


class Ingest(AsyncStage):
    async def run(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        p = ctx.params
        self.out = ctx.outputs[0]
        self.batch_rows = int(p.get("batch_rows", 64))
        self.rows: list[tuple] = []
        self.wake_flusher = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.tasks: dict[int, asyncio.Task] = {}
        self.latency_ns = np.zeros(_LATENCY_SAMPLES, dtype=np.int64)  # a ring of recent samples
        self.latency_count = 0
        self.counts = {"accepted": 0, "rejected": 0, "tokens": 0, "errors": 0, "completed": 0, "cancelled": 0}
        self._init_state(int(p.get("max_streams", 4096)))
        self.request_buckets = KeyedBuckets(
            float(p.get("client_requests_per_s", 100)), float(p.get("client_burst", 20))
        )
        self.token_buckets = KeyedBuckets(
            float(p.get("client_tokens_per_s", 1e6)), float(p.get("client_burst_tokens", 1e5))
        )
        self.queue_bound = int(p.get("queue_bound", 64))
        self.queued: dict[str, int] = {}
        self.embedded = None
        self.cache_policy = check_policy(p.get("cache_policy", "deterministic"))
        cache_worker = str(p.get("cache", "cache"))
        self.cache = CacheLookup(socket_path(ctx.runtime_dir, cache_worker)) if cache_worker else None
        upstreams = [UpstreamConfig(**u) for u in p.get("upstreams", [])]
        # what the cache key names as the producer: the upstreams' URLs and models, or the embedded one's models
        self.producer = producer_id([{"base_url": u.base_url, "models": list(u.models)} for u in upstreams])
        if not upstreams:
            upstreams = [self._start_embedded(p)]
        self.pool = UpstreamPool(upstreams, PoolPolicy(**p.get("pool", {})))
        await self.pool.start()
        if self.cache is not None:
            self.cache.start()
        self._recover_lost_streams()
        flusher = asyncio.create_task(self._flusher())
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ctx.endpoint("ingest"))
        ctx.log.info("ingest_ready", endpoint=ctx.endpoint("ingest"), upstreams=[u.base_url for u in upstreams])
        try:
            await self._serve(sock)
        finally:
            sock.close(0)
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self._flush_all()
            flusher.cancel()
            await self.pool.close()
            if self.cache is not None:
                self.cache.close()

    # ---- requests ---------------------------------------------------------------------------

    async def _serve(self, sock) -> None:
        while not (self.ctx.draining and not self.tasks):
            try:
                identity, frame = await asyncio.wait_for(sock.recv_multipart(), 0.2)
            except TimeoutError:
                continue
            except ValueError:
                continue  # not two frames: not a request from a DEALER
            await sock.send_multipart((identity, orjson.dumps(self._handle(identity.decode(errors="replace"), frame))))

    def _handle(self, identity: str, frame: bytes) -> dict[str, Any]:
        try:
            msg = parse_request(frame)
        except RequestError as exc:
            self.counts["rejected"] += 1
            return {"type": "rejected", "reason": str(exc)}
        if msg["type"] == "cancel":
            task = self.tasks.get(msg["stream_id"])
            if task is None:
                return {"type": "rejected", "reason": f"no active stream {msg['stream_id']}"}
            task.cancel()
            return {"type": "cancelled", "stream_id": msg["stream_id"]}
        if self.ctx.draining:
            self.counts["rejected"] += 1
            return {"type": "rejected", "reason": "ingest is draining: not accepting new requests"}
        client = msg.get("client") or identity
        if self.queued.get(client, 0) >= self.queue_bound:
            self.counts["rejected"] += 1
            return {
                "type": "rejected",
                "reason": f"rate limit: client {client!r} already has {self.queue_bound} requests queued",
            }
        stream_id = self._new_stream_id()
        self.counts["accepted"] += 1
        self.tasks[stream_id] = asyncio.create_task(self._stream(stream_id, client, msg["body"], msg["endpoint"]))
        return {"type": "accepted", "stream_id": stream_id}

    # ---- one stream -------------------------------------------------------------------------

    async def _stream(self, sid: int, client: str, body: dict, endpoint: str) -> None:
        try:
            await self._admit(client)
            key = key_for(body, endpoint, self.cache_policy, self.producer)
            if key is not None and self.cache is not None and await self.cache.lookup(key, sid):
                self._forget(sid)  # the cache replays the stream under this id
                return
            start = {"model": str(body.get("model", "")), "cached": False, "cache_key": key}
            self._emit(sid, Kind.START, orjson.dumps(start), time.monotonic_ns())
            await self._relay(sid, client, body, endpoint)
        except asyncio.CancelledError:
            self.counts["cancelled"] += 1
            self._emit(sid, Kind.ERROR, b"cancelled", time.monotonic_ns())
        except Exception as exc:  # a bug here must still end the stream explicitly
            self.ctx.log.error("stream_failed", stream_id=sid, error=repr(exc))
            self._emit(sid, Kind.ERROR, f"ingest failed: {exc!r}".encode(), time.monotonic_ns())
        finally:
            self.tasks.pop(sid, None)

    async def _admit(self, client: str) -> None:
        """Wait for the client's request bucket; the wait is the bounded queue of ``_handle``."""
        self.queued[client] = self.queued.get(client, 0) + 1
        try:
            while not self.request_buckets.try_take(client):
                await asyncio.sleep(self.request_buckets.wait_time(client))
        finally:
            self.queued[client] -= 1

    async def _relay(self, sid: int, client: str, body: dict, endpoint: str) -> None:
        deterministic = body.get("temperature") == 0 or body.get("seed") is not None
        # aclosing: a cancelled stream closes its HTTP response, so the upstream sees it go
        async with contextlib.aclosing(
            self.pool.stream_batches(body, endpoint=endpoint, deterministic=deterministic)
        ) as batches:
            async for batch in batches:  # the events of one network read; an end or error comes last
                tokens = [event for event in batch if event.kind == "token"]
                if tokens:
                    await take(self.token_buckets.bucket(client), len(tokens))
                    self._emit_tokens(sid, tokens)
                if batch[-1].kind in ("end", "error"):
                    self._emit_final(sid, batch[-1])
                    return
                if not self.room.is_set():
                    await self.room.wait()  # back-pressure from a full ring reaches the upstream read
        self._emit(sid, Kind.ERROR, b"upstream stream ended without an end event", time.monotonic_ns())

    def _emit_tokens(self, sid: int, events: list[TokenEvent]) -> None:
        seq = self.next_seq[sid]
        self.next_seq[sid] = seq + len(events)
        self.counts["tokens"] += len(events)
        rows = self.rows
        for event in events:
            text = event.text.encode()
            rows.append((sid, seq, _TOKEN, event.token_id or stable_token_id(text), event.logprob, event.recv_ns, text))
            seq += 1
        self._rows_added()

    def _emit_final(self, sid: int, event: TokenEvent) -> None:
        if event.kind == "end":
            self.counts["completed"] += 1
            text = orjson.dumps({"finish_reason": event.finish_reason, "usage": event.usage})
            self._emit(sid, Kind.END, text, event.recv_ns)
        else:
            self.counts["errors"] += 1
            self.ctx.log.warning("stream_error", stream_id=sid, error=event.error)
            self._emit(sid, Kind.ERROR, event.error.encode(), event.recv_ns)

    def _emit(self, sid: int, kind: int, text: bytes, recv_ns: int, token_id: int = 0, logprob: float = math.nan):
        seq = self.next_seq[sid]
        self.next_seq[sid] = seq + 1
        self.rows.append((sid, seq, kind, token_id, logprob, recv_ns, text))
        self._rows_added()

    def _rows_added(self) -> None:
        if len(self.rows) >= self.batch_rows:
            self._write_full_batches()
        if self.rows:
            self.wake_flusher.set()
        if len(self.rows) >= 8 * self.batch_rows:
            self.room.clear()

    def _write_full_batches(self) -> None:
        """Write full batches now, from the stream task that filled one: the flusher's turn comes
        only after every stream task ready in this turn of the event loop has run (with 1,000
        streams, hundreds of milliseconds). Rows stay (for the flusher) when the ring is full."""
        while len(self.rows) >= self.batch_rows and self._write_batch(self.rows[: self.batch_rows]):
            del self.rows[: self.batch_rows]

    # ---- writing batches --------------------------------------------------------------------

    async def _flusher(self) -> None:
        while True:
            await self.wake_flusher.wait()
            self.wake_flusher.clear()
            await self._flush_all()

    async def _flush_all(self) -> None:
        while self.rows:
            if not self._write_batch(self.rows[: self.batch_rows]):
                await wait_writable(self.out, timeout=0.2)
                continue
            del self.rows[: self.batch_rows]
            if len(self.rows) < 4 * self.batch_rows:
                self.room.set()

    def _write_batch(self, rows: list[tuple]) -> bool:
        texts = [r[6] for r in rows]
        text_bytes = sum(map(len, texts))
        view = self.out.try_claim(batch_size(len(rows), text_bytes))
        if view is None:
            return False
        columns = write_batch(view, len(rows), text_bytes)
        stream_id, seq, kind, token_id, logprob, recv_ns, _ = zip(*rows, strict=True)
        columns.stream_id[:] = stream_id
        columns.seq[:] = seq
        columns.kind[:] = kind
        columns.token_id[:] = token_id
        columns.logprob[:] = logprob
        columns.recv_ns[:] = recv_ns
        columns.text_end[:] = np.cumsum([len(t) for t in texts], dtype=np.uint32)
        columns.text[:] = np.frombuffer(b"".join(texts), dtype=np.uint8)
        del columns
        view.release()
        self.out.commit(RECORD_TYPE)
        self._committed(rows)
        self._record_latency(time.monotonic_ns(), [r[5] for r in rows if r[2] == Kind.TOKEN])
        return True

    def _record_latency(self, now: int, received: list[int]) -> None:
        """Keep SSE-event-parsed -> committed-to-ring times of the most recent tokens."""
        at = self.latency_count % _LATENCY_SAMPLES
        samples = now - np.asarray(received[-_LATENCY_SAMPLES:], dtype=np.int64)
        first = samples[: _LATENCY_SAMPLES - at]
        self.latency_ns[at : at + len(first)] = first
        self.latency_ns[: len(samples) - len(first)] = samples[len(first) :]
        self.latency_count += len(samples)

    # ---- state that survives a restart of this worker ---------------------------------------

    def _init_state(self, max_streams: int) -> None:
        self.next_id = self.ctx.state_array("next_stream_id", "u8", 1)
        # slot -> (stream id + 1, next seq committed to the ring); 0 marks a free slot. A slot is
        # freed only once the stream's END/ERROR row is committed, so a restart finds every
        # stream that had not ended in the ring.
        self.active = self.ctx.state_array("active_streams", "u8", (max_streams, 2))
        self.slots: dict[int, int] = {}
        self.next_seq: dict[int, int] = {}

    def _new_stream_id(self) -> int:
        sid = int(self.next_id[0]) + 1
        self.next_id[0] = sid
        free = np.flatnonzero(self.active[:, 0] == 0)
        if not len(free):
            raise RuntimeError("more concurrent streams than max_streams")
        self.active[free[0]] = (sid + 1, 0)
        self.slots[sid] = int(free[0])
        self.next_seq[sid] = 0
        return sid

    def _forget(self, sid: int) -> None:
        """Free the slot of a stream this worker will write no row of (a cache hit)."""
        self.active[self.slots.pop(sid)] = (0, 0)
        del self.next_seq[sid]

    def _committed(self, rows: list[tuple]) -> None:
        """Record in the restart-surviving table how far each stream of a committed batch got."""
        last: dict[int, tuple[int, int]] = {}
        for sid, seq, kind, *_ in rows:
            last[sid] = (seq, kind)
        for sid, (seq, kind) in last.items():
            slot = self.slots[sid]
            if kind in (Kind.END, Kind.ERROR):
                self.active[slot] = (0, 0)
                del self.slots[sid], self.next_seq[sid]
            else:
                self.active[slot, 1] = seq + 1

    def _recover_lost_streams(self) -> None:
        """Streams a killed predecessor left open end with an explicit error, never silently.

        The table is updated right after each commit, so a predecessor killed between the two left
        it one batch behind: that batch is the ring's last committed record, read back here. Its
        rows move a stream's next seq on (an error row on an old seq would be dropped downstream as
        a duplicate, and the stream would never end), and a stream it ended is not open at all."""
        open_streams = {}
        for slot in np.flatnonzero(self.active[:, 0]):
            open_streams[int(self.active[slot, 0]) - 1] = (int(slot), int(self.active[slot, 1]))
        last = self.out.last_committed()
        if last is not None and open_streams:
            batch = TokenBatch.decode(last[1])
            for sid, seq, kind in zip(batch.stream_id.tolist(), batch.seq.tolist(), batch.kind.tolist(), strict=True):
                if sid in open_streams:
                    slot, next_seq = open_streams[sid]
                    open_streams[sid] = (slot, max(next_seq, seq + 1))
                    if kind in (Kind.END, Kind.ERROR):
                        self.active[slot] = (0, 0)
                        del open_streams[sid]
            del batch
        for sid, (slot, next_seq) in open_streams.items():
            self.slots[sid] = slot
            self.next_seq[sid] = next_seq
            self._emit(sid, Kind.ERROR, b"ingest restarted; stream lost", time.monotonic_ns())
            self.ctx.log.warning("stream_lost_on_restart", stream_id=sid)

    # ---- embedded upstream ------------------------------------------------------------------

    def _start_embedded(self, p: dict[str, Any]) -> UpstreamConfig:
        from stages.ingest.upstream_server import UpstreamServerConfig, serve_in_process

        cfg = UpstreamServerConfig(**p.get("embedded", {}))
        self.producer = producer_id([{"embedded": list(cfg.models)}])
        self.embedded, base_url = serve_in_process(cfg)
        # As many streams in flight as the embedded server accepts (the pool's default is 64).
        return UpstreamConfig(name="embedded", base_url=base_url, models=(), max_concurrency=cfg.max_concurrency)

    # ---- stage hooks ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if not hasattr(self, "counts"):
            return {}
        stats = {**self.counts, "active": len(self.tasks), **(self.cache.counts if self.cache else {})}
        n = min(self.latency_count, _LATENCY_SAMPLES)
        if n:  # np.percentile partitions in O(n): cheap enough for the event loop's heartbeat
            p50, p99 = np.percentile(self.latency_ns[:n], (50, 99)) / 1e3
            stats |= {"latency_p50_us": round(float(p50), 1), "latency_p99_us": round(float(p99), 1)}
        return stats

    def close(self) -> None:
        if getattr(self, "embedded", None) is not None:
            self.embedded.terminate()
            self.embedded.join(5)
            with contextlib.suppress(ValueError):
                self.embedded.close()
