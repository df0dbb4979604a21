"""The live web dashboard (GET /dashboard) in a real browser: Debian's Chromium driven by Playwright
(no browser download), against one real engine with the gateway and API keys on. The page loads with
no console error and nothing fetched from another host, its values go live, the token view draws
each token at its Hilbert cell in its colour, and without a key it asks for one. One engine serves
the module (tests/gateway_harness.py); each test launches its own browser (the leak check wants no
child process left between tests)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from gateway_harness import GatewayEngine, default_topology

CHROMIUM = "/usr/bin/chromium"
MODEL = "neuralpipe-echo"
WAIT_MS = 30_000  # deadline of each wait on the page (a loaded 2-core machine)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    engine = GatewayEngine(
        tmp_path_factory.mktemp("dash"),
        default_topology(gateway='auth = "keys"', embedded="tokens_per_s = 200"),
        "d" + uuid.uuid4().hex[:10],
    )
    try:
        engine.start()
        created = engine.cli("keys", "create", "dashboard", "--json", "--instance", engine.instance)
        engine.key = json.loads(created.stdout)["key"]
        engine.web = engine.url.removesuffix("/v1")
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield chromium
        finally:
            chromium.close()


class Watched:
    """A page, and everything that went wrong on it: console errors, uncaught exceptions, failed
    requests, requests to any other host than the gateway's."""

    def __init__(self, browser, gw) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.origin = urlsplit(gw.web).netloc
        self.console_errors: list[str] = []
        self.failed: list[str] = []
        self.elsewhere: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}"))
        self.page.on("request", self._request)
        self.page.on("websocket", lambda ws: self._request_url(ws.url))

    def _request(self, request) -> None:
        self._request_url(request.url)

    def _request_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "data" and parts.netloc != self.origin:
            self.elsewhere.append(url)


