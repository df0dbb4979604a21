"""``neuralpipe bench sse``: the SSE parser of stages.ingest.sse against httpx-sse and sseclient-py.

Input: a realistic OpenAI chat streaming body (``chat.completion.chunk`` events with one token
each, a few of them non-ASCII, a ``: keep-alive`` comment every 500 events, ``data: [DONE]`` at
the end), cut into 4 KiB reads as a socket would deliver them, so that lines and UTF-8 characters
are split across reads. Each parser turns the same list of reads into its events; the harness
reports the median over several runs of MB/s (bytes of the body per second) and events/s.

What runs for each library:

- ours: ``SSEParser.feed`` on each read, then ``close()``.
- httpx-sse: exactly the pipeline of ``EventSource.iter_sse``/``aiter_sse`` without the HTTP
  response around it: each read through the incremental UTF-8 decoder of ``Response.iter_text``
  (httpx's ``TextDecoder``: ``codecs`` utf-8 with errors="replace"), the text through httpx-sse's
  ``SSELineDecoder`` (as in ``_iter_sse_lines``), each line through ``rstrip("\\n")`` and
  ``SSEDecoder.decode`` (as in ``iter_sse``). This is the parsing cost alone, the same work that
  our parser does, and the baseline of the ratio column.
- httpx-sse + httpx.Response: the library's public path, ``EventSource(response).iter_sse()``
  over an ``httpx.Response`` whose content is the iterator of reads (no network), so httpx's own
  per-read machinery (``iter_bytes``, ``iter_text``) is included.
- sseclient-py: ``sseclient.SSEClient(iter(reads)).events()``.

Correctness: ``CASES`` are edge cases of the standard with the events (and reconnection time)
that the WHATWG HTML standard prescribes; each library scores one per case that it gets exactly
right (the same events in the same order; an exception counts as wrong). tests/test_sse.py checks
the expected values against a character-by-character reference implementation of the standard.
"""

from __future__ import annotations

import codecs
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import orjson

from stages.ingest.corpus import TEXT, tokenize
from stages.ingest.sse import SSEParser

from . import report

DOCS = Path(__file__).resolve().parent.parent / "docs" / "sse.md"
READ_SIZE = 4096
KEEPALIVE_EVERY = 500
NON_ASCII_EVERY = 37  # a non-ASCII token this often: reads then split some characters
NON_ASCII_TOKENS = (" café", " 東京", " naïve", " 🙂", " Größe")


@dataclass(frozen=True)
class Settings:
    events: int  # chat chunks in the body
    runs: int  # timed runs per parser; the median is reported


FULL = Settings(events=20_000, runs=9)
QUICK = Settings(events=1_000, runs=2)

# A library's events, reduced to what the standard defines: (type, data, last event ID).
Triple = tuple[str, str, str]
# A parser on a list of reads: its events and the reconnection time it ends with.
Parse = Callable[[Sequence[bytes]], tuple[list[Triple], Any]]


# ---- the input ---------------------------------------------------------------------------------


