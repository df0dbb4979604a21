"""Top logprobs end to end (issue 15): the embedded upstream's alternatives, the ring's ``top``
column (shm.batch), compute's entropy from them, the gateway's OpenAI shapes."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid

import numpy as np
import openai
import orjson
import pytest
from aiohttp import web
from gateway_harness import GatewayEngine, default_topology
from test_compute_stage import Rig, _drain
from test_compute_stage import stream_rows as compute_stream_rows

from engine.protocol.rows import End, Start, end_text, start_text
from shm.batch import (
    MAX_TOP_LOGPROBS,
    MAX_TOP_TEXT,
    BatchError,
    ExtraColumn,
    Kind,
    TokenBatch,
    batch_size,
    encode_texts,
    encode_tops,
    top_alternatives,
    top_logprobs,
    top_rows,
    write_batch,
)
from shm.ring import RecordTooLarge
from stages.cache.collect import Collector
from stages.cache.replay import Replay
from stages.ingest import corpus
from stages.ingest.upstream_server import UpstreamServer, UpstreamServerConfig


def test_upstream_alternatives_are_a_distribution() -> None:
    """The embedded upstream's top logprobs of a position leave a non-negative rest of the mass:
    the alternatives of a real model's softmax never sum above probability 1."""
    for seed in range(200):
        key = corpus.request_key("m", f"prompt {seed}", None)
        sample = corpus.sample(key, 8)
        for i, (token, logprob) in enumerate(zip(sample.tokens, sample.logprobs, strict=True)):
            top = corpus.top_logprobs(key, i, token, logprob, 20)
            assert top[0] == (token, logprob)
            assert sum(math.exp(lp) for _, lp in top) <= 1.0 + 1e-5, (seed, i, top)
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert top[:3] == corpus.top_logprobs(key, i, token, logprob, 3)  # more only appends


def _roundtrip(tops: list) -> np.ndarray:
    rows = top_rows(tops)
    column = rows.column
    buf = memoryview(bytearray(batch_size(len(tops), 0, (column,))))
    encode_tops(write_batch(buf, len(tops), 0, (column,)).extra["top"], rows)
    return TokenBatch.decode(buf).extra["top"]


def test_top_column_round_trip_and_caps() -> None:
    tops = [
        (("a", -0.1), ("bé", -2.5)),
        None,
        tuple((f"t{j}", -float(j)) for j in range(10_000)),  # a hostile upstream's 10,000 alternatives
        (("x" * 1000, -1.0), ("\u20ac" * 200, float("nan"))),  # oversized texts, a NaN logprob
    ]
    column = _roundtrip(tops)
    assert top_alternatives(column, 0) == (("a", pytest.approx(-0.1)), ("bé", -2.5))
    assert top_alternatives(column, 1) == ()
    assert len(top_alternatives(column, 2)) == MAX_TOP_LOGPROBS
    long_text, euro = top_alternatives(column, 3)
    assert long_text[0] == "x" * MAX_TOP_TEXT
    assert len(euro[0].encode()) <= MAX_TOP_TEXT and set(euro[0]) == {"\u20ac"}  # cut at a character
    assert math.isnan(euro[1])
    lps = top_logprobs(column)
    assert lps.shape == (4, MAX_TOP_LOGPROBS) and np.isnan(lps[1]).all()


def test_top_column_with_a_lying_header_is_refused() -> None:
    column = np.array(_roundtrip([(("a", -0.1),)]))
    column[0, 0] = 7  # K no longer matches the width
    with pytest.raises(BatchError, match="top column"):
        top_logprobs(column)


def _record(kinds: list[int], seqs: list[int], texts: list[bytes], tops: list | None = None):
    """A decoded batch of stream 7 with compute's ``conf`` column and, given ``tops``, a ``top`` one."""
    rows = top_rows(tops) if tops else None
    extra = (ExtraColumn("conf", "f4"),) + ((rows.column,) if rows else ())
    size = sum(map(len, texts))
    buf = memoryview(bytearray(batch_size(len(kinds), size, extra)))
    columns = write_batch(buf, len(kinds), size, extra)
    columns.stream_id[:], columns.seq[:], columns.kind[:], columns.logprob[:] = 7, seqs, kinds, -0.5
    encode_texts(columns, texts)
    if rows:
        encode_tops(columns.extra["top"], rows)
    return TokenBatch.decode(buf)


