"""A real Prometheus (Debian's /usr/bin/prometheus, started here with the rules loaded) scraping a real engine of
the default topology under load: the dashboard's key queries return data, every rule loads and evaluates, and
three restarts of a worker fire the restart-storm alert."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from engine_harness import chat, full_config, wait_for
from monitoring_helpers import (
    MONITORING,
    RULE_FILES,
    dashboard_queries,
    grafana_expr,
    kill_until_restarted,
    rule_groups,
)

from engine.clients.requests import RequestClient
from engine.protocol.requests import RequestError, ingest_endpoint

PROMETHEUS = "/usr/bin/prometheus"
pytestmark = [
    pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK), reason="Debian's prometheus package not installed"),
    pytest.mark.timeout(150),
]
PIPELINE = {"ingest", "compute", "cache", "broadcast"}  # the stages that pass tokens on
WORKERS = {*PIPELINE, "gateway"}
GATEWAY = '\n[workers.gateway]\nstage = "gateway"\n\n[gateway]\nlisten = "127.0.0.1:0"\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """One Prometheus server in a temp dir, scraping ``target`` every second, rules evaluated every second."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [{"job_name": "neuralpipe", "static_configs": [{"targets": [target]}]}],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = tmp_path / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
                cwd=tmp_path,
            )
        try:
            wait_for(self._ready, 30, "prometheus ready", interval=0.1)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict | list:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector of ``expr`` now, samples with a finite value only."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [s for s in data["result"] if math.isfinite(float(s["value"][1]))]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Load:
    """Until stopped: streams submitted straight to ingest (about 10 open at 100 tokens/s each), and one
    streamed chat completion after another through the gateway's HTTP API."""

    def __init__(self, runtime_dir: str, gateway_url: str) -> None:
        self.runtime_dir = runtime_dir
        self.gateway_url = gateway_url
        self.stop_event = threading.Event()
        self.submitted = 0
        self.answered = 0  # gateway requests answered
        self.threads = [threading.Thread(target=run, daemon=True) for run in (self._submit, self._gateway)]
        for thread in self.threads:
            thread.start()

    def _submit(self) -> None:
        with RequestClient(ingest_endpoint(self.runtime_dir)) as client:
            while not self.stop_event.wait(0.1):
                try:
                    client.submit(chat(f"load {self.submitted}", max_tokens=100, temperature=0.7))
                    self.submitted += 1
                except RequestError:  # refused or timed out while a worker restarts: try the next
                    continue

    def _gateway(self) -> None:
        body = json.dumps({"model": "neuralpipe-echo", "stream": True, **chat("gateway load", 20, 0.7)}).encode()
        while not self.stop_event.is_set():
            request = urllib.request.Request(
                self.gateway_url + "/chat/completions", body, {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    answer.read()
                self.answered += 1
            except OSError:  # a worker killed on purpose (the restart-storm part) fails a request
                self.stop_event.wait(0.1)

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(30)


def by_title(board: dict, title: str) -> str:
    return grafana_expr(dashboard_queries(board)[title])


# Panels (title refId) that have data once streams flow through the default topology
FLOWING_PANELS = (
    "Streams A",
    "Workers up A",
    "CPU (1 = one core) A",
    "Resident memory A",
    "Occupancy A",
    "Written bytes/s A",
    "Upstreams up A",
    "Requests and errors /s A",
    "Time to first token B",
    "In flight A",
    "Size A",
    "Subscribers A",
    "Messages/s A",
    "Requests/s by endpoint and code A",
    "Request duration and time to first token A",
    "Request duration and time to first token D",
    "Active streams A",
    "Tokens/s per key A",
)


@pytest.fixture
def engine(start_engine):
    return start_engine(full_config(rate=100) + GATEWAY)


@pytest.fixture
def prometheus(engine, tmp_path):
    server = Prometheus(tmp_path, f"127.0.0.1:{engine.info()['metrics_port']}")
    yield server
    server.stop()


@pytest.fixture
def load(engine):
    url = wait_for(lambda: engine.worker("gateway")["stats"].get("url"), 30, "the gateway's URL")
    streams = Load(engine.info()["runtime_dir"], url)
    yield streams
    streams.stop()


def test_prometheus_scrapes_the_engine_and_the_dashboard_queries_return_data(engine, prometheus, load) -> None:
    board = json.loads((MONITORING / "dashboard.json").read_text())

    def panel(title: str, label: str) -> dict[str, float]:
        """The panel's query now: its series' ``label`` -> value."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in prometheus.query(by_title(board, title))}

    wait_for(lambda: panel("Workers up A", "worker") == dict.fromkeys(WORKERS, 1), 30, "every worker up")
    pas = wait_for(lambda: panel("PAS A", "engine"), 30, "PAS in prometheus")
    assert list(pas) == [engine.instance] and 0 <= pas[engine.instance] <= 1
    subscores = panel("PAS and its four sub-scores B", "subscore")
    assert set(subscores) == {"integrity", "stability", "symmetry", "consistency"}
    tokens = wait_for(
        lambda: (rates := panel("Tokens/s by stage A", "stage")).get("broadcast", 0) > 0 and rates,
        45,
        "tokens/s at the broadcast",
    )
    assert set(tokens) == PIPELINE and all(v > 0 for v in tokens.values()), tokens
    p99 = wait_for(lambda: panel("Latency by stage, p50 and p99 B", "stage").get("broadcast"), 45, "e2e p99")
    assert 0 < p99 < 60
    for title in FLOWING_PANELS:
        wait_for(lambda t=title: prometheus.query(by_title(board, t)), 30, f"data in panel {title!r}")
    # the recording rules evaluate on the real series too
    recorded = wait_for(
        lambda: prometheus.query('engine_stage:neuralpipe_tokens:rate1m{stage="broadcast"} > 0'),
        30,
        "the recorded tokens rate",
    )
    assert recorded[0]["metric"]["engine"] == engine.instance

    def rules_healthy() -> list[dict]:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else []

    rules = wait_for(rules_healthy, 30, "every rule evaluated without error")
    assert len(rules) == sum(len(group["rules"]) for group in rule_groups())
    assert {"NeuralpipePasCritical", "engine_stage:neuralpipe_tokens:rate1m"} <= {r["name"] for r in rules}

    # metrics -> recording rule -> alert, end to end: three restarts of a worker make a storm
    kill_until_restarted(engine, "compute", 3)

    def storm() -> list[dict]:
        return [
            a
            for a in prometheus.api("alerts")["alerts"]
            if a["labels"]["alertname"] == "NeuralpipeWorkerRestartStorm" and a["state"] == "firing"
        ]

    [alert] = wait_for(storm, 30, "the restart-storm alert firing")
    assert alert["labels"]["worker"] == "compute" and alert["labels"]["engine"] == engine.instance
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#neuralpipeworkerrestartstorm"
    assert load.submitted > 0 and load.answered > 0
