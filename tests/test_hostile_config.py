"""Hostile configuration files (issue 13 item 10): refused at load with a clear error naming the
problem, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.config import MAX_CONFIG_BYTES, ConfigError, check_stage_params, load_config


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


def _fifo(tmp_path) -> str:
    path = str(tmp_path / "engine.toml")
    os.mkfifo(path)
    return path


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("kind", "problem"),
    [("fifo", "not a regular file but a FIFO"), ("device", "not a regular file but a character device")],
)
def test_a_config_that_is_no_regular_file_is_refused_at_once(tmp_path, kind, problem):
    """A FIFO blocked the reader for good (``neuralpipe run`` hung before saying anything), and
    /dev/zero was read until memory ran out (a MemoryError traceback)."""
    path = _fifo(tmp_path) if kind == "fifo" else "/dev/zero"
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "config", "show", "--config", path],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert done.returncode != 0 and problem in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_config_over_its_size_limit_is_refused(tmp_path):
    path = tmp_path / "engine.toml"
    path.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(str(path), env={})


def test_a_bad_value_from_the_environment_is_blamed_on_its_variable_not_the_file(tmp_path):
    """A stage's params checked after load (the gateway's listen) were blamed on the file, whose own
    value was fine, or on "defaults" without one."""
    path = tmp_path / "engine.toml"
    path.write_text('[gateway]\nlisten = "127.0.0.1:8080"\n')
    for given in (str(path), None):
        cfg = load_config(given, env={"NEURALPIPE_GATEWAY_LISTEN": "nohost"})
        with pytest.raises(ConfigError) as info:
            check_stage_params(cfg, given or "defaults")
        assert str(info.value).startswith("NEURALPIPE_GATEWAY_LISTEN: gateway.listen: must be host:port"), info.value
