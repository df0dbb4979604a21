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
table "hashed" (rows 4096, dim 64) or a GGUF file path (its token_embd), seed 0, window 32},
coalesce_rows (256: records waiting together are computed and written as one, up to this many rows).

The backend is chosen at start (stages.compute.backends.open_kernels; docs/compute.md). A kernel
that fails on the GPU is run again in numpy for that batch (counted in ``fallbacks``):
no batch is lost. The input record is released only after its output is committed. Per-stream
running state (perplexity sums, the repetition window) is in memory: after a restart of this
worker a stream's running values start again from its next token.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from engine.requests import RequestClient, RequestError, ingest_endpoint
from engine.stage import Stage, WorkerContext
from shm.batch import COLUMNS_OFFSET, BatchColumns, ExtraColumn, Kind, TokenBatch, batch_size, write_batch
from stages.compute import kernels
from stages.compute.backends import open_kernels
from stages.compute.probes import probe_table
from stages.compute.shaders import MAX_PROBES

_TOKEN, _END, _ERROR = int(Kind.TOKEN), int(Kind.END), int(Kind.ERROR)
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


class StreamStates:
    """Per-stream running state as dense arrays indexed by a slot per stream (at most ``_MAX_STREAMS``,
    the least recently seen dropped first), so that a batch's streams are updated with a few numpy
    calls whatever their number. Histories are right-aligned: a stream's latest value is in the last
    column; columns before its first token are zero."""

    def __init__(self, history: int, flags: int, probes: int, k: int) -> None:
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.batches = 0  # batches seen: the clock of ``last_seen``
        self.last_seen = np.zeros(0, dtype=np.int64)  # per slot, for dropping the least recently seen
        self.running = np.zeros((0, 3))  # sum of -logprob, tokens with one, tokens seen
        self.fired = np.zeros(0, dtype=bool)
        self.history = np.zeros((0, history), dtype=np.uint32)  # the last window + ngram - 1 token ids
        self.flags = np.zeros((0, flags), dtype=np.uint8)  # match flags of the last window tokens
        self.probes = np.zeros((0, probes, k), dtype=np.float32)  # probe cosines of the last probe window tokens

    def slots(self, sids: list[int]) -> np.ndarray:
        """The slot of each stream (all distinct), a fresh (zeroed) one for a stream not seen before."""
        found = [self.slot_of.get(sid) for sid in sids]
        if None in found:
            fresh = [self._take(sid) for sid, slot in zip(sids, found, strict=True) if slot is None]
            found = [self.slot_of[sid] for sid in sids]
            for array in (self.running, self.fired, self.history, self.flags, self.probes):
                array[fresh] = 0
        slots = np.array(found, dtype=np.intp)
        self.batches += 1
        self.last_seen[slots] = self.batches
        return slots

    def drop(self, sids: list[int]) -> None:
        for sid in sids:
            self.free.append(self.slot_of.pop(sid))

    def __len__(self) -> int:
        return len(self.slot_of)

    def _take(self, sid: int) -> int:
        if not self.free:
            if len(self.last_seen) < _MAX_STREAMS:
                self._grow(min(max(2 * len(self.last_seen), 64), _MAX_STREAMS))
            else:  # full: the least recently seen stream gives its slot up (only ever when full)
                slot = int(np.argmin(self.last_seen))
                del self.slot_of[next(s for s, at in self.slot_of.items() if at == slot)]
                self.free.append(slot)
        slot = self.slot_of[sid] = self.free.pop()
        self.last_seen[slot] = self.batches + 1  # not the least recent while this batch takes slots
        return slot

    def _grow(self, capacity: int) -> None:
        def grown(array: np.ndarray) -> np.ndarray:
            bigger = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
            bigger[: len(array)] = array
            return bigger

        old = len(self.last_seen)
        self.last_seen, self.running, self.fired = grown(self.last_seen), grown(self.running), grown(self.fired)
        self.history, self.flags, self.probes = grown(self.history), grown(self.flags), grown(self.probes)
        self.free.extend(range(capacity - 1, old - 1, -1))


