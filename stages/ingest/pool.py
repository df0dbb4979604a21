"""A pool of OpenAI-compatible upstreams: several servers per model name, health checks
(``GET /v1/models``), load balancing, retries with back-off before the first token, failover,
cool-down of failing upstreams, per-upstream concurrency limits, per-upstream request and token
rate limits (token buckets) and a configurable policy for a stream that fails after its first
token. All upstreams share one aiohttp session, so connections are kept alive and reused.
Rules and measurements: docs/upstreams.md.

    pool = UpstreamPool([UpstreamConfig("a", "http://10.0.0.1:8000"), ...], PoolPolicy())
    await pool.start()
    async with aclosing(pool.stream(body)) as events:   # "start", "token"..., "end" | "error"
        async for event in events:
            ...
    end = await pool.relay(body, sink)   # the fast path: sink(tokens) per read; UpstreamError
    end = await pool.relay(body, sink, one_token=one)   # and one(text, recv_ns) per one-token read
    await pool.close()
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field

import aiohttp
import orjson

from engine.fdlimit import out_of_descriptors
from engine.protocol.requests import MAX_TOKENS_LIMIT
from engine.telemetry import Telemetry
from engine.upstreams import UpstreamEntry as UpstreamConfig  # one definition with the config's [[upstreams]]
from stages.ingest.openai_client import (
    OneToken,
    StreamEnd,
    TokenEvent,
    Tokens,
    TokenSink,
    UpstreamError,
    batches_of,
    raise_after,
    relay_completion,
    wait_both,
)
from stages.ingest.ratelimit import TokenBucket, taking

__all__ = ["MID_STREAM_POLICIES", "STRATEGIES", "PoolPolicy", "UpstreamConfig", "UpstreamPool"]

STRATEGIES = ("least_outstanding", "ewma", "round_robin")
MID_STREAM_POLICIES = ("error", "reissue")
EWMA_ALPHA = 0.3  # weight of the newest time-to-first-token sample
MAX_MODELS = 1024  # model ids kept per upstream from its GET /v1/models
MAX_MODEL_ID = 256
# a GET /v1/models answer read at most this far (OpenRouter's list of ~300 models with their
# descriptions is ~1-2 MB; one that streams without end was read whole into ingest's memory)
MAX_MODELS_BODY = 8 << 20
NO_VERDICT = "no verdict"  # a health check that could not be made (ingest had no file descriptor left)


@dataclass(frozen=True)
class PoolPolicy:
    strategy: str = "least_outstanding"
    retries: int = 3  # attempts after the first, before the first token (and for "reissue")
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    failures_to_cool_down: int = 3  # consecutive failed requests that take an upstream out
    cool_down_s: float = 5.0  # then it returns once a health check passes
    health_interval_s: float = 2.0
    mid_stream: str = "error"  # "reissue": a deterministic request continues on another upstream
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0  # longest silence (keep-alive comments count) inside a stream
    first_token_timeout_s: float = 120.0  # from the request to the first token (keep-alives do not count)
    stream_timeout_s: float = 1800.0  # the whole stream, from the request to its end
    retry_after_max_s: float = 60.0  # the longest pause an upstream's Retry-After may impose

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"pool strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.mid_stream not in MID_STREAM_POLICIES:
            raise ValueError(f"pool mid_stream must be one of {MID_STREAM_POLICIES}, not {self.mid_stream!r}")
        if self.retries < 0 or self.failures_to_cool_down < 1:
            raise ValueError("pool retries must be >= 0 and failures_to_cool_down >= 1")
        for name in (
            "connect_timeout_s",
            "idle_timeout_s",
            "first_token_timeout_s",
            "stream_timeout_s",
            "retry_after_max_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"pool {name} must be > 0, not {getattr(self, name)!r}")


@dataclass(eq=False)
class _Upstream:
    """An upstream's configuration and live state (one event loop: no locks)."""

    cfg: UpstreamConfig
    healthy: bool = True
    cooling_until: float = 0.0  # time.monotonic(); 0: not cooling down
    not_before: float = 0.0  # time.monotonic(): its Retry-After; no request to it before then
    client_errors: int = 0  # requests it refused (4xx): the clients', not its health's
    outstanding: int = 0
    ewma_latency_s: float = 0.0  # time to first token; 0: not measured yet
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    headers: dict = field(default_factory=dict)
    request_bucket: TokenBucket | None = None  # None: unlimited
    token_bucket: TokenBucket | None = None
    last_token_ns: int = 0  # time.monotonic_ns() of the last read that brought a token
    last_failure: str = ""  # what went wrong last (a request or a health check), for errors
    reported_models: tuple[str, ...] = ()  # what its GET /v1/models listed at the last health check

    def serves(self, model: str | None) -> bool:
        # A request that names no model takes the server's default: any upstream will do.
        return not self.cfg.models or model is None or model in self.cfg.models

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.cooling_until

    def has_slot(self) -> bool:
        return self.outstanding < self.cfg.max_concurrency

    def request_wait(self, now: float) -> float:
        """Seconds until its request bucket allows one more request (0: now)."""
        return 0.0 if self.request_bucket is None else self.request_bucket.wait_time(1.0, now)

    def record_latency(self, seconds: float) -> None:
        old = self.ewma_latency_s
        self.ewma_latency_s = seconds if old == 0.0 else old + EWMA_ALPHA * (seconds - old)


