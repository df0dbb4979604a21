"""The live web dashboard (docs/observability.md, "Live web dashboard"):

    GET /dashboard                 the page (stages/gateway/static/dashboard.html)
    GET /dashboard/static/<file>   its script and style sheet, shipped in the package (no CDN, no fonts)
    GET /dashboard/state.json      what the page shows (dashboard_state.py), polled once a second;
                                   ?since=<t>: only the chart points after t (wall-clock seconds)

The page and its files hold no engine data and are served to anyone; state.json and the token view's
feed (/v1/feed) take the same credentials as the API. The page asks for a key (or JWT) when
state.json answers 401, keeps it in the tab's sessionStorage and sends it as ``Authorization`` on
fetch and as ``?access_token=`` on the WebSocket (a browser cannot set headers there)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from engine.protocol.openai_errors import ApiError
from stages.gateway.dashboard_state import DashboardState
from stages.gateway.health import EngineHealth

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Everything the page loads comes from this origin: a stray external URL fails loudly in the browser.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_dashboard_routes(
    app: web.Application, ctx: Any, authenticate: Callable[[web.Request], Any], health: EngineHealth
) -> None:
    """Register the dashboard's routes on ``app``. ``ctx``: the gateway's WorkerContext;
    ``authenticate(request)``: the API's check (raises ApiError 401/403); ``health``: the gateway's
    EngineHealth, whose cached status reply /health shares."""
    state = DashboardState(ctx.runtime_dir, health)

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "dashboard.html", headers=PAGE_HEADERS)

    async def state_json(request: web.Request) -> web.Response:
        authenticate(request)
        raw = request.query.get("since", "0")
        try:
            since = float(raw)
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            raise ApiError(400, f"since: a time in seconds (got {raw[:40]!r})", param="since", code="invalid_value")
        body = orjson.dumps(await state.state(since))
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def close_state(_app: web.Application) -> None:
        await state.close()

    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/state.json", state_json)
    app.router.add_static("/dashboard/static/", STATIC_DIR, append_version=False)
    app.on_cleanup.append(close_state)
