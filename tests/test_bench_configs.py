"""The benches' engine configs: each loads, and ``--sched-policy`` reaches the engine's
``[engine] sched_policy`` (the option measures one policy against the other)."""

from __future__ import annotations

import tempfile

import pytest

from bench import gateway, ingest, pipeline
from engine.config import load_config

CONFIGS = {
    "gateway": lambda policy: gateway.engine_toml("http://127.0.0.1:9", "/tmp/unused-state", sched_policy=policy),
    "ingest": lambda policy: ingest.engine_toml(100.0, sched_policy=policy),
    "pipeline": lambda policy: pipeline.engine_toml("shm", 100.0, sched_policy=policy),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bench", sorted(CONFIGS))
@pytest.mark.parametrize(("policy", "expected"), [(None, "batch"), ("normal", "normal"), ("batch", "batch")])
def test_sched_policy_reaches_the_engine_config(tmp_path, bench: str, policy: str | None, expected: str) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(CONFIGS[bench](policy))
    assert load_config(str(path), env={}).engine.sched_policy == expected


@pytest.mark.timeout(30)
def test_bench_gateway_leaves_no_state_dir_when_its_upstream_fails_to_start(tmp_path, monkeypatch) -> None:
    def fail(*_args, **_kwargs):
        raise RuntimeError("embedded upstream failed to start (exit code 1)")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(gateway, "serve_in_process", fail)
    with pytest.raises(RuntimeError, match="failed to start"):
        gateway.measure(gateway.QUICK, progress=False)
    assert list(tmp_path.iterdir()) == []
