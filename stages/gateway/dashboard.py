"""The live web dashboard's routes (GET /dashboard and its static files): a later part adds them
here. Until then this registers nothing; the server calls it once, unconditionally."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def add_dashboard_routes(app: web.Application, ctx: Any) -> None:
    """Register the dashboard's routes on ``app`` (``ctx``: the gateway's WorkerContext)."""