@dataclass
class _Progress:
    """What one pool stream has delivered, so a re-issued request can skip it."""

    sent: int = 0  # token events yielded to the consumer
    texts: list[str] | None = None  # their texts, kept only when a reissue may need to check them


class UpstreamPool:
    def __init__(
        self,
        upstreams: list[UpstreamConfig],
        policy: PoolPolicy | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("an upstream pool needs at least one upstream")
        if len({u.name for u in upstreams}) != len(upstreams):
            raise ValueError("upstream names must be unique")
        self.policy = policy or PoolPolicy()
        self.telemetry = telemetry or Telemetry()  # per-upstream requests, errors, time to first token
        self._upstreams = [
            _Upstream(
                cfg,
                headers=_auth_headers(cfg),
                request_bucket=_bucket(cfg.requests_per_s),
                token_bucket=_bucket(cfg.tokens_per_s),
            )
            for cfg in upstreams
        ]
        self._session_factory = session_factory or self._default_session
        self._session: aiohttp.ClientSession | None = None
        self._health_tasks: list[asyncio.Task] = []
        self._changed = asyncio.Event()  # replaced on every change of slots or health
        self._rr_next = 0

    def _default_session(self) -> aiohttp.ClientSession:
        # One connection per stream in flight plus one for the health check; limit=0: no global cap
        # (the pool's own per-upstream limits decide), keep-alive reuse is the connector's default.
        per_host = max(u.cfg.max_concurrency for u in self._upstreams) + 1
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=per_host))

    async def start(self) -> None:
        """Open the session, run one round of health checks, then keep checking in the background."""
        self._session = self._session_factory()
        await asyncio.gather(*(self._check(u) for u in self._upstreams))
        self._health_tasks = [asyncio.create_task(self._health_loop(u)) for u in self._upstreams]

    async def close(self) -> None:
        for task in self._health_tasks:
            task.cancel()
        for task in self._health_tasks:
            with suppress(asyncio.CancelledError):
                await task
        self._health_tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def snapshot(self) -> list[dict]:
        """Per upstream, for metrics and status (``cooling_down_until`` on time.monotonic())."""
        return [
            {
                "name": u.cfg.name,
                "healthy": u.healthy,
                "cooling_down_until": u.cooling_until,
                "outstanding": u.outstanding,
                "ewma_latency_s": u.ewma_latency_s,
                "requests": u.requests,
                "failures": u.failures,
                "client_errors": u.client_errors,
            }
            for u in self._upstreams
        ]

    def models(self) -> list[str]:
        """The models the pool serves: each upstream's configured ``models``, or what its model
        list said at the last health check."""
        return sorted({m for u in self._upstreams for m in (u.cfg.models or u.reported_models)})

    def stream(self, body: dict, *, endpoint: str = "chat", deterministic: bool = False) -> AsyncIterator[TokenEvent]:
        """One "start", the "token" events, then one "end" or one "error" event. Stop early with
        ``aclose()``: the upstream response is closed and the slot freed."""
        return _flatten(self.stream_batches(body, endpoint=endpoint, deterministic=deterministic))

    async def stream_batches(
        self, body: dict, *, endpoint: str = "chat", deterministic: bool = False
    ) -> AsyncIterator[list[TokenEvent]]:
        """The events of :meth:`stream` in non-empty lists, one per network read."""
        yield [TokenEvent("start", recv_ns=time.monotonic_ns())]
        batches = batches_of(lambda sink: self.relay(body, sink, endpoint=endpoint, deterministic=deterministic))
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()

    # ------------------------------------------------------------------ one request

    async def relay(
        self,
        body: dict,
        sink: TokenSink,
        *,
        one_token: OneToken | None = None,
        endpoint: str = "chat",
        deterministic: bool = False,
    ) -> StreamEnd:
        """Stream ``body`` from the pool: ``sink`` gets each read's new tokens (an awaitable it
        returns is awaited before reading on), ``one_token`` where given those of a read of one
        plain content token (relay_completion's); returns how the stream ended, or raises
        :class:`UpstreamError` with the message that ends it once retries and failover are spent.
        Cancel it to stop: the upstream response is closed and the slot freed."""
        reissue = deterministic and self.policy.mid_stream == "reissue"
        progress = _Progress(texts=[] if reissue else None)
        model = body.get("model")
        tried: set[_Upstream] = set()
        failed = waited = 0
        give_up_at = time.monotonic() + self.policy.first_token_timeout_s
        while True:
            try:
                upstream = await self._acquire(model, tried)
                tried.add(upstream)
                return await self._attempt(upstream, body, endpoint, progress, sink, one_token)
            except UpstreamError as err:
                if err.local and time.monotonic() < give_up_at:
                    # no descriptor for a connection: wait, as for a slot, until a stream ends (its
                    # connection is kept for the next request) or a back-off passes; not an attempt
                    waited += 1
                    await self._changed_within(self._backoff_s(waited))
                    continue
                failed += 1
                final = self._final_error(err, progress, failed, reissue)
                if final is not None:
                    raise UpstreamError(final, retryable=False, before_first_token=not progress.sent) from None
            if not self._untried_available(model, tried):
                await asyncio.sleep(self._backoff_s(failed))

    def _final_error(self, err: UpstreamError, progress: _Progress, failed: int, reissue: bool) -> str | None:
        """The message that ends the stream, or None to try again."""
        if not err.retryable:
            return str(err)
        if failed > self.policy.retries:
            return f"{err} (gave up after {failed} attempts)"
        if progress.sent and not reissue:
            why = "mid_stream policy 'error'" if self.policy.mid_stream == "error" else "request not deterministic"
            return f"{err} (after {progress.sent} tokens; not re-issued: {why})"
        return None

    def _backoff_s(self, failed: int) -> float:
        """Exponential back-off with jitter: retries of many streams that failed together spread out."""
        # the exponent capped: a float overflows past 2**1023 (a large ``retries``, a long wait for a descriptor)
        base = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** min(failed - 1, 64))
        return base * random.uniform(0.5, 1.0)

    async def _attempt(
        self,
        upstream: _Upstream,
        body: dict,
        endpoint: str,
        progress: _Progress,
        sink: TokenSink,
        one_token: OneToken | None,
    ) -> StreamEnd:
        """One request to ``upstream``, holding its slot (taken by :meth:`_acquire`) until it ends
        whichever way. The first ``progress.sent`` tokens were delivered by an earlier attempt:
        they are checked against what was sent and skipped."""
        skip, seen, began = progress.sent, 0, time.monotonic()
        policy, limit = self.policy, _max_tokens(body)
        start = asyncio.get_running_loop().time()
        deadline = start + policy.stream_timeout_s
        budget = asyncio.timeout_at(start + min(policy.first_token_timeout_s, policy.stream_timeout_s))

        # the usual stream: nothing to keep for a reissue, no token rate of the upstream's to take
        unchecked = progress.texts is None and upstream.token_bucket is None

        def fresh_one(text: str, recv_ns: int) -> Awaitable[None] | None:
            """The usual read, one plain token: passed on as it is while nothing needs checking."""
            nonlocal seen
            if unchecked and seen > skip and progress.sent < limit:
                seen += 1
                progress.sent += 1
                upstream.last_token_ns = recv_ns  # passive health: a stream delivering proves it up
                return one_token(text, recv_ns)
            return fresh(Tokens.single(text, recv_ns))

        def fresh(tokens: Tokens) -> Awaitable[None] | None:
            nonlocal seen
            if seen == 0:
                upstream.record_latency(ttft := time.monotonic() - began)
                self.telemetry.observe("neuralpipe_time_to_first_token_seconds", ttft, upstream=upstream.cfg.name)
                budget.reschedule(deadline)  # a first token: the whole-stream deadline from now on
            upstream.last_token_ns = tokens.recv_ns  # passive health: a stream delivering proves it up
            before = seen
            tokens, seen = _fresh_tokens(tokens, progress, seen, skip)
            new = seen - max(before, skip)
            over = progress.sent + new - limit
            if over > 0:  # an upstream ignoring max_tokens: deliver up to it, then end the stream
                tokens = tokens.upto(len(tokens.texts) - over)
                new -= over
            progress.sent += new
            # the stream reads its response slower, so the upstream is throttled by TCP
            # back-pressure rather than anything being dropped
            throttle = taking(upstream.token_bucket, new) if upstream.token_bucket is not None and new else None
            wait = sink(tokens) if tokens.texts else None
            if over > 0:
                return raise_after(wait, UpstreamError(f"sent more than max_tokens ({limit}) tokens", retryable=False))
            if throttle is None or wait is None:
                return throttle or wait
            return wait_both(throttle, wait)

        try:
            async with budget:
                end = await relay_completion(
                    self._session,
                    upstream.cfg.base_url,
                    body,
                    fresh,
                    one_token=fresh_one if one_token is not None else None,
                    endpoint=endpoint,
                    headers=upstream.headers,
                    connect_timeout_s=policy.connect_timeout_s,
                    idle_timeout_s=policy.idle_timeout_s,
                )
            if seen < skip:  # the end of a re-issued stream shorter than what was sent
                raise UpstreamError(f"re-issued request ended after {seen} of {skip} tokens", retryable=False)
            upstream.consecutive_failures = 0
            return end
        except TimeoutError:
            self._count_error(upstream, "timeout")
            if seen == 0:
                err = UpstreamError(f"no first token within {policy.first_token_timeout_s:g} s", retryable=True)
                self._record_failure(upstream, str(err))
            else:
                err = UpstreamError(f"stream not done within {policy.stream_timeout_s:g} s", retryable=False)
            raise UpstreamError(f"upstream {upstream.cfg.name!r}: {err}", retryable=err.retryable) from None
        except UpstreamError as err:
            self._count_error(upstream, _error_kind(err))
            if err.retry_after_s is not None:
                pause = min(err.retry_after_s, policy.retry_after_max_s)
                upstream.not_before = max(upstream.not_before, time.monotonic() + pause)
            if err.client_caused:  # one client's bad requests must not cool it for everyone
                upstream.client_errors += 1
            elif err.health_failure:
                self._record_failure(upstream, str(err))
            raise UpstreamError(
                f"upstream {upstream.cfg.name!r}: {err}", retryable=err.retryable, local=err.local
            ) from None
        except asyncio.CancelledError:
            self._count_error(upstream, "cancelled")
            raise
        finally:
            upstream.outstanding -= 1
            self._notify()

    def _count_error(self, upstream: _Upstream, kind: str) -> None:
        self.telemetry.count("neuralpipe_upstream_errors_total", upstream=upstream.cfg.name, kind=kind)

    def _record_failure(self, upstream: _Upstream, why: str) -> None:
        upstream.last_failure = why
        upstream.failures += 1
        upstream.consecutive_failures += 1
        if upstream.consecutive_failures >= self.policy.failures_to_cool_down:
            # Out until the cool-down has passed and then a health check passes.
            upstream.cooling_until = time.monotonic() + self.policy.cool_down_s
            upstream.healthy = False
            upstream.consecutive_failures = 0
            self._notify()

    # ------------------------------------------------------------------ choosing an upstream

    async def _acquire(self, model: str | None, tried: set[_Upstream]) -> _Upstream:
        """Pick an upstream for ``model`` and take one of its slots and one request from its
        bucket; wait while every usable one is full or over its request rate. Prefers upstreams
        this request has not tried yet (failover)."""
        serving = [u for u in self._upstreams if u.serves(model)]
        if not serving:
            raise UpstreamError(f"no upstream serves model {model!r}", retryable=False)
        while True:
            now = time.monotonic()
            usable = [u for u in serving if u.usable(now)]
            if not usable:
                raise UpstreamError(
                    f"no healthy upstream for model {model!r}: {self._why_down(serving, now)}", retryable=True
                )
            free = [u for u in usable if u.has_slot()]
            ready = [u for u in free if u.request_wait(now) == 0.0 and now >= u.not_before]
            if ready:
                upstream = self._choose([u for u in ready if u not in tried] or ready)
                if upstream.request_bucket is not None:
                    upstream.request_bucket.try_take(1.0, now)
                upstream.outstanding += 1
                upstream.requests += 1
                self.telemetry.count("neuralpipe_upstream_requests_total", upstream=upstream.cfg.name)
                return upstream
            # Wake on a freed slot or a change of health, or when the first bucket refills.
            await self._changed_within(min((max(u.request_wait(now), u.not_before - now) for u in free), default=None))

    @staticmethod
    def _why_down(upstreams: list[_Upstream], now: float) -> str:
        """Each upstream and its last failure, in one line."""
        reasons = []
        for u in upstreams:
            state = f"cooling down for {u.cooling_until - now:.1f} s" if now < u.cooling_until else "down"
            reasons.append(f"{u.cfg.name!r} {state}" + (f" (last failure: {u.last_failure})" if u.last_failure else ""))
        return "; ".join(reasons)

    def _untried_available(self, model: str | None, tried: set[_Upstream]) -> bool:
        now = time.monotonic()
        return any(u.serves(model) and u.usable(now) and u not in tried for u in self._upstreams)

    def _choose(self, candidates: list[_Upstream]) -> _Upstream:
        strategy = self.policy.strategy
        if strategy == "round_robin":
            return self._round_robin(candidates)
        if strategy == "ewma":
            # Expected wait: latency times the queue it joins. Unmeasured (0) upstreams go first,
            # which is how a new or returning upstream gets its first sample.
            return min(candidates, key=lambda u: (u.ewma_latency_s * (u.outstanding + 1) / u.cfg.weight, u.requests))
        # Fewest requests in flight per unit of weight; ties go to the least used overall, so
        # sequential requests spread too.
        return min(candidates, key=lambda u: (u.outstanding / u.cfg.weight, u.requests / u.cfg.weight))

    def _round_robin(self, candidates: list[_Upstream]) -> _Upstream:
        """The next candidate in configuration order after the last one chosen."""
        n = len(self._upstreams)
        for i in range(n):
            index = (self._rr_next + i) % n
            if self._upstreams[index] in candidates:
                self._rr_next = index + 1
                return self._upstreams[index]
        raise AssertionError("round robin over no candidates")

    async def _changed_within(self, timeout_s: float | None) -> None:
        """Until the next change of slots or health, or ``timeout_s`` (None: no limit)."""
        with suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can swallow a cancel
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()

    def _notify(self) -> None:
        """Wake every request waiting for a slot or for an upstream to come back."""
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ health

    async def _health_loop(self, upstream: _Upstream) -> None:
        while True:
            delay = self.policy.health_interval_s
            remaining = upstream.cooling_until - time.monotonic()
            if remaining > 0:  # check as soon as the cool-down ends, not up to an interval later
                delay = min(delay, remaining)
            await asyncio.sleep(delay)
            await self._check(upstream)

    async def _check(self, upstream: _Upstream) -> None:
        failure = await self._probe(upstream)
        if failure is NO_VERDICT:
            return
        if failure is not None and self._streaming(upstream):
            failure = None  # a server that blocks its model list while it generates is not down
        ok = failure is None
        if not ok:
            upstream.last_failure = f"health check: {failure}"
        if ok and time.monotonic() < upstream.cooling_until:
            return  # healthy again, but the cool-down is not over
        if ok != upstream.healthy:
            upstream.healthy = ok
            self._notify()
        if ok:
            upstream.cooling_until = 0.0

    def _streaming(self, upstream: _Upstream) -> bool:
        """Passive health: one of its streams brought a token within the last health interval."""
        recent_ns = (self.policy.health_interval_s + self.policy.health_timeout_s) * 1e9
        return upstream.outstanding > 0 and time.monotonic_ns() - upstream.last_token_ns < recent_ns

    async def _probe(self, upstream: _Upstream) -> str | None:
        """None when ``GET /v1/models`` answers 200 with a model list, NO_VERDICT when ingest could
        not ask (no file descriptor left), else what went wrong."""
        url = upstream.cfg.base_url.rstrip("/") + "/v1/models"
        timeout = aiohttp.ClientTimeout(total=self.policy.health_timeout_s)
        try:
            async with self._session.get(url, headers=upstream.headers, timeout=timeout) as resp:
                if resp.status != 200:
                    return f"GET /v1/models answered HTTP {resp.status}"
                body = bytearray()
                async for chunk in resp.content.iter_any():  # bounded: the answer is untrusted
                    body += chunk
                    if len(body) > MAX_MODELS_BODY:
                        return f"GET /v1/models answered more than {MAX_MODELS_BODY} bytes"
                answer = orjson.loads(body)
        except TimeoutError:
            return f"GET /v1/models gave no answer within {self.policy.health_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            if out_of_descriptors(exc):  # ingest's own limit: says nothing of the upstream
                return NO_VERDICT
            return f"GET /v1/models failed: {type(exc).__name__}: {exc}"
        except ValueError:  # a body that is not JSON
            return "GET /v1/models answered something that is not JSON"
        if not (isinstance(answer, dict) and isinstance(answer.get("data"), list)):
            return "GET /v1/models answered without a model list"
        upstream.reported_models = _model_ids(answer["data"])
        return None


