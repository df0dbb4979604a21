"""Compute: runs the kernels over each batch and writes it on with their columns appended.

Columns (docs/compute.md): ``hilbert`` f4 x 2 (cell centre on the Hilbert curve, in [0, 1]),
``conf`` f4 (exp(logprob), 1 without one), ``rgba`` u1 x 4, ``entropy`` f4 (nats; a lower bound
from the chosen token's probability, the only one the ring carries), ``ppl`` f4 (the stream's
running perplexity), ``rep`` f4 (share of the stream's last ``window`` tokens whose n-gram had
occurred within the window before), ``repflag`` u1 (rep >= threshold), and with probes on
``probe`` f4 x K (each probe's cosine with the token's embedding, averaged over the stream's last
``probes.window`` tokens). START, END and ERROR rows get zeros, except ``ppl`` (the stream's value
so far: on END, its final perplexity).

Params (all optional): backend ("auto" | "numpy" | "wgpu"; env NEURALPIPE_COMPUTE_BACKEND),
allow_cpu_adapter (false), adapter (a device-name substring), hilbert_order (8), repetition
{ngram 4, window 64, threshold 0.5, action "mark" | "cancel"}, probes {count K (0: off), vectors,
table "hashed" (rows 4096, dim 64) or a GGUF file path (its token_embd), seed 0, window 32}.

The backend is chosen at start (stages.compute.backends.open_kernels; docs/compute.md). A kernel
that fails on the GPU is run again in numpy for that batch (counted in ``fallbacks``):
no batch is lost. The input record is released only after its output is committed. Per-stream
running state (perplexity sums, the repetition window) is in memory: after a restart of this
worker a stream's running values start again from its next token.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np

from engine.requests import RequestClient, RequestError, ingest_endpoint
from engine.stage import Stage, WorkerContext
from shm.batch import ExtraColumn, Kind, TokenBatch, batch_size, write_batch
from stages.compute import kernels
from stages.compute.backends import open_kernels
from stages.compute.probes import probe_table
from stages.compute.shaders import MAX_PROBES

_TOKEN = int(Kind.TOKEN)
_MAX_STREAMS = 65536  # per-stream state kept (least recently seen dropped)
BASE_COLUMNS = (
    ExtraColumn("hilbert", "f4", 2),
    ExtraColumn("conf", "f4"),
    ExtraColumn("rgba", "u1", 4),
    ExtraColumn("entropy", "f4"),
    ExtraColumn("ppl", "f4"),
    ExtraColumn("rep", "f4"),
    ExtraColumn("repflag", "u1"),
)


class _StreamState:
    __slots__ = ("fired", "flags", "history", "nll", "probes", "seen", "tokens")

    def __init__(self) -> None:
        self.nll = 0.0  # sum of -logprob over tokens with one
        self.tokens = 0  # tokens with a logprob
        self.history = np.zeros(0, dtype=np.uint32)  # the last window + ngram - 1 token ids
        self.flags = np.zeros(0, dtype=np.uint8)  # match flags of the last window tokens
        self.fired = False
        self.seen = 0  # tokens of the stream so far
        self.probes = np.zeros((0, 0), dtype=np.float32)  # probe cosines of the last probe window tokens


def _window_mean(history: np.ndarray, values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``values`` (a stream's next rows, 1-D or [rows, k]) averaged with the ones before
    it over the last ``window`` rows (fewer at the stream's start), and the history to keep: its
    last ``window`` rows. ``history`` is what the previous call returned (empty at first)."""
    joined = np.concatenate([history.reshape(-1, *values.shape[1:]), values]) if len(history) else values
    sums = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(joined, axis=0, dtype=np.float64)])
    ends = np.arange(len(joined) - len(values), len(joined)) + 1  # rows up to and including each value
    counts = np.minimum(ends, window).reshape(-1, *[1] * (values.ndim - 1))
    means = (sums[ends] - sums[np.maximum(ends - window, 0)]) / counts
    return means.astype(np.float32), joined[-window:]


