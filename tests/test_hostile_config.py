"""Hostile configuration files (issue 13 item 10): refused at load with a clear error naming the
problem, never a traceback."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, load_config


def test_a_5000_deep_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(path), env={})


@pytest.mark.parametrize(
    "host", ["not a host", "300.1.1.1", "exa_mple.com", "-bad.example", "a" * 300, "[::1]"], ids=range(6)
)
def test_an_invalid_metrics_host_is_refused_at_load_with_the_key_named(tmp_path, host):
    path = tmp_path / "engine.toml"
    path.write_text(f"[engine]\nmetrics_host = {host!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=r"engine\.metrics_host") as info:
        load_config(str(path), env={})
    assert "IP address or a host name" in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "metrics.example.com", "0.0.0.0"])
def test_a_valid_metrics_host_loads(tmp_path, host):
    path = tmp_path / "engine.toml"
    path.write_text(f'[engine]\nmetrics_host = "{host}"\n')
    assert load_config(str(path), env={}).engine.metrics_host == host