def extend(history: np.ndarray, slots: np.ndarray, group: np.ndarray, at: np.ndarray, counts: np.ndarray, values):
    """Each group's history row (``history[slots]``, right-aligned, ``w`` columns) with its new
    ``values`` appended: value ``i`` goes to row ``group[i]``, column ``w + at[i]``; the rows are
    ``w + counts.max()`` long, ``counts`` values per group. The last ``w`` columns of each group's
    part are written back as its history."""
    width, tail = history.shape[1], history.shape[2:]
    joined = np.zeros((len(slots), width + int(counts.max()), *tail), dtype=history.dtype)
    joined[:, :width] = history[slots]
    joined[group, width + at] = values
    # windows[g, c] is joined[g, c : c + w]: a strided view (no index arrays to build)
    row, step = joined.strides[:2]
    windows = np.ndarray((len(slots), joined.shape[1] - width + 1, *history.shape[1:]), joined.dtype, joined, 0,
                         (row, step, step, *joined.strides[2:]))  # fmt: skip
    history[slots] = windows[np.arange(len(slots)), counts]
    return joined


def window_mean(joined: np.ndarray, group: np.ndarray, at: np.ndarray, position: np.ndarray, window: int):
    """The mean of each value of :func:`extend`'s ``joined`` (a ``window``-column history) with the
    ones before it in its stream, over the last ``window`` (fewer at the stream's start: ``position``
    is the value's index in its stream)."""
    sums = np.cumsum(joined, axis=1, dtype=np.float64)
    counts = np.minimum(position + 1, window).reshape(-1, *[1] * (joined.ndim - 2))
    return ((sums[group, window + at] - sums[group, at]) / counts).astype(np.float32)


