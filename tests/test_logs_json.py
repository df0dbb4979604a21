"""The engine's log is JSON lines only, also when a library writes to the worker's raw stderr: Mesa's
Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" while compute probes for adapters."""

from __future__ import annotations

import os

import orjson
import pytest
from engine_harness import Engine, full_config, wait_for

pytestmark = pytest.mark.timeout(60)


def test_every_log_line_is_json_without_xdg_runtime_dir(tmp_path, instance, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("NODEVICE_SELECT", raising=False)
    engine = Engine(tmp_path, full_config().replace('params.backend = "numpy"', 'params.backend = "auto"'), instance)
    engine.start()
    try:
        probed = wait_for(
            lambda: "background" not in engine.worker("compute")["stats"].get("reason", "background"),
            20,
            "compute's adapter probe to finish",
        )
        assert probed
    finally:
        assert engine.stop() == 0
    lines = engine.log().splitlines()
    assert lines and "XDG_RUNTIME_DIR" not in os.environ
    for line in lines:
        assert isinstance(orjson.loads(line), dict), line
