"""CORS against a real gateway with keys (``[gateway] cors_origins``): a browser's preflight is
answered 204 without a key and allows what the official openai JS client sends; the request that
follows still needs its key, and its answers (errors, 429s and streams too) carry
Access-Control-Allow-Origin, Vary: Origin and the exposed headers; another origin gets no CORS
headers; ``["*"]`` allows any; and bad origins are refused at config load, by name."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import httpx
import pytest
from aiohttp import web
from gateway_harness import GatewayEngine, default_topology

from stages.gateway.cors import Cors
from stages.gateway.params import GatewayParams

MODEL = "neuralpipe-echo"
APP = "https://app.example.com"
# what openai-node (src/client.ts, internal/detect-platform.ts) sends from a browser, as a browser asks for it
JS_CLIENT_HEADERS = (
    "authorization,content-type,x-stainless-arch,x-stainless-helper-method,x-stainless-lang,x-stainless-os,"
    "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,"
    "x-stainless-timeout"
)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "from a browser"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    engine = GatewayEngine(
        tmp_path_factory.mktemp("gwcors"),
        default_topology(gateway=f'auth = "keys"\ncors_origins = ["{APP}", "http://localhost:5173"]'),
        "c" + uuid.uuid4().hex[:10],
    )
    try:
        yield engine.start()
    finally:
        engine.stop()


def make_key(engine: GatewayEngine, name: str, *limits: str) -> str:
    return json.loads(engine.cli("keys", "create", name, *limits, "--json").stdout)["key"]


def preflight(url: str, origin: str, method: str = "POST") -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if method == "POST":
        headers["Access-Control-Request-Headers"] = JS_CLIENT_HEADERS
    return httpx.options(url, headers=headers, timeout=10)


def assert_cors(answer: httpx.Response, origin: str = APP) -> None:
    assert answer.headers.get("Access-Control-Allow-Origin") == origin, dict(answer.headers)
    assert "origin" in answer.headers.get("Vary", "").lower()
    exposed = answer.headers.get("Access-Control-Expose-Headers", "").lower()
    assert "x-neuralpipe-cache" in exposed and "retry-after" in exposed and "x-ratelimit-remaining-tokens" in exposed


def test_a_preflight_needs_no_key_and_allows_what_the_openai_js_client_sends(gw):
    health = gw.url.removesuffix("/v1") + "/health"
    urls = (gw.url + "/chat/completions", "POST"), (gw.url + "/models", "GET"), (gw.url + "/models/m%2Fx", "GET")
    for url, method in (*urls, (health, "GET")):
        answer = preflight(url, APP, method)
        assert answer.status_code == 204 and answer.content == b"", (url, answer.text)
        assert answer.headers["Access-Control-Allow-Origin"] == APP
        assert "origin" in answer.headers["Vary"].lower()
        assert method in answer.headers["Access-Control-Allow-Methods"]
        assert int(answer.headers["Access-Control-Max-Age"]) > 0
        allowed = {h.strip().lower() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
        assert set(JS_CLIENT_HEADERS.split(",")) <= allowed
    other = preflight(gw.url + "/completions", "http://localhost:5173")
    assert other.status_code == 204 and other.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


def test_the_request_still_needs_a_key_and_every_answer_carries_the_headers(gw):
    url, origin = gw.url + "/chat/completions", {"Origin": APP}
    refused = httpx.post(url, json=BODY, headers=origin, timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert_cors(refused)

    key = {**origin, "Authorization": f"Bearer {make_key(gw, 'browser', '--rpm', '2')}"}
    whole = httpx.post(url, json=BODY, headers=key, timeout=30)
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 3
    assert_cors(whole)
    with httpx.stream("POST", url, json={**BODY, "stream": True}, headers=key, timeout=30) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        assert_cors(stream)
        assert stream.headers["x-neuralpipe-cache"] in ("hit", "miss")
        assert list(stream.iter_lines())[-2:] == ["data: [DONE]", ""]
    limited = httpx.post(url, json=BODY, headers=key, timeout=10)  # its third request in a minute
    assert limited.status_code == 429 and limited.headers["Retry-After"]
    assert_cors(limited)


def test_another_origin_gets_no_cors_headers(gw):
    evil = "https://evil.example"
    refused = preflight(gw.url + "/chat/completions", evil)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
    health = httpx.get(gw.url.removesuffix("/v1") + "/health", headers={"Origin": evil}, timeout=10)
    assert health.status_code == 200
    for answer in (refused, health):
        assert not [h for h in answer.headers if h.lower().startswith("access-control-")], dict(answer.headers)
    assert "origin" in health.headers["Vary"].lower()  # a cache must not hand this answer to APP


def test_any_origin_with_a_star():
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def run() -> tuple[httpx.Response, httpx.Response]:
        app = web.Application()
        app.router.add_get("/health", ok)
        Cors(["*"], lambda path: path == "/health").install(app)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/health"
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                pre = await client.options(
                    url, headers={"Origin": "https://anywhere.example", "Access-Control-Request-Method": "GET"}
                )
                got = await client.get(url, headers={"Origin": "http://localhost:3000"})
            return pre, got
        finally:
            await runner.cleanup()

    pre, got = asyncio.run(run())
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "*"
    assert got.status_code == 200 and got.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize(
    "origins, named",
    [
        (["https://app.example.com/"], "'https://app.example.com/' is not an origin"),
        (["https://app.example.com/chat"], "'https://app.example.com/chat' is not an origin"),
        (["app.example.com"], "'app.example.com' is not an origin"),
        (["https://App.example.com"], "'https://App.example.com' is not an origin"),
        (["https://app.example.com:443"], "leave the default port out"),
        (["http://localhost:99999"], "port 99999 is out of range"),
        (["*", APP], '"*" allows every origin, so it stands alone'),
    ],
)
def test_a_bad_origin_is_refused_by_name(origins, named):
    with pytest.raises(ValueError, match="cors_origins") as refused:
        GatewayParams(cors_origins=origins)
    assert named in str(refused.value)


def test_a_bad_origin_stops_the_config_load_with_its_key_path(tmp_path):
    path = tmp_path / "cors.toml"
    path.write_text(default_topology(gateway='cors_origins = ["https://app.example.com/"]'))
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "config", "show", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "gateway.cors_origins: 'https://app.example.com/' is not an origin" in done.stderr
