"""engine/protocol/toolcalls.py: a tool call's pieces as the engine carries them (TOOL_CALL rows),
joined into whole calls and merged into a stream's deltas; a bad row text is skipped, never raised."""

from __future__ import annotations

import pytest

from engine.protocol.toolcalls import ToolCallJoiner, merged_pieces, piece_text, read_piece

FIRST = piece_text(0, '{"q": ', "call_1", "function", "lookup")


def test_pieces_join_into_the_calls_and_merge_into_one_delta_per_call():
    texts = [FIRST, piece_text(0, '"x"'), piece_text(0, "}"), piece_text(1, "{}", "call_2", "function", "now")]
    joiner = ToolCallJoiner()
    for text in texts:
        joiner.add(text)
    assert joiner.result() == [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    assert merged_pieces(texts) == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}},
        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    # a run that begins mid-call: its pieces merge among themselves
    assert merged_pieces(texts[1:3]) == [{"index": 0, "function": {"arguments": '"x"}'}}]
    assert ToolCallJoiner().result() is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1]",
        '{"index": 0}',
        '{"index": -1, "function": {}}',
        '{"index": 0, "function": {"name": 7}}',
        '{"index": "0", "function": {"arguments": "x"}}',
        '{"index": 0, "id": ["x"], "function": {}}',
    ],
)
def test_a_text_that_is_not_a_piece_is_skipped(text):
    assert read_piece(text) is None
    joiner = ToolCallJoiner()
    joiner.add(text)
    joiner.add(FIRST)
    assert joiner.result()[0]["function"]["name"] == "lookup"
    assert merged_pieces([text, FIRST]) == [read_piece(FIRST)]
