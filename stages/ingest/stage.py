"""Ingest: the source of every stream. An asyncio worker (uvloop) that takes generation requests
on its ROUTER, streams them from the upstream pool and writes token batches into its output ring.

Params (all optional; a bad value is refused at start with the key named, ``stages/ingest/params.py``):
    upstreams        list of {name, base_url, models, max_concurrency}; empty: the embedded
                     upstream is started in a child process (``embedded`` = its config)
    pool             PoolPolicy fields (strategy, retries, mid_stream, ...)
    batch_rows       most rows per batch record (64, 1..65536); a full batch is written at once
    flush_ms         longest a row waits for its batch to fill (2.0, 0..100): rows written within
                     this window of the first one waiting, or as soon as batch_rows are there; a
                     stream's first token, and a row after a quiet spell (no record written for
                     flush_ms), go at once
    client_requests_per_s, client_burst, client_tokens_per_s, client_burst_tokens, queue_bound
                     rate limits per client
    max_streams      concurrent streams (4096, 1..2**20); one more is rejected ("at capacity")
    cache            name of the cache worker to ask before going upstream (left out: the
                     topology's, engine/config.py; "" disables; no lookup while its socket does
                     not exist; docs/cache.md)
    cache_policy     which requests are cacheable: "deterministic" (temperature 0 or a seed), "all", "off"

Rows: one START row (text: JSON {model, cached, cache_key}), one TOKEN row per token, then one END
row (text: JSON {finish_reason, usage}) or one ERROR row (text: the reason), with seq 0, 1, 2, ...
per stream. The row texts are the contract with later stages (docs/data-plane.md, "Rows of a stream").
A stream cut short by a restart of this worker ends with an ERROR row "ingest restarted".
No row's text exceeds the ring's record (at most 64 KiB): a longer token ends its stream with an
error, a longer error message is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import secrets
import time
from collections.abc import Awaitable
from itertools import chain
from typing import Any

import numpy as np
import orjson
import zmq
import zmq.asyncio

from engine.clients.cache import CacheLookup
from engine.clients.correlation import split_request
from engine.protocol.cache import socket_path
from engine.protocol.cachekey import is_deterministic, key_for, producer_id
from engine.protocol.control import expired
from engine.protocol.requests import RequestError, parse_request
from engine.protocol.rows import End, Start, end_text, start_text
from engine.protocol.streamtable import StreamTable
from engine.protocol.tokens import LOOKUP, OPERATOR
from engine.stage import AsyncStage, WorkerContext, wait_writable
from engine.tokens import ensure_token, matches
from shm.batch import Kind, TokenBatch, stable_token_id
from stages.ingest.openai_client import Tokens, UpstreamError, wait_both
from stages.ingest.params import IngestParams
from stages.ingest.pool import PoolPolicy, UpstreamConfig, UpstreamPool
from stages.ingest.ratelimit import KeyedBuckets, TokenCredit
from stages.ingest.rows import Committed, RowBuffer

_LATENCY_SAMPLES = 4096
_LATENCY_PENDING = 512  # records whose latency waits for the next heartbeat, at most
_TOKEN = int(Kind.TOKEN)
_BACKLOG_BATCHES = 8  # rows waiting, in batches, beyond which streams stop reading their upstreams
# an open stream's error when ingest ends: the engine stopping (past [engine] stop_timeout_s), or ingest alone
STOPPING = "engine stopping: the stream was still open after [engine] stop_timeout_s"
STOPPED = "ingest stopped with the stream open"


class RowTooLarge(Exception):
    """A row whose text cannot fit the ring's record: its stream ends with this error."""


class _Room(asyncio.Event):
    """Room for more rows (set at first): an Event whose state is also an attribute, ``open``,
    which every read of every stream checks (``is_set`` is a Python call)."""

    open = False

    def __init__(self) -> None:
        super().__init__()
        self.set()

    def set(self) -> None:
        self.open = True
        super().set()

    def clear(self) -> None:
        self.open = False
        super().clear()


