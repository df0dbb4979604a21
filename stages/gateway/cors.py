"""CORS for browser apps that call the API from another origin (``[gateway] cors_origins``;
docs/gateway.md, "Browsers on other origins"). Off (no headers, OPTIONS is 405 as before) while the
list is empty.

A preflight (OPTIONS with Origin and Access-Control-Request-Method) on a covered path is answered
204 here, before any handler: browsers send it without credentials, and the request that follows
still needs its key. Every other response on a covered path (errors and streams included) gets its
Access-Control-* headers in ``on_response_prepare``, which runs as its head is sent."""

from __future__ import annotations

from collections.abc import Callable, Collection

from aiohttp import hdrs, web

from engine.protocol.openai_errors import ApiError

# What the official clients send (openai-node src/client.ts buildHeaders and
# internal/detect-platform.ts; Accept and Content-Type text/plain are CORS-safelisted, the JSON one is not).
ALLOW_HEADERS = ", ".join(
    (
        "Authorization",
        "Content-Type",
        "Accept",
        "OpenAI-Organization",
        "OpenAI-Project",
        "X-Stainless-Lang",
        "X-Stainless-Package-Version",
        "X-Stainless-OS",
        "X-Stainless-Arch",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Retry-Count",
        "X-Stainless-Timeout",
        "X-Stainless-Helper-Method",
    )
)
ALLOW_METHODS = "GET, POST, OPTIONS"
# none is CORS-safelisted: scripts could not read them
EXPOSE_HEADERS = ", ".join(
    ["x-neuralpipe-cache", "Retry-After"]
    + [f"x-ratelimit-{what}-{name}" for name in ("requests", "tokens") for what in ("limit", "remaining", "reset")]
)
MAX_AGE_S = "600"  # browsers cache a preflight this long (Chrome caps it at 7200)


class Cors:
    def __init__(self, origins: Collection[str], covers: Callable[[str], bool]) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.covers = covers  # the paths it answers for

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self._preflight)
        app.on_response_prepare.append(self._add_headers)

    def _allowed(self, request: web.Request) -> str | None:
        """The Access-Control-Allow-Origin to answer ``request`` with; None: no CORS headers."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return None
        if self.any_origin:
            return "*"
        return origin if origin in self.origins else None

    @web.middleware
    async def _preflight(self, request: web.Request, handler) -> web.StreamResponse:
        is_preflight = (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            and self.covers(request.path)
            and hdrs.ORIGIN in request.headers
        )
        if not is_preflight:
            return await handler(request)
        if self._allowed(request) is None:
            origin = request.headers[hdrs.ORIGIN][:200]
            raise ApiError(403, f"the origin {origin!r} is not in [gateway] cors_origins", code="origin_not_allowed")
        headers = {
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
            hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE_S,
        }
        return web.Response(status=204, headers=headers)  # Allow-Origin and Vary: _add_headers

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if not self.covers(request.path):
            return
        response.headers.add(hdrs.VARY, hdrs.ORIGIN)  # the answer depends on Origin: caches must key on it
        allow = self._allowed(request)
        if allow is not None:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allow
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