def test_the_cache_stores_a_stream_whose_records_carry_top_columns_of_different_widths() -> None:
    """The START record has no ``top`` column and the token records have it at different widths (K
    and S are per record): the stream is stored whole, one ``top`` column over all its rows. Before,
    the collector gave it up as incomplete."""
    collector = Collector(1 << 20)
    collector.observe(_record([1], [0], [start_text(Start("m", False, "ab"))]), 16)
    collector.observe(_record([2, 2], [1, 2], [b"a", b"b"], [(("a", -0.25),), (("b", -0.5), ("bb", -3.0))]), 16)
    collector.observe(_record([2], [3], [b"c"], [(("c" * 40, -0.75),)]), 16)
    finished = collector.observe(_record([3], [4], [end_text(End("stop", None))]), 16)
    assert collector.counts["collected"] == 1, collector.counts
    ((_, stored),) = finished
    columns = dict((column.name, array) for column, array in stored.extras)
    assert set(columns) == {"conf", "top"}
    alternatives = [top_alternatives(columns["top"], i) for i in range(stored.rows)]
    assert alternatives == [(), (("a", -0.25),), (("b", -0.5), ("bb", -3.0)), (("c" * 40, -0.75),), ()]


def test_a_replay_of_wide_top_columns_keeps_to_the_ring_record_limit() -> None:
    """20 alternatives of 255 bytes make a row of over 5 KB: a replay of 64 rows at a time would
    claim a record larger than the ring takes (RecordTooLarge ended the replay before)."""
    collector = Collector(1 << 22)
    collector.observe(_record([1], [0], [start_text(Start("m", False, "ab"))]), 16)
    wide = tuple((f"{j:03d}" + "w" * 250, -1.0 - j) for j in range(MAX_TOP_LOGPROBS))
    collector.observe(_record([2] * 30, list(range(1, 31)), [b"t"] * 30, [wide] * 30), 16)
    ((key, stored),) = collector.observe(_record([3], [31], [end_text(End("stop", None))]), 16)

    class Out:  # a producer that refuses records over its max_record, as a ring does
        max_record = 64 * 1024

        def __init__(self) -> None:
            self.rows = 0

        def try_claim(self, n: int) -> memoryview:
            if n > self.max_record:
                raise RecordTooLarge(f"record of {n} bytes")
            self.raw = bytearray(n)
            return memoryview(self.raw)

        def commit(self, record_type: int) -> None:
            batch = TokenBatch.decode(memoryview(self.raw))
            assert top_alternatives(batch.extra["top"], batch.rows - 1) in (wide, ())
            self.rows += batch.rows

    out = Out()
    replay = Replay(9, stored, key, paced=False, now_ns=0)
    while not replay.done:
        assert replay.write(out, batch_rows=64, now_ns=1) > 0
    assert out.rows == 32


# ---- end to end: the official client, a real engine, upstreams on a thread of the test process ------

MODEL = "good"
HOSTILE_TOKENS = ("one ", "two ", "three")


def _hostile_top(model: str, token: str) -> object:
    if model == "many":  # thousands of alternatives: the ring carries 20 at most
        return [{"token": f"a{j}", "logprob": -1.0 - j / 1000} for j in range(6000)]
    if model == "flood":  # 10,000 alternatives: an event of ~400 KB, over ingest's bound on one event
        return [{"token": f"alternative {j}", "logprob": -1.0 - j / 1000} for j in range(10_000)]
    if model == "badtype":  # a number where an alternative object belongs
        return [3, 4]
    # "odd": a string and an infinite-looking logprob, a positive one, a 1,000-byte text
    return [
        {"token": token, "logprob": "NaN"},
        {"token": "x" * 1000, "logprob": 5.0},
        {"token": "z", "logprob": -1e308},
    ]


