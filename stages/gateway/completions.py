"""One completion request after validation: submit it to ingest, follow its stream on the
broadcast, and answer it, streaming (SSE, OpenAI's chunks) or whole. A client that goes away
cancels the engine stream at once (the request protocol's cancel, with the stream's cancel token),
so ingest closes the upstream request; a stream that fails is an error the client sees (an error
status, or an error event mid-stream), never an empty 200."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from engine.auth.gate import Lease
from engine.clients.requests_async import AsyncRequestClient, Submitted
from engine.protocol import wire
from engine.protocol.openai_errors import ApiError
from engine.protocol.requests import RequestError
from engine.protocol.toolcalls import ToolCallJoiner
from engine.telemetry import Telemetry
from engine.write_now import write_now
from shm.batch import TOP_COLUMN, TopAlternatives, top_alternatives
from stages.gateway.budget import Budget
from stages.gateway.errors import rejection, stream_error
from stages.gateway.follower import BroadcastFollower, Inbox, Tokens
from stages.gateway.inflight import InFlight
from stages.gateway.responses import ResponsesRequest, ResponsesShaper
from stages.gateway.shapes import (
    KEEPALIVE,
    Shaper,
    Usage,
    chat_logprobs,
    completion_logprobs,
    estimate_prompt_tokens,
    usage_of,
)
from stages.gateway.validation import INT64_MAX

# Ingest's per-client limits (requests per second, a burst, a queue bound) are for the request
# protocol's direct clients; under one name the gateway as a whole would be capped at one client's
# 100 new streams/s and 64 waiting (a burst of 100 concurrent requests got 429s). It submits under
# LANES names in turn instead; its callers are limited per key by the Gate.
LANES = 256
# bytes a client may leave unread before tokens wait for the stream's task, which drains them
DIRECT_WRITE_BUFFERED = 1 << 16
# a whole answer as it is collected: the JSON of a logprob entry (or of one of its alternatives)
# without its token text, and of one column value (an estimate, to bound what one request holds)
LOGPROB_JSON_BYTES = 80
COLUMN_JSON_BYTES = 12
YIELD_EVERY = 256  # messages taken in a row before the event loop gets a turn
ASSEMBLE_INLINE_BYTES = 1 << 20  # a whole answer larger than this is assembled in a thread


@dataclass
class Ask:
    """What the client asked, as the answer needs it."""

    chat: bool
    stream: bool
    model: str
    body: dict[str, Any]  # submitted to ingest
    include_usage: bool = False
    logprobs: bool = False  # each token's own logprob
    columns: list[str] = field(default_factory=list)  # compute's columns per token (extension)
    top_logprobs: int = 0  # alternatives per token (the ring's ``top`` column), 0: none asked
    n: int = 1  # choices: an engine stream each
    responses: ResponsesRequest | None = None  # asked through the Responses API: answered in its shapes

    def body_of(self, index: int) -> dict[str, Any]:
        """What choice ``index`` submits: the body, its ``seed`` (if any) moved on by the index,
        so the choices are distinct samples that a repeat of the request gives again."""
        seed = self.body.get("seed")
        if index and type(seed) is int:  # validated within int64: the step stays there
            return self.body | {"seed": seed + index if seed + index <= INT64_MAX else seed - index}
        return self.body


class Follow:
    """A stream's messages in seq order, as ingest numbered them: a message that does not start
    where the last ended (rows lost before the request registered) ends it with an error."""

    __slots__ = ("cached", "ended", "inbox", "next_seq", "stream_id")

    def __init__(self, inbox: Inbox, stream_id: int) -> None:
        self.inbox, self.stream_id = inbox, stream_id
        self.next_seq = 0
        self.ended = False
        self.cached = False

    def follows_on(self, message: wire.Message | Tokens) -> bool:
        """Whether ``message`` starts where the last ended, without a hole inside (a tokens
        message spans its rows' seqs: rows the engine lost show as fewer texts than seqs)."""
        first, last = message.seq
        return first == self.next_seq and (
            message.type not in wire.TOKEN_TYPES or last - first + 1 == len(message.text)
        )

    def accept(self, message: wire.Message | Tokens) -> wire.Message | Tokens:
        """``message`` as the next of the stream, or the error that ends it where it does not follow on."""
        if not self.follows_on(message):
            reason = f"lost: rows of stream {self.stream_id} from seq {self.next_seq} never reached the gateway"
            head = wire.header("error", self.stream_id, self.next_seq, self.next_seq, "json", reason=reason)
            message = wire.Message("error", self.stream_id, (self.next_seq, self.next_seq), head)
        self.next_seq = message.seq[1] + 1
        if message.type == "start":
            self.cached = bool(message.header.get("cached"))
        elif message.type in ("end", "error"):
            self.ended = True
        return message


class Choice:
    """One choice of a response: its engine stream, what came of it so far, its chunks."""

    __slots__ = ("follow", "shaper", "state", "submitted")

    def __init__(self, submitted: Submitted, inbox: Inbox, shaper: Shaper, estimate: int) -> None:
        self.submitted = submitted
        self.follow = Follow(inbox, submitted.stream_id)
        self.shaper = shaper
        self.state = _Tally(estimate)


class Choices:
    """A request's choices, whose streams share one inbox: its messages, each accepted by the
    follow of its stream (what comes after a stream's end is dropped)."""

    __slots__ = ("all", "by_stream", "inbox")

    def __init__(self, inbox: Inbox, choices: list[Choice]) -> None:
        self.inbox, self.all = inbox, choices
        self.by_stream = {choice.follow.stream_id: choice for choice in choices}

    def take(self) -> list[tuple[Choice, wire.Message | Tokens]]:
        out = []
        by_stream = self.by_stream
        for message in self.inbox.take():
            choice = by_stream[message.stream]
            if not choice.follow.ended:
                out.append((choice, choice.follow.accept(message)))
        return out

    @property
    def ended(self) -> bool:
        return all(choice.follow.ended for choice in self.all)

    @property
    def failed(self) -> bool:
        return any(choice.state.failed for choice in self.all)

    @property
    def cached(self) -> bool:
        return all(choice.follow.cached for choice in self.all)

    @property
    def tokens(self) -> int:
        return sum(choice.state.tokens for choice in self.all)

    def usage(self) -> tuple[Usage, int]:
        """The response's usage (the prompt once, every choice's completion tokens) and how many
        of those were served from the engine's cache."""
        each = [(choice.state.usage(choice.follow.cached), choice.follow.cached) for choice in self.all]
        first = each[0][0]
        completion = sum(usage.completion_tokens for usage, _ in each)
        cached = sum(usage.completion_tokens for usage, hit in each if hit)
        reasoning = sum(usage.reasoning_tokens for usage, _ in each)
        usage = Usage(first.prompt_tokens, completion, first.prompt_estimated, self.cached, reasoning)
        return usage, cached


class Completions:
    """The gateway's completion handling (one per gateway; a call of :meth:`answer` per request)."""

    def __init__(
        self,
        requests: AsyncRequestClient,
        follower: BroadcastFollower,
        inflight: InFlight,
        telemetry: Telemetry,
        keepalive_s: float,
        first_token_timeout_s: float,
        max_whole_bytes: int,
        max_stream_backlog: int,
        max_total_backlog: int,
        max_total_whole_bytes: int,
    ) -> None:
        self.requests = requests
        self.follower = follower
        self.inflight = inflight
        self.telemetry = telemetry
        self.keepalive_s = keepalive_s
        self.first_token_timeout_s = first_token_timeout_s
        self.max_whole_bytes = max_whole_bytes
        self.max_stream_backlog = max_stream_backlog
        # what all requests hold together: streams' tokens waiting for slow clients, whole answers
        self.backlog = Budget(max_total_backlog, "max_total_backlog")
        self.whole = Budget(max_total_whole_bytes, "max_total_whole_bytes")
        self.active_streams = 0
        self.counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            # requests whose client fell max_stream_backlog behind their streams, or was the furthest
            # behind when every stream's together passed max_total_backlog
            "too_slow": 0,
            "cache_hits": 0,
            "tokens": 0,
        }
        self._cancels: set[asyncio.Task] = set()
        self._lane = 0

    async def answer(self, request: web.Request, ask: Ask, lease: Lease, received: float) -> web.StreamResponse:
        try:
            inbox, accepted = await self._submit_all(ask)
        except BaseException:
            lease.close()  # refused, or the client left before ingest answered: the slot is free again
            raise
        shaper = ResponsesShaper(ask.responses) if ask.responses else Shaper(ask.chat, ask.model, ask.include_usage)
        estimate = estimate_prompt_tokens(ask.chat, ask.body)
        choices = Choices(
            inbox, [Choice(s, inbox, shaper.sibling(i) if i else shaper, estimate) for i, s in enumerate(accepted)]
        )
        for submitted in accepted:
            self.inflight.add(submitted.stream_id, submitted.cancel_token)
        try:
            if ask.stream:
                return await self._stream(request, ask, choices, lease, received)
            return await self._whole(ask, choices, lease)
        finally:
            for choice in choices.all:
                self._ended(choice)
            usage, cached = choices.usage()
            lease.close(usage.prompt_tokens, usage.completion_tokens, cached)
            self._count_key(lease, usage, cached)

    def _ended(self, choice: Choice) -> None:
        """A choice's stream is no longer followed: cancelled if it had not ended, and counted."""
        submitted, follow = choice.submitted, choice.follow
        self.follower.unregister(submitted.stream_id)
        self.inflight.remove(submitted.stream_id)
        if not follow.ended:  # the client went away, the first token never came, another choice failed
            self.counts["cancelled"] += 1
            self._cancel(submitted)
        elif choice.state.failed:
            self.counts["failed"] += 1
        else:
            self.counts["completed"] += 1
        if follow.cached:
            self.counts["cache_hits"] += 1

    async def _submit_all(self, ask: Ask) -> tuple[Inbox, list[Submitted]]:
        """Every choice's stream submitted, each registered on one inbox; on any refusal (or the
        client leaving) the ones already accepted are cancelled."""
        inbox = Inbox()
        inbox.wants_columns = ask.logprobs or bool(ask.columns)
        calls = [asyncio.ensure_future(self._submit(ask, i, inbox)) for i in range(ask.n)]
        try:
            return inbox, list(await asyncio.gather(*calls))
        except BaseException:
            for call in calls:
                if not call.done():
                    call.cancel()  # one accepted later is cancelled then (_submit)
                elif not call.cancelled() and call.exception() is None:
                    self.follower.unregister(call.result().stream_id)
                    self._cancel_when_accepted(call)
            inbox.close()
            raise

    async def _submit(self, ask: Ask, index: int, inbox: Inbox) -> Submitted:
        endpoint = "chat" if ask.chat else "completions"
        self._lane = (self._lane + 1) % LANES
        call = asyncio.ensure_future(self.requests.submit(ask.body_of(index), endpoint, client=f"gateway-{self._lane}"))
        with self.follower.expecting_one():
            try:
                submitted = await asyncio.shield(call)
            except asyncio.CancelledError:  # the client left: the stream, once accepted, is cancelled
                call.add_done_callback(self._cancel_when_accepted)
                raise
            except RequestError as exc:
                raise rejection(str(exc)) from None
            except TimeoutError:
                raise ApiError(
                    503,
                    "the engine did not take the request in time",
                    "server_error",
                    "engine_unavailable",
                    retry_after="1",
                ) from None
            self.follower.register(submitted.stream_id, inbox)  # while rows of unknown streams are kept
        self.counts["submitted"] += 1
        return submitted

    def _cancel_when_accepted(self, call: asyncio.Future) -> None:
        if not call.cancelled() and call.exception() is None:
            self.counts["cancelled"] += 1
            self._cancel(call.result())

    def _cancel(self, submitted: Submitted) -> None:
        """Cancel the engine stream now, from a task of its own (the handler may be cancelled)."""

        async def cancel() -> None:
            # it may have ended meanwhile, or ingest be gone (its restart ends the stream anyway)
            with contextlib.suppress(RequestError, TimeoutError, ValueError, ConnectionError):
                await self.requests.cancel(submitted.stream_id, submitted.cancel_token)

        task = asyncio.get_running_loop().create_task(cancel())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    # ---- streaming ----------------------------------------------------------------------------

    async def _stream(
        self, request: web.Request, ask: Ask, choices: Choices, lease: Lease, received: float
    ) -> web.StreamResponse:
        choices.inbox.bound(self.max_stream_backlog, self.backlog, functools.partial(self._fell_behind, choices))
        # Hold the response for the first row after the starts, up to keepalive_s: a stream
        # that fails at once gets a proper error status, and the cache header is known.
        pending = await self._first(choices, min(self.keepalive_s, self.first_token_timeout_s))
        if any(m.type == "error" for _, m in pending) and not any(m.type in wire.TOKEN_TYPES for _, m in pending):
            failure = next(m for _, m in pending if m.type == "error")
            for choice, message in pending:
                choice.state.failed |= message is failure
            raise stream_error(failure.header.get("reason", ""))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass each chunk on at once
                "x-neuralpipe-cache": "hit" if choices.cached else "miss",
                **lease.headers,
            }
        )
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        await response.prepare(request)
        self.active_streams += 1
        self.telemetry.set("neuralpipe_gateway_active_streams", self.active_streams)
        try:
            out = [choice.shaper.role() for choice in choices.all]
            deadline = received + self.first_token_timeout_s
            first_token_at = None
            while True:
                for choice, message in pending:
                    self._chunks(message, ask, choice, lease, out)
                if choices.inbox.overflowed:  # its engine streams are cancelled already (_fell_behind)
                    out.append(choices.all[0].shaper.error(self._too_slow(choices.inbox.overflowed)))
                    break
                if first_token_at is None and choices.tokens:
                    first_token_at = time.monotonic()
                    self.telemetry.observe("neuralpipe_gateway_time_to_first_token_seconds", first_token_at - received)
                if choices.ended or choices.failed:
                    if not choices.failed:
                        out.append(choices.all[0].shaper.closing(choices.usage()[0]))
                    break  # the last chunks go with the end of the body: one write
                if out:
                    await response.write(b"".join(out))
                    out.clear()
                direct = None
                if first_token_at is not None and len(choices.all) == 1:
                    # the headers and the first token are out: later tokens may go at once
                    direct = functools.partial(self._write_now, request, response, ask, choices.all[0], lease)
                if not await choices.inbox.wait(self.keepalive_s, direct):
                    if first_token_at is None and time.monotonic() >= deadline:
                        choices.all[0].state.failed = True
                        reason = f"no first token within {self.first_token_timeout_s:g} s (first_token_timeout_s)"
                        out.append(choices.all[0].shaper.error(ApiError(503, reason, "server_error", "timeout")))
                        break
                    out.append(KEEPALIVE)  # proxies cut streams idle for 60 s
                pending = choices.take()
            await response.write_eof(b"".join(out))
        finally:
            self.active_streams -= 1
            self.telemetry.set("neuralpipe_gateway_active_streams", self.active_streams)
        return response

    def _fell_behind(self, choices: Choices) -> None:
        """The client reads slower than its streams come, max_stream_backlog rows behind (or the
        furthest behind when all are max_total_backlog behind): the streams are cancelled now (not
        once the client has read what is already on its way) and end in an error event (_stream)."""
        self.counts["too_slow"] += 1
        self.telemetry.count("neuralpipe_gateway_cut_total", bound=choices.inbox.overflowed)
        for choice in choices.all:
            if not choice.follow.ended:
                choice.follow.ended = choice.state.failed = True
                self._cancel(choice.submitted)

    def _too_slow(self, bound: str) -> ApiError:
        """The error event of a stream cut by ``bound`` (the key that cut it)."""
        if bound == "max_total_backlog":
            what = (
                "it was the furthest behind when the gateway's streams together had more than"
                f" {self.backlog.limit} tokens waiting to be sent (max_total_backlog)"
            )
        else:
            what = f"more than {self.max_stream_backlog} tokens waited to be sent (max_stream_backlog)"
        return ApiError(
            400,
            f"the client read the stream slower than it came: {what};"
            " read it as it comes, or ask for less (n, max_tokens, top_logprobs)",
            "invalid_request_error",
            "client_too_slow",
            "stream",
        )

    def _write_now(
        self,
        request: web.Request,
        response: web.StreamResponse,
        ask: Ask,
        choice: Choice,
        lease: Lease,
        message: wire.Message | Tokens,
    ) -> bool:
        """Write a tokens (or reasoning) message of a one-choice response that follows on straight to the
        socket, from the follower's routing, while the stream's task waits (no wake-up of it per
        token); False leaves it to the task: anything else, a client gone, or one that reads
        slower than it is written (the task's write then waits for the socket to drain)."""
        transport = request.transport
        if (
            message.type not in wire.TOKEN_TYPES
            or not choice.follow.follows_on(message)
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > DIRECT_WRITE_BUFFERED
        ):
            return False
        choice.follow.accept(message)
        out: list[bytes] = []
        self._chunks(message, ask, choice, lease, out)
        write_now(response.write(out[0]))  # empty (a call's piece that makes no event): aiohttp sends nothing
        return True

    async def _first(self, choices: Choices, wait_s: float) -> list[tuple[Choice, wire.Message | Tokens]]:
        """The rows up to the first token, end or error of any choice, or what came within ``wait_s``."""
        until = time.monotonic() + wait_s
        taken: list[tuple[Choice, wire.Message | Tokens]] = []
        while True:
            taken += choices.take()
            if any(m.type != "start" for _, m in taken):
                return taken
            left = until - time.monotonic()
            if left <= 0 or not await choices.inbox.wait(left):
                return taken

    def _chunks(self, message: wire.Message | Tokens, ask: Ask, choice: Choice, lease: Lease, out: list[bytes]) -> None:
        """The SSE bytes of one of a choice's messages appended to ``out``: its tokens, its finish
        chunk, or the error event that ends the response (the client raises on it)."""
        kind, state = message.type, choice.state
        if kind == "tokens":
            texts = message.text
            logprobs = self._logprobs(ask, texts, message.columns, state.chars) if ask.logprobs else None
            extension = _columns(ask.columns, message.columns) if ask.columns else None
            text = "".join(texts)
            out.append(choice.shaper.content(text, logprobs, extension))
            state.add(len(texts), len(text))
            lease.tokens(len(texts))
        elif kind == "reasoning":
            out.append(choice.shaper.reasoning("".join(message.text)))
            state.add(len(message.text), 0, thinking=True)
            lease.tokens(len(message.text))
        elif kind == "tool_calls":
            out.append(choice.shaper.tool_call_pieces(message.text))
            state.add(len(message.text), 0)
            lease.tokens(len(message.text))
        elif kind == "end":
            state.end_usage = message.header.get("usage")
            out.append(choice.shaper.finish(message.header.get("finish_reason") or "stop"))
        elif kind == "error":
            state.failed = True
            out.append(choice.shaper.error(stream_error(message.header.get("reason", ""))))

    # ---- whole responses ----------------------------------------------------------------------

    async def _whole(self, ask: Ask, choices: Choices, lease: Lease) -> web.Response:
        collected = [_Collected(ask) for _ in choices.all]  # by choice index
        try:  # counted in max_total_whole_bytes until its body is made
            size = await self._collect(choices, lease, collected)
            usage = choices.usage()[0]

            def assemble() -> bytes:
                answer = [part.choice(choice.shaper) for part, choice in zip(collected, choices.all, strict=True)]
                return orjson.dumps(choices.all[0].shaper.whole(answer, usage))

            # a large answer is assembled off the event loop (seconds of Python for a million logprobs:
            # the gateway's heartbeats and every other client would wait); nothing adds to it any more
            body = await asyncio.to_thread(assemble) if size > ASSEMBLE_INLINE_BYTES else assemble()
        finally:
            self.whole.release(choices.inbox)
        headers = {"x-neuralpipe-cache": "hit" if choices.cached else "miss", **lease.headers}
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _collect(self, choices: Choices, lease: Lease, collected: list[_Collected]) -> int:
        """Every choice's messages into ``collected`` until all have ended; the answer's JSON size,
        estimated as it came."""
        deadline = time.monotonic() + self.first_token_timeout_s
        size = 0
        while not choices.ended:
            for taken, (choice, message) in enumerate(choices.take(), 1):
                if choices.inbox.overflowed:  # cut by a larger answer's growth (maybe while it yielded)
                    raise self._whole_cut()
                if message.type in wire.TOKEN_TYPES:
                    thinking = message.type == "reasoning"
                    grown = collected[choice.shaper.index].add(message)
                    size += grown
                    if size > self.max_whole_bytes:
                        self.telemetry.count("neuralpipe_gateway_cut_total", bound="max_whole_bytes")
                        raise _too_large_whole(self.max_whole_bytes)
                    self.whole.add(choices.inbox, grown)  # past the limit the largest answer is cut
                    chars = sum(map(len, message.text)) if message.type == "tokens" else 0
                    choice.state.add(len(message.text), chars, thinking)
                    lease.tokens(len(message.text))
                elif message.type == "end":
                    choice.state.end_usage = message.header.get("usage")
                    collected[choice.shaper.index].reason = message.header.get("finish_reason") or "stop"
                elif message.type == "error":
                    choice.state.failed = True
                    raise stream_error(message.header.get("reason", ""))
                if taken % YIELD_EVERY == 0:  # a backlog of messages: the other clients' turn too
                    await asyncio.sleep(0)
            if choices.inbox.overflowed:  # cut by its last message, or while it waited
                raise self._whole_cut()
            if choices.ended:
                break
            wait = self.keepalive_s if choices.tokens else deadline - time.monotonic()
            if wait <= 0:
                choices.all[0].state.failed = True
                reason = f"no first token within {self.first_token_timeout_s:g} s (first_token_timeout_s)"
                raise ApiError(503, reason, "server_error", "timeout", retry_after="1")
            await choices.inbox.wait(wait)
        return size

    def _whole_cut(self) -> ApiError:
        """The answer was the largest when all whole answers together passed max_total_whole_bytes."""
        self.telemetry.count("neuralpipe_gateway_cut_total", bound="max_total_whole_bytes")
        return ApiError(
            503,
            f"the gateway is collecting more whole answers than max_total_whole_bytes ({self.whole.limit} bytes"
            ' of JSON) and this one was the largest: try again later, or ask with "stream": true',
            "server_error",
            "gateway_busy",
            retry_after="1",
        )

    # ---- accounting ---------------------------------------------------------------------------

    def _logprobs(self, ask: Ask, texts: list[str], columns: dict, offset: int) -> Any:
        values = columns["logprob"].tolist()
        tops = _tops(ask, columns, len(texts))
        if ask.chat:
            return chat_logprobs(texts, values, tops)
        return completion_logprobs(texts, values, offset, tops if ask.top_logprobs else None)

    def _count_key(self, lease: Lease, usage: Usage, cached: int) -> None:
        label = lease.principal.label
        self.counts["tokens"] += usage.completion_tokens
        count = self.telemetry.count
        count("neuralpipe_gateway_key_requests_total", key=label)
        count("neuralpipe_gateway_key_tokens_total", usage.prompt_tokens, key=label, kind="prompt")
        count("neuralpipe_gateway_key_tokens_total", usage.completion_tokens, key=label, kind="completion")
        if cached:
            count("neuralpipe_gateway_key_tokens_total", cached, key=label, kind="cached")