class Compute(Stage):
    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        p = ctx.params
        self.inp, self.out = ctx.inputs[0], ctx.outputs[0]
        self.order = int(p.get("hilbert_order", 8))
        self.coalesce_rows = int(p.get("coalesce_rows", 256))
        if self.coalesce_rows < 1:
            raise ValueError(f"compute param coalesce_rows must be >= 1 (got {self.coalesce_rows})")
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
        # the curve's lookup table (~10 ms for order 8) is built now, not on the first stream's tokens
        self.kernels.run("layout", {"token_id": np.zeros(1, np.uint32), "logprob": np.zeros(1, np.float32)},
                         {"order": self.order})  # fmt: skip
        k = len(self.probe_vectors) if self.table is not None else 0
        self.streams = StreamStates(self.window + self.ngram - 1, self.window, self.probe_window if k else 0, k)
        self.counts = {"batches": 0, "tokens": 0, "repetitions": 0, "cancels": 0, "cancel_errors": 0}
        self.busy_ns = 0
        self.requests: RequestClient | None = None

    # ---- the duty cycle -------------------------------------------------------------------

    def do_work(self) -> int:
        moved = 0
        while moved < 64:
            group = self._read_group()
            records = len(group)
            if not records or not self._write_group(group):
                break
            moved += records
        return moved

    def _read_group(self) -> list[tuple[int, memoryview, BatchColumns]]:
        """The records waiting in the input, up to ``coalesce_rows`` rows together: under load one
        computation and one output record cover several small batches (the per-batch cost of the
        kernels is mostly fixed), and a record that comes alone goes on alone, at once."""
        group: list[tuple[int, memoryview, BatchColumns]] = []
        rows = 0
        while True:
            record = self.inp.try_read()
            if record is None:
                return group
            record_type, view = record
            batch = TokenBatch.decode(view)
            if group and (rows + batch.rows > self.coalesce_rows or record_type != group[0][0]):
                del batch, view  # not view.release(): a message transport hands the same view back
                self.inp.unread()
                return group
            group.append((record_type, view, batch))
            rows += batch.rows
            if rows >= self.coalesce_rows:
                return group

    def _write_group(self, group: list[tuple[int, memoryview, BatchColumns]]) -> bool:
        """Compute ``group`` into one output record; False (the group pushed back) when the output is full."""
        began = time.perf_counter_ns()
        record_type, view, first = group[0]
        merged = first if len(group) == 1 else _Merged([batch for _, _, batch in group])
        text_bytes = len(merged.text)
        # claimed before computing: a batch that waits for room must not advance the running state twice
        target = self.out.try_claim(batch_size(merged.rows, text_bytes, self.columns))
        if target is None:
            del merged, first, view
            group.clear()
            self.inp.rewind()  # every record of the group comes again (earlier groups are released)
            return False
        columns = write_batch(target, merged.rows, text_bytes, self.columns)
        if len(group) == 1:
            base = slice(COLUMNS_OFFSET, batch_size(merged.rows, text_bytes))
            target[base] = view[base]  # the base columns and text: the same layout in both records
        else:
            for name in _BASE_NAMES:
                getattr(columns, name)[:] = getattr(merged, name)
        self.compute(merged, columns.extra)
        del columns, merged, first
        group.clear()
        target.release()
        self.out.commit(record_type)
        self.inp.release()  # after the output is committed: a compute killed at any point loses nothing
        self.busy_ns += time.perf_counter_ns() - began
        return True

    def compute(self, batch: BatchColumns, values: dict[str, np.ndarray]) -> None:
        """Fill ``values`` (each appended column, every row) for ``batch``: START, END and ERROR rows
        zero but for ``ppl``."""
        tokens = np.flatnonzero(batch.kind == _TOKEN)
        every = len(tokens) == batch.rows  # the usual batch, token rows only: no gathers or zeroing
        if not every:
            for column in values.values():
                column[:] = 0
        if len(tokens):
            ids = batch.token_id if every else batch.token_id[tokens]
            lps = batch.logprob if every else batch.logprob[tokens]
            per_token = self.kernels.run("layout", {"token_id": ids, "logprob": lps}, {"order": self.order})
            per_token["entropy"] = self.kernels.run("entropy", {"toplp": lps[:, None]}, {"k": 1})["entropy"]
            if self.table is not None:
                rows, dim = self.table.shape
                inputs = {"token_id": ids, "table": self.table, "probes": self.probe_vectors}
                params = {"rows": rows, "dim": dim, "k": len(self.probe_vectors)}
                per_token["probe"] = self.kernels.run("probes", inputs, params)["cosine"]
            for name, column in per_token.items():
                values[name][slice(None) if every else tokens] = column
        self._per_stream(batch, values, every)
        self.counts["batches"] += 1
        self.counts["tokens"] += len(tokens)

    # ---- running values per stream --------------------------------------------------------

    def _per_stream(self, batch: BatchColumns, values: dict[str, np.ndarray], every: bool) -> None:
        """``ppl`` of every row, and ``rep``, ``repflag`` and the windowed ``probe`` means of the
        token rows (``every`` row one), for all the batch's streams at once: rows grouped by stream
        (a stable sort keeps each stream's order), running sums continued from each stream's state."""
        n = batch.rows
        order = np.argsort(batch.stream_id, kind="stable")
        sid = batch.stream_id[order]
        opens = np.empty(n, dtype=bool)
        opens[:1] = True
        np.not_equal(sid[1:], sid[:-1], out=opens[1:])
        starts = np.flatnonzero(opens)
        group = np.cumsum(opens) - 1  # each sorted row's stream: 0 .. streams - 1
        sids = sid[starts]
        slots = self.streams.slots(sids.tolist())
        # running sums of -logprob, of tokens with a logprob and of tokens, from each stream's state
        kind = batch.kind[order]
        lp = batch.logprob[order].astype(np.float64)
        counted = ~np.isnan(lp)
        if not every:
            counted &= kind == _TOKEN
        steps = np.empty((n, 3))
        steps[:, 0] = np.where(counted, -lp, 0.0)
        steps[:, 1] = counted
        steps[:, 2] = True if every else kind == _TOKEN
        sums = np.cumsum(steps, axis=0)
        before = self.streams.running[slots]
        sums += (before - sums[starts] + steps[starts])[group]
        self.streams.running[slots] = before + np.add.reduceat(steps, starts)
        ppl = np.zeros(n, dtype=np.float32)
        some = sums[:, 1] > 0
        ppl[some] = np.exp(sums[some, 0] / sums[some, 1])
        values["ppl"][order] = ppl  # each row's value so far in its stream: on END, the final perplexity
        tokens = slice(None) if every else np.flatnonzero(steps[:, 2])
        position = sums[tokens, 2].astype(np.intp) - 1  # each token's index in its stream
        if len(position):
            seen = before[:, 2].astype(np.intp)  # each stream's tokens before this batch
            counts = self.streams.running[slots, 2].astype(np.intp) - seen
            self._token_streams(batch, values, order[tokens], group[tokens], position, seen, counts, slots, sids)
        if not every:
            ended = np.flatnonzero((kind == _END) | (kind == _ERROR))
            if len(ended):  # a stream's state goes with its END or ERROR row
                self.streams.drop(np.unique(sid[ended]).tolist())

    def _token_streams(self, batch, values, rows, group, position, seen, counts, slots, sids) -> None:
        """The windowed columns of the token ``rows`` (batch rows in stream order; ``group`` the
        stream of each, ``position`` its index in the stream; ``seen`` and ``counts`` per stream:
        tokens before this batch and in it)."""
        at = position - seen[group]  # each token's index among its stream's tokens in this batch
        streams = self.streams
        joined = extend(streams.history, slots, group, at, counts, batch.token_id[rows])
        # one repetition call for the batch: every stream's row of ids, its history then its new tokens
        kept, width = streams.history.shape[1], joined.shape[1]
        row_at = np.arange(len(slots)) * width
        query = (row_at[group] + kept + at).astype(np.uint32)
        first = (row_at + np.maximum(kept - seen, 0))[group].astype(np.uint32)  # 0: began before the history
        inputs = {"ids": joined.ravel(), "query": query, "first": first}
        match = self.kernels.run("repetition", inputs, {"ngram": self.ngram, "window": self.window})["match"]
        flags = extend(streams.flags, slots, group, at, counts, match)
        share = window_mean(flags, group, at, position, self.window)
        fired = share >= self.threshold
        values["rep"][rows] = share
        values["repflag"][rows] = fired
        if self.table is not None:  # each probe's moving average over the stream's last tokens
            cosines = extend(streams.probes, slots, group, at, counts, values["probe"][rows])
            values["probe"][rows] = window_mean(cosines, group, at, position, self.probe_window)
        if fired.any():
            hit = np.zeros(len(slots), dtype=bool)
            hit[group[fired]] = True
            for g in np.flatnonzero(hit & ~streams.fired[slots]).tolist():
                streams.fired[slots[g]] = True
                self._fired(int(sids[g]), float(share[group == g].max()))

    def _fired(self, sid: int, share: float) -> None:
        """A stream's flag fired for the first time."""
        self.counts["repetitions"] += 1
        self.ctx.log.warning("repetition_loop", stream_id=sid, share=round(share, 3))
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

    # ---- hooks ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if not hasattr(self, "counts"):
            return {}
        per_batch = self.busy_ns / self.counts["batches"] / 1e3 if self.counts["batches"] else 0.0
        return {**self.counts, **self.kernels.stats(), **self.choice, "busy_us_per_batch": round(per_batch, 1)}

    def close(self) -> None:
        if getattr(self, "requests", None) is not None:
            self.requests.close()


_BASE_NAMES = ("stream_id", "seq", "recv_ns", "token_id", "logprob", "kind", "text_end", "text")


class _Merged:
    """The base columns of several batches, one after another (what :meth:`Compute.compute`
    reads of a batch)."""

    def __init__(self, batches: list[BatchColumns]) -> None:
        for name in ("stream_id", "seq", "recv_ns", "token_id", "logprob", "kind", "text"):
            setattr(self, name, np.concatenate([getattr(b, name) for b in batches]))
        offsets = np.cumsum([0] + [len(b.text) for b in batches[:-1]], dtype=np.uint32)
        self.text_end = np.concatenate([b.text_end + offset for b, offset in zip(batches, offsets, strict=True)])
        self.rows = len(self.kind)