async def _hostile_chat(request):
    body = await request.json()
    model = body["model"]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for token in HOSTILE_TOKENS:
        entry = {
            "token": token,
            "logprob": -0.5,
            "bytes": list(token.encode()),
            "top_logprobs": _hostile_top(model, token),
        }
        choice = {"index": 0, "delta": {"content": token}, "logprobs": {"content": [entry]}, "finish_reason": None}
        await resp.write(
            b"data: " + orjson.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"
        )
    done = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    await resp.write(b"data: " + orjson.dumps({"id": "x", "choices": [done]}) + b"\n\ndata: [DONE]\n\n")
    return resp


async def _no_models(_request):
    return web.json_response({"object": "list", "data": []})


class _Upstreams:
    """The embedded upstream's server and a hostile one, on one event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.good = UpstreamServer(UpstreamServerConfig(models=(MODEL,)))
        self.good_url = self._run(self.good.start())
        self.hostile_url, self.runner = self._run(self._hostile())

    async def _hostile(self):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", _hostile_chat)
        app.router.add_get("/v1/models", _no_models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return "http://{}:{}".format(*runner.addresses[0][:2]), runner

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self._run(self.good.stop())
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    ups = _Upstreams()
    hostile = '["many", "flood", "badtype", "odd"]'
    entries = f'\n[[upstreams]]\nname = "good"\nbase_url = "{ups.good_url}"\nmodels = ["good"]\n' + (
        f'\n[[upstreams]]\nname = "hostile"\nbase_url = "{ups.hostile_url}"\nmodels = {hostile}\n'
    )
    config = default_topology(ingest='params.pool = { mid_stream = "error", retries = 0 }') + entries
    engine = GatewayEngine(tmp_path_factory.mktemp("toplp"), config, "t" + uuid.uuid4().hex[:10])
    try:
        engine.start()
        yield engine, ups
    finally:
        engine.stop()
        ups.close()


def _ask(text: str, model: str = MODEL, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 10, **fields}


def _entropy(logprobs: list[float]) -> float:
    """docs/compute.md's formula, in f32 as compute takes it: the listed outcomes and the rest of the mass."""
    p = np.exp(np.minimum(np.array(logprobs, dtype=np.float32), np.float32(0)))
    rest = max(np.float32(1) - p.sum(dtype=np.float32), np.float32(0))
    return float(-(p * np.log(np.where(p > 0, p, 1))).sum() - (rest * math.log(rest) if rest > 0 else 0.0))


def test_top_logprobs_pass_through_and_entropy(rig):
    engine, ups = rig
    with (
        openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30) as client,
        openai.OpenAI(base_url=ups.good_url + "/v1", api_key="unused", max_retries=0, timeout=30) as direct,
    ):
        body = _ask("three alternatives", logprobs=True, top_logprobs=3)
        upstream = direct.chat.completions.create(**body).choices[0].logprobs.content
        whole = client.chat.completions.create(**body, extra_body={"neuralpipe": {"columns": ["entropy"]}})
        got = whole.choices[0].logprobs.content
        assert [e.token for e in got] == [e.token for e in upstream] and len(got) == 10
        for mine, theirs in zip(got, upstream, strict=True):
            assert len(mine.top_logprobs) == 3
            assert [t.token for t in mine.top_logprobs] == [t.token for t in theirs.top_logprobs]
            assert [t.logprob for t in mine.top_logprobs] == pytest.approx([t.logprob for t in theirs.top_logprobs])
            assert all(bytes(t.bytes).decode() == t.token for t in mine.top_logprobs)
        entropy = whole.choices[0].model_extra["neuralpipe"]["columns"]["entropy"]
        for value, entry in zip(entropy, upstream, strict=True):
            assert value == pytest.approx(_entropy([t.logprob for t in entry.top_logprobs]), abs=1e-5)
            assert value > _entropy([entry.logprob]) + 1e-4  # not the lower bound from the chosen token alone

        streamed = [
            c.choices[0].logprobs.content
            for c in client.chat.completions.create(**_ask("streamed", logprobs=True, top_logprobs=2), stream=True)
            if c.choices and c.choices[0].logprobs
        ]
        entries = [e for content in streamed for e in content]
        assert len(entries) == 10 and all(len(e.top_logprobs) == 2 for e in entries)
        assert all(e.top_logprobs[0].token == e.token for e in entries)  # the embedded upstream lists the chosen first

        own_only = client.chat.completions.create(**_ask("own only", logprobs=True))
        assert all(e.top_logprobs == [] for e in own_only.choices[0].logprobs.content)

        legacy = client.completions.create(model=MODEL, prompt="legacy", max_tokens=5, logprobs=2)
        lp = legacy.choices[0].logprobs
        assert len(lp.top_logprobs) == 5 and all(len(top) == 2 for top in lp.top_logprobs)
        assert all(lp.tokens[i] in lp.top_logprobs[i] for i in range(5))

        legacy_streamed = list(
            client.completions.create(model=MODEL, prompt="legacy", max_tokens=5, logprobs=1, stream=True)
        )
        tops = [
            t
            for c in legacy_streamed
            if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.top_logprobs
        ]
        assert len(tops) == 5 and all(len(t) == 1 for t in tops)


