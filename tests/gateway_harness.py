"""An engine with a gateway, started detached (``neuralpipe run --detach``) so one engine can serve
every test of a module: the supervisor is then not a child of the test process, and each test's
leak check (conftest.no_leaks) leaves it alone; the module's fixture stops it at the end and checks
that it went."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

from engine.clients.supervisor import find_engine, request
from engine.launcher import wait_exit

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def default_topology(gateway: str = "", ingest: str = "", embedded: str = "") -> str:
    """The default topology with test-friendly timings; ``gateway``/``ingest``: TOML lines added to
    ``[gateway]`` / the ingest worker's table; ``embedded``: the embedded upstream's inline table."""
    return f"""
[engine]
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 5.0  # generous: a loaded 2-core machine is not a hung worker
stop_timeout_s = 5.0

[supervisor]
intensity = 10
backoff_initial_s = 0.01
backoff_max_s = 0.2

[workers.ingest]
stage = "ingest"
outputs = ["ingest-compute"]
params.embedded = {{ {embedded} }}
{ingest}

[workers.compute]
stage = "compute"
inputs = ["ingest-compute"]
outputs = ["compute-cache"]
params.backend = "numpy"

[workers.cache]
stage = "cache"
inputs = ["compute-cache"]
outputs = ["cache-broadcast"]

[workers.broadcast]
stage = "broadcast"
inputs = ["cache-broadcast"]

[workers.gateway]
stage = "gateway"

[gateway]
listen = "127.0.0.1:0"
{gateway}
"""


class GatewayEngine:
    def __init__(self, tmp_path, config: str, instance: str) -> None:
        self.base = str(tmp_path / "run")
        self.instance = instance
        self.state_dir = str(tmp_path / "state")
        self.config_path = str(tmp_path / f"{instance}.toml")
        with open(self.config_path, "w") as f:
            f.write(config)
        self.pid = 0
        self.url = ""

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            NEURALPIPE_RUNTIME_DIR=self.base,
            NEURALPIPE_INSTANCE=self.instance,
            NEURALPIPE_METRICS_PORT="0",
            NEURALPIPE_STATE_DIR=self.state_dir,
            NEURALPIPE_GATEWAY_LISTEN="127.0.0.1:0",
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", *args], env=self.env(), capture_output=True, text=True, timeout=60
        )
        if check and done.returncode:
            raise AssertionError(f"neuralpipe {' '.join(args)} exited {done.returncode}: {done.stderr}{done.stdout}")
        return done

    def start(self) -> GatewayEngine:
        self.cli("run", "--detach", "--config", self.config_path)
        info = find_engine(self.base, self.instance)
        self.pid = info["pid"]
        self.url = json.loads(self.cli("status", "--json", "--instance", self.instance).stdout)["gateway"]["url"]
        return self

    @property
    def runtime_dir(self) -> str:
        return find_engine(self.base, self.instance)["runtime_dir"]

    def status(self) -> dict[str, Any]:
        return request(find_engine(self.base, self.instance)["control"], "status", timeout_s=5)

    def stats(self, worker: str) -> dict[str, Any]:
        return next(w for w in self.status()["workers"] if w["name"] == worker)["stats"]

    def metrics(self) -> str:
        port = find_engine(self.base, self.instance)["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return answer.read().decode()

    def log(self) -> str:
        path = os.path.join(self.base, f"{self.instance}.log")
        with open(path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if not self.pid:
            return
        self.cli("stop", "--instance", self.instance, check=False)
        if not wait_exit(self.pid, 30):
            os.kill(self.pid, 9)
            raise AssertionError(f"engine {self.instance} still running 30 s after stop")


def cuts(engine: GatewayEngine, bound: str) -> float:
    """``neuralpipe_gateway_cut_total`` for ``bound`` in the engine's /metrics (0 until counted:
    the gateway's telemetry comes with its heartbeats)."""
    for line in engine.metrics().splitlines():
        if line.startswith("neuralpipe_gateway_cut_total{") and f'bound="{bound}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def serving(tmp_path_factory, name: str, config: str = "") -> Iterator[GatewayEngine]:
    """A module fixture's body: an engine (``config``, else the default topology) started for the
    module's tests and stopped after them (``yield from serving(...)``)."""
    instance = name[:2] + uuid.uuid4().hex[:10]
    engine = GatewayEngine(tmp_path_factory.mktemp(name), config or default_topology(), instance)
    try:
        yield engine.start()
    finally:
        engine.stop()