def _too_large(size: int, max_text: int) -> RowTooLarge:
    return RowTooLarge(f"upstream sent a token of {size} bytes; at most {max_text} fit a row")


def latency_figures(samples_ns: np.ndarray) -> dict[str, float]:
    """``latency_p50_us`` and ``latency_p99_us`` of ``samples_ns`` (none when empty): the samples
    at those ranks (numpy's "lower" percentiles), by one partition, in O(n). Every heartbeat asks:
    np.percentile's interpolation cost 2-3x as much per call for a difference under one sample."""
    n = len(samples_ns)
    if not n:
        return {}
    ranks = [(n - 1) // 2, (n - 1) * 99 // 100]
    p50, p99 = np.partition(samples_ns, ranks)[ranks] / 1e3
    return {"latency_p50_us": round(float(p50), 1), "latency_p99_us": round(float(p99), 1)}


class Ingest(AsyncStage):
    Params = IngestParams
    embedded = None  # the embedded upstream's process, when it runs (what close() may meet)

    async def setup(self, ctx: WorkerContext) -> None:
        """Everything before serving: state, upstream pool (and the embedded upstream), cache
        client, ROUTER. The runtime awaits it while heartbeats flow, so nothing here may block
        the event loop."""
        self.ctx = ctx
        self.params = params = self.parse_params(ctx.params)
        self.out = ctx.outputs[0]
        self.rows = RowBuffer(self.out, params.batch_rows)
        self.backlog_rows = _BACKLOG_BATCHES * params.batch_rows  # beyond: streams stop reading
        self.loop = asyncio.get_running_loop()
        self.flush_s = params.flush_ms / 1e3
        self.max_request_bytes = params.max_request_bytes
        self.flush_timer: asyncio.Handle | None = None
        self.flush_soon = False  # flush_timer is a call_soon, not the window's timer
        self.last_write = -math.inf  # time.monotonic() of the last record written (the loop clock is in whole ms)
        self.wake_flusher = asyncio.Event()
        self.room = _Room()
        self.failed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.tasks: dict[int, asyncio.Task] = {}
        self.owners: dict[int, str] = {}  # stream id -> its cancel token, which only its submitter was told
        self.operator_token = ensure_token(ctx.runtime_dir, OPERATOR)
        self.latency_ns = np.zeros(_LATENCY_SAMPLES, dtype=np.int64)  # a ring of recent samples
        self.latency_count = 0
        self.latency_figures: dict[str, float] = {}  # p50 and p99 of the ring, made at latency_figures_at
        self.latency_figures_at = 0
        self.latency_pending: list[tuple[int, list[int]]] = []  # (commit time, its tokens' receive times)
        self.counts = {
            **dict.fromkeys(("accepted", "rejected", "expired", "tokens", "errors", "completed", "cancelled"), 0),
        }
        self._init_state(params.max_streams)
        self.request_buckets = KeyedBuckets(params.client_requests_per_s, params.client_burst)
        self.token_buckets = KeyedBuckets(params.client_tokens_per_s, params.client_burst_tokens)
        self.queued: dict[str, int] = {}
        self.cache_policy = params.cache_policy
        cache_worker = params.cache
        self.cache = None
        if cache_worker:
            lookup_token = ensure_token(ctx.runtime_dir, LOOKUP)
            self.cache = CacheLookup(socket_path(ctx.runtime_dir, cache_worker), lookup_token)
        upstreams = [UpstreamConfig(**u.model_dump()) for u in params.upstreams]
        # what the cache key names as the producer: the upstreams' URLs and models, or the embedded one's models
        self.producer = producer_id([{"base_url": u.base_url, "models": list(u.models)} for u in upstreams])
        if not upstreams:
            upstreams = [await self._start_embedded(params.embedded)]
        self.pool = UpstreamPool(upstreams, PoolPolicy(**params.pool), telemetry=ctx.telemetry)
        await self.pool.start()
        if self.cache is not None:
            self.cache.start()
        self._recover_lost_streams()
        self.sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # a frame up to twice the request limit gets a clear rejection; a larger one is never buffered
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * params.max_request_bytes)
        self.sock.bind(ctx.endpoint())
        ctx.log.info("ingest_ready", endpoint=ctx.endpoint(), upstreams=[u.base_url for u in upstreams])

    async def run(self, ctx: WorkerContext) -> None:
        flusher = asyncio.create_task(self._flusher())
        serve = asyncio.create_task(self._serve(self.sock))
        try:
            # A dead flusher (or a failed write from a stream task) kills the worker, so the
            # supervisor restarts it: never a half-alive ingest whose streams all hang.
            await asyncio.wait({serve, flusher, self.failed}, return_when=asyncio.FIRST_COMPLETED)
            for task in (self.failed, flusher, serve):
                if task.done():
                    task.result()
            if flusher.done():
                raise RuntimeError("ingest's flusher stopped")
        finally:
            serve.cancel()
            self.sock.close(0)
            # the reason each open stream's error row gives (a client's cancel says "cancelled")
            why = STOPPING if self.ctx.draining else STOPPED
            for task in self.tasks.values():
                task.cancel(why)
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            if not self.failed.done() and not (flusher.done() and flusher.exception()):
                await self._flush_all()
            flusher.cancel()
            await self.pool.close()
            if self.cache is not None:
                self.cache.close()

    # ---- requests ---------------------------------------------------------------------------

    async def _serve(self, sock) -> None:
        while not (self.ctx.draining and not self.tasks):
            try:
                frames = await asyncio.wait_for(sock.recv_multipart(), 0.2)
            except TimeoutError:
                continue
            request = split_request(frames)
            if request is None:
                continue  # not a DEALER's request
            envelope, frame = request
            reply = self._handle(envelope[0], frame)
            await sock.send_multipart([*envelope, orjson.dumps(reply)])

    def _handle(self, identity: bytes, frame: bytes) -> dict[str, Any]:
        """``identity``: the DEALER's routing identity (the default rate-limit key). A stream is
        cancelled with the random token its ``accepted`` reply carried (proof of having submitted
        it: a routing identity can be claimed by a later connection) or the operator token."""
        try:
            msg = parse_request(frame, self.max_request_bytes)
        except RequestError as exc:
            return self._reject(str(exc))
        if msg["type"] == "models":  # what the upstreams serve (the gateway's GET /v1/models)
            return {"type": "models", "models": self.pool.models()}
        if msg["type"] == "cancel":
            sid = msg["stream_id"]
            task = self.tasks.get(sid)
            # one answer for "none" and "not yours": a client learns nothing of others' streams
            token = msg.get("token")
            if task is None or not (matches(token, self.owners.get(sid)) or matches(token, self.operator_token)):
                return {"type": "rejected", "reason": f"no active stream {sid} submitted by this client"}
            task.cancel()
            return {"type": "cancelled", "stream_id": msg["stream_id"]}
        if expired(msg, time.monotonic_ns()):  # its client gave up on it while it waited to be read
            self.counts["expired"] += 1
            return {"type": "rejected", "reason": "expired: read after the client's deadline_ns; nothing started"}
        if self.ctx.draining:
            return self._reject("ingest is draining: not accepting new requests")
        if self.active.full:  # global admission: every slot holds a stream not yet ended
            return self._reject(f"ingest is at capacity: {self.params.max_streams} concurrent streams (max_streams)")
        client = msg.get("client") or identity.decode(errors="replace")
        if self.queued.get(client, 0) >= self.params.queue_bound:
            return self._reject(f"rate limit: client {client!r} already has {self.params.queue_bound} requests queued")
        stream_id = self._new_stream_id()
        self.counts["accepted"] += 1
        self.owners[stream_id] = cancel_token = secrets.token_hex(16)
        self.tasks[stream_id] = asyncio.create_task(self._stream(stream_id, client, msg["body"], msg["endpoint"]))
        return {"type": "accepted", "stream_id": stream_id, "cancel_token": cancel_token}

    def _reject(self, reason: str) -> dict[str, Any]:
        self.counts["rejected"] += 1
        return {"type": "rejected", "reason": reason}

    # ---- one stream -------------------------------------------------------------------------

    async def _stream(self, sid: int, client: str, body: dict, endpoint: str) -> None:
        try:
            await self._admit(client)
            key = key_for(body, endpoint, self.cache_policy, self.producer)
            if key is not None and self.cache is not None and await self.cache.lookup(key, sid):
                self._free(sid)  # the cache replays the stream under this id: no row of it here
                return
            start = Start(str(body.get("model", "")), cached=False, cache_key=key)
            self._emit(sid, Kind.START, start_text(start), time.monotonic_ns())
            await self._relay(sid, client, body, endpoint)
        except asyncio.CancelledError as exc:
            self.counts["cancelled"] += 1
            reason = exc.args[0] if exc.args and exc.args[0] in (STOPPING, STOPPED) else "cancelled"
            self._emit(sid, Kind.ERROR, reason.encode(), time.monotonic_ns())
        except RowTooLarge as exc:
            self.counts["errors"] += 1
            self.ctx.log.warning("stream_error", stream_id=sid, error=str(exc))
            self._emit(sid, Kind.ERROR, str(exc).encode(), time.monotonic_ns())
        except Exception as exc:  # a bug here must still end the stream explicitly
            self.counts["errors"] += 1
            self.ctx.log.error("stream_failed", stream_id=sid, error=repr(exc))
            self._emit(sid, Kind.ERROR, f"ingest failed: {exc!r}".encode(), time.monotonic_ns())
        finally:
            self.tasks.pop(sid, None)
            self.owners.pop(sid, None)

    async def _admit(self, client: str) -> None:
        """Wait for the client's request bucket; the wait is the bounded queue of ``_handle``."""
        self.queued[client] = self.queued.get(client, 0) + 1
        try:
            while not self.request_buckets.try_take(client):
                await asyncio.sleep(self.request_buckets.wait_time(client))
        finally:
            self.queued[client] -= 1
            if not self.queued[client]:
                del self.queued[client]

    async def _relay(self, sid: int, client: str, body: dict, endpoint: str) -> None:
        deterministic = is_deterministic(body)
        credit = TokenCredit(self.token_buckets.bucket(client))
        rows, next_seq, room, counts = self.rows, self.next_seq, self.room, self.counts
        append, max_text, batch_rows = rows.append, rows.max_text, rows.batch_rows

        def added(n: int, first: bool) -> Awaitable[None] | None:
            """After a read's rows: the batch's flush, the client's tokens, the ring's room.
            Cancelling the stream cancels the read, so the upstream sees its response closed."""
            counts["tokens"] += n
            if first or self.flush_timer is None or len(rows.stream_id) >= batch_rows:  # else: nothing to do yet
                self._rows_added(first)
            throttle = credit.take(n)
            if room.open:
                return throttle
            # back-pressure from a full ring reaches the upstream read
            return room.wait() if throttle is None else wait_both(throttle, room.wait())

        def sink(tokens: Tokens) -> Awaitable[None] | None:
            first = next_seq[sid] == 1  # the stream's first token (seq 0 is its START row)
            self._add_tokens(sid, tokens)
            return added(len(tokens.texts), first)

        def one_token(text: str, recv_ns: int) -> Awaitable[None] | None:
            """The usual read: one content token, straight into the row columns."""
            data = text.encode()
            if len(data) > max_text:
                raise _too_large(len(data), max_text)
            seq = next_seq[sid]
            next_seq[sid] = seq + 1
            # no vocabulary id from the upstream: the stable hash of the token's bytes
            append(sid, seq, _TOKEN, stable_token_id(data), math.nan, recv_ns, data)
            return added(1, seq == 1)

        try:
            end = await self.pool.relay(body, sink, one_token=one_token, endpoint=endpoint, deterministic=deterministic)
        except UpstreamError as err:
            self.counts["errors"] += 1
            message = str(err)
            self.ctx.log.warning("stream_error", stream_id=sid, error=message[:1024])
            self._emit(sid, Kind.ERROR, message.encode(), time.monotonic_ns())
            return
        finally:
            credit.close()
        text = end_text(End(end.finish_reason, end.usage))
        if len(text) > self.rows.max_text:
            text = end_text(End(str(end.finish_reason)[:256], None))  # an oversized usage object: keep the reason
        self.counts["completed"] += 1
        self._emit(sid, Kind.END, text, end.recv_ns)

    def _add_tokens(self, sid: int, tokens: Tokens) -> None:
        """A read of several tokens."""
        texts = [text.encode() for text in tokens.texts]
        longest = max(map(len, texts))
        if longest > self.rows.max_text:
            raise _too_large(longest, self.rows.max_text)
        ids = tokens.ids
        if None in ids:  # no vocabulary id from the upstream: the stable hash of the token's bytes
            ids = [stable_token_id(text) if i is None else i for i, text in zip(ids, texts, strict=True)]
        seq = self.next_seq[sid]
        self.next_seq[sid] = seq + len(texts)
        self.rows.add_tokens(sid, seq, ids, tokens.logprobs, tokens.recv_ns, texts, tokens.all_kinds())
        if any(tokens.tops):  # top logprobs asked for: kept aside, by row
            self.rows.tops.update(((sid, seq + i), top) for i, top in enumerate(tokens.tops) if top)

    def _emit(self, sid: int, kind: int, text: bytes, recv_ns: int) -> None:
        """One START, END or ERROR row (no token id, no logprob)."""
        if len(text) > self.rows.max_text:
            if kind != Kind.ERROR:
                raise RowTooLarge(f"a row of {len(text)} bytes; at most {self.rows.max_text} fit the ring's record")
            text = text[: self.rows.max_text].decode(errors="ignore").encode()  # cut at a character
        seq = self.next_seq[sid]
        self.next_seq[sid] = seq + 1
        self.rows.append(sid, seq, kind, 0, math.nan, recv_ns, text)
        self._rows_added()

    def _rows_added(self, first_token: bool = False) -> None:
        """Full batches go now, from the stream task that filled one: the flusher's turn comes
        only after every stream task ready in this turn of the event loop has run (with 1,000
        streams, hundreds of milliseconds). A partial batch waits at most flush_ms for more rows,
        and not at all when no record was written for flush_ms or it holds a stream's first token."""
        rows = self.rows
        waiting = len(rows.stream_id)
        if waiting >= rows.batch_rows:
            self._write_now(rows.batch_rows)
            waiting = len(rows.stream_id)
            if not waiting:
                if self.flush_timer is not None:
                    self.flush_timer.cancel()
                    self.flush_timer = None
                return
        if self.flush_timer is None or (first_token and not self.flush_soon):
            # a stream's first token (time to first token is what a chat waits on) and a row after
            # a quiet spell (no record for flush_ms) go at the end of this turn of the loop, with
            # whatever else the turn reads; other rows wait the window out
            if self.flush_timer is not None:
                self.flush_timer.cancel()
            self.flush_soon = first_token or time.monotonic() - self.last_write >= self.flush_s
            if self.flush_soon:
                self.flush_timer = self.loop.call_soon(self._flush_due)
            else:
                self.flush_timer = self.loop.call_later(self.flush_s, self._flush_due)
        if waiting >= self.backlog_rows:
            self.room.clear()
            self.wake_flusher.set()

    def _flush_due(self) -> None:
        """The oldest waiting row's window is over: what is there goes now, from the timer itself
        (no task to wake); what the ring has no room for is left to the flusher, which waits."""
        self.flush_timer = None
        self._write_now(1)
        if len(self.rows):
            self.wake_flusher.set()

    def _write_now(self, least: int) -> None:
        """Write records while at least ``least`` rows wait and the ring has room."""
        rows = self.rows
        try:
            while len(rows) >= least and self._write(rows.batch_rows):
                pass
        except Exception as exc:  # a write that fails will fail again: the worker must restart
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.ctx.log.error("ingest_write_failed", error=repr(exc))
        if not self.failed.done():
            self.failed.set_exception(exc)

    # ---- writing batches --------------------------------------------------------------------

    async def _flusher(self) -> None:
        while True:
            await self.wake_flusher.wait()
            self.wake_flusher.clear()
            await self._flush_all()

    async def _flush_all(self) -> None:
        rows = self.rows
        while len(rows):
            if not self._write(rows.batch_rows):
                await wait_writable(self.out, timeout=0.2)
                continue
            if len(rows) < _BACKLOG_BATCHES // 2 * rows.batch_rows:
                self.room.set()
        self.room.set()

    def _write(self, limit: int) -> bool:
        committed = self.rows.write(limit)
        if committed is None:
            return False
        self.last_write = time.monotonic()
        self._committed(committed)
        # the latency figures are made at the next heartbeat, a batch of records at a time
        self.latency_pending.append((time.monotonic_ns(), committed.token_recv_ns))
        if len(self.latency_pending) >= _LATENCY_PENDING:
            self._take_latency()
        return True

    def _take_latency(self) -> None:
        """SSE-event-parsed -> committed-to-ring times of the tokens of the records written since
        the last call: into the stage latency histogram and the ring of recent samples."""
        pending, self.latency_pending = self.latency_pending, []
        received = np.fromiter(chain.from_iterable(tokens for _, tokens in pending), np.int64)
        if not len(received):
            return
        committed = np.repeat([now for now, _ in pending], [len(tokens) for _, tokens in pending])
        samples = committed - received
        self.ctx.telemetry.observe("neuralpipe_stage_latency_seconds", samples / 1e9, stage="ingest")
        self._record_latency(samples[-_LATENCY_SAMPLES:])

    def _record_latency(self, samples: np.ndarray) -> None:
        """Keep the most recent samples (at most _LATENCY_SAMPLES at a time) in the ring."""
        at = self.latency_count % _LATENCY_SAMPLES
        first = samples[: _LATENCY_SAMPLES - at]
        self.latency_ns[at : at + len(first)] = first
        self.latency_ns[: len(samples) - len(first)] = samples[len(first) :]
        self.latency_count += len(samples)

    # ---- state that survives a restart of this worker ---------------------------------------

    def _init_state(self, max_streams: int) -> None:
        self.next_id = self.ctx.state_array("next_stream_id", "u8", 1)
        # each stream with the next seq committed to the ring (engine/protocol/streamtable.py),
        # closed only once its END/ERROR row is committed, so a restart finds every stream that
        # had not ended in the ring
        self.active = StreamTable(self.ctx.state_array("active_streams", "u8", (max_streams, 2)))
        self.next_seq: dict[int, int] = {}

    def _new_stream_id(self) -> int:
        """A new stream's id and slot; the caller has checked that a slot is free."""
        sid = int(self.next_id[0]) + 1
        self.next_id[0] = sid
        self.active.open(sid, 0)
        self.next_seq[sid] = 0
        return sid

    def _free(self, sid: int) -> None:
        self.active.close(sid)
        del self.next_seq[sid]

    def _committed(self, committed: Committed) -> None:
        """Record in the restart-surviving table how far each stream of a committed batch got:
        then the streams the batch ended free their slots."""
        self.active.advance_past(committed.stream_id, 0, committed.seq)
        for sid in committed.ended:
            self._free(sid)

    def _recover_lost_streams(self) -> None:
        """Streams a killed predecessor left open end with an explicit error, never silently.

        The table is updated right after each commit, so a predecessor killed between the two left
        it one batch behind: that batch is the ring's last committed record, read back here. Its
        rows move a stream's next seq on (an error row on an old seq would be dropped downstream as
        a duplicate, and the stream would never end), and a stream it ended is not open at all."""
        open_streams = {sid: int(values[0]) for sid, values in self.active.left.items()}
        last = self.out.last_committed()
        if last is not None and open_streams:
            batch = TokenBatch.decode(last[1])
            for sid, seq, kind in zip(batch.stream_id.tolist(), batch.seq.tolist(), batch.kind.tolist(), strict=True):
                if sid in open_streams:
                    open_streams[sid] = max(open_streams[sid], seq + 1)
                    if kind in (Kind.END, Kind.ERROR):
                        self.active.close(sid)
                        del open_streams[sid]
            del batch
        for sid, next_seq in open_streams.items():
            self.active.adopt(sid)
            self.next_seq[sid] = next_seq
            self._emit(sid, Kind.ERROR, b"ingest restarted; stream lost", time.monotonic_ns())
            self.ctx.log.warning("stream_lost_on_restart", stream_id=sid)

    # ---- embedded upstream ------------------------------------------------------------------

    async def _start_embedded(self, embedded: dict[str, Any]) -> UpstreamConfig:
        from stages.ingest.upstream_server import UpstreamServerConfig, serve_in_process

        known = {f.name for f in dataclasses.fields(UpstreamServerConfig)}
        unknown = sorted(set(embedded) - known)
        if unknown:
            raise ValueError(f"params.embedded: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            cfg = UpstreamServerConfig(**embedded)
        except ValueError as exc:
            raise ValueError(f"params.embedded.{exc}") from None
        self.producer = producer_id([{"embedded": list(cfg.models)}])
        # in a thread: the start takes a spawn and the child's imports, and the loop must go on
        # sending heartbeats meanwhile (issue 12 item 5)
        self.embedded, base_url = await asyncio.to_thread(serve_in_process, cfg)
        # ingest lives and dies with it: the supervisor's restart brings a new one (before, a dead
        # embedded upstream left an ingest whose every request failed "no healthy upstream")
        self.loop.add_reader(self.embedded.sentinel, self._embedded_exited)
        # As many streams in flight as the embedded server accepts (the pool's default is 64).
        return UpstreamConfig(name="embedded", base_url=base_url, models=(), max_concurrency=cfg.max_concurrency)

    # ---- stage hooks ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats = {**self.counts, "active": len(self.tasks), **(self.cache.counts if self.cache else {})}
        # what grows with distinct clients: bounded (KeyedBuckets' max_keys; entries leave with their streams)
        stats |= {"clients_tracked": len(self.request_buckets) + len(self.token_buckets) + len(self.queued)}
        self._take_latency()
        if self.latency_count != self.latency_figures_at:  # new samples since the last heartbeat's
            self.latency_figures_at = self.latency_count
            self.latency_figures = latency_figures(self.latency_ns[: min(self.latency_count, _LATENCY_SAMPLES)])
        stats |= self.latency_figures
        self._export_metrics()
        return stats

    def _export_metrics(self) -> None:
        """Metrics from the counters kept anyway, once per heartbeat (engine/telemetry.py)."""
        tel, counts = self.ctx.telemetry, self.counts
        tel.total("neuralpipe_tokens_total", counts["tokens"], stage="ingest")
        hits = self.cache.counts["cache_hits"] if self.cache else 0
        ended = {"completed": counts["completed"], "error": counts["errors"], "cancelled": counts["cancelled"]}
        for outcome, n in (ended | {"cache_hit": hits}).items():
            tel.total("neuralpipe_streams_total", n, outcome=outcome)
        tel.set("neuralpipe_streams_active", len(self.tasks))
        for upstream in self.pool.snapshot():
            tel.set("neuralpipe_upstream_up", float(upstream["healthy"]), upstream=upstream["name"])
            tel.set("neuralpipe_upstream_in_flight", upstream["outstanding"], upstream=upstream["name"])

    def _embedded_exited(self) -> None:
        self.loop.remove_reader(self.embedded.sentinel)
        if self.ctx.draining or self.failed.done():
            return
        code = self.embedded.exitcode
        self.ctx.log.error("embedded_upstream_exited", exit_code=code)
        self.failed.set_exception(RuntimeError(f"the embedded upstream exited (exit code {code})"))

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.terminate()
            self.embedded.join(5)
            with contextlib.suppress(ValueError):
                self.embedded.close()
