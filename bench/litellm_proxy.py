"""LiteLLM's proxy (``litellm[proxy]`` from PyPI) for ``neuralpipe bench gateway``: started as a
subprocess in front of an OpenAI-compatible upstream, one model, one worker, nothing it would send
out of the machine (the model cost map from the package, no telemetry).

The ``litellm`` executable is ``$NEURALPIPE_BENCH_LITELLM`` or the one on PATH; it may live in a
virtual environment of its own (its dependencies pin versions the engine does not want)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 180.0  # its imports alone take many seconds on a small machine
STOP_TIMEOUT_S = 10.0
EXECUTABLE_ENV = "NEURALPIPE_BENCH_LITELLM"


class Unavailable(Exception):
    """LiteLLM is not installed here or did not start; the message says why."""


def executable() -> str:
    path = os.environ.get(EXECUTABLE_ENV) or shutil.which("litellm")
    if not path or not os.access(path, os.X_OK):
        raise Unavailable(f"not installed (pip install 'litellm[proxy]', or set ${EXECUTABLE_ENV} to its executable)")
    return path


def _config(upstream_url: str, model: str) -> str:
    return f"""model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {upstream_url}/v1
      api_key: unused
litellm_settings:
  telemetry: false
general_settings: {{}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_group_dying_with_parent() -> None:
    """In the child before exec: a process group of its own (so its workers are stopped with it)
    and SIGTERM when the bench dies."""
    os.setsid()
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class LiteLLMProxy:
    """``with LiteLLMProxy(upstream_url, model) as proxy:`` -> ``proxy.url`` (the /v1 base URL),
    ``proxy.pid`` (the proxy's process; its children are in its process group), ``proxy.version``."""

    def __init__(self, upstream_url: str, model: str) -> None:
        self.exe = executable()
        self.version = self._version()
        self.tmp = tempfile.mkdtemp(prefix="neuralpipe-bench-litellm-")
        self.log_path = os.path.join(self.tmp, "litellm.log")
        config = os.path.join(self.tmp, "config.yaml")
        Path(config).write_text(_config(upstream_url, model))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = dict(
            os.environ,
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # else it fetches the cost map from GitHub at start
            LITELLM_LOG="ERROR",
            LITELLM_TELEMETRY="False",
            NO_DOCS="True",
            # no master key, as the gateway runs with auth "off" on loopback: like for like
            LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "--config", config, "--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.tmp,
                preexec_fn=_own_group_dying_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _version(self) -> str:
        python = Path(self.exe).with_name("python")
        if not python.exists():
            return "unknown"
        done = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout.strip() or "unknown"

    def __enter__(self) -> LiteLLMProxy:
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"exited with code {self.proc.returncode} at start: {self.log_tail(600)}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/models", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(0.25)
        raise Unavailable(f"not answering {self.url}/models within {START_TIMEOUT_S:g} s: {self.log_tail(600)}")

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return " ".join(Path(self.log_path).read_text(errors="replace")[-chars:].split())
        return ""

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            with contextlib.suppress(ProcessLookupError):  # a worker that outlived the proxy
                os.killpg(self.proc.pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
