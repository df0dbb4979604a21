"""An incremental parser of ``text/event-stream`` (server-sent events), exactly as the WHATWG HTML
standard's "Parsing an event stream" and "Interpreting an event stream" define it.

    parser = SSEParser()
    for chunk in response_chunks:
        for event in parser.feed(chunk):
            handle(event.event, event.data, event.id)
    parser.close()

Why it works on bytes first: the standard decodes the whole stream as UTF-8 (replacing invalid
bytes by U+FFFD) and then splits it into lines. CR, LF and the colon are ASCII, and no byte of a
multi-byte UTF-8 sequence is ASCII, so a line end never falls inside a character and an invalid
sequence always ends at the line end at the latest. Splitting the bytes into lines first and
decoding complete lines gives exactly the characters that decoding the whole stream gives, and lets a feed
decode all its complete lines in one ``bytes.decode`` call while an unfinished line (and with it a
character split across reads) waits, as bytes, for the next read.

Two choices where the standard leaves room: ``retry`` with an empty value is ignored (there is no
integer to set), and ``last_event_id`` is the event source's last event ID string, which the
standard updates only when a blank line is reached, so an ``id`` in an unfinished event does not
show there yet.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

__all__ = ["Event", "SSEParser"]

BOM = "\ufeff"
DATA_PREFIX = "data: "  # the line every event of an OpenAI stream is made of: worth a fast path
_DATA_VALUE = len(DATA_PREFIX)  # where its value starts (exactly one space after the colon is dropped)


class Event(NamedTuple):
    """A dispatched event. A NamedTuple: immutable and compared by value, yet as cheap to create
    as a slots class (a frozen dataclass costs more than twice as much per event)."""

    event: str  # the event type, "message" when the stream named none
    data: str  # the data lines joined with LF
    id: str  # the last event ID when the event was dispatched ("" if none was ever set)


class SSEParser:
    """Parses one event stream fed in chunks of any size; ``close()`` ends it.

    ``last_event_id`` and ``retry`` (the reconnection time in milliseconds, None until the stream
    sets one) survive ``close()``, so one parser can go on with the stream of a reconnection, as an
    EventSource does."""

    def __init__(self, stop_at_unknown: bool = False, max_event: int | None = None) -> None:
        self.last_event_id = ""
        self.retry: int | None = None
        # The standard ignores a line with an unknown field name. With ``stop_at_unknown`` the
        # parser keeps the first such line in ``unknown_line`` and parses nothing after it (a
        # client that treats it as a failure, as the OpenAI client does with llama.cpp's
        # ``error: {...}`` line, gets the events before it and then abandons the stream).
        self.stop_at_unknown = stop_at_unknown
        self.unknown_line: str | None = None
        # Hostile input: with ``max_event``, a line (finished or not) or an event's data longer
        # than that many characters stops the parser like an unknown line, with ``overflow``
        # saying so; what it had buffered is dropped, so memory stays bounded.
        self.max_event = max_event
        self.overflow: str | None = None
        self._reset_stream()

    def _reset_stream(self) -> None:
        self._partial: list[bytes] = []  # the bytes of the unfinished last line
        self._partial_size = 0
        self._after_cr = False  # the last byte fed was a CR: a LF right after it ends no new line
        self._at_start = True  # no line decoded yet: a BOM may still open the stream
        self._data: list[str] = []  # the data buffer, as its lines
        self._data_size = 0  # characters in it (counted only with max_event)
        self._event_type = ""
        self._id_buffer = self.last_event_id
        # Nothing buffered that a data-only read could depend on (an ``id`` waiting for its blank
        # line included): a read of complete ``data: `` events may be taken by :meth:`feed_plain`
        # (or a caller's own equivalent of it) instead of :meth:`feed`, the parser unchanged.
        self.plain = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse the next bytes of the stream; return the events that they complete."""
        events = self._feed(chunk)
        self.plain = not (
            self._partial
            or self._data
            or self._event_type  # an "event:" line waiting for its data names the next event
            or self._at_start
            or self._after_cr
            or self.unknown_line is not None
            or self.overflow is not None
            or self._id_buffer != self.last_event_id
        )
        return events

    def _feed(self, chunk: bytes) -> list[Event]:
        if self.unknown_line is not None or self.overflow is not None:
            return []
        chunk = self._lf_line_ends(chunk)
        end = chunk.rfind(b"\n")
        if end < 0:
            if chunk:
                self._partial.append(chunk)
                self._partial_size += len(chunk)
                if self.max_event is not None and self._partial_size > self.max_event:
                    self._overflow(f"a line longer than {self.max_event} bytes")
            return []
        complete = chunk[:end]
        if self._partial:
            self._partial.append(complete)
            complete = b"".join(self._partial)
        self._partial = [chunk[end + 1 :]] if end + 1 < len(chunk) else []
        self._partial_size = len(chunk) - end - 1
        text = complete.decode("utf-8", "replace")
        if self._at_start:
            self._at_start = False
            text = text.removeprefix(BOM)
        return self._process(text.split("\n"))

    def feed_plain(self, chunk: bytes) -> list[bytes] | None:
        """The fast path of an OpenAI stream's usual read: when ``chunk`` is nothing but complete
        events of one ``data: `` line each (LF line ends, no id, event or comment line) and the
        parser holds nothing unfinished (no partial line, data, event type or pending CR), the
        data of each of its events, as bytes (valid UTF-8); else None (nothing consumed: use
        :meth:`feed`). The events are the ones :meth:`feed` would return, of type "message" with
        the unchanged last event ID."""
        if not self.plain:
            return None
        limit = self.max_event
        end = len(chunk) - 2
        if chunk.find(b"\n") == end and chunk[-1:] == b"\n" and chunk[:_DATA_VALUE] == b"data: ":
            # one event, a read at model speed: checked with as few scans as possible
            if 13 in chunk or (limit is not None and end > limit):  # 13: CR, a line end of its own
                return None
            pieces = [chunk[_DATA_VALUE:end]]
        elif chunk.endswith(b"\n\n") and 13 not in chunk:
            pieces = chunk[:-2].split(b"\n\n")
            for piece in pieces:
                if not piece.startswith(b"data: ") or b"\n" in piece or (limit is not None and len(piece) > limit):
                    return None
            pieces = [piece[_DATA_VALUE:] for piece in pieces]
        else:
            return None
        if not chunk.isascii():  # invalid UTF-8 is the full parser's (it replaces it, as required)
            try:
                chunk.decode()
            except UnicodeDecodeError:
                return None
        return pieces

    def _lf_line_ends(self, chunk: bytes) -> bytes:
        """``chunk`` with every line end (CRLF, LF or CR) made a LF. A CR ends a line at once, so
        that a CR at the end of the stream needs no next byte; a LF at the start of the next chunk
        is then the second half of that CRLF, not an empty line."""
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if b"\r" in chunk:  # rare in practice: skip two copies of every chunk
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return chunk

    def close(self) -> list[Event]:
        """End the stream. An unfinished line or event is discarded, as the standard requires,
        so this returns no event; it is here so that callers need not know that. The parser is
        then ready for the next stream (a reconnection)."""
        self._reset_stream()
        return []

    def _process(self, lines: list[str]) -> list[Event]:
        """Interpret complete lines; return the events that blank lines among them dispatch."""
        events: list[Event] = []
        data = self._data
        limit = self.max_event
        for line in lines:
            if limit is not None and len(line) > limit:
                self._overflow(f"a line longer than {limit} characters")
                break
            if not line:  # a blank line dispatches
                self.last_event_id = self._id_buffer
                if data:
                    events.append(Event(self._event_type or "message", "\n".join(data), self._id_buffer))
                    data.clear()
                    self._data_size = 0
                self._event_type = ""
            elif line.startswith(DATA_PREFIX):
                data.append(line[_DATA_VALUE:])
                if limit is not None:
                    self._data_size += len(line)
                    if self._data_size > limit:
                        self._overflow(f"an event longer than {limit} characters")
                        break
            elif line[0] != ":" and not self._field(line) and self.stop_at_unknown:  # ":" starts a comment
                self.unknown_line = line
                self._partial = []
                break
        return events

    def _overflow(self, what: str) -> None:
        self.overflow = what
        self._partial = []
        self._data.clear()

    def _field(self, line: str) -> bool:
        """Process one field line other than the common ``data: `` (those never get here);
        False for a field name the standard does not know."""
        name, _, value = line.partition(":")  # no colon: the whole line is the name, the value is ""
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():  # isdigit alone takes any script's digits
            # int() refuses more than sys.get_int_max_str_digits() digits: a reconnection time of
            # no use to anyone, ignored rather than raised.
            with contextlib.suppress(ValueError):
                self.retry = int(value)
        elif name != "retry":
            return False
        return True
