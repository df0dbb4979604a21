"""Run a real engine (``python -m engine.cli run``) in a subprocess for tests, and wait on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.clients.supervisor import EngineNotFound, find_engine, request

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def held_for(predicate: Callable[[], Any], seconds: float, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it has been truthy for ``seconds`` in a row; fail after ``timeout``."""
    deadline, since = time.monotonic() + timeout, None
    while True:
        now = time.monotonic()
        since = (since or now) if predicate() else None
        if since is not None and now - since >= seconds:
            return
        if now > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} to hold {seconds:g} s")
        time.sleep(interval)


def follow_ends(runtime_dir: str, ended: dict, joined: Any, done: Any) -> None:
    """A wildcard consumer, for a thread: each stream's end into ``ended`` (id -> (end | error,
    reason)) until ``done`` is set; ``joined`` (an Event) is set once it has joined the broadcast."""
    from engine.clients.consumer import StreamConsumer

    with StreamConsumer.for_engine(runtime_dir) as consumer:
        if consumer.join(10):
            joined.set()
        while not done.is_set():
            for message in consumer.messages(idle_timeout_s=0.2):
                if message.type in ("end", "error"):
                    ended[message.stream] = (message.type, str(message.header.get("reason", "")))


def first_end(consumer: Any, sid: int) -> Any:
    """Stream ``sid``'s end or error message from a wildcard StreamConsumer (None after 10 s
    without a message): it returns at the end, not after an idle wait."""
    ends = (m for m in consumer.messages(idle_timeout_s=10) if m.stream == sid and m.type in ("end", "error"))
    return next(ends, None)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent, or init, to reap it is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Engine:
    """One engine under test: its config file, runtime directory, log and supervisor process."""

    def __init__(self, tmp_path, config: str, instance: str, open_files: tuple[int, int] | None = None) -> None:
        self.base = str(tmp_path / "run")
        self.instance = instance
        self.config_path = tmp_path / f"{instance}.toml"
        self.config_path.write_text(config)
        self.log_path = tmp_path / f"{instance}.log"
        self.proc: subprocess.Popen | None = None
        self.open_files = open_files  # the supervisor's RLIMIT_NOFILE (soft, hard); None: this process's

    def env(self) -> dict[str, str]:
        # the workers can import the test-only stages of this directory (readiness_stages)
        path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
        return dict(
            os.environ,
            NEURALPIPE_RUNTIME_DIR=self.base,
            NEURALPIPE_INSTANCE=self.instance,
            NEURALPIPE_METRICS_PORT="0",
            PYTHONPATH=path,
        )

    def start(self, wait_running: bool = True) -> Engine:
        """Run the supervisor; with ``wait_running``, return once it reports running (every
        worker ready)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self._limited(), sys.executable, "-m", "engine.cli", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=self.env(),
            )
        if wait_running:
            wait_for(self._running, 30, f"engine {self.instance} to report running")
        return self

    def _limited(self) -> list[str]:
        """A prefix that runs the command under ``open_files`` (util-linux's prlimit), or none."""
        if self.open_files is None:
            return []
        return ["prlimit", "--nofile={}:{}".format(*self.open_files), "--"]

    def _running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"engine exited with {self.proc.returncode} at start:\n{self.log()}")
        try:
            return find_engine(self.base, self.instance).get("state") == "running"
        except EngineNotFound:
            return False

    def info(self) -> dict[str, Any]:
        return find_engine(self.base, self.instance)

    def status(self) -> dict[str, Any]:
        return request(self.info()["control"], "status", timeout_s=5)

    def worker(self, name: str) -> dict[str, Any]:
        return next(w for w in self.status()["workers"] if w["name"] == name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"engine still running after {timeout:g} s:\n{self.log()[-4000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the supervisor with ``sig`` and wait; it drains and cleans up after itself."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def kill_all(self) -> None:
        """Last resort for a failed test: kill the supervisor (workers follow it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def pipeline_config(
    *,
    total: int = 0,
    rate: float = 2000,
    source_stage: str = "counter",
    strategy: str = "one_for_one",
    intensity: int = 10,
    heartbeat_interval_s: float = 0.1,
    heartbeat_timeout_s: float = 1.0,
    capacity: int = 65536,
    extra: str = "",
) -> str:
    """The source -> relay -> sink topology with test-friendly timings."""
    return f"""
[engine]
heartbeat_interval_s = {heartbeat_interval_s}
heartbeat_timeout_s = {heartbeat_timeout_s}
health_interval_s = 0.2
stop_timeout_s = 5.0

[supervisor]
strategy = "{strategy}"
intensity = {intensity}
period_s = 30.0
backoff_initial_s = 0.01
backoff_max_s = 0.2

[ring_defaults]
capacity = {capacity}

[workers.source]
stage = "{source_stage}"
outputs = ["source-relay"]
params = {{ streams = 4, batch = 16, rate = {rate}, total = {total} }}

[workers.relay]
stage = "relay"
inputs = ["source-relay"]
outputs = ["relay-sink"]

[workers.sink]
stage = "verify"
inputs = ["relay-sink"]
params = {{ streams = 4 }}
{extra}
"""


def with_stage(worker: str, stage: str, params: str) -> str:
    """The test pipeline with ``worker``'s stage replaced (and its params, where it has some)."""
    config = pipeline_config(heartbeat_timeout_s=1.0)
    table = f"[workers.{worker}]\n"
    head, rest = config.split(table)
    body, _, tail = rest.partition("\n\n")
    lines = [line for line in body.splitlines() if not line.startswith(("stage", "params"))]
    return head + table + "\n".join([f'stage = "{stage}"', f"params = {{ {params} }}", *lines]) + "\n\n" + tail


def full_config(
    *,
    rate: float = 0,
    cache: str = "",
    broadcast: str = "",
    compute: str = "",
    ingest: str = "",
    capacity: int = 1 << 20,
) -> str:
    """The default topology (embedded upstream -> ingest -> compute -> cache -> broadcast) with
    test-friendly timings; each ``*`` argument adds TOML lines to that worker's table (params.x = ...)."""
    return f"""
[engine]
heartbeat_interval_s = 0.1
heartbeat_timeout_s = 1.0
stop_timeout_s = 5.0

[supervisor]
intensity = 10
backoff_initial_s = 0.01
backoff_max_s = 0.2

[ring_defaults]
capacity = {capacity}

[workers.ingest]
stage = "ingest"
outputs = ["ingest-compute"]
params.client_requests_per_s = 1e6
params.client_burst = 1e6
params.queue_bound = 100000
params.embedded = {{ tokens_per_s = {rate} }}
{ingest}

[workers.compute]
stage = "compute"
inputs = ["ingest-compute"]
outputs = ["compute-cache"]
params.backend = "numpy"
{compute}

[workers.cache]
stage = "cache"
inputs = ["compute-cache"]
outputs = ["cache-broadcast"]
{cache}

[workers.broadcast]
stage = "broadcast"
inputs = ["cache-broadcast"]
{broadcast}
"""


def chat(text: str, max_tokens: int = 40, temperature: float | None = 0) -> dict[str, Any]:
    """A chat request of exactly ``max_tokens`` tokens from the embedded upstream (ignore_eos)."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    if temperature is not None:
        body["temperature"] = temperature
    return body
