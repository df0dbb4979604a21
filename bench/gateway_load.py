"""The load generator of ``neuralpipe bench gateway``: streaming chat completions (or Responses API
responses) over aiohttp (under uvloop) in a process of its own, so its CPU is counted apart from
what it measures.

Each token's latency is read from its text: the embedded upstream, run with ``stamp_tokens``,
writes each token as its send time (``time.monotonic_ns()``, CLOCK_MONOTONIC is system-wide), and a
proxy passes the text through; a chunk that carries several tokens carries several stamps. Latency
= the time the read that brought the chunk returned here minus the stamp. Not the official
``openai`` client: it builds pydantic objects for every chunk, CPU that on a small machine would
compete with the processes being measured; a plain SSE reader with orjson is all this needs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

MAX_ERRORS_KEPT = 5  # error texts sent back (all are counted)
READ_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Job:
    """One load: ``streams`` concurrent streams, each ``rounds`` requests one after another."""

    base_url: str  # the /v1 base URL
    model: str
    streams: int
    rounds: int
    tokens: int  # max_tokens of each request
    spread_s: float  # the streams' starts are spread evenly over this
    tag: str  # in every prompt: no two requests alike (no cache hit)
    extra: dict[str, Any] = field(default_factory=dict)  # more body fields (ignore_eos)
    api: str = "chat"  # or "responses": OpenAI's Responses API (POST /responses)


class Tally:
    """What the requests of one job saw."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.ttft_ns: list[int] = []
        self.latency_ns: list[int] = []
        self.received_ns: list[int] = []  # when each token of latency_ns came
        self.started_ns: list[int] = []  # when each stream's first request had its first token
        self.requests = self.cache_hits = self.error_count = 0
        self.errors: list[str] = []

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)

    def steady_latency_ns(self) -> list[int]:
        """The latency of the tokens that came once every stream had its first token: the load's
        steady state, without the start of every stream at once (none if a stream never had one)."""
        if len(self.started_ns) < self.streams:
            return []
        settled = max(self.started_ns)
        return [ns for ns, at in zip(self.latency_ns, self.received_ns, strict=True) if at >= settled]

    def result(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": len(self.latency_ns),
            "ttft_ns": self.ttft_ns,
            "latency_ns": self.latency_ns,
            "steady_latency_ns": self.steady_latency_ns(),
            "cache_hits": self.cache_hits,
            "error_count": self.error_count,
            "errors": self.errors,
        }


def _token_texts(event: bytes) -> tuple[str | None, str | None]:
    """(content text, error) of one SSE event; (None, None) for a comment, the role chunk, [DONE]."""
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return None, None
    chunk = orjson.loads(event[6:])
    if "error" in chunk:
        return None, str(chunk["error"])[:300]
    choices = chunk.get("choices")
    if not choices:
        return None, None
    choice = choices[0]
    delta = choice.get("delta")
    return (delta.get("content") if delta is not None else choice.get("text")) or None, None


def _response_texts(event: bytes) -> tuple[str | None, str | None]:
    """(text, error) of one Responses API event: an output text delta's text, a failure's error."""
    data = event.rpartition(b"data: ")[2]
    if not data:
        return None, None
    body = orjson.loads(data)
    if "error" in body:
        return None, str(body["error"])[:300]
    return (body.get("delta") or None) if body.get("type") == "response.output_text.delta" else None, None


async def _one(session: aiohttp.ClientSession, job: Job, body: bytes, tally: Tally, opens_stream: bool) -> None:
    tally.requests += 1
    began = time.monotonic_ns()
    first = True
    path, texts = ("/responses", _response_texts) if job.api == "responses" else ("/chat/completions", _token_texts)
    async with session.post(f"{job.base_url}{path}", data=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            tally.error(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            return
        if resp.headers.get("x-neuralpipe-cache") == "hit":
            tally.cache_hits += 1
        pending = b""
        async for data in resp.content.iter_any():
            now = time.monotonic_ns()
            *events, pending = (pending + data).replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                text, error = texts(event)
                if error is not None:
                    tally.error(error)
                    return
                if text is None:
                    continue
                try:
                    stamps = [int(stamp) for stamp in text.split()]
                except ValueError:
                    tally.error(f"token text is not a send stamp: {text[:80]!r}")
                    return
                if first and stamps:
                    tally.ttft_ns.append(now - began)
                    if opens_stream:
                        tally.started_ns.append(now)
                    first = False
                tally.latency_ns.extend(now - stamp for stamp in stamps)
                tally.received_ns.extend([now] * len(stamps))
    if first:
        tally.error("stream ended without a token")


async def _stream(session: aiohttp.ClientSession, job: Job, index: int, tally: Tally) -> None:
    await asyncio.sleep(index * job.spread_s / job.streams)
    for round_ in range(job.rounds):
        prompt = f"gateway bench {job.tag} stream {index} round {round_}"
        if job.api == "responses":
            body = {"model": job.model, "input": prompt, "max_output_tokens": job.tokens}
        else:
            body = {"model": job.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": job.tokens}
        body |= {"stream": True, **job.extra}
        try:
            await _one(session, job, orjson.dumps(body), tally, opens_stream=round_ == 0)
        except (TimeoutError, aiohttp.ClientError) as exc:
            tally.error(f"{type(exc).__name__}: {exc}")


async def _run(job: Job) -> dict[str, Any]:
    tally = Tally(job.streams)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(_stream(session, job, i, tally) for i in range(job.streams)))
    return tally.result()


def run_job(job: Job) -> dict[str, Any]:
    """Run one load to its end: every request's time to first token, every token's latency (ns)."""
    return uvloop.run(_run(job))


def serve(conn: Any) -> None:
    """The child's main (bench.proc.ChildProcess): "ready", then a result for each Job received,
    until None."""
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(run_job(job))