@contextlib.contextmanager
def traffic(gw, streams: int = 3, max_tokens: int = 150) -> Iterator[None]:
    """``streams`` streaming chat requests at a time through the API until the block ends."""
    stop = threading.Event()
    failures: list[str] = []

    def one_at_a_time() -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {gw.key}"}) as client:
            while not stop.is_set():
                body = {"model": MODEL, "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
                body |= {"max_tokens": max_tokens, "stream": True}
                with client.stream("POST", f"{gw.url}/chat/completions", json=body) as answer:
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.read()[:200]!r}")
                        return
                    for _ in answer.iter_lines():
                        if stop.is_set():
                            break

    threads = [threading.Thread(target=one_at_a_time, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures


def test_page_loads_clean_and_its_values_go_live(gw, browser):
    w = Watched(browser, gw)
    w.page.goto(f"{gw.web}/dashboard#key={gw.key}")
    w.page.wait_for_selector("#board:not([hidden])", timeout=WAIT_MS)
    assert w.page.evaluate("location.hash") == ""  # the key left the address bar at once
    assert w.page.locator("#login").is_hidden()
    with traffic(gw):
        # tokens delivered grow (a counter from /metrics) and the rate shows
        start = w.page.eval_on_selector("#tokens-per-s", "e => Number(e.dataset.total || 0)")
        w.page.wait_for_function(
            "start => Number(document.getElementById('tokens-per-s').dataset.total || 0) > start + 100",
            arg=start,
            timeout=WAIT_MS,
        )
        w.page.wait_for_function(
            "() => /\\d/.test(document.getElementById('tokens-per-s').textContent)", timeout=WAIT_MS
        )
        w.page.wait_for_function(
            "() => /\\d/.test(document.getElementById('latency-p99').textContent)", timeout=WAIT_MS
        )
    rows = w.page.eval_on_selector_all("#workers tr", "rows => rows.slice(1).map(r => r.cells[0].textContent)")
    assert sorted(rows) == ["broadcast", "cache", "compute", "gateway", "ingest"]
    assert w.page.locator("#rings .ring").count() == 3
    assert w.page.locator("#upstreams tr").nth(1).locator("td").nth(1).text_content() == "up"
    assert "healthy" in w.page.text_content("#pas-badge")
    points = w.page.evaluate("dash.history.length")
    assert points >= 2  # the PAS chart has a series to draw
    assert w.console_errors == [] and w.failed == [] and w.elsewhere == []


def test_token_view_draws_each_token_at_its_hilbert_cell_in_its_colour(gw, browser):
    w = Watched(browser, gw)
    w.page.goto(f"{gw.web}/dashboard#key={gw.key}")
    w.page.wait_for_function(
        "() => document.getElementById('feed-state').textContent === 'feed: connected'", timeout=WAIT_MS
    )
    assert w.page.evaluate("document.getElementById('token-view').dataset.drawn") == "0"
    # one answer, with the columns compute appended to each of its tokens (the gateway's extension)
    answer = httpx.post(
        f"{gw.url}/chat/completions",
        headers={"Authorization": f"Bearer {gw.key}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "draw me"}],
            "max_tokens": 40,
            "neuralpipe": {"columns": ["hilbert", "rgba"]},
        },
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    columns = answer.json()["choices"][0]["neuralpipe"]["columns"]
    tokens = len(columns["hilbert"])
    assert tokens == 40
    w.page.wait_for_function(
        "n => Number(document.getElementById('token-view').dataset.drawn) >= n", arg=tokens, timeout=WAIT_MS
    )
    # the last token drawn in each cell decides its colour; the alpha fades, the colour stays (read
    # back through the canvas' premultiplied alpha: within 255 / alpha)
    last = {}
    for (x, y), rgba in zip(columns["hilbert"], columns["rgba"], strict=True):
        last[(x, y)] = rgba
    shown = w.page.evaluate(
        """cells => {
            const canvas = document.getElementById('token-view');
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let lit = 0;
            for (let o = 3; o < data.length; o += 4) if (data[o]) lit++;
            const at = cells.map(([x, y]) => {
                const px = Math.min(canvas.width - 2, Math.max(0, Math.floor(x * canvas.width) - 1));
                const py = Math.min(canvas.height - 2, Math.max(0, Math.floor(y * canvas.height) - 1));
                const o = 4 * (py * canvas.width + px);
                return Array.from(data.slice(o, o + 4));
            });
            return {lit, at};
        }""",
        [list(cell) for cell in last],
    )
    assert shown["lit"] >= 4 * len(last) * 0.5  # 2x2 pixels per cell, some cells fading out
    matching = [
        cell
        for cell, pixel in zip(last.values(), shown["at"], strict=True)
        if pixel[3] > 0 and all(abs(a - b) <= max(4, 255 / pixel[3]) for a, b in zip(cell[:3], pixel[:3], strict=True))
    ]
    assert len(matching) >= 0.8 * len(last), (list(last.values())[:5], shown["at"][:5])
    assert w.console_errors == [] and w.failed == [] and w.elsewhere == []


def test_without_a_key_the_page_asks_for_one_and_a_key_opens_it(gw, browser):
    w = Watched(browser, gw)
    w.page.goto(f"{gw.web}/dashboard")
    w.page.wait_for_selector("#login:not([hidden])", timeout=WAIT_MS)
    assert w.page.locator("#board").is_hidden()
    assert w.page.text_content("#feed-state") == "feed: not connected"  # no feed without a key

    w.page.fill("#login-key", "sk-not-a-key-of-this-gateway")
    w.page.click("#login button")
    w.page.wait_for_function(
        "() => /refused the key: invalid API key/.test(document.getElementById('login-why').textContent)",
        timeout=WAIT_MS,
    )
    assert w.page.locator("#login").is_visible() and w.page.evaluate("sessionStorage.length") == 0

    w.page.fill("#login-key", gw.key)
    w.page.click("#login button")
    w.page.wait_for_selector("#board:not([hidden])", timeout=WAIT_MS)
    w.page.wait_for_function(
        "() => document.getElementById('feed-state').textContent === 'feed: connected'", timeout=WAIT_MS
    )
    assert w.page.evaluate("sessionStorage.length") == 1
    # the browser's only complaints: the two refused state.json requests (401)
    assert len(w.console_errors) == 2 and all("401" in e for e in w.console_errors), w.console_errors
    assert w.elsewhere == []


def test_state_json_takes_the_apis_credentials_and_answers_from_the_engine(gw):
    url = f"{gw.web}/dashboard/state.json"
    refused = httpx.get(url, timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{gw.web}/v1/feed", timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {gw.key}"}
    bad = httpx.get(url, params={"since": "nan"}, headers=auth, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"

    body = httpx.get(url, headers=auth, timeout=10).json()
    status = gw.status()
    assert body["engine"]["instance"] == gw.instance and body["engine"]["state"] == "running"
    assert [w["name"] for w in body["workers"]] == [w["name"] for w in status["workers"]]
    assert [r["name"] for r in body["rings"]] == [r["name"] for r in status["rings"]]
    assert set(body["pas"]) >= {"score", "integrity", "stability", "symmetry", "consistency"}
    assert body["metrics"] == "ok", body["metrics"]
    assert all(w["rss_bytes"] > 0 for w in body["workers"])
    fields = body["history"]["fields"]
    assert fields[0] == "t" and body["history"]["points"]
    later = httpx.get(url, params={"since": body["history"]["points"][-1][0]}, headers=auth, timeout=10).json()
    assert all(p[0] > body["history"]["points"][-1][0] for p in later["history"]["points"])
    page = httpx.get(f"{gw.web}/dashboard", timeout=10)  # the page itself holds no data: no key needed
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert "dashboard/static/dashboard.js" in page.text
