"""Take the screenshot of the live web dashboard that docs/observability.md shows (docs/img/dashboard.png).

    python3 tools/dashboard_screenshot.py                     # a temporary engine with traffic, then stopped
    python3 tools/dashboard_screenshot.py --url http://127.0.0.1:8080 [--key sk-...]   # a running gateway

Without ``--url`` it starts an engine of the default topology (embedded upstream paced at
``--tokens-per-s`` per stream, gateway and metrics on free ports, everything under a temporary
directory), keeps ``--streams`` chat streams going through the gateway's API (a few repeated prompts,
so the cache has hits), waits ``--seconds`` for the charts to fill, and shoots the whole page.
The browser is Debian's Chromium (/usr/bin/chromium) driven by Playwright, as in
tests/test_dashboard_browser.py: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png"
CHROMIUM = "/usr/bin/chromium"
MODEL = "neuralpipe-echo"
PROMPTS = (
    "Explain a ring buffer to a new engineer.",
    "Why does a shared-memory queue beat a socket on one machine?",
    "Describe a Hilbert curve in one paragraph.",
)


@contextlib.contextmanager
def temporary_engine(tokens_per_s: float) -> Iterator[str]:
    """A default-topology engine under a temporary directory; yields the gateway's base URL."""
    from engine.clients.supervisor import request
    from engine.config import load_config, render_config
    from engine.launcher import launch_detached, wait_exit
    from engine.status_view import gateway_view

    with tempfile.TemporaryDirectory(prefix="np-shot-") as tmp:
        os.environ.update(
            NEURALPIPE_RUNTIME_DIR=os.path.join(tmp, "run"),
            NEURALPIPE_STATE_DIR=os.path.join(tmp, "state"),
            NEURALPIPE_METRICS_PORT="0",
            NEURALPIPE_GATEWAY_LISTEN="127.0.0.1:0",
        )
        cfg = load_config()
        cfg.workers["ingest"].params["embedded"] = {"tokens_per_s": tokens_per_s}
        # a busy machine must not fail the start
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"heartbeat_timeout_s": 10.0})})
        path = os.path.join(tmp, "engine.toml")
        Path(path).write_text(render_config(cfg))
        info = launch_detached(cfg, path, timeout_s=60)
        try:
            gateway = gateway_view(request(info["control"], "status", timeout_s=5))
            if gateway is None:
                raise SystemExit("the engine runs no gateway")
            yield gateway["url"].removesuffix("/v1")
        finally:
            request(info["control"], "shutdown")
            if not wait_exit(info["pid"], 30):
                print(f"engine {info['instance']} did not stop within 30 s", file=sys.stderr)


@contextlib.contextmanager
def traffic(base: str, key: str | None, streams: int) -> Iterator[None]:
    """``streams`` chat streams at a time through the gateway until the block ends."""
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def one_at_a_time(n: int) -> None:
        with httpx.Client(timeout=60, headers=headers) as client:
            i = 0
            while not stop.is_set():
                i += 1
                repeat = i % 4 == 0  # the same prompt at temperature 0: a cache hit
                prompt = PROMPTS[i % len(PROMPTS)] if repeat else f"{PROMPTS[i % len(PROMPTS)]} ({n}.{i})"
                body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 300}
                body |= {"stream": True, "temperature": 0}
                with (
                    contextlib.suppress(httpx.HTTPError),
                    client.stream("POST", f"{base}/v1/chat/completions", json=body) as answer,
                ):
                    for _ in answer.iter_lines():
                        if stop.is_set():
                            break

    threads = [threading.Thread(target=one_at_a_time, args=(n,), daemon=True) for n in range(streams)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def shoot(base: str, key: str | None, seconds: float, out: Path, width: int) -> None:
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(f"{base}/dashboard" + (f"#key={key}" if key else ""))
            page.wait_for_selector("#board:not([hidden])", timeout=30_000)
            time.sleep(seconds)  # the charts fill with a point a second
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--url", help="a running gateway (http://host:port); default: a temporary engine")
    parser.add_argument("--key", help="an API key or JWT, when the gateway's auth is on")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long the page runs before the shot")
    parser.add_argument("--streams", type=int, default=6, help="streams kept going (temporary engine only)")
    parser.add_argument("--tokens-per-s", type=float, default=150.0, help="per stream (temporary engine only)")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    if not os.path.exists(CHROMIUM):
        parser.error(f"{CHROMIUM} is missing (apt-get install chromium)")
    if args.url:
        shoot(args.url.rstrip("/").removesuffix("/v1"), args.key, args.seconds, args.out, args.width)
    else:
        with temporary_engine(args.tokens_per_s) as base, traffic(base, None, args.streams):
            shoot(base, None, args.seconds, args.out, args.width)
    print(f"{args.out}: {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