def test_a_repeated_deterministic_request_gets_the_same_alternatives(rig):
    """The cache stores a stream with top logprobs and replays its ``top`` column: the repeat is a
    hit with the same alternatives."""
    engine, _ = rig
    with openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30) as client:
        body = _ask("repeat me", logprobs=True, top_logprobs=3, temperature=0)
        answers = [client.chat.completions.with_raw_response.create(**body) for _ in range(2)]
        tops = [
            [[(t.token, t.logprob) for t in e.top_logprobs] for e in a.parse().choices[0].logprobs.content]
            for a in answers
        ]
        assert tops[0] == tops[1] and all(len(t) == 3 for t in tops[0])
        assert [a.headers["x-neuralpipe-cache"] for a in answers] == ["miss", "hit"]


def test_top_logprobs_without_logprobs_is_a_400(rig):
    engine, _ = rig
    with (
        openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30) as client,
        pytest.raises(openai.BadRequestError, match="top_logprobs"),
    ):
        client.chat.completions.create(**_ask("no logprobs", top_logprobs=2))


def test_a_hostile_upstreams_top_logprobs_are_capped_or_a_stream_error(rig):
    engine, _ = rig
    with openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=30) as client:
        many = client.chat.completions.create(**_ask("many", "many", logprobs=True, top_logprobs=20))
        content = many.choices[0].logprobs.content
        assert [e.token for e in content] == list(HOSTILE_TOKENS)
        assert all(len(e.top_logprobs) == 20 for e in content)  # 6,000 sent, 20 carried
        assert content[0].top_logprobs[19].logprob == pytest.approx(-1.019)

        odd = client.chat.completions.create(
            **_ask("odd", "odd", logprobs=True, top_logprobs=3), extra_body={"neuralpipe": {"columns": ["entropy"]}}
        )
        first = odd.choices[0].logprobs.content[0].top_logprobs
        assert first[0].logprob == -9999.0  # a logprob that is not a number: unknown, as OpenAI writes it
        assert len(first[1].token.encode()) == 255 and first[1].logprob == 5.0
        entropy = odd.choices[0].model_extra["neuralpipe"]["columns"]["entropy"]
        assert all(math.isfinite(h) and h >= 0 for h in entropy)

        with pytest.raises(openai.APIError, match="upstream sent a line longer than 262144 "):
            client.chat.completions.create(**_ask("flood", "flood", logprobs=True, top_logprobs=20))

        with pytest.raises(openai.APIError, match="malformed chunk"):
            list(
                client.chat.completions.create(**_ask("badtype", "badtype", logprobs=True, top_logprobs=2), stream=True)
            )

        workers = engine.status()["workers"]
        assert all(w.get("restarts", 0) == 0 for w in workers), [(w["name"], w.get("restarts")) for w in workers]


# ---- compute: the top column passed on, the entropy from it (the stage between two real rings) ----


