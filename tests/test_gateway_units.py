"""The gateway's pure parts: a stream whose rows do not follow on ends in an error (never a shorter
text that looks whole), /health's answer, the prompt-token estimate, and chunks that are valid JSON."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from types import SimpleNamespace

import numpy as np

from engine.clients.consumer import RESYNC_S
from engine.clients.requests_async import Submitted
from engine.protocol import wire
from stages.gateway import follower as follower_module
from stages.gateway.budget import Budget
from stages.gateway.completions import Ask, Choice, Choices, Completions
from stages.gateway.follower import PINNED_BATCHES, BroadcastFollower, Inbox
from stages.gateway.health import health_body
from stages.gateway.shapes import Shaper, Usage, estimate_prompt_tokens


def tokens(sid: int, first: int, texts: list[str], last: int | None = None) -> wire.Message:
    last = first + len(texts) - 1 if last is None else last
    columns = {"seq": np.arange(first, first + len(texts), dtype=np.uint64)}
    return wire.Message("tokens", sid, (first, last), wire.header("tokens", sid, first, last, "json"), columns, texts)


def follow(*messages: wire.Message) -> list[wire.Message]:
    async def run() -> list[wire.Message]:
        inbox = Inbox()
        for message in messages:
            inbox.put(message)
        return [m for _, m in Choices(inbox, [Choice(Submitted(7, "t"), inbox, Shaper(True, "m", False), 0)]).take()]

    return asyncio.run(run())


def test_rows_that_do_not_follow_on_end_the_stream_with_an_error():
    start = wire.event_message(wire.START, 7, 0, '{"model": "m", "cached": true}', 0)
    whole = follow(start, tokens(7, 1, ["a", "b"]), tokens(7, 3, ["c"]))
    assert [m.type for m in whole] == ["start", "tokens", "tokens"]
    # a message that starts past the next seq (rows lost before it)
    late = follow(start, tokens(7, 2, ["b"]))
    assert late[-1].type == "error" and late[-1].header["reason"].startswith("lost: rows of stream 7 from seq 1")
    # rows missing inside one message: seqs 1..5 but two texts (the batch's rows of a stream with a hole)
    holed = follow(start, tokens(7, 1, ["a", "e"], last=5), tokens(7, 6, ["f"]))
    assert [m.type for m in holed] == ["start", "error"]  # ended: what follows is not delivered
    assert follow(tokens(7, 3, ["x"]))[0].type == "error"  # no start: rows 0..2 lost


def test_health_is_503_unless_the_engine_runs_and_the_gateway_follows():
    running = {"state": "running", "pas": {"score": 0.97}}
    assert health_body(running, True)[0] == 200 and health_body(running, True)[1]["pas"] == {"score": 0.97}
    for status, following, reason in (
        (None, True, "the supervisor did not answer"),
        ({"state": "starting"}, True, "the engine is starting"),
        (running, False, "the gateway is not following the broadcast yet"),
    ):
        code, body = health_body(status, following)
        assert (code, body["ready"], body["reason"]) == (503, False, reason)


def test_the_prompt_estimate_counts_characters_and_chat_framing():
    assert estimate_prompt_tokens(False, {"prompt": "abcdefgh"}) == 2
    chat = {
        "messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": [{"type": "text", "text": "abcde"}]},
        ]
    }
    assert estimate_prompt_tokens(True, chat) == 3 + (3 + 1) + (3 + 2)


def test_chunks_are_json_with_one_id_and_usage_only_when_asked():
    for chat in (True, False):
        shaper = Shaper(chat, "m", include_usage=True)
        chunks = [shaper.role(), shaper.content("hi"), shaper.finish("stop"), shaper.usage_chunk(Usage(3, 1, True))]
        parsed = [json.loads(c.removeprefix(b"data: ")) for c in chunks if c]
        assert len({p["id"] for p in parsed}) == 1 and all("usage" in p for p in parsed)
        assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["total_tokens"] == 4
        assert parsed[-1]["usage"]["neuralpipe"] == {"prompt_tokens_estimated": True}
        assert "usage" not in json.loads(Shaper(chat, "m", include_usage=False).content("x")[6:])


def test_a_plain_token_chunk_is_the_bytes_the_general_shape_gives():
    for chat in (True, False):
        for usage in (True, False):
            for model in ("m", "\0", 'a"\0'):
                shaper = Shaper(chat, model, usage)
                for text in ("hi", "", '\0"\n', "é😀"):
                    general = shaper.content(text, extension={})[:-2].replace(b',"neuralpipe":{}', b"") + b"\n\n"
                    assert shaper.content(text) == general
                    assert json.loads(shaper.content(text)[6:])["choices"][0]["finish_reason"] is None
                    if chat:  # a piece of thinking, its text twice
                        assert shaper.reasoning(text) == shaper._chunk(shaper._reasoning_choice(text))
                        delta = json.loads(shaper.reasoning(text)[6:])["choices"][0]["delta"]
                        assert delta == {"reasoning_content": text, "reasoning": text}


def _batch(rows: list[tuple[int, int, int, str]], at: int = 0) -> list[bytes]:
    """The binary frames of a batch (record ``at``) of (stream, seq, kind, text) rows with one appended column."""
    sids, seqs, kinds, texts = zip(*rows, strict=True)
    n = len(rows)
    columns = {
        "stream_id": np.array(sids, np.uint64),
        "seq": np.array(seqs, np.uint64),
        "kind": np.array(kinds, np.uint8),
        "token_id": np.arange(n, dtype=np.uint32),
        "logprob": np.linspace(-1, 0, n, dtype=np.float32),
        "recv_ns": np.arange(n, dtype=np.int64),
        "entropy": np.arange(n, dtype=np.float32),
    }
    return list(wire.encode_batch(wire.Batch(1, at, at + 1, columns, wire.Texts.from_list(list(texts))), "binary"))


def test_routing_gives_each_stream_the_messages_the_wire_split_makes(tmp_path):
    start, end = '{"model": "m", "cached": true}', '{"finish_reason": "stop", "usage": null}'
    T = wire.TOKEN
    rows = [(5, 0, wire.START, start), (6, 3, T, "x"), (5, 1, T, "a"), (6, 4, T, "y"), (5, 2, T, "b")]
    rows += [(5, 3, wire.END, end), (7, 0, T, "z"), (6, 5, T, "w")]
    # a reasoning model's thinking, a tool call's pieces: runs of their own kinds, alone or mixed
    piece = '{"index":0,"function":{"arguments":"{}"}}'
    rows += [(8, 4, wire.REASONING, "hm"), (9, 2, wire.TOOL_CALL, piece), (8, 5, wire.REASONING, " so")]
    rows += [(10, 7, wire.REASONING, "ok"), (10, 8, T, "Yes"), (9, 3, wire.TOOL_CALL, piece)]
    frames = _batch(rows)
    expected: dict[int, list[wire.Message]] = {}
    for message in wire.decode(frames).stream_messages():
        expected.setdefault(message.stream, []).append(message)

    async def run() -> dict[int, list]:
        follower = BroadcastFollower(str(tmp_path))
        try:
            follower.core.feed([b"", b'{"type":"batches_end","first":0,"next":0,"epoch":1}', b""], False)
            inboxes = {sid: follower.register(sid) for sid in (5, 6, 8, 9, 10)}
            follower.core.feed(frames, True)
            follower._deliver()
            return {sid: list(inbox.messages) for sid, inbox in inboxes.items()}
        finally:
            await follower.close()

    routed = asyncio.run(run())
    assert [type(m).__name__ for sid in (8, 9) for m in routed[sid]] == ["Tokens", "Tokens"]  # no split
    assert [m.type for m in routed[10]] == ["reasoning", "tokens"]
    for sid, messages in routed.items():
        assert [(m.type, m.seq, m.text if m.type in wire.TOKEN_TYPES else None) for m in messages] == [
            (m.type, m.seq, m.text if m.type in wire.TOKEN_TYPES else None) for m in expected[sid]
        ]
        for got, want in zip(messages, expected[sid], strict=True):
            assert got.header == want.header
            assert got.columns.keys() == want.columns.keys()
            assert all(np.array_equal(got.columns[k], want.columns[k]) for k in want.columns)


def test_a_failure_in_reading_or_routing_is_kept_for_the_gateway_to_fail_on(tmp_path):
    """A bug in reading or routing (a listener that raises, the consumer's timers) was logged by the
    event loop and that read's rows dropped, or ended the follower's ticker silently: every stream
    would then wait for rows never routed. Now the follower keeps it and the gateway fails on it,
    so the supervisor restarts the gateway (stages/gateway/stage.py)."""

    async def run() -> tuple:
        follower = BroadcastFollower(str(tmp_path))
        follower.start()
        try:
            failures = []

            def broken(*_):
                raise ValueError("a bug in routing")

            follower._deliver = broken
            follower._readable()  # as the sockets' readers call it: nothing escapes to the loop
            failures.append(follower.failure)
            follower.failure = None
            follower.core.tick = broken
            await asyncio.sleep(RESYNC_S / 2)  # a tick or two
            failures.append(follower.failure)
            return failures, follower._ticker.done()
        finally:
            await follower.close()

    failures, ticker_ended = asyncio.run(run())
    assert [repr(f) for f in failures] == [repr(ValueError("a bug in routing"))] * 2
    assert not ticker_ended  # the ticker goes on


def test_an_inbox_past_its_row_bound_drops_what_it_holds_takes_no_more_and_says_so_once():
    async def run() -> tuple:
        inbox, overflows, backlog = Inbox(), [], Budget(1 << 20, "max_total_backlog")
        inbox.bound(4, backlog, lambda: overflows.append(inbox.rows))
        inbox.put(tokens(7, 0, ["a", "b"]))
        inbox.put(tokens(7, 2, ["c", "d"]))
        within = (inbox.rows, backlog.total, len(inbox.take()), inbox.rows, backlog.total)  # taking empties the counts
        inbox.put(tokens(7, 4, ["e", "f", "g"]))
        inbox.put(tokens(7, 7, ["h", "i"]))  # 5 rows waiting: past the bound
        inbox.put(tokens(7, 9, ["j"]))
        return within, overflows, inbox.overflowed, list(inbox.messages), await inbox.wait(5.0), backlog.total

    within, overflows, overflowed, held, woke, left = asyncio.run(run())
    assert within == (4, 4, 2, 0, 0)
    assert overflows == [0] and held == [] and woke  # a wait ends at once
    assert overflowed == "max_stream_backlog" and left == 0


def test_past_the_gateways_total_backlog_the_stream_furthest_behind_is_cut():
    """Each request's backlog was bounded, the sum of them not: a thousand slow clients could
    hold a thousand max_stream_backlogs. Past max_total_backlog the inbox holding the most
    overflows (its client is the furthest behind), as if past its own bound."""

    async def run() -> tuple:
        backlog, cut = Budget(10, "max_total_backlog"), []
        a, b, c = Inbox(), Inbox(), Inbox()
        for name, inbox in zip("abc", (a, b, c), strict=True):
            inbox.bound(100, backlog, lambda name=name: cut.append(name))
        a.put(tokens(1, 0, ["x"] * 4))
        b.put(tokens(2, 0, ["x"] * 3))
        c.put(tokens(3, 0, ["x"] * 2))
        within = (backlog.total, list(cut))
        waiting = asyncio.ensure_future(a.wait(5.0))
        await asyncio.sleep(0)
        b.put(tokens(2, 3, ["x"] * 2))  # 11 waiting: b holds the most (5)
        first = (backlog.total, list(cut), b.overflowed, b.rows)
        c.take()  # read: no longer counted
        a.put(tokens(1, 4, ["x"] * 7))  # a alone: 11
        second = (backlog.total, list(cut), a.overflowed, await waiting)
        c.put(tokens(3, 2, ["x"]))
        c.close()  # the request ended: what it held is no longer counted, nor is it cut later
        return within, first, second, backlog.total, backlog.held

    within, first, second, left, bound = asyncio.run(run())
    assert within == (9, [])
    assert first == (6, ["b"], "max_total_backlog", 0)
    assert second == (0, ["b", "a"], "max_total_backlog", True)  # a's wait ends at once
    assert left == 0 and not bound


def test_a_run_of_tokens_waiting_for_a_slow_client_keeps_only_its_own_rows(tmp_path):
    """A run of a stream's tokens kept its batch, every stream's rows of one record: a client
    reading slower than its stream kept alive every batch routed while it was behind (measured
    ~5.8 KB per waiting token with 50 streams and 20 top logprobs, against its own ~0.3 KB).
    Now a waiting run lets go of its batch, keeping a copy of its own columns only when the
    request reads them (the first PINNED_BATCHES aside)."""
    streams, batches = 50, 3 * PINNED_BATCHES
    frames = [
        _batch([(s, 2 * i + j, wire.TOKEN, f"{s}.{i}.{j}") for s in range(1, streams + 1) for j in (0, 1)], i)
        for i in range(batches)
    ]
    expected = {sid: [wire.decode(f).take(np.array([2 * (sid - 1), 2 * sid - 1])) for f in frames] for sid in (1, 2)}

    async def run() -> tuple:
        follower = BroadcastFollower(str(tmp_path))
        try:
            alive: list[weakref.ref] = []
            follower.listeners.add(lambda batch: alive.append(weakref.ref(batch)))
            follower.core.feed([b"", b'{"type":"batches_end","first":0,"next":0,"epoch":1}', b""], False)
            plain, with_logprobs = Inbox(), Inbox()
            plain.wants_columns = False
            follower.register(1, plain)
            follower.register(2, with_logprobs)
            for frame in frames:
                follower.core.feed(frame, True)
                follower._deliver()
            gc.collect()
            return sum(ref() is not None for ref in alive), list(plain.messages), list(with_logprobs.messages)
        finally:
            await follower.close()

    kept_alive, plain, with_logprobs = asyncio.run(run())
    assert kept_alive <= PINNED_BATCHES  # the first runs of the request that reads columns
    for messages, want in ((plain, expected[1]), (with_logprobs, expected[2])):
        assert [m.text for m in messages] == [batch.texts for batch in want]
        assert [m.header for m in messages] == [wire.header("tokens", m.stream, *m.seq, "binary") for m in messages]
    for got, want in zip(with_logprobs, expected[2], strict=True):
        assert all(np.array_equal(got.columns[k], want.columns[k]) for k in got.columns)
        assert got.columns.keys() == want.columns.keys() - {"stream_id", "kind"}


def test_a_wait_ends_at_its_own_timeout_and_a_direct_delivery_restarts_it():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        inbox = Inbox()
        began = loop.time()
        assert not await inbox.wait(0.3)  # arms the timer at +0.3
        assert not await inbox.wait(0.05)  # a shorter wait is not held to the longer timer
        assert loop.time() - began < 0.3 + 0.2
        taken: list = []
        loop.call_later(0.1, inbox.put, tokens(7, 1, ["a"]))  # taken at once: the wait goes on
        began = loop.time()
        assert not await inbox.wait(0.2, lambda m: taken.append(m) or True)
        assert len(taken) == 1 and loop.time() - began >= 0.3 - 0.02 and not inbox.messages
        loop.call_later(0.05, inbox.put, tokens(7, 2, ["b"]))  # refused: queued and the wait ends
        assert await inbox.wait(5.0, lambda m: False)
        assert [m.seq for m in inbox.messages] == [(2, 2)]
        inbox.close()

    asyncio.run(run())


class _Transport:
    def __init__(self, buffered: int = 0, closing: bool = False) -> None:
        self.buffered, self.closing, self.written = buffered, closing, []

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


class _Response:
    """What the direct write uses of an aiohttp StreamResponse: its ``write`` coroutine, which
    writes the bytes (framing them) and then waits only to drain a full socket."""

    def __init__(self, drain: asyncio.Future | None = None) -> None:
        self.written: list[bytes] = []
        self.drain = drain  # aiohttp's one drain waiter per connection, while the socket is full

    async def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.drain is not None:
            await self.drain  # a drain: it waits


class _Lease:
    def __init__(self) -> None:
        self.delivered = 0

    def tokens(self, n: int) -> None:
        self.delivered += n


def test_tokens_go_straight_to_the_socket_only_when_they_follow_on_and_the_client_keeps_up():
    def attempt(transport: _Transport, message: wire.Message, response: _Response | None = None):
        completions = Completions(None, None, None, None, 10.0, 120.0, 1 << 20, 65536, 1 << 20, 1 << 30)
        request, response = SimpleNamespace(transport=transport), response or _Response()
        choice, lease = Choice(Submitted(7, "t"), None, Shaper(True, "m", False), 0), _Lease()
        choice.follow.next_seq = 3
        ask = Ask(True, True, "m", {})
        done = completions._write_now(request, response, ask, choice, lease, message)
        stream, state = choice.follow, choice.state
        return done, stream.next_seq, state.tokens, lease.delivered, choice.shaper.content("ab"), response.written

    done, next_seq, counted, delivered, chunk, written = attempt(_Transport(), tokens(7, 3, ["a", "b"]))
    assert (done, next_seq, counted, delivered) == (True, 5, 2, 2)
    assert written == [chunk]  # through aiohttp's own write: its framing, its byte counts

    # a write that would wait to drain all the same: its bytes are out, the wait is dropped, and
    # the stream's task can still wait on the drain (it raised "await wasn't used with future")
    async def dropped_drain() -> tuple:
        drain = asyncio.get_running_loop().create_future()
        done, *_, chunk, written = attempt(_Transport(), tokens(7, 3, ["a", "b"]), _Response(drain))
        task_write = asyncio.ensure_future(_Response(drain).write(b"next"))
        await asyncio.sleep(0)
        drain.set_result(None)
        await task_write
        return done, chunk, written

    done, chunk, written = asyncio.run(dropped_drain())
    assert done and written == [chunk]
    # left to the stream's task (queued, nothing written): a client behind on reading, one gone,
    # rows that do not follow on, anything but tokens
    for transport, message in (
        (_Transport(buffered=1 << 17), tokens(7, 3, ["a"])),
        (_Transport(closing=True), tokens(7, 3, ["a"])),
        (_Transport(), tokens(7, 4, ["a"])),
        (_Transport(), tokens(7, 3, ["a", "c"], last=5)),
        (_Transport(), wire.event_message(wire.END, 7, 3, '{"finish_reason": "stop"}', 0)),
    ):
        done, next_seq, counted, delivered, _, written = attempt(transport, message)
        assert (done, next_seq, counted, delivered) == (False, 3, 0, 0) and not written


def test_rows_kept_for_unregistered_streams_are_bounded_in_bytes(tmp_path):
    """While submits are in flight the follower keeps the rows of streams that start meanwhile
    (one of them may be the submitted one). Under a steady stream of submits some is always in
    flight, so other clients' streams were kept up to ten seconds, bounded in streams and messages
    but not in bytes: an upstream sending tokens of 64 KiB could make the gateway hold gigabytes.
    The oldest streams kept go first once their rows pass ORPHAN_BYTES; the newest stay."""
    S, T = wire.START, wire.TOKEN
    start = '{"model": "m", "cached": false}'
    big = "x" * 60_000
    batches = [_batch([(100 + i, 0, S, start), *[(100 + i, 1 + k, T, big) for k in range(8)]], i) for i in range(40)]

    async def run() -> tuple:
        follower = BroadcastFollower(str(tmp_path))
        try:
            follower.core.feed([b"", b'{"type":"batches_end","first":0,"next":0,"epoch":1}', b""], False)
            with follower.expecting_one():
                for frames in batches:
                    follower.core.feed(frames, True)
                    follower._deliver()
                kept = sorted(follower.orphans)
                held = sum(len(t) for entry in follower.orphans.values() for m in entry.messages for t in m.text)
                counted = follower.orphan_bytes
                # a stream with a row larger than all may hold goes whole; the others stay
                follower.core.feed(_batch([(200, 0, S, start), (200, 1, T, "y" * (9 << 20))], 40), True)
                follower._deliver()
                assert sorted(follower.orphans) == kept and follower.orphan_bytes == counted
                inbox = follower.register(139)  # the newest: its rows are all there
            return kept, held, counted, follower.counts["orphans_dropped"], [(m.type, m.seq) for m in inbox.messages]
        finally:
            await follower.close()

    kept, held, counted, dropped, handed = asyncio.run(run())
    assert held <= counted <= follower_module.ORPHAN_BYTES < 40 * 8 * 60_000
    assert dropped > 1 and kept == list(range(140 - len(kept), 140))
    assert handed == [("start", (0, 0)), ("tokens", (1, 8))]


def test_while_a_submit_is_in_flight_only_streams_that_start_meanwhile_are_kept(tmp_path):
    """Rows can come before a submit's accepted reply is read, so the follower keeps rows of
    unregistered streams while a submit is in flight. It kept every such stream's rows, also those
    of streams that began before the submit (other clients of the engine): each batch split and
    kept for ten seconds, ~430 µs of the gateway's CPU per 64-row batch instead of ~30. Only a
    stream whose start row comes meanwhile can be the one submitted, and once no submit is in flight
    nothing kept can be (they were kept up to ten seconds after)."""
    T, S = wire.TOKEN, wire.START
    start = '{"model": "m", "cached": false}'
    before = [_batch([(s, 1, T, "old") for s in range(20, 40)], 0)]  # streams that began earlier
    during = [
        _batch([(7, 0, S, start), (8, 0, S, start), *[(s, 2, T, "old") for s in range(20, 40)]], 1),  # 7 is ours
        _batch([(7, 1, T, "a"), (8, 1, T, "b"), *[(s, 3, T, "old") for s in range(20, 40)]], 2),
    ]

    async def run() -> tuple:
        follower = BroadcastFollower(str(tmp_path))
        try:
            follower.core.feed([b"", b'{"type":"batches_end","first":0,"next":0,"epoch":1}', b""], False)
            follower.core.feed(before[0], True)
            follower._deliver()
            with follower.expecting_one():
                for frames in during:
                    follower.core.feed(frames, True)
                    follower._deliver()
                kept = sorted(follower.orphans)
                inbox = follower.register(7)
            # no submit in flight: whatever is still kept is another client's (each submit's
            # stream was registered before its reply's wait ended)
            return kept, [(m.type, m.seq) for m in inbox.messages], dict(follower.orphans)
        finally:
            await follower.close()

    kept, handed, left = asyncio.run(run())
    assert kept == [7, 8]
    assert handed == [("start", (0, 0)), ("tokens", (1, 1))]
    assert left == {}
