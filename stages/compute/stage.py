"""Compute: runs the kernels over each batch and writes it on with their columns appended.

Columns (docs/compute.md): ``hilbert`` f4 x 2 (cell centre on the Hilbert curve, in [0, 1]),
``conf`` f4 (exp(logprob), 1 without one), ``rgba`` u1 x 4, ``entropy`` f4 (nats: over the top
logprobs and the rest of the mass when the record carries them, else a lower bound from the chosen
token's probability alone), ``ppl`` f4 (the stream's
running perplexity), ``rep`` f4 (share of the stream's last ``window`` tokens whose n-gram had
occurred within the window before), ``repflag`` u1 (rep >= threshold), and with probes on
``probe`` f4 x K (each probe's cosine with the token's embedding, averaged over the stream's last
``probes.window`` tokens). START, END and ERROR rows get zeros, except ``ppl`` (the stream's value
so far: on END, its final perplexity). A record with top logprobs (shm.batch's ``top`` column) is
computed alone and its ``top`` column passed on unchanged (dropped, and counted, when probes leave
no directory entry for it).

Params (all optional): backend ("auto" | "numpy" | "wgpu"; env NEURALPIPE_COMPUTE_BACKEND),
allow_cpu_adapter (false), adapter (a device-name substring), hilbert_order (8), repetition
{ngram 4, window 64, threshold 0.5, action "mark" | "cancel"}, probes {count K (0: off), vectors,
table "hashed" (rows 4096, dim 64) or a GGUF file path (its token_embd), seed 0, window 32},
coalesce_rows (256: records waiting together are computed and written as one, up to this many rows),
compiled (true: the C record kernel, stages/compute/compiled.c, where it is built and applies).

The backend (stages.compute.backends.open_kernels; docs/compute.md): with ``auto`` the worker is
ready at once on numpy while a background thread looks for a wgpu adapter, adopted between
records. On the CPU a record is one call of the compiled kernel (stages/compute/compiled.c) when
it is built, ``compiled`` is on, probes are off and the curve is tabulated (order <= 10); else
numpy: the per-token kernels run fused (stages.compute.fused), records of up to
``_SMALL_RECORD`` rows have their running columns computed row by row, larger ones vectorised over
all their streams (stages.compute.streams). A kernel that fails on the GPU is run again in numpy
for that batch (counted in ``fallbacks``): no batch is lost. The input record is released only
after its output is committed. Per-stream running state (perplexity sums, the repetition window)
is in memory: after a restart of this worker a stream's running values start again from its next
token.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from engine.clients.requests import RequestClient
from engine.protocol.requests import RequestError, ingest_endpoint
from engine.stage import Stage, WorkerContext
from engine.validated import ModelRef
from shm.batch import (
    BASE_COLUMNS,
    COLUMNS_OFFSET,
    MAX_EXTRA,
    TOP_COLUMN,
    BatchColumns,
    ExtraColumn,
    Kind,
    TokenBatch,
    batch_size,
    ending_rows,
    top_logprobs,
    write_batch,
)
from stages.compute import fused, streams
from stages.compute.backends import Kernels, open_kernels
from stages.compute.probes import probe_table

try:  # built at install where a C compiler is (setup.py); the numpy path otherwise
    from stages.compute import _compiled
except ImportError:
    _compiled = None

# REASONING and TOOL_CALL rows are computed as START rows are (zeros): the columns are the reply's tokens
_TOKEN, _END, _ERROR = int(Kind.TOKEN), int(Kind.END), int(Kind.ERROR)
_SMALL_RECORD = 8  # rows up to which a record's running columns go row by row (numpy's turn from 8-12 rows)
_ROWS_AT_ONCE = 256  # rows whose running columns are computed together: bounds the state rows' free columns
SIZES_KEPT = 4096  # output record sizes remembered; texts' lengths vary without end, so the memo starts over
COLUMNS = (  # what compute appends (and ``probe`` when probes are configured)
    ExtraColumn("hilbert", "f4", 2),
    ExtraColumn("conf", "f4"),
    ExtraColumn("rgba", "u1", 4),
    ExtraColumn("entropy", "f4"),
    ExtraColumn("ppl", "f4"),
    ExtraColumn("rep", "f4"),
    ExtraColumn("repflag", "u1"),
)


class Compute(Stage):
    Params = ModelRef("stages.compute.params:ComputeParams")
    requests: RequestClient | None = None  # made on the first cancel (what close() may meet)
    kernels: Kernels | None = None  # made in start(), which close() may meet failed before it

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        p = self.parse_params(ctx.params)
        self.inp, self.out = ctx.inputs[0], ctx.outputs[0]
        self.order, self.coalesce_rows = p.hilbert_order, p.coalesce_rows
        rep = p.repetition
        self.ngram, self.window, self.threshold, self.action = rep.ngram, rep.window, rep.threshold, rep.action
        self.threshold32 = float(np.float32(self.threshold))  # the shares are f32: compared as numpy compares them
        probes = p.probes
        self.table, self.probe_vectors = probe_table(probes.model_dump()) if probes.count else (None, None)
        self.columns = COLUMNS + (
            (ExtraColumn("probe", "f4", len(self.probe_vectors)),) if self.table is not None else ()
        )
        self.probe_window = probes.window
        if not os.path.isdir(os.environ.get("XDG_RUNTIME_DIR", "")):
            # Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" on the worker's raw
            # stderr, outside the JSON log, when probing adapters; our private runtime dir will do
            os.environ["XDG_RUNTIME_DIR"] = ctx.runtime_dir
        self.kernels = open_kernels(p.model_dump(), ctx.log, os.path.join(ctx.state_dir, f"{ctx.name}.adapters.json"))
        self.curve = fused.CurveTable(self.order)  # built now (~10 ms at order 8), not on the first tokens
        k = len(self.probe_vectors) if self.table is not None else 0
        self.states = streams.StreamStates(self.window, self.ngram, self.probe_window if k else 0, k)
        # the C kernel's columns are compute's own: not the probes', nor an untabulated curve's
        applies = p.compiled and k == 0 and self.curve.xy is not None
        self.compiled = _compiled if applies else None
        self.counts = {
            "batches": 0,
            "tokens": 0,
            "repetitions": 0,
            "cancels": 0,
            "cancel_errors": 0,
            "split_records": 0,
            "top_dropped": 0,
        }
        self.split_at = 0  # rows of the input record being split that are written already
        self.busy_ns = 0
        self.sizes: dict[tuple[int, int], int] = {}  # output record bytes per (rows, text bytes)

    # ---- the duty cycle -------------------------------------------------------------------

    def do_work(self) -> int:
        if self.kernels.probe is not None:  # a wgpu adapter is being looked for: its device, once it is in
            self.kernels.adopt()
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
        rows = text = 0
        while True:
            record = self.inp.try_read()
            if record is None:
                return group
            record_type, view = record
            batch = TokenBatch.decode(view)
            if batch.extra:  # top logprobs: a record of their own (the passed column's width is the record's)
                if group:
                    del batch, view
                    self.inp.unread()
                return group or [(record_type, view, batch)]
            if group and (
                rows + batch.rows > self.coalesce_rows
                or record_type != group[0][0]
                or self._size(rows + batch.rows, text + len(batch.text)) > self.out.max_record
            ):
                del batch, view  # not view.release(): a message transport hands the same view back
                self.inp.unread()
                return group
            group.append((record_type, view, batch))
            rows += batch.rows
            text += len(batch.text)
            if rows >= self.coalesce_rows:
                return group

    def _size(self, rows: int, text_bytes: int) -> int:
        """Bytes of an output record of ``rows`` rows and ``text_bytes`` of text."""
        size = self.sizes.get((rows, text_bytes))
        if size is None:  # batch_size walks the columns: asked once per shape
            if len(self.sizes) >= SIZES_KEPT:
                self.sizes.clear()
            size = self.sizes[(rows, text_bytes)] = batch_size(rows, text_bytes, self.columns)
        return size

    def _write_group(self, group: list[tuple[int, memoryview, BatchColumns]]) -> bool:
        """Compute ``group`` into one output record; False (the group pushed back) when the output is full."""
        began = time.perf_counter_ns()
        record_type, view, first = group[0]
        if len(group) == 1:  # the usual group: no generators to sum
            rows, text_bytes = first.rows, len(first.text)
        else:
            rows = sum(batch.rows for _, _, batch in group)
            text_bytes = sum(len(batch.text) for _, _, batch in group)
        spec = self._spec(first)
        size = self._size(rows, text_bytes) if spec is self.columns else batch_size(rows, text_bytes, spec)
        if size > self.out.max_record:  # one record whose appended columns outgrow the output ring's records
            return self._write_split(record_type, first, began, spec)
        # claimed before computing: a batch that waits for room must not advance the running state twice
        target = self.out.try_claim(size)
        if target is None:
            del first, view
            group.clear()
            self.inp.rewind()  # every record of the group comes again (earlier groups are released)
            return False
        columns = write_batch(target, rows, text_bytes, spec)
        if len(group) == 1:
            base = slice(COLUMNS_OFFSET, batch_size(rows, text_bytes))
            target[base] = view[base]  # the base columns and text: the same layout in both records
            self.compute(first, columns.extra)
            if first.extra:
                self._with_top(first.kind, first.extra, columns.extra, slice(None))
        else:  # the records' rows one after the other, computed from the output record's own columns
            _concatenate([batch for _, _, batch in group], columns)
            self.compute(columns, columns.extra)
        del columns, first
        group.clear()
        target.release()
        self.out.commit(record_type)
        self.inp.release()  # after the output is committed: a compute killed at any point loses nothing
        self.busy_ns += time.perf_counter_ns() - began
        return True

    def _spec(self, batch: BatchColumns) -> tuple[ExtraColumn, ...]:
        """The output record's appended columns: compute's, and the input's ``top`` column passed on
        when the directory has room for it."""
        top = batch.extra.get(TOP_COLUMN)
        if top is None:
            return self.columns
        if len(self.columns) >= MAX_EXTRA:
            self.counts["top_dropped"] += 1
            return self.columns
        return (*self.columns, ExtraColumn(TOP_COLUMN, "u1", top.shape[1]))

    def _with_top(self, kind: np.ndarray, extra: dict, values: dict[str, np.ndarray], rows: slice) -> None:
        """Rows ``rows`` of the input's ``top`` column passed on, and the entropy of the token rows
        that have alternatives taken from them (the formula: docs/compute.md, "entropy")."""
        top = extra.get(TOP_COLUMN)
        if top is None:
            return
        top = top[rows]
        if TOP_COLUMN in values:
            values[TOP_COLUMN][:] = top
        lps = top_logprobs(top)
        listed = (kind == _TOKEN) & ~np.isnan(lps).all(axis=1)
        if listed.any():
            k = lps.shape[1]
            values["entropy"][listed] = self.kernels.run("entropy", {"toplp": lps[listed]}, {"k": k})["entropy"]

    def _write_split(
        self, record_type: int, batch: BatchColumns, began: int, spec: tuple[ExtraColumn, ...] | None = None
    ) -> bool:
        """Write one input record as several output records of consecutive rows, each within the
        output ring's max_record. Rows already written stay written when the output fills up
        (``split_at``), so a piece waiting for room never advances the running state twice; the
        input record is released after its last piece (a restart repeats the pieces written, which
        the broadcast drops by seq)."""
        spec = spec or self.columns
        size = self._size if spec is self.columns else lambda rows, text: batch_size(rows, text, spec)
        while self.split_at < batch.rows:
            start = self.split_at
            stop = start + 1
            while stop < batch.rows and size(stop + 1 - start, _text_span(batch, start, stop + 1)) <= (
                self.out.max_record
            ):
                stop += 1
            piece = _Merged(batch, start, stop)
            target = self.out.try_claim(size(piece.rows, len(piece.text)))  # RecordTooLarge: a row never fits
            if target is None:
                del piece, batch
                self.inp.rewind()
                return False
            columns = write_batch(target, piece.rows, len(piece.text), spec)
            for name in _BASE_NAMES:
                getattr(columns, name)[:] = getattr(piece, name)
            self.compute(piece, columns.extra)
            if batch.extra:
                self._with_top(piece.kind, batch.extra, columns.extra, slice(start, stop))
            del columns, piece
            target.release()
            self.out.commit(record_type)
            self.split_at = stop
            self.counts["split_records"] += 1
        del batch
        self.split_at = 0
        self.inp.release()
        self.busy_ns += time.perf_counter_ns() - began
        return True

    def compute(self, batch: BatchColumns, values: dict[str, np.ndarray]) -> None:
        """Fill ``values`` (each appended column, every row) for ``batch``: START, END and ERROR rows
        zero but for ``ppl``."""
        kind = batch.kind
        count = kind.tobytes().count(_TOKEN)  # one C loop: no temporary array for the usual all-token batch
        # with a wgpu device, only a record too small to be worth a device call stays on the CPU
        if self.compiled is not None and (self.kernels.device is None or batch.rows <= _SMALL_RECORD):
            self._compiled_record(batch, values, count == batch.rows)
        else:
            self._numpy_record(batch, values, count)
        self.counts["batches"] += 1
        self.counts["tokens"] += count
        self.ctx.telemetry.observe_since_ns("neuralpipe_stage_latency_seconds", batch.recv_ns, stage="compute")

    def _compiled_record(self, batch: BatchColumns, values: dict[str, np.ndarray], every: bool) -> None:
        """:meth:`compute` in one call of the C kernel: the values of :meth:`_row_by_row` and
        :func:`fused.token_columns`, whatever the record's rows and streams."""
        state, curve = self.states, self.curve
        sids = batch.stream_id.tolist()
        slots = state.row_slots(sids)
        fired = self.compiled.record(
            batch.kind, slots, batch.token_id, batch.logprob,
            state.running, state.origin, state.keys, state.flags, state.fired, curve.xy, curve.base,
            values["hilbert"], values["conf"], values["rgba"], values["entropy"],
            values["ppl"], values["rep"], values["repflag"],
            batch.rows, state.width, int(curve.mask), self.ngram, self.window, self.threshold32,
        )  # fmt: skip
        for row in fired:
            self._fired(sids[row], float(values["rep"][row]))
        if not every:
            self._drop_ended(batch)

    def _numpy_record(self, batch: BatchColumns, values: dict[str, np.ndarray], count: int) -> None:
        """:meth:`compute` in numpy (or the per-token kernels on the wgpu device)."""
        kind = batch.kind
        every = count == batch.rows  # the usual batch, token rows only: no gathers or zeroing
        tokens = slice(None) if every else np.flatnonzero(kind == _TOKEN)
        if not every:
            for column in values.values():
                column[:] = 0
        # a paced stream's usual record: a few rows, on the CPU whatever the backend (a device call
        # costs 0.1-1 ms of submit and readback, numpy tens of µs)
        small = batch.rows <= _SMALL_RECORD and self.table is None
        if count:
            ids = batch.token_id if every else batch.token_id[tokens]
            lps = batch.logprob if every else batch.logprob[tokens]
            self._per_token(ids, lps, values, tokens, every, small or self.kernels.device is None)
        if small:
            self._row_by_row(batch, values)
        elif batch.rows <= _ROWS_AT_ONCE:
            self._per_stream(batch, values, None if every else kind == _TOKEN)
        else:  # in parts: a stream's row of the state never needs room for more tokens than a part has
            for start in range(0, batch.rows, _ROWS_AT_ONCE):
                piece = _Merged(batch, start, min(start + _ROWS_AT_ONCE, batch.rows))
                part = {name: column[start : start + piece.rows] for name, column in values.items()}
                self._per_stream(piece, part, None if every else piece.kind == _TOKEN)

    def _per_token(self, ids, lps, values: dict[str, np.ndarray], tokens, every: bool, on_cpu: bool) -> None:
        if on_cpu:  # numpy: the fused path, straight into the output columns
            out = values if every else {name: np.empty_like(values[name][: len(ids)]) for name in _TOKEN_COLUMNS}
            fused.token_columns(self.curve, ids, lps, out)
            per_token = {} if every else out
        else:
            per_token = self.kernels.run("layout", {"token_id": ids, "logprob": lps}, {"order": self.order})
            per_token["entropy"] = self.kernels.run("entropy", {"toplp": lps[:, None]}, {"k": 1})["entropy"]
        if self.table is not None:
            rows, dim = self.table.shape
            inputs = {"token_id": ids, "table": self.table, "probes": self.probe_vectors}
            params = {"rows": rows, "dim": dim, "k": len(self.probe_vectors)}
            per_token["probe"] = self.kernels.run("probes", inputs, params)["cosine"]
        for name, column in per_token.items():
            values[name][tokens] = column

    # ---- running values per stream --------------------------------------------------------

    def _per_stream(self, batch: BatchColumns, values: dict[str, np.ndarray], is_token: np.ndarray | None) -> None:
        """``ppl`` of every row, and ``rep``, ``repflag`` and the windowed ``probe`` means of the
        token rows (``is_token``; None: every row is one), for all the batch's streams at once:
        rows grouped by stream (a stable sort keeps each stream's order), running sums continued
        from each stream's state."""
        n = batch.rows
        if is_token is None:
            sids = batch.stream_id.tolist()
            if sids.count(sids[0]) == n:  # tokens of one stream (a coalesced stream, a burst)
                self._single_stream(batch, values, sids[0])
                return
            if len(set(sids)) == n:  # a token of each of n streams: a paced load's usual record
                self._distinct_streams(batch, values, sids)
                return
        order, group, starts, lasts, sids = streams.group_rows(batch.stream_id)
        slots = self.states.slots(sids)
        # running sums of -logprob, of tokens with a logprob and of tokens, from each stream's state
        lp = batch.logprob if order is None else batch.logprob[order]
        token = None if is_token is None else is_token if order is None else is_token[order]
        counted = lp == lp  # a logprob, not NaN
        if token is not None:
            counted &= token
        steps = np.zeros((n, 3))
        np.negative(lp, out=steps[:, 0], where=counted)
        steps[:, 1] = counted
        steps[:, 2] = 1 if token is None else token
        sums = np.add.accumulate(steps, axis=0)  # np.cumsum's wrapper costs more than this
        running = self.states.running
        before = running[slots]
        if order is None:
            sums += before
        else:
            sums += (before - sums[starts] + steps[starts])[group]
        running[slots] = sums[lasts]
        ppl = _perplexity(sums)
        values["ppl"][slice(None) if order is None else order] = ppl  # so far in its stream: on END, the final one
        if is_token is None or is_token.any():
            picked = None if token is None else np.flatnonzero(token)
            position = (sums[:, 2] if picked is None else sums[picked, 2]).astype(np.intp)
            position -= 1  # each token's index in its stream
            seen = before[:, 2].astype(np.intp)  # each stream's tokens before this batch
            if order is None:  # one stream, its rows in order
                rows = slice(None) if picked is None else picked
                group, counts = None, [len(position)]
            else:
                rows = order if picked is None else order[picked]
                group = group if picked is None else group[picked]
                counts = lasts - starts + 1 if picked is None else np.bincount(group, minlength=len(slots))
            at = None if group is None else position + self.states.make_room(slots, seen, counts)[group]
            self._token_streams(batch, values, rows, group, position, seen, slots, sids, counts, at)
        if is_token is not None:
            self._drop_ended(batch)

    def _drop_ended(self, batch: BatchColumns) -> None:
        """The state of the streams that end in ``batch`` (an END or ERROR row) goes."""
        ended = np.flatnonzero(ending_rows(batch.kind))
        if len(ended):
            self.states.drop(np.unique(batch.stream_id[ended]).tolist())

    def _single_stream(self, batch: BatchColumns, values: dict[str, np.ndarray], sid: int) -> None:
        """:meth:`_per_stream` of a record of token rows of one stream: scalar state, one
        cumulative sum of the logprobs (a NaN in it: a token without one, then counted apart)."""
        state, n = self.states, batch.rows
        slot = state.slot(sid)
        nll, counted, seen = state.running[slot].tolist()
        lp = batch.logprob
        taken = np.add.accumulate(lp, dtype=np.float64)
        if taken[-1] == taken[-1]:  # every token has a logprob
            count = _ORDINALS[n] + counted
        else:
            kept = lp == lp
            taken = np.add.accumulate(np.where(kept, lp, _F32_ZERO), dtype=np.float64)
            count = np.add.accumulate(kept, dtype=np.float64)
            count += counted
        sums = np.subtract(nll, taken, out=taken)  # the running sums of -logprob
        state.running[slot] = (sums[-1], count[-1], seen + n)
        _perplexity_into(sums, count, values["ppl"])
        seen = int(seen)
        position = _POSITIONS[n] + seen
        self._token_streams(batch, values, slice(None), None, position, [seen], [slot], [sid], [n])

    def _distinct_streams(self, batch: BatchColumns, values: dict[str, np.ndarray], sids: list[int]) -> None:
        """:meth:`_per_stream` of a record of token rows of as many streams: each row's state moves
        one token on, no sort and no cumulative sums."""
        state = self.states
        slots = state.slots(sids)
        sums = state.running[slots]  # per row: its stream's sum of -logprob, tokens with one, tokens
        position = sums[:, 2].astype(np.intp)  # each token's index in its stream
        lp = batch.logprob
        total = np.add.reduce(lp)
        if total == total:  # the usual record: every token has a logprob (a NaN makes the sum NaN)
            sums[:, 0] -= lp
            sums[:, 1:] += 1
            state.running[slots] = sums
            np.divide(sums[:, 0], sums[:, 1], out=sums[:, 0])  # every stream has had a logprob: no zero
            np.exp(sums[:, 0], out=values["ppl"])
        else:
            counted = lp == lp  # a logprob, not NaN
            np.subtract(sums[:, 0], lp, out=sums[:, 0], where=counted)
            sums[:, 1] += counted
            sums[:, 2] += 1
            state.running[slots] = sums
            values["ppl"][:] = _perplexity(sums)
        each, at = _POSITIONS[len(sids)], state.make_room_each(slots, position)
        self._token_streams(batch, values, slice(None), each, position, position, slots, sids, _ONES[len(sids)], at)

    def _row_by_row(self, batch: BatchColumns, values: dict[str, np.ndarray]) -> None:
        """:meth:`_per_stream` of a small record (at most ``_SMALL_RECORD`` rows), one row after
        the other in scalar arithmetic, with the same values (tests/test_compute_stage.py compares
        them): at a few rows, numpy's fixed cost per call would be most of the record's. As there,
        a stream's state goes at the end of the record that ends it."""
        state = self.states
        ngram, window = self.ngram, self.window
        grams = max(ngram - 1, 1)  # consecutive pair keys that hold an n-gram's ids
        ended = []
        kinds, sids, logprobs = batch.kind.tolist(), batch.stream_id.tolist(), batch.logprob.tolist()
        tokens = batch.token_id.tolist()
        ppl, rep, flagged = [0.0] * batch.rows, [0.0] * batch.rows, [False] * batch.rows
        for i, (kind, sid, logprob, token) in enumerate(zip(kinds, sids, logprobs, tokens, strict=True)):
            slot = state.slot(sid)
            nll, counted, position = state.running[slot].tolist()
            if kind != _TOKEN:
                ppl[i] = math.exp(nll / counted) if counted else 0.0
                if kind in (_END, _ERROR):
                    ended.append(sid)
                continue
            if logprob == logprob:  # not NaN
                nll, counted = nll - logprob, counted + 1
            state.running[slot] = (nll, counted, position + 1)
            ppl[i] = math.exp(nll / counted) if counted else 0.0
            position = int(position)  # this token's index in its stream
            at = position - int(state.origin[slot])  # its column
            if at >= state.width:  # the row is full: its last span columns to the front
                state.compact(slot, position)
                at = position - int(state.origin[slot])
            keys, flags = state.keys[slot], state.flags[slot]
            keys[at] = token | (int(keys[at - 1]) & 0xFFFFFFFF) << 32 if ngram > 1 else token
            match = False
            reach = min(window, position - (ngram - 1))  # n-grams back that lie within the stream
            if reach >= 1:  # the window's n-grams as bytes: find this one at an 8-byte boundary
                row = keys[: at + 1].tobytes()
                gram = row[8 * (at + 1 - grams) :]
                end = 8 * at
                found = row.find(gram, 8 * (at - reach + 1 - grams), end)
                while found % 8 and found >= 0:
                    found = row.find(gram, found + 1, end)
                match = found >= 0
            flags[at] = match
            total = flags[at + 1 - window : at + 1].tobytes().count(1)
            share = rep[i] = float(np.float32(total / min(position + 1, window)))
            fired = flagged[i] = share >= self.threshold32
            if fired and not state.fired[slot]:
                state.fired[slot] = True
                self._fired(sid, share)
        values["ppl"][:] = ppl
        values["rep"][:] = rep
        values["repflag"][:] = flagged
        if ended:
            self.states.drop(list(dict.fromkeys(ended)))

    def _token_streams(self, batch, values, rows, group, position, seen, slots, sids, counts, at=None) -> None:
        """The windowed columns of the token rows ``rows`` (in stream order; ``group``: each one's
        stream, None: one stream; ``position``: its index in it; ``at``: its flat index in the state,
        made room for) for the streams of ``slots`` (``seen``: tokens each had before this batch,
        ``counts``: in it)."""
        if group is None:  # one stream, its rows in order: views of its row of the state, no gathers
            total = self._one_stream(int(slots[0]), int(seen[0]), batch.token_id[rows], position)
        else:
            total = self._streams(at, batch.token_id[rows], position)
        whole = isinstance(rows, slice)  # every row: the columns are written in place
        share = values["rep"][rows] if whole else np.empty(len(position), dtype=np.float32)
        if np.minimum.reduce(position) >= self.window - 1:  # the usual case: every token has a full window behind it
            np.divide(total, self.window, out=share)
        else:
            np.divide(total, np.minimum(position + 1, self.window), out=share)
        fired = share >= self.threshold
        if not whole:
            values["rep"][rows] = share
        values["repflag"][rows] = fired
        state = self.states
        single = group is None
        some_fired = np.logical_or.reduce(fired)  # the ufunc: ndarray.any's wrapper costs more at a record's size
        if single and (self.table is not None or some_fired):  # one stream's group and state as arrays
            group, slots, seen, counts = np.zeros(len(position), dtype=np.intp), *map(np.array, (slots, seen, counts))
        if self.table is not None:  # each probe's moving average over the stream's last tokens
            tokens = streams.Tokens(rows, group, position, position - seen[group], slots, seen, counts, single)
            cosines = streams.extend(state.probes, tokens)
            streams.put(cosines, tokens, self.probe_window, slice(None), values["probe"][rows])
            streams.keep(state.probes, tokens, cosines)
            values["probe"][rows] = streams.window_mean(cosines, tokens, self.probe_window, self.probe_window)
        if some_fired and not state.fired[slots].all():  # a stream's flag fires for the first time
            hit = np.zeros(len(slots), dtype=bool)
            hit[group[fired]] = True
            for g in np.flatnonzero(hit & ~state.fired[slots]).tolist():
                state.fired[slots[g]] = True
                self._fired(int(sids[g]), float(share[group == g].max()))

    def _one_stream(self, slot: int, seen: int, ids: np.ndarray, position: np.ndarray) -> np.ndarray:
        """The match flags of one stream's ``ids`` (at ``position``, consecutive from ``seen``) written
        into its row of the state; returns each one's count of flags among the last ``window``."""
        state, n, window = self.states, len(ids), self.window
        first = state.make_room_one(slot, seen, n)  # the column of the first new token
        keys, flags = state.keys[slot], state.flags[slot]
        halves = keys.view(np.uint32)  # little-endian: [low, high] per key
        halves[2 * first : 2 * (first + n) : 2] = ids
        if self.ngram > 1:  # the id before each, in the high half
            halves[2 * first + 1 : 2 * (first + n) : 2] = halves[2 * first - 2 : 2 * (first + n - 1) : 2]
        if self.kernels.device is None:
            match = fused.pair_match_run(keys, first, position, self.ngram, window)
        else:
            span = state.span
            recent = np.ndarray((n, span + 1), np.uint64, keys, 8 * (first - span), (8, 8))
            match = self._on_device(recent, position)
        flags[first : first + n] = match
        sums = np.add.accumulate(flags[first - window : first + n], dtype=np.intp)
        return sums[window:] - sums[:n]

    def _streams(self, at: np.ndarray, ids: np.ndarray, position: np.ndarray) -> np.ndarray:
        """:meth:`_one_stream` for the tokens of several streams (``at``: each one's flat index in
        the state's keys and flags), through the state's strided views: one gather each."""
        state = self.states
        state.low[at] = ids
        if self.ngram > 1:  # the id before (written above when it is in this batch too)
            state.high[at] = state.low[at - 1]
        back = at - state.span  # the row of each token's window in the views
        recent = state.recent[back]
        if self.kernels.device is None:
            match = fused.pair_match(recent, position, self.ngram, self.window)
        else:
            match = self._on_device(recent, position)
        state.flat_flags[at] = match
        return np.add.reduce(state.flag_runs[back], axis=1)  # flags before a stream's first token are 0

    def _on_device(self, recent: np.ndarray, position: np.ndarray) -> np.ndarray:
        """The repetition kernel's match of each token from ``recent`` (its pair key last, after
        those of the span before it): each token's row of ids, ``first`` where its stream begins."""
        span = recent.shape[1] - 1
        rows = np.arange(len(recent)) * (span + 1)
        query = (rows + span).astype(np.uint32)
        first = (rows + np.maximum(span - position, 0)).astype(np.uint32)
        inputs = {"ids": recent.view(np.uint32)[:, ::2].ravel(), "query": query, "first": first}
        return self.kernels.run("repetition", inputs, {"ngram": self.ngram, "window": self.window})["match"]

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
                # as an operator: the stream belongs to the client that submitted it (docs/security.md)
                self.requests = RequestClient(ingest_endpoint(self.ctx.runtime_dir), timeout_s=0.2, operator=True)
            self.requests.cancel(sid)
            self.counts["cancels"] += 1
        except (RequestError, TimeoutError, OSError) as exc:
            self.counts["cancel_errors"] += 1
            self.ctx.log.warning("repetition_cancel_failed", stream_id=sid, error=str(exc))

    # ---- hooks ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if self.kernels.probe is not None:  # between records (heartbeats): an idle worker adopts it too
            self.kernels.adopt()
        per_batch = self.busy_ns / self.counts["batches"] / 1e3 if self.counts["batches"] else 0.0
        self.ctx.telemetry.total("neuralpipe_tokens_total", self.counts["tokens"], stage="compute")
        compiled = self.compiled is not None  # the C kernel computes the CPU's records
        return {**self.counts, **self.kernels.stats(), "compiled": compiled, "busy_us_per_batch": round(per_batch, 1)}

    def close(self) -> None:
        if self.kernels is not None:
            self.kernels.close()
        if self.requests is not None:
            self.requests.close()