def _send_with_tops(rig: Rig, rows: list[tuple], tops: list) -> None:
    """One record of (stream, seq, kind, token_id, logprob, text) rows with a ``top`` column."""
    texts = [r[5] for r in rows]
    top = top_rows(tops)
    view = rig.source.try_claim(batch_size(len(rows), sum(map(len, texts)), (top.column,)))
    cols = write_batch(view, len(rows), sum(map(len, texts)), (top.column,))
    for i, name in enumerate(("stream_id", "seq", "kind", "token_id", "logprob")):
        getattr(cols, name)[:] = [r[i] for r in rows]
    cols.recv_ns[:] = 7
    encode_texts(cols, texts)
    encode_tops(cols.extra["top"], top)
    del cols
    view.release()
    rig.source.commit(16)


@pytest.fixture
def compute_rig(instance, tmp_path):
    rigs: list[Rig] = []

    def make(out_capacity: int = 1 << 20, **params) -> Rig:
        rigs.append(Rig(f"{instance}{len(rigs)}", tmp_path, params, out_capacity))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def _alternatives(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [tuple((f"alt{j}", float(-rng.exponential(1.0) - j)) for j in range(3)) for _ in range(n)]


def test_compute_passes_the_top_column_on_and_takes_the_entropy_from_it(compute_rig):
    r = compute_rig(backend="numpy", coalesce_rows=256)
    plain = compute_stream_rows(1, [1, 2, 3], [-0.5] * 3)
    topped = compute_stream_rows(2, [4, 5, 6], [-0.5] * 3)
    tops = [None, *_alternatives(3, 1), None]  # START and END rows have none
    r.send(plain[:2])
    _send_with_tops(r, topped, tops)
    r.send(plain[2:])
    assert r.stage.do_work() == 3
    out = r.receive()
    assert len(out) == 3  # the record with top logprobs was not coalesced with the others
    assert "top" not in out[0] and "top" not in out[2]
    sent = top_rows(tops)
    want = np.zeros((5, sent.column.width), dtype=np.uint8)
    encode_tops(want, sent)
    np.testing.assert_array_equal(out[1]["top"], want)  # passed on unchanged
    for i in (1, 2, 3):
        assert out[1]["entropy"][i] == pytest.approx(_entropy([lp for _, lp in tops[i]]), abs=1e-6)
    assert out[1]["entropy"][[0, 4]].tolist() == [0, 0]
    assert out[0]["entropy"][1] == pytest.approx(_entropy([-0.5]), abs=1e-6)  # the lower bound without tops


def test_a_split_record_carries_each_pieces_top_rows(compute_rig):
    big, small = compute_rig(backend="numpy"), compute_rig(out_capacity=1 << 16, backend="numpy")
    rows = [(3, i + 1, Kind.TOKEN, i, -0.7, b"x" * 1000) for i in range(64)]
    tops = _alternatives(64, 2)
    _send_with_tops(big, rows, tops)
    _send_with_tops(small, rows, tops)
    want, got = _drain(big), _drain(small)
    assert len(want) == 1 and len(got) >= 4
    np.testing.assert_array_equal(np.concatenate([b["top"] for b in got]), want[0]["top"])
    np.testing.assert_array_equal(np.concatenate([b["entropy"] for b in got]), want[0]["entropy"])
    assert want[0]["entropy"][0] == pytest.approx(_entropy([lp for _, lp in tops[0]]), abs=1e-6)


def test_with_probes_on_the_top_column_is_dropped_but_the_entropy_uses_it(compute_rig):
    r = compute_rig(backend="numpy", probes={"count": 2, "dim": 8, "rows": 64})
    tops = [None, *_alternatives(2, 3), None]
    _send_with_tops(r, compute_stream_rows(5, [1, 2], [-0.5] * 2), tops)
    r.stage.do_work()
    (batch,) = r.receive()
    assert "top" not in batch and "probe" in batch and r.stage.counts["top_dropped"] == 1
    assert batch["entropy"][1] == pytest.approx(_entropy([lp for _, lp in tops[1]]), abs=1e-6)
