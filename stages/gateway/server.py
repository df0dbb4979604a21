"""The gateway's HTTP server: routes, request bodies, who may call, and the answers that are not
completions (models, health, errors). docs/gateway.md has every endpoint and error.

    POST /v1/chat/completions, POST /v1/completions    completions (stages/gateway/completions.py)
    GET  /v1/models                                    what the upstreams serve (asked from ingest)
    GET  /health                                       engine ready (200) or not (503), PAS
    GET  /v1/feed                                      the broadcast over a WebSocket (feed.py)

Every refusal is OpenAI's error object with a 4xx or 503 status (errors.py); a handler's bug is
logged and answered 500 in the same shape, never a hang or a closed connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from engine.auth.errors import AuthError, LimitExceeded
from engine.auth.gate import Gate
from engine.clients.requests_async import AsyncRequestClient
from engine.protocol.openai_errors import ApiError
from engine.protocol.requests import MAX_MODEL_BYTES, MAX_STREAM_ID, RequestError
from engine.stage import WorkerContext
from stages.gateway.completions import Ask, Completions
from stages.gateway.cors import Cors
from stages.gateway.dashboard import add_dashboard_routes
from stages.gateway.errors import error_response
from stages.gateway.feed import FeedHub
from stages.gateway.follower import BroadcastFollower
from stages.gateway.health import EngineHealth, health_body
from stages.gateway.inflight import InFlight
from stages.gateway.responses import chat_body, responses_param, validate_responses
from stages.gateway.validation import Invalid, upstream_body, validate

MODELS_REFRESH_S = 30.0  # how long ingest's model list is taken as current
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/models": "models",
    "/health": "health",
    "/v1/feed": "feed",
}
MODEL_PATH = "/v1/models/"  # + a model's id: one model (ids hold slashes: "Qwen/Qwen3-8B")


def endpoint_of(path: str) -> str | None:
    """The API endpoint ``path`` names, as metrics label it; None for any other path."""
    return ENDPOINTS.get(path) or ("models" if path.startswith(MODEL_PATH) else None)


class GatewayServer:
    def __init__(
        self,
        ctx: WorkerContext,
        params: Any,
        gate: Gate,
        requests: AsyncRequestClient,
        follower: BroadcastFollower,
        inflight: InFlight,
    ) -> None:
        self.ctx = ctx
        self.params = params
        self.gate = gate
        self.requests = requests
        self.follower = follower
        self.completions = Completions(
            requests,
            follower,
            inflight,
            ctx.telemetry,
            params.keepalive_s,
            params.first_token_timeout_s,
            params.max_whole_bytes,
            params.max_stream_backlog,
            params.max_total_backlog,
            params.max_total_whole_bytes,
        )
        self.hub = FeedHub(follower, ctx.runtime_dir, params.feed_queue, params.max_stream_feeds)
        self.health = EngineHealth(ctx.runtime_dir)
        self.open = 0  # requests and feeds in progress
        self.counts = {"requests": 0, "refused_busy": 0, "errors": 0}
        self._models: list[str] = list(params.models)
        self._models_at = -MODELS_REFRESH_S

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.params.max_body_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get(MODEL_PATH + "{model:.+}", self._retrieve_model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/feed", self._feed)
        add_dashboard_routes(app, self.ctx, self._principal, self.health)
        if self.params.cors_origins:
            Cors(self.params.cors_origins, lambda path: endpoint_of(path) is not None).install(app)
        return app

    # ---- every request ------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        endpoint = endpoint_of(request.path) or ("dashboard" if request.path.startswith("/dashboard") else "other")
        started = time.monotonic()
        status = 499  # the client went away first
        self.counts["requests"] += 1
        try:
            if self.open >= self.params.max_connections:
                self.counts["refused_busy"] += 1
                raise ApiError(
                    503,
                    f"the gateway is at max_connections ({self.params.max_connections})",
                    "server_error",
                    "gateway_busy",
                    retry_after="1",
                )
            self.open += 1
            try:
                response = await handler(request)
            finally:
                self.open -= 1
            status = response.status
            return response
        except ApiError as err:
            status = err.status
            return error_response(err)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            status = exc.status
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            return error_response(
                ApiError(exc.status, f"{request.method} {request.path[:200]}: {exc.reason}", code=code)
            )
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # a bug: logged, and still an answer in the documented shape
            status = 500
            self.counts["errors"] += 1
            self.ctx.log.error("gateway_handler_failed", path=request.path[:200], error=repr(exc)[:1000])
            return error_response(
                ApiError(500, "internal error in the gateway (logged)", "server_error", "internal_error")
            )
        finally:
            telemetry = self.ctx.telemetry
            telemetry.count("neuralpipe_gateway_requests_total", endpoint=endpoint, code=str(status))
            telemetry.observe(
                "neuralpipe_gateway_request_duration_seconds", time.monotonic() - started, endpoint=endpoint
            )

    def _principal(self, request: web.Request, query_token: bool = False):
        authorization = request.headers.get("Authorization")
        if len(request.headers.getall("Authorization", ())) > 1 and self.gate.mode != "off":
            # which one counts? a proxy in front may have checked (or added) another than the first
            raise ApiError(401, "more than one Authorization header: send exactly one", code="invalid_api_key")
        if authorization is None and query_token and "access_token" in request.query:
            authorization = "Bearer " + request.query["access_token"]  # browsers cannot set headers on a WebSocket
        try:
            return self.gate.authenticate(authorization)
        except AuthError as exc:
            raise ApiError(exc.status, exc.message, exc.type, exc.code) from None

    async def _json_body(self, request: web.Request) -> Any:
        limit = self.params.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        try:
            raw = await asyncio.wait_for(request.read(), self.params.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(None, limit) from None
        except TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {self.params.body_timeout_s:g} s", code="request_timeout"
            ) from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    # ---- completions --------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        received = time.monotonic()
        principal = self._principal(request)
        raw = await self._json_body(request)
        try:
            req = validate(raw, chat)
        except Invalid as exc:
            raise _refused(exc) from None
        return await self._admitted(request, principal, self._ask(req, raw, chat), received)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: its request as the chat request it asks for (checked as one), its
        answer in its own shapes (stages/gateway/responses.py)."""
        received = time.monotonic()
        principal = self._principal(request)
        raw = await self._json_body(request)
        try:
            req = validate_responses(raw)
            body = chat_body(req)
        except Invalid as exc:
            raise _refused(exc) from None
        try:
            chat = validate(body, chat=True)
        except Invalid as exc:
            raise _refused(responses_param(exc)) from None
        ask = Ask(
            True,
            bool(req.stream),
            req.model,
            upstream_body(chat, body),
            logprobs=req.logprobs,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
            responses=req,
        )
        return await self._admitted(request, principal, ask, received)

    async def _admitted(self, request: web.Request, principal: Any, ask: Ask, received: float) -> web.StreamResponse:
        await self._check_model(ask.model)
        try:
            lease = self.gate.admit(principal, ask.n)
        except LimitExceeded as exc:
            self.ctx.telemetry.count("neuralpipe_gateway_limited_total", key=principal.label, reason=exc.reason)
            raise ApiError(
                429,
                exc.message,
                exc.type,
                exc.code,
                retry_after=exc.retry_after_header,
                headers=self.gate.rate_headers(principal),
            ) from None
        return await self.completions.answer(request, ask, lease, received)

    def _ask(self, req: Any, raw: dict[str, Any], chat: bool) -> Ask:
        """What the answer needs; 400 for what the engine cannot give (yet)."""
        if chat:
            if req.top_logprobs and not req.logprobs:
                raise ApiError(400, "top_logprobs requires logprobs: true", param="top_logprobs", code="invalid_value")
            logprobs, top = bool(req.logprobs), req.top_logprobs or 0
        else:
            if req.echo:
                raise _unsupported("echo", "the prompt is not echoed")
            logprobs, top = req.logprobs is not None, req.logprobs or 0
        columns = list(req.neuralpipe.columns) if req.neuralpipe else []
        known = self.follower.columns
        unknown = [name for name in columns if known and name not in known]
        if unknown:
            available = ", ".join(sorted(known)) or "none"
            raise ApiError(
                400,
                f"neuralpipe.columns: no column {unknown[0]!r} (this engine's: {available})",
                param="neuralpipe.columns",
                code="invalid_value",
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = upstream_body(req, raw)
        return Ask(chat, bool(req.stream), req.model, body, include_usage, logprobs, columns, top, req.n or 1)

    async def _check_model(self, model: str) -> None:
        models = await self._current_models()
        if models and model not in models:
            if time.monotonic() - self._models_at > 1.0:  # a model added upstream since: ask again
                self._models_at = -MODELS_REFRESH_S
                models = await self._current_models()
            if model not in models:
                raise ApiError(
                    404,
                    f"the model {model!r} does not exist (GET /v1/models lists them)",
                    code="model_not_found",
                    param="model",
                )

    async def _current_models(self) -> list[str]:
        """``[gateway] models``, else what ingest's upstreams serve (empty: not known, any goes)."""
        if self.params.models or time.monotonic() - self._models_at < MODELS_REFRESH_S:
            return self._models
        try:
            reply = await self.requests.call({"type": "models"})
            models = reply.get("models")
            if isinstance(models, list):
                self._models = [m for m in models if isinstance(m, str)]
        except (RequestError, TimeoutError, ValueError):
            pass  # ingest busy or restarting: keep the last list
        self._models_at = time.monotonic()
        return self._models

    # ---- the rest ------------------------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.Response:
        self._principal(request)
        self._models_at = min(self._models_at, time.monotonic() - MODELS_REFRESH_S + 1.0)  # at most 1 s old
        return _json({"object": "list", "data": [_model(m) for m in await self._current_models()]})

    async def _retrieve_model(self, request: web.Request) -> web.Response:
        self._principal(request)
        model = request.match_info["model"]
        if len(model.encode()) > MAX_MODEL_BYTES:  # no model is named so (nor echoed back in full)
            raise ApiError(404, f"no model id is longer than {MAX_MODEL_BYTES} bytes", code="model_not_found")
        await self._check_model(model)  # 404 model_not_found; any id while the list is not known, as requests take
        return _json(_model(model))

    async def _health(self, request: web.Request) -> web.Response:
        status, body = health_body(await self.health.status(), self.follower.ready)
        body["gateway"] = {"active_streams": self.completions.active_streams, "open_requests": self.open}
        return _json(body, status)

    async def _feed(self, request: web.Request) -> web.StreamResponse:
        self._principal(request, query_token=True)
        raw = request.query.get("stream", "all")
        stream = None
        if raw != "all":
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or int(raw) > MAX_STREAM_ID:
                raise ApiError(
                    400,
                    f"stream: 'all' or a stream id in 0..{MAX_STREAM_ID} (got {raw[:40]!r})",
                    param="stream",
                    code="invalid_value",
                )
            stream = int(raw)
        return await self.hub.serve(request, stream)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            **self.completions.counts,
            **self.hub.counts,
            "open": self.open,
            "active_streams": self.completions.active_streams,
            "backlog": self.completions.backlog.total,  # tokens waiting for slow streaming clients
            "whole_bytes": self.completions.whole.total,  # whole answers being collected (estimated JSON)
            "feeds_open": len(self.hub.feeds),
            **self.follower.counts,
            **{f"broadcast_{k}": v for k, v in self.follower.core.counts.items()},
            # its calls to ingest: timeouts, late replies, streams accepted too late and so cancelled
            **{f"requests_{k}": v for k, v in self.completions.requests.counts.items()},
        }


def _model(model_id: str) -> dict:
    """OpenAI's model object (no creation time or owner is known: 0 and "neuralpipe")."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "neuralpipe"}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _refused(exc: Invalid) -> ApiError:
    """A body that fails validation: 422 naming the field, 400 for the body as a whole."""
    if exc.param is None:
        return ApiError(400, exc.message, code="invalid_body")
    return ApiError(422, exc.message, param=exc.param, code="invalid_value")


def _too_large(size: int | None, limit: int) -> ApiError:
    got = f" ({size} bytes)" if size is not None else ""
    return ApiError(413, f"the request body is larger than max_body_bytes = {limit}{got}", code="request_too_large")


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(
        400, f"{param} is not supported yet: the engine carries {what}", param=param, code="unsupported_parameter"
    )