def openai_body(events: int) -> bytes:
    """A chat completion stream as OpenAI sends it: a role chunk, one chunk per token, a finish
    chunk, ``[DONE]``, and keep-alive comments in between."""
    words = tokenize(TEXT)
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    for i in range(events - 2):
        token = NON_ASCII_TOKENS[i % len(NON_ASCII_TOKENS)] if i % NON_ASCII_EVERY == 0 else words[i % len(words)]
        deltas.append({"content": token})
    deltas.append({})
    parts = []
    for i, delta in enumerate(deltas):
        if i and i % KEEPALIVE_EVERY == 0:
            parts.append(b": keep-alive\n\n")
        parts.append(b"data: " + orjson.dumps(_chunk(delta, last=i == len(deltas) - 1)) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _chunk(delta: dict[str, Any], last: bool) -> dict[str, Any]:
    return {
        "id": "chatcmpl-9x7Q2mKfT3bLw8sVnR4hZcYp1dEa",
        "object": "chat.completion.chunk",
        "created": 1718049203,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0f03d4f0ee",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if last else None}],
    }


def reads(body: bytes, size: int = READ_SIZE) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


# ---- the parsers, each on a list of reads --------------------------------------------------------


def parse_ours(chunks: Sequence[bytes]) -> tuple[list[Triple], int | None]:
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return events, parser.retry  # Events are NamedTuples: already (type, data, id)


def _httpx_sse_events(chunks: Sequence[bytes]) -> Iterator[Any]:
    """httpx-sse's ``iter_sse`` over ``_iter_sse_lines`` over httpx's ``iter_text``, minus the
    response object."""
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    def text() -> Iterator[str]:  # Response.iter_text with chunk_size=None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in chunks:
            if piece := decoder.decode(chunk):
                yield piece
        if piece := decoder.decode(b"", True):
            yield piece

    def lines() -> Iterator[str]:  # httpx_sse._api._iter_sse_lines
        line_decoder = SSELineDecoder()
        for piece in text():
            yield from line_decoder.decode(piece)
        yield from line_decoder.flush()

    decoder = SSEDecoder()  # EventSource.iter_sse
    for line in lines():
        sse = decoder.decode(line.rstrip("\n"))
        if sse is not None:
            yield sse


def _httpx_response_events(chunks: Sequence[bytes]) -> Iterator[Any]:
    import httpx
    from httpx_sse import EventSource

    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))
    return EventSource(response).iter_sse()


def _sseclient_events(chunks: Sequence[bytes]) -> Iterator[Any]:
    import sseclient

    return sseclient.SSEClient(iter(chunks)).events()


def _from_library(events: Callable[[Sequence[bytes]], Iterator[Any]]) -> Parse:
    """A parser of a library that reports retry on its events: the last one seen stands for the
    stream's reconnection time (sseclient-py gives it as the field's text, unchecked)."""

    def parse(chunks: Sequence[bytes]) -> tuple[list[Triple], Any]:
        out, retry = [], None
        for event in events(chunks):
            out.append((event.event, event.data, event.id or ""))  # sseclient-py: id None when unset
            retry = event.retry if event.retry is not None else retry
        return out, retry

    return parse


PARSERS: dict[str, Parse] = {
    "neuralpipe SSEParser": parse_ours,
    "httpx-sse": _from_library(_httpx_sse_events),
    "httpx-sse + httpx.Response": _from_library(_httpx_response_events),
    "sseclient-py": _from_library(_sseclient_events),
}
BASELINE = "httpx-sse"


# ---- correctness -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    chunks: tuple[bytes, ...]  # the reads, split where the case needs it
    events: tuple[Triple, ...]  # what the standard dispatches
    retry: int | None = None  # the reconnection time afterwards


def _m(data: str, id: str = "", event: str = "message") -> Triple:
    return (event, data, id)