def _perplexity_into(nll: np.ndarray, count: np.ndarray, out: np.ndarray) -> None:
    """``out`` = exp(``nll`` / ``count``) (``nll`` overwritten), 0 where ``count`` is 0."""
    if count[0] > 0:  # one stream's counts never fall: every row has had a logprob
        np.divide(nll, count, out=nll)
        np.exp(nll, out=out)
        return
    some = count > 0
    np.divide(nll, count, out=nll, where=some)
    np.exp(nll, out=nll, where=some)
    np.copyto(out, nll, where=some)
    out[~some] = 0


class _Ranges(dict):
    """start, start + step, .. (n values) as float64 or intp, made once per n."""

    def __init__(self, start: int, dtype: type, step: int = 1) -> None:
        super().__init__()
        self.start, self.dtype, self.step = start, dtype, step

    def __missing__(self, n: int) -> np.ndarray:
        values = self[n] = (self.start + self.step * np.arange(n)).astype(self.dtype)
        values.flags.writeable = False
        return values


_ORDINALS = _Ranges(1, np.float64)  # a token's count among a record's tokens of its stream
_POSITIONS = _Ranges(0, np.intp)
_ONES = _Ranges(1, np.intp, step=0)  # one token per stream (the distinct streams' counts)
_F32_ZERO = np.float32(0)