class Compute(Stage):
    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        p = ctx.params
        self.inp, self.out = ctx.inputs[0], ctx.outputs[0]
        self.order = int(p.get("hilbert_order", 8))
        if not 1 <= self.order <= kernels.MAX_ORDER:
            raise ValueError(f"compute param hilbert_order must be in 1..{kernels.MAX_ORDER} (got {self.order})")
        rep = p.get("repetition", {})
        self.ngram, self.window = int(rep.get("ngram", 4)), int(rep.get("window", 64))
        self.threshold = float(rep.get("threshold", 0.5))
        self.action = rep.get("action", "mark")
        if self.action not in ("mark", "cancel"):
            raise ValueError(f"compute param repetition.action must be mark or cancel (got {self.action!r})")
        probes = p.get("probes", {})
        self.table, self.probe_vectors = probe_table(probes) if int(probes.get("count", 0)) else (None, None)
        self.columns = BASE_COLUMNS + (
            (ExtraColumn("probe", "f4", len(self.probe_vectors)),) if self.table is not None else ()
        )
        if self.table is not None and not 0 < len(self.probe_vectors) <= MAX_PROBES:
            raise ValueError(f"compute param probes: {len(self.probe_vectors)} probe vectors, 1..{MAX_PROBES} allowed")
        self.probe_window = int(probes.get("window", 32))
        if self.ngram < 1 or self.window < 1 or self.probe_window < 1:
            raise ValueError("compute params repetition.ngram, repetition.window and probes.window must be >= 1")
        self.kernels, self.choice = open_kernels(p, ctx.log)
        self.streams: OrderedDict[int, _StreamState] = OrderedDict()
        self.counts = {"batches": 0, "tokens": 0, "repetitions": 0, "cancels": 0, "cancel_errors": 0}
        self.busy_ns = 0
        self.requests: RequestClient | None = None

    # ---- the duty cycle -------------------------------------------------------------------

    def do_work(self) -> int:
        inp, out = self.inp, self.out
        moved = 0
        while moved < 64:
            record = inp.try_read()
            if record is None:
                break
            record_type, view = record
            began = time.perf_counter_ns()
            batch = TokenBatch.decode(view)
            values = self.compute(batch)
            text_bytes = len(batch.text)
            target = out.try_claim(batch_size(batch.rows, text_bytes, self.columns))
            if target is None:
                inp.unread()
                break
            columns = write_batch(target, batch.rows, text_bytes, self.columns)
            for name in ("stream_id", "seq", "recv_ns", "token_id", "logprob", "text_end", "kind", "text"):
                getattr(columns, name)[:] = getattr(batch, name)
            for name, array in values.items():
                columns.extra[name][:] = array
            del columns, batch
            view.release()
            target.release()
            out.commit(record_type)
            self.busy_ns += time.perf_counter_ns() - began
            moved += 1
        inp.release()  # after the outputs are committed: a compute killed at any point loses nothing
        return moved

    def compute(self, batch) -> dict[str, np.ndarray]:
        """The appended columns of ``batch`` (all rows; non-token rows zero but for ppl)."""
        n = batch.rows
        tokens = np.flatnonzero(batch.kind == _TOKEN)
        ids, lps = batch.token_id[tokens], batch.logprob[tokens]
        values = {c.name: np.zeros((n, c.width) if c.width > 1 else n, dtype="<" + c.dtype) for c in self.columns}
        if len(tokens):
            layout = self.kernels.run("layout", {"token_id": ids, "logprob": lps}, {"order": self.order})
            for name in ("hilbert", "conf", "rgba"):
                values[name][tokens] = layout[name]
            values["entropy"][tokens] = self.kernels.run("entropy", {"toplp": lps[:, None]}, {"k": 1})["entropy"]
            if self.table is not None:
                rows, dim = self.table.shape
                inputs = {"token_id": ids, "table": self.table, "probes": self.probe_vectors}
                params = {"rows": rows, "dim": dim, "k": len(self.probe_vectors)}
                values["probe"][tokens] = self.kernels.run("probes", inputs, params)["cosine"]
        self._per_stream(batch, values)
        self.counts["batches"] += 1
        self.counts["tokens"] += len(tokens)
        return values

    # ---- running values per stream --------------------------------------------------------

    def _per_stream(self, batch, values: dict[str, np.ndarray]) -> None:
        order = np.argsort(batch.stream_id, kind="stable")
        bounds = np.flatnonzero(np.diff(batch.stream_id[order])) + 1
        for rows in np.split(order, bounds):
            if len(rows):
                self._stream_rows(int(batch.stream_id[rows[0]]), rows, batch, values)

    def _stream_rows(self, sid: int, rows: np.ndarray, batch, values: dict[str, np.ndarray]) -> None:
        state = self._state(sid)
        kinds = batch.kind[rows]
        tokens = rows[kinds == _TOKEN]
        if len(tokens):
            lps = batch.logprob[tokens].astype(np.float64)
            has = ~np.isnan(lps)
            nll = np.cumsum(np.where(has, -lps, 0.0)) + state.nll
            count = np.cumsum(has) + state.tokens
            values["ppl"][tokens] = np.exp(np.divide(nll, count, out=np.zeros_like(nll), where=count > 0))
            state.nll, state.tokens = float(nll[-1]), int(count[-1])
            self._repetition(sid, state, batch.token_id[tokens], tokens, values)
            if self.table is not None:  # each probe's moving average over the stream's last tokens
                values["probe"][tokens], state.probes = _window_mean(
                    state.probes, values["probe"][tokens], self.probe_window
                )
        last_ppl = np.exp(state.nll / state.tokens) if state.tokens else 0.0
        values["ppl"][rows[kinds != _TOKEN]] = last_ppl
        if (kinds == Kind.END).any() or (kinds == Kind.ERROR).any():
            self.streams.pop(sid, None)

    def _repetition(self, sid: int, state: _StreamState, ids: np.ndarray, rows: np.ndarray, values) -> None:
        joined = np.concatenate([state.history, ids.astype(np.uint32)])
        query = np.arange(len(state.history), len(joined))
        # where the stream's first id is in ``joined`` (0: it began before the kept history)
        first = np.full(len(ids), max(len(state.history) - state.seen, 0), dtype=np.uint32)
        inputs = {"ids": joined, "query": query, "first": first}
        flags = self.kernels.run("repetition", inputs, {"ngram": self.ngram, "window": self.window})["match"]
        # the share of matches among each token's last ``window`` tokens
        share, state.flags = _window_mean(state.flags, flags.astype(np.uint8), self.window)
        values["rep"][rows] = share
        fired = share >= self.threshold
        values["repflag"][rows] = fired
        state.history = joined[-(self.window + self.ngram - 1) :]
        state.seen += len(ids)
        if fired.any() and not state.fired:
            state.fired = True
            self.counts["repetitions"] += 1
            self.ctx.log.warning("repetition_loop", stream_id=sid, share=round(float(share.max()), 3))
            if self.action == "cancel":
                self._cancel(sid)

    def _cancel(self, sid: int) -> None:
        """Ask ingest to cancel the stream at its upstream; a failure is logged, never fatal."""
        try:
            if self.requests is None:
                self.requests = RequestClient(ingest_endpoint(self.ctx.runtime_dir), timeout_s=0.2)
            self.requests.cancel(sid)
            self.counts["cancels"] += 1
        except (RequestError, TimeoutError, OSError) as exc:
            self.counts["cancel_errors"] += 1
            self.ctx.log.warning("repetition_cancel_failed", stream_id=sid, error=str(exc))

    def _state(self, sid: int) -> _StreamState:
        state = self.streams.get(sid)
        if state is None:
            state = self.streams[sid] = _StreamState()
            if len(self.streams) > _MAX_STREAMS:
                self.streams.popitem(last=False)
        else:
            self.streams.move_to_end(sid)
        return state

    # ---- hooks ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if not hasattr(self, "counts"):
            return {}
        per_batch = self.busy_ns / self.counts["batches"] / 1e3 if self.counts["batches"] else 0.0
        return {**self.counts, **self.kernels.stats(), **self.choice, "busy_us_per_batch": round(per_batch, 1)}

    def close(self) -> None:
        if getattr(self, "requests", None) is not None:
            self.requests.close()
