"""The gateway's pure parts: a stream whose rows do not follow on ends in an error (never a shorter
text that looks whole), /health's answer, the prompt-token estimate, and chunks that are valid JSON."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from engine.protocol import wire
from stages.gateway.completions import Follow
from stages.gateway.follower import Inbox
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
        return Follow(inbox, 7).take()

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