def _perplexity(sums: np.ndarray) -> np.ndarray:
    """exp(sum of -logprob / tokens with one) per row of running ``sums``; 0 before the first."""
    if sums[:, 1].min() > 0:  # the usual case: every row's stream has had a logprob
        ppl = sums[:, 0] / sums[:, 1]
        return np.exp(ppl, out=ppl)
    ppl = np.zeros(len(sums))
    some = sums[:, 1] > 0
    np.divide(sums[:, 0], sums[:, 1], out=ppl, where=some)
    return np.exp(ppl, out=ppl, where=some)


_TOKEN_COLUMNS = ("hilbert", "conf", "rgba", "entropy")
# the ring's base columns (shm.batch) copied as they are; text_end is rebased with the text
_COPIED = tuple(name for name, _ in BASE_COLUMNS if name != "text_end")
_BASE_NAMES = (*_COPIED, "text_end", "text")


def _text_span(batch: BatchColumns, start: int, stop: int) -> int:
    """Text bytes of rows start..stop of ``batch``."""
    return int(batch.text_end[stop - 1]) - (int(batch.text_end[start - 1]) if start else 0)


def _concatenate(batches: list[BatchColumns], out: BatchColumns) -> None:
    """The base columns and texts of ``batches``, one after another, into ``out``."""
    row = text = 0
    for batch in batches:
        stop = row + batch.rows
        for name in _COPIED:
            getattr(out, name)[row:stop] = getattr(batch, name)
        np.add(batch.text_end, text, out=out.text_end[row:stop])
        out.text[text : text + len(batch.text)] = batch.text
        row, text = stop, text + len(batch.text)


class _Merged:
    """Rows start..stop of a batch (what :meth:`Compute.compute` reads of a batch)."""

    def __init__(self, batch: BatchColumns, start: int, stop: int) -> None:
        first = int(batch.text_end[start - 1]) if start else 0
        for name in _COPIED:
            setattr(self, name, getattr(batch, name)[start:stop])
        self.text = batch.text[first : int(batch.text_end[stop - 1])]
        self.text_end = batch.text_end[start:stop] - np.uint32(first)
        self.rows = stop - start
