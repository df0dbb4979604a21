"""stages.ingest.sse: every rule of the WHATWG standard's event-stream parsing, chunking
invariance, and agreement with a character-by-character reference implementation of the standard
on random streams; the expected values of the benchmark's edge cases; `neuralpipe bench sse`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from neuralpipe_bench.sse import CASES, Case

from stages.ingest.sse import Event, SSEParser

REPO = Path(__file__).resolve().parent.parent

# ---- a reference implementation: the standard's text, one character at a time ------------------


def reference(stream: bytes) -> tuple[list[Event], str, int | None]:
    """Events, last event ID string and reconnection time of a whole stream, written to follow
    "Parsing an event stream" and "Interpreting an event stream" step by step, not to be fast."""
    text = stream.decode("utf-8", "replace")  # the UTF-8 decode algorithm ...
    if text.startswith("\ufeff"):  # ... which strips one leading BOM
        text = text[1:]
    data, event_type, id_buffer, last_id, retry = "", "", "", "", None
    events = []
    for line in _reference_lines(text):
        if line == "":
            last_id = id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(Event(event_type or "message", data, last_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line[: line.index(":")], line[line.index(":") + 1 :]
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id" and "\0" not in value:
            id_buffer = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events, last_id, retry


def _reference_lines(text: str) -> list[str]:
    """The lines of ``text``, each ended by CRLF, LF or CR; an unterminated last line is dropped."""
    lines, current, i = [], "", 0
    while i < len(text):
        c = text[i]
        if c == "\r" or c == "\n":
            lines.append(current)
            current = ""
            if c == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1
        else:
            current += c
        i += 1
    return lines


# ---- helpers -----------------------------------------------------------------------------------


def parse(*chunks: bytes) -> tuple[list[Event], SSEParser]:
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return events, parser


def events_of(*chunks: bytes) -> list[tuple[str, str, str]]:
    return [tuple(e) for e in parse(*chunks)[0]]


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# ---- the benchmark's edge cases: right here, and right per the reference ---------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_edge_case(case: Case) -> None:
    events, parser = parse(*case.chunks)
    assert [tuple(e) for e in events] == list(case.events)
    assert parser.retry == case.retry


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_edge_case_expectation_matches_reference(case: Case) -> None:
    events, _, retry = reference(b"".join(case.chunks))
    assert [tuple(e) for e in events] == list(case.events)
    assert retry == case.retry


# ---- each rule, including what the API shows beyond the events ---------------------------------


def test_event_is_returned_by_the_feed_that_completes_it() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [Event("message", "a", "")]
    assert parser.feed(b"data: b\n\ndata: c\n\nda") == [Event("message", "b", ""), Event("message", "c", "")]


def test_cr_ends_a_line_without_waiting_for_the_next_byte() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == [Event("message", "a", "")]
    assert parser.close() == []


@pytest.mark.parametrize(
    "chunks",
    [(b"data: a\r", b"\n", b"\n"), (b"data: a\r", b"", b"\n\n"), (b"data: a\r", b"\n\r", b"\n")],
    ids=["LF alone after CR", "empty read between", "CRLF then CRLF"],
)
def test_crlf_split_across_reads_is_one_line_end(chunks: tuple[bytes, ...]) -> None:
    assert events_of(*chunks) == [("message", "a", "")]


def test_lf_after_a_cr_that_ended_an_earlier_read_is_not_swallowed_later() -> None:
    # The CR at the end of the first read pairs only with a LF at the very start of the next one.
    assert events_of(b"data: a\r", b"data: b\n", b"\n") == [("message", "a\nb", "")]


def test_incomplete_bom_is_not_stripped() -> None:
    assert events_of(b"\xef\xbb", b"data: a\n\n") == []  # the field name is "\ufffddata"


def test_bom_after_the_stream_start_is_data() -> None:
    assert events_of(b"data: a", b"\xef\xbb\xbf\n\n") == [("message", "a\ufeff", "")]


def test_utf8_split_at_every_byte() -> None:
    stream = "data: é東🙂\n\n".encode()
    assert events_of(*(stream[i : i + 1] for i in range(len(stream)))) == [("message", "é東🙂", "")]


def test_invalid_utf8_is_replaced_per_maximal_subpart() -> None:
    # \xe2\x82 is one truncated character (one U+FFFD); \xed\xa0\x80 a surrogate (three).
    assert events_of(b"data: \xe2\x82x\xed\xa0\x80\n\n") == [("message", "\ufffdx\ufffd\ufffd\ufffd", "")]


def test_last_event_id_is_set_when_a_blank_line_is_reached() -> None:
    parser = SSEParser()
    parser.feed(b"id: 3\n")
    assert parser.last_event_id == ""
    parser.feed(b"\n")
    assert parser.last_event_id == "3"
    assert parser.feed(b"data: a\n\n") == [Event("message", "a", "3")]


def test_id_of_an_unfinished_event_is_dropped_at_the_end() -> None:
    _, parser = parse(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")
    assert parser.last_event_id == "1"


def test_retry_is_milliseconds_and_updates_at_once() -> None:
    parser = SSEParser()
    assert parser.retry is None
    parser.feed(b"retry: 007\n")
    assert parser.retry == 7
    parser.feed(b"retry:  5\nretry: 5.0\nretry:\n")  # a space left in, a dot, nothing: all ignored
    assert parser.retry == 7


def test_retry_with_more_digits_than_int_converts_is_ignored() -> None:
    _, parser = parse(b"retry: 10\nretry: " + b"9" * (sys.get_int_max_str_digits() + 1) + b"\n")
    assert parser.retry == 10


def test_close_discards_the_unfinished_event_and_starts_a_new_stream() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 250\nid: 9\ndata: a\n\nevent: x\ndata: lost\n")
    assert parser.close() == []
    # The next stream (a reconnection) may open with a BOM again and keeps last event ID and retry.
    assert parser.feed(b"\xef\xbb\xbfdata: b\n\n") == [Event("message", "b", "9")]
    assert (parser.last_event_id, parser.retry) == ("9", 250)


def test_event_is_an_immutable_value() -> None:
    event = Event("message", "a", "1")
    assert (event.event, event.data, event.id) == ("message", "a", "1")
    assert event == Event("message", "a", "1")
    with pytest.raises(AttributeError):
        event.data = "b"  # type: ignore[misc]


# ---- property tests ----------------------------------------------------------------------------

LINE_ENDS = st.sampled_from([b"\n", b"\r", b"\r\n"])
NAMES = st.sampled_from([b"data", b"event", b"id", b"retry", b"Data", b"dat", b"foo", b"", b"\xef\xbb\xbfdata"])
VALUE_PIECES = st.sampled_from([b"a", b" ", b"  ", b":", b"0", b"42", b"\x00", b"message"]) | st.sampled_from(
    [
        "é".encode(),
        "東".encode(),
        "🙂".encode(),
        "٣".encode(),
        b"\xef\xbb\xbf",
        b"\xff",
        b"\xe2\x82",
        b"\xc3",
        b"\xed\xa0\x80",
    ]
)  # non-ASCII, a BOM, invalid UTF-8
VALUES = st.lists(VALUE_PIECES, max_size=5).map(b"".join)


@st.composite
def field_lines(draw: st.DrawFn) -> bytes:
    name = draw(NAMES)
    separator = draw(st.sampled_from([b"", b":", b": ", b":  "]))
    return name + separator + (draw(VALUES) if separator else b"")


LINES = st.one_of(field_lines(), st.just(b""), VALUES.map(lambda v: b":" + v), VALUES)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Event streams from the grammar of the standard, with its edge cases mixed in: a BOM or
    not, every line end, comments, fields without colon, odd names, non-ASCII, invalid UTF-8, and
    an unterminated last line."""
    bom = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf", b"\xef\xbb"]))
    lines = draw(st.lists(st.tuples(LINES, LINE_ENDS).map(b"".join), max_size=25))
    tail = draw(st.one_of(st.just(b""), LINES))
    return bom + b"".join(lines) + tail


