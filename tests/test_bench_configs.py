"""The benches' engine configs: each loads, and ``--sched-policy`` reaches the engine's
``[engine] sched_policy`` (the option measures one policy against the other)."""

from __future__ import annotations

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
