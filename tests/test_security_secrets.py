"""Secrets never shown (issue 13, Security): an upstream's ``api_key`` appears in no log line, no
``status`` and no ``config show``; a ``base_url`` with credentials in it is refused at load
(tests/test_upstream_url.py), and any URL with credentials that reaches a log line (from anywhere)
is masked. A real engine (ingest -> broadcast) whose upstream refuses connections, so its errors
name the URL."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys

import orjson
import pytest
from engine_harness import wait_for

from engine.clients.requests import RequestClient
from engine.config import load_config, render_config
from engine.logs import JsonLogger
from engine.protocol.requests import ingest_endpoint
from engine.redact import mask_url, redact

PASSWORD, API_KEY = "pa@ss-W0RD", "sk-TOPSECRET-1234"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again at once: connections are refused


def _config(port: int) -> str:
    return f"""
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 2.0

[[upstreams]]
name = "private"
base_url = "http://127.0.0.1:{port}"
api_key = "{API_KEY}"

[workers.ingest]
stage = "ingest"
outputs = ["ingest-broadcast"]
params = {{ cache = "" }}

[workers.broadcast]
stage = "broadcast"
inputs = ["ingest-broadcast"]
"""


def _leaks(text: str) -> list[str]:
    return [secret for secret in (PASSWORD, "ss-W0RD", API_KEY) if secret in text]


def _cli(engine_base: str, *args: str) -> str:
    env = dict(os.environ, NEURALPIPE_RUNTIME_DIR=engine_base)
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(90)
def test_no_surface_shows_an_upstreams_credentials(start_engine, tmp_path):
    engine = start_engine(_config(_closed_port()))
    with RequestClient(ingest_endpoint(engine.info()["runtime_dir"])) as client:
        client.submit({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    log = wait_for(lambda: "stream_error" in engine.log() and engine.log(), 30, "the refused connection logged")
    assert "127.0.0.1" in log  # the URL is still named
    assert _leaks(log) == []
    for as_json in ((), ("--json",)):
        assert _leaks(_cli(engine.base, "status", *as_json)) == []
        shown = _cli(engine.base, "config", "show", "--config", str(engine.config_path), *as_json)
        assert _leaks(shown) == [] and "***" in shown


def test_config_show_masks_secrets_in_upstreams_and_in_worker_params(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        _config(9)
        + '\n[workers.extra]\nstage = "ingest"\noutputs = ["x"]\n'
        + 'params = { upstreams = [{ name = "p", base_url = "https://h.example/v1", '
        + f'api_key = "{API_KEY}" }}] }}\n[workers.sink]\nstage = "broadcast"\ninputs = ["x"]\n'
    )
    cfg = load_config(str(path))
    for as_json in (False, True):
        shown = render_config(cfg, as_json=as_json)
        assert _leaks(shown) == [] and "https://h.example/v1" in shown and "***" in shown
    assert cfg.upstreams[0].api_key == API_KEY  # masked where shown, not where used


def test_log_lines_mask_urls_and_keys_in_any_field():
    out = io.BytesIO()
    JsonLogger("ingest", "info", out).warning(
        "stream_error",
        error=f"cannot connect to http://alice:{PASSWORD}@10.0.0.1:8000/v1/chat/completions: refused",
        upstreams=[f"https://u:{PASSWORD}@a.example"],
        api_key=API_KEY,
    )
    line = out.getvalue().decode()
    assert _leaks(line) == []
    record = orjson.loads(line)
    assert record["error"].startswith("cannot connect to http://***@10.0.0.1:8000/v1")
    assert record["upstreams"] == ["https://***@a.example"] and record["api_key"] == "***"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://host:1/path?q=a@b", "http://host:1/path?q=a@b"),  # an "@" after the host is no userinfo
        ("http://u@h", "http://***@h"),
        ("see https://u:p@ss@h/x and http://v:w@g", "see https://***@h/x and http://***@g"),
        ("no url here", "no url here"),
    ],
)
def test_mask_url(text, shown):
    assert mask_url(text) == shown


def test_redact_leaves_empty_keys_and_other_values_alone():
    assert redact({"api_key": "", "n": 3, "t": (1, "http://a:b@c")}) == {
        "api_key": "",
        "n": 3,
        "t": [1, "http://***@c"],
    }


def test_config_show_masks_webhook_urls_but_their_origin(tmp_path):
    # a webhook's secret is its path or query (Slack, Discord, Teams put the token there)
    path = tmp_path / "c.toml"
    hooks = ["https://hooks.example.com/services/T0/B0/s3cr3tpath", "http://127.0.0.1:9000/hook?token=s3cr3tquery"]
    path.write_text("[notify]\nwebhooks = [" + ", ".join(f'"{h}"' for h in hooks) + "]\n")
    cfg = load_config(str(path), env={})
    for as_json in (False, True):
        shown = render_config(cfg, as_json=as_json)
        assert "s3cr3t" not in shown
        assert "https://hooks.example.com/***" in shown and "http://127.0.0.1:9000/***" in shown
    assert cfg.notify.webhooks == hooks  # masked where shown, not where used