def _error_kind(err: UpstreamError) -> str:
    """A failed request's kind for the errors metric: http (a status), local (ingest had no file
    descriptor for its connection), connect, timeout (idle), else protocol (a broken or malformed
    stream); the messages are openai_client's."""
    if err.status is not None:
        return "http"
    if err.local:
        return "local"
    text = str(err)
    return "connect" if text.startswith("cannot connect") else "timeout" if text.startswith("idle") else "protocol"


def _model_ids(data: list) -> tuple[str, ...]:
    """The ids of a /v1/models answer's ``data``, bounded (an upstream's answer is untrusted)."""
    ids = (m.get("id") for m in data[:MAX_MODELS] if isinstance(m, dict))
    return tuple(i for i in ids if isinstance(i, str) and 0 < len(i) <= MAX_MODEL_ID)


def _fresh_tokens(tokens: Tokens, progress: _Progress, seen: int, skip: int) -> tuple[Tokens, int]:
    """The tokens of one read that an earlier attempt did not deliver (its first ``skip`` tokens
    are checked and dropped), and the count of tokens seen after it."""
    n = len(tokens.texts)
    if seen >= skip and progress.texts is None:  # the usual case: nothing to skip or to keep
        return tokens, seen + n
    replayed = min(max(skip - seen, 0), n)
    for i in range(replayed):
        _check_replay(progress, seen + i, tokens.texts[i])
    if replayed:
        tokens = tokens.after(replayed)
    if progress.texts is not None:
        progress.texts += tokens.texts
    return tokens, seen + n


async def _flatten(batches: AsyncIterator[list[TokenEvent]]) -> AsyncIterator[TokenEvent]:
    """The events of a batch iterator one by one (closing it when this one is closed)."""
    try:
        async for batch in batches:
            for event in batch:
                yield event
    finally:
        await batches.aclose()


def _check_replay(progress: _Progress, index: int, text: str) -> None:
    """A re-issued deterministic request must repeat what was already sent, or the consumer would
    get a spliced answer."""
    if progress.texts is not None and progress.texts[index] != text:
        raise UpstreamError(
            f"re-issued request diverged from the tokens already sent at token {index}", retryable=False
        )


def _max_tokens(body: dict) -> int:
    """The most tokens a stream of ``body`` may bring: its max_tokens (or max_completion_tokens),
    else the most any request may ask for."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return MAX_TOKENS_LIMIT


def _bucket(rate: float) -> TokenBucket | None:
    """A bucket of ``rate`` per second holding one second's worth (at least one); None for 0."""
    return TokenBucket(rate, max(rate, 1.0)) if rate > 0 else None


def _auth_headers(cfg: UpstreamConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