class _Tally:
    """What one response delivered, for its usage."""

    __slots__ = ("chars", "end_usage", "estimate", "failed", "first_token_at", "reasoning", "tokens")

    def __init__(self, estimate: int) -> None:
        self.estimate = estimate
        self.tokens = 0
        self.chars = 0  # characters of text so far (legacy completions' logprob text offsets)
        self.end_usage: dict | None = None
        self.failed = False
        self.first_token_at: float | None = None
        self.reasoning = 0  # tokens of a reasoning model's thinking, counted in ``tokens``

    def add(self, tokens: int, chars: int, thinking: bool = False) -> None:
        self.tokens += tokens
        if thinking:
            self.reasoning += tokens
        else:
            self.chars += chars

    def usage(self, cached: bool) -> Usage:
        return usage_of(self.end_usage, self.tokens, self.estimate, cached, self.reasoning)


class _Collected:
    """A whole response's choice as its rows come: texts, logprobs, the columns asked for."""

    __slots__ = ("ask", "calls", "columns", "logprobs", "reason", "texts", "thinking", "tops")

    def __init__(self, ask: Ask) -> None:
        self.ask = ask
        self.texts: list[str] = []
        self.thinking: list[str] = []  # a reasoning model's, before the reply
        self.logprobs: list[float] = []
        self.tops: list[TopAlternatives] = []
        self.columns: dict[str, list] = {name: [] for name in ask.columns}
        self.reason = "stop"
        self.calls = ToolCallJoiner()

    def add(self, message: wire.Message | Tokens) -> int:
        """Keep ``message``; roughly the bytes it adds to the answer's JSON."""
        size = sum(map(len, message.text))
        if message.type == "reasoning":  # no logprobs or columns: the reply's tokens have them
            self.thinking += message.text
            return size
        if message.type == "tool_calls":
            for text in message.text:
                self.calls.add(text)
            return size
        self.texts += message.text
        rows = len(message.text)
        if self.ask.logprobs:
            self.logprobs += message.columns["logprob"].tolist()
            tops = _tops(self.ask, message.columns, rows)
            self.tops += tops
            size += 6 * size + LOGPROB_JSON_BYTES * (rows + sum(map(len, tops)))  # token, its bytes, each alternative
        for name, values in self.columns.items():
            if name in message.columns:
                values += message.columns[name].tolist()
                size += COLUMN_JSON_BYTES * rows
        return size

    def choice(self, shaper: Shaper) -> dict[str, Any]:
        ask, lp = self.ask, None
        if ask.logprobs:
            lp = (
                chat_logprobs(self.texts, self.logprobs, self.tops)
                if ask.chat
                else completion_logprobs(self.texts, self.logprobs, 0, self.tops if ask.top_logprobs else None)
            )
        extension = {"columns": self.columns} if ask.columns else None
        thinking = "".join(self.thinking)
        return shaper.choice("".join(self.texts), self.reason, lp, extension, self.calls.result(), thinking)


def _too_large_whole(limit: int) -> ApiError:
    return ApiError(
        400,
        f'the whole answer would be larger than max_whole_bytes ({limit} bytes): ask with "stream": true',
        "invalid_request_error",
        "response_too_large",
        "stream",
    )


def _columns(names: list[str], columns: dict) -> dict[str, Any]:
    """The extension of one chunk: each asked-for column's values, one per token."""
    return {"columns": {name: columns[name].tolist() for name in names if name in columns}}


def _tops(ask: Ask, columns: dict, rows: int) -> list[TopAlternatives]:
    """Each row's alternatives (at most the ``top_logprobs`` asked), from the ring's ``top`` column
    (shm.batch); none for rows of a record without it."""
    column = columns.get(TOP_COLUMN)
    if not ask.top_logprobs or column is None:
        return [()] * rows
    return [top_alternatives(column, i)[: ask.top_logprobs] for i in range(rows)]
