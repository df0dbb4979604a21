"""The gateway: the engine's OpenAI-compatible front door, an asyncio worker (aiohttp's server under
uvloop). It is a client of the engine like any other: it submits over the request protocol to
ingest (engine/clients/requests_async.py) and follows its streams on the broadcast
(stages/gateway/follower.py). Auth, limits and the usage ledger are engine/auth's Gate. What it
serves: docs/gateway.md.

Params (``[gateway]``, stages/gateway/params.py): listen (127.0.0.1:8080; port 0: any free port),
auth (off | keys | jwt; off only on loopback) and its files, max_body_bytes, body_timeout_s,
header_timeout_s, send_timeout_s, keepalive_s, first_token_timeout_s, submit_timeout_s,
max_whole_bytes, max_total_whole_bytes, max_stream_backlog, max_total_backlog, models, feed_queue,
max_connections, cors_origins.

Stats (with every heartbeat): ``url`` (the /v1 base URL clients use: ``neuralpipe status --json``
shows it as gateway.url), requests, open, active_streams, backlog (tokens waiting for slow
streaming clients), whole_bytes (whole answers being collected, estimated JSON), submitted,
completed, failed, cancelled, too_slow, send_timeouts, cache_hits, tokens, feeds, feeds_open,
feeds_dropped, feeds_refused, feeds_closed_for_input, feeds_unheard, refused_busy, errors, and
the broadcast follower's counts (``broadcast_gaps``, ``broadcast_lost_streams``, ...).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web

from engine.auth.gate import Gate
from engine.clients.requests_async import AsyncRequestClient
from engine.listen import parse_listen
from engine.protocol.requests import ingest_endpoint
from engine.stage import AsyncStage, WorkerContext
from engine.validated import ModelRef
from stages.gateway.follower import BroadcastFollower
from stages.gateway.inflight import InFlight
from stages.gateway.sendwatch import SendWatch
from stages.gateway.server import GatewayServer

FOLLOW_WAIT_S = 20.0  # set-up waits this long for the broadcast's first answer (then /health says 503)
SHUTDOWN_S = 1.0  # streams still open when the gateway stops are cut after this long


DRAIN_CHECK_S = 0.25  # an idle gateway wakes 4 times a second for it (was 10: 0.4 % of a core idle)


class Gateway(AsyncStage):
    Params = ModelRef("stages.gateway.params:GatewayParams")

    async def setup(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        params = self.params = self.parse_params(ctx.params)
        self.gate = Gate.from_config(
            params, params.state_dir or None, on_error=lambda m: ctx.log.warning("gateway_auth", error=m)
        )
        self.requests = AsyncRequestClient(
            ingest_endpoint(ctx.runtime_dir), f"gateway-{os.getpid()}", params.submit_timeout_s
        )
        self.requests.start()
        self.inflight = InFlight(ctx, params.max_connections)
        await self._cancel_left_open()
        BroadcastFollower.reserve(1 + params.max_stream_feeds)  # this one and each feed of one stream
        self.follower = BroadcastFollower(ctx.runtime_dir)
        self.follower.start()
        for _ in range(int(FOLLOW_WAIT_S / 0.05)):
            if self.follower.ready:
                break
            await asyncio.sleep(0.05)
        self.server = GatewayServer(ctx, params, self.gate, self.requests, self.follower, self.inflight)
        self.send_watch = SendWatch(params.send_timeout_s, ctx.log)
        self.runner = web.AppRunner(
            self.server.app(),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_S,
            # aiohttp's keep-alive timer runs from a connection's opening and from the end of each
            # answer until the next request head is whole: so it is the slow-header (slowloris)
            # limit, and the idle keep-alive limit with it (docs/gateway.md, "Slow clients")
            keepalive_timeout=params.header_timeout_s,
        )
        await self.runner.setup()
        host, port = parse_listen(params.listen)
        await web.TCPSite(self.runner, host, port).start()
        bound_host, bound_port = self.runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/v1"
        ctx.log.info("gateway_ready", url=self.url, auth=params.auth, following=self.follower.ready)

    async def _cancel_left_open(self) -> None:
        """The streams a killed predecessor had open: their clients are gone, so cancel them."""
        left = self.inflight.left
        if not left:
            return
        done = await asyncio.gather(*(self.requests.cancel(sid, token) for sid, token in left), return_exceptions=True)
        cancelled = sum(1 for result in done if result is None)  # the others had ended meanwhile
        self.ctx.log.warning("gateway_cancelled_left_open", streams=len(left), cancelled=cancelled)

    async def run(self, ctx: WorkerContext) -> None:
        try:
            while not ctx.draining:  # a drain comes with the control socket, read each heartbeat
                await asyncio.sleep(DRAIN_CHECK_S)
                if self.follower.failure is not None:  # the supervisor restarts the gateway
                    raise RuntimeError("the broadcast follower failed") from self.follower.failure
                closed = self.send_watch.check((c.transport for c in self.runner.server.connections), time.monotonic())
                if closed:
                    ctx.telemetry.count("neuralpipe_gateway_send_timeouts_total", closed)
                completions = self.server.completions  # what all requests hold, 4 samples a second
                ctx.telemetry.set("neuralpipe_gateway_backlog_tokens", completions.backlog.total)
                ctx.telemetry.set("neuralpipe_gateway_whole_answer_bytes", completions.whole.total)
        finally:
            await self.runner.cleanup()
            await self.follower.close()
            await self.requests.close()
            self.gate.close()

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "following": self.follower.ready,
            "send_timeouts": self.send_watch.closed,
            **self.server.stats(),
        }