# Arbitrary bytes, drawn from pieces that matter to the parser so that they form lines and fields.
RANDOM_BYTES = st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b":", b" ", b"data", b"id", b"event", b"retry", b"7", b"x"])
    | st.sampled_from([b"\x00", b"\xff", b"\xef\xbb\xbf", b"\xef", b"\xe2\x82", b"\xac", "東".encode()]),
    max_size=60,
).map(b"".join)


def chunkings(stream: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(stream)), max_size=12).map(lambda cuts: split(stream, cuts))


def _check_against_reference(stream: bytes, chunks: list[bytes]) -> None:
    events, parser = parse(*chunks)
    expected, last_id, retry = reference(stream)
    assert events == expected
    assert (parser.last_event_id, parser.retry) == (last_id, retry)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_grammar_streams_match_the_reference_in_any_chunking(data: st.DataObject) -> None:
    stream = data.draw(streams())
    _check_against_reference(stream, data.draw(chunkings(stream)))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_bytes_match_the_reference_in_any_chunking(data: st.DataObject) -> None:
    stream = data.draw(RANDOM_BYTES)
    _check_against_reference(stream, data.draw(chunkings(stream)))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_events_of_the_whole_stream(data: st.DataObject) -> None:
    stream = data.draw(st.binary(max_size=200) | streams())
    whole, whole_parser = parse(stream)
    chunked, chunked_parser = parse(*data.draw(chunkings(stream)))
    assert chunked == whole
    assert (chunked_parser.last_event_id, chunked_parser.retry) == (whole_parser.last_event_id, whole_parser.retry)