CASES: tuple[Case, ...] = (
    Case("LF line ends", (b"data: a\n\ndata: b\n\n",), (_m("a"), _m("b"))),
    Case("CRLF line ends", (b"data: a\r\n\r\ndata: b\r\n\r\n",), (_m("a"), _m("b"))),
    Case("CR line ends", (b"data: a\r\rdata: b\r\r",), (_m("a"), _m("b"))),
    Case("mixed line ends", (b"data: a\rdata: b\r\ndata: c\n\r\n",), (_m("a\nb\nc"),)),
    Case("CRLF split across reads", (b"data: a\r", b"\ndata: b\n\n"), (_m("a\nb"),)),
    Case("CR ends the stream", (b"data: a\n", b"\r"), (_m("a"),)),
    Case("BOM stripped", (b"\xef\xbb\xbfdata: a\n\n",), (_m("a"),)),
    Case("BOM split across reads", (b"\xef", b"\xbb", b"\xbfdata: a\n\n"), (_m("a"),)),
    Case("only one BOM stripped", (b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n",), (_m("b"),)),
    Case("comments ignored", (b": hi\ndata: a\n: there\n\n:\n\n",), (_m("a"),)),
    Case("field name without colon", (b"data\n\n",), (_m(""),)),
    Case("two empty data lines", (b"data\ndata\n\n",), (_m("\n"),)),
    Case("no space after colon", (b"data:a\n\n",), (_m("a"),)),
    Case("only one space removed", (b"data:  a \n\n",), (_m(" a "),)),
    Case("colon in the value", (b"data: a: b\n\n",), (_m("a: b"),)),
    Case("multi-line data", (b"data: a\ndata: b\n\n",), (_m("a\nb"),)),
    Case("last data line empty", (b"data: a\ndata:\n\n",), (_m("a\n"),)),
    Case("unterminated event not dispatched", (b"data: a\n\ndata: b\n",), (_m("a"),)),
    Case("unterminated line not dispatched", (b"data: a\n\ndata: b",), (_m("a"),)),
    Case("no data, no event", (b"event: x\n\nid: 1\n\nretry: 5\n\n",), (), 5),
    Case("event type", (b"event: add\ndata: a\n\n",), (_m("a", event="add"),)),
    Case("event type reset after dispatch", (b"event: x\ndata: a\n\ndata: b\n\n",), (_m("a", event="x"), _m("b"))),
    Case("event type reset by an empty event", (b"event: x\n\ndata: a\n\n",), (_m("a"),)),
    Case("empty event type is message", (b"event:\ndata: a\n\n",), (_m("a"),)),
    Case("id persists across events", (b"id: 7\ndata: a\n\ndata: b\n\n",), (_m("a", "7"), _m("b", "7"))),
    Case("id from an event without data", (b"id: 5\n\ndata: a\n\n",), (_m("a", "5"),)),
    Case("empty id resets", (b"id: 7\ndata: a\n\nid\ndata: b\n\n",), (_m("a", "7"), _m("b"))),
    Case("id with NUL ignored", (b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",), (_m("a", "1"), _m("b", "1"))),
    Case("retry digits", (b"retry: 1500\ndata: a\n\n",), (_m("a"),), 1500),
    Case("retry non-digits ignored", (b"retry: 1500\nretry: 2x\nretry: -1\nretry: +3\ndata: a\n\n",), (_m("a"),), 1500),
    Case("retry non-ASCII digits ignored", (b"retry: 10\nretry: 1_000\nretry: \xd9\xa3\ndata: a\n\n",), (_m("a"),), 10),
    Case("unknown fields ignored", (b"foo: bar\nData: x\ndata : y\ndata: a\n\n",), (_m("a"),)),
    Case("line of spaces is not blank", (b"data: a\n \ndata: b\n\n",), (_m("a\nb"),)),
    Case("UTF-8 split across reads", (b"data: \xe2", b"\x82", b"\xac!\n\n"), (_m("€!"),)),
    Case("invalid UTF-8 replaced", (b"data: \xff\xfe a\n\n",), (_m("\ufffd\ufffd a"),)),
    Case("truncated UTF-8 at line end", (b"data: \xe2\x82\ndata: \xf0\x9f\n\n",), (_m("\ufffd\n\ufffd"),)),
)


def score(parse: Parse) -> list[str]:
    """The names of the cases ``parse`` gets wrong."""
    wrong = []
    for case in CASES:
        try:
            events, retry = parse(case.chunks)
            right = [tuple(e) for e in events] == list(case.events) and str(retry) == str(case.retry)
        except Exception:  # a library that raises on valid input gets the case wrong
            right = False
        if not right:
            wrong.append(case.name)
    return wrong


# ---- timing ------------------------------------------------------------------------------------


def timings(chunks: list[bytes], runs: int) -> dict[str, tuple[float, int]]:
    """Median seconds and number of events of each parser on ``chunks``. The runs go round-robin
    over the parsers, so that a busy neighbour on a shared machine weighs on all of them alike; an
    untimed first round imports the libraries and warms their caches."""
    counts = {name: len(parse(chunks)[0]) for name, parse in PARSERS.items()}
    times: dict[str, list[float]] = {name: [] for name in PARSERS}
    for _ in range(runs):
        for name, parse in PARSERS.items():
            start = time.perf_counter()
            parse(chunks)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), counts[name]) for name in PARSERS}


def run(settings: Settings) -> list[dict[str, Any]]:
    chunks = reads(openai_body(settings.events))
    size = sum(map(len, chunks))
    measured = timings(chunks, settings.runs)
    base_seconds = measured[BASELINE][0]
    rows = []
    for name, (seconds, count) in measured.items():
        wrong = score(PARSERS[name])
        rows.append(
            {
                "parser": name,
                "events": count,
                "seconds": round(seconds, 5),
                "mb_s": round(size / seconds / 1e6, 1),
                "events_s": round(count / seconds),
                "vs_httpx_sse": round(base_seconds / seconds, 2),
                "correct": len(CASES) - len(wrong),
                "cases": len(CASES),
                "wrong": wrong,
            }
        )
    return rows


def main(as_json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Measure every parser, print a table (or one JSON object) and return the results.

    A full run from a checkout also writes bench/results/sse-<machine>.json and docs/sse.md's
    generated section."""
    settings = QUICK if quick else FULL
    info, load_before = report.machine(), report.load()
    rows = run(settings)
    body_bytes = len(openai_body(settings.events))
    result = {
        "benchmark": "sse",
        "machine": info,
        "load_before": load_before,
        "load_after": report.load(),
        "settings": {"events": settings.events, "runs": settings.runs, "read_size": READ_SIZE, "bytes": body_bytes},
        "libraries": {name: version(name) for name in ("httpx-sse", "httpx", "sseclient-py")},
        "rows": rows,
    }
    _print(result, as_json)
    if not quick:
        report.publish("sse", info, result, markdown(result), docs=DOCS)
    return result


# ---- output ------------------------------------------------------------------------------------

_COLUMNS: tuple[report.Column, ...] = (
    ("parser", "parser", "{}"),
    ("mb_s", "MB/s", "{:.1f}"),
    ("events_s", "events/s", "{:,}"),
    ("vs_httpx_sse", "vs httpx-sse", "{:.2f}x"),
    ("score", "edge cases right", "{}"),
)


def _table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**row, "score": f"{row['correct']}/{row['cases']}"} for row in result["rows"]]


def _input_line(result: dict[str, Any]) -> str:
    s = result["settings"]
    libraries = ", ".join(f"{name} {v}" for name, v in result["libraries"].items())
    return (
        f"Input: an OpenAI chat stream of {s['events']:,} events ({s['bytes'] / 1e6:.2f} MB) in "
        f"{s['read_size']}-byte reads; median of {s['runs']} runs; {libraries}."
    )


def _wrong_lines(result: dict[str, Any]) -> list[str]:
    return [f"- {row['parser']} gets wrong: {', '.join(row['wrong'])}." for row in result["rows"] if row["wrong"]]


def markdown(result: dict[str, Any]) -> str:
    """The generated section of docs/sse.md for this result."""
    return "\n".join(
        [
            report.machine_line(result["machine"], result["load_before"], result["load_after"]),
            "",
            _input_line(result),
            "",
            report.markdown_table(_table_rows(result), _COLUMNS),
            "",
            *_wrong_lines(result),
        ]
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(report.machine_line(result["machine"], result["load_before"], result["load_after"]))
    click.echo(_input_line(result))
    click.echo()
    click.echo(report.text_table(_table_rows(result), _COLUMNS))
    click.echo()
    for line in _wrong_lines(result):
        click.echo(line)
