"""The START and END row texts (engine/protocol/rows.py): what a writer puts in, a reader gets back, and a
bad text reads as the defaults instead of stopping the reader."""

from __future__ import annotations

import pytest

from engine.protocol.rows import End, Start, end_text, read_end, read_start, start_text


def test_round_trip() -> None:
    start = Start("qwen2.5-7b", cached=True, cache_key="ab" * 16)
    assert read_start(start_text(start)) == start
    end = End("stop", {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    assert read_end(end_text(end)) == end


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"model": 7, "cache_key": 3, "usage": "x"}',
    ],
)
def test_a_bad_text_reads_as_the_defaults(text: bytes) -> None:
    start, end = read_start(text), read_end(text)
    assert start.cache_key is None and start.cached is False
    assert end == End(None, None)