@settings(max_examples=100, deadline=None)
@given(streams())
def test_byte_at_a_time_matches_the_reference(stream: bytes) -> None:
    _check_against_reference(stream, [stream[i : i + 1] for i in range(len(stream))])


# ---- the benchmark through the CLI ---------------------------------------------------------------


def _generated_files() -> dict[Path, float]:
    paths = [REPO / "docs" / "sse.md", *(REPO / "bench" / "results").glob("sse-*.json")]
    return {path: path.stat().st_mtime for path in paths if path.exists()}


def test_bench_sse_quick_json() -> None:
    before = _generated_files()
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "sse", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)  # one JSON object and nothing else on stdout
    assert result["benchmark"] == "sse"
    assert result["machine"]["cores"] >= 1 and len(result["load_before"]) == 3
    assert result["settings"]["read_size"] == 4096 and result["settings"]["bytes"] > 0
    rows = {row["parser"]: row for row in result["rows"]}
    assert set(rows) == {"neuralpipe SSEParser", "httpx-sse", "httpx-sse + httpx.Response", "sseclient-py"}
    for row in rows.values():
        assert row["mb_s"] > 0 and row["events_s"] > 0 and row["vs_httpx_sse"] > 0
        assert row["cases"] == len(CASES) and row["correct"] == len(CASES) - len(row["wrong"])
    ours = rows["neuralpipe SSEParser"]
    assert ours["wrong"] == [] and ours["events"] == result["settings"]["events"] + 1  # the [DONE] event
    assert rows["httpx-sse"]["events"] == ours["events"]
    assert _generated_files() == before  # a quick run writes no result


def test_stop_at_unknown_keeps_the_events_before_the_line_and_parses_nothing_after():
    parser = SSEParser(stop_at_unknown=True)
    events = parser.feed(b'data: a\n\nerror: {"code": 500}\ndata: b\n\n')
    assert [e.data for e in events] == ["a"]
    assert parser.unknown_line == 'error: {"code": 500}'
    assert parser.feed(b"data: c\n\n") == []


def test_known_fields_and_comments_are_not_unknown_lines():
    parser = SSEParser(stop_at_unknown=True)
    events = parser.feed(b": keep-alive\nevent: e\nid: 7\nretry: 10\ndata\ndata: x\n\n")
    assert [(e.event, e.data, e.id) for e in events] == [("e", "\nx", "7")]
    assert parser.unknown_line is None


def test_the_default_parser_ignores_unknown_fields_as_the_standard_says():
    parser = SSEParser()
    assert [e.data for e in parser.feed(b"foo: x\ndata: a\n\n")] == ["a"]
    assert parser.unknown_line is None


_LINE_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(st.lists(_LINE_BYTES, min_size=1, max_size=5))
@settings(max_examples=300, deadline=None)
def test_feed_plain_gives_what_feed_gives_or_declines(values):
    """The fast path for data-only reads agrees with the full parser (invalid UTF-8 included: it
    declines it, the full parser replaces it), and declines anything else."""
    chunk = b"".join(b"data: " + v + b"\n\n" for v in values)
    fast, full = SSEParser(), SSEParser()
    fast.feed(b": opened\n")  # past the start of the stream (a BOM is only possible there)
    full.feed(b": opened\n")
    expected = [event.data.encode() for event in full.feed(chunk)]
    got = fast.feed_plain(chunk)
    if got is None:  # declined: nothing consumed, the full parser gives the same events
        got = [event.data.encode() for event in fast.feed(chunk)]
    assert got == expected


def test_feed_plain_declines_what_it_does_not_handle():
    parser = SSEParser()
    assert parser.feed_plain(b"data: x\n\n") is None  # the stream's start: a BOM may open it
    parser.feed(b"\n")
    assert parser.feed_plain(b"data: x\n\n") == [b"x"]
    for chunk in (b"data: x\n", b"event: e\ndata: x\n\n", b"data: x\r\n\r\n", b"data: a\ndata: b\n\n", b": c\n\n"):
        assert parser.feed_plain(chunk) is None, chunk
    assert parser.feed_plain(b"data: \xff\n\n") is None  # invalid UTF-8: the full parser replaces it
    parser.feed(b"data: unfinished")
    assert parser.feed_plain(b"data: x\n\n") is None
