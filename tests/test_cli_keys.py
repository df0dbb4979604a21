"""`neuralpipe keys create|list|revoke|usage`: real processes on a real state directory, also while a
gateway's Gate holds the same database open (CliRunner where no second process is needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from click.testing import CliRunner

from engine.auth.errors import AuthError
from engine.auth.gate import Gate
from engine.auth.keystore import DB_FILE
from engine.auth.principal import Principal
from engine.cli import main


@pytest.fixture
def env(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEURALPIPE_")}
    return environ | {"XDG_STATE_HOME": str(tmp_path / "xdg")}


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "engine.cli", "keys", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(180)
def test_keys_lifecycle_beside_a_running_gate(tmp_path, env):
    state = tmp_path / "xdg" / "neuralpipe" / "default"
    gate = Gate.from_config({"auth": "keys"}, str(state))  # the gateway, holding the database open
    try:
        made = _cli(env, "create", "alice", "--rpm", "60", "--max-streams", "2", "--json")
        assert made.returncode == 0, made.stderr
        created = orjson.loads(made.stdout)
        assert created.keys() == {"key", "name"} and created["name"] == "alice"
        key = created["key"]
        principal = gate.authenticate(f"Bearer {key}")  # made by another process, seen at once
        assert (principal.name, principal.limits.rpm, principal.limits.max_streams) == ("alice", 60, 2)

        lease = gate.admit(principal)
        lease.tokens(7)
        lease.close(prompt_tokens=11, completion_tokens=7, cached_tokens=2)
        assert gate.flush()
        usage = _cli(env, "usage", "alice", "--json")
        assert orjson.loads(usage.stdout)["alice"] | {"last_used": None} == {
            "requests": 1,
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "cached_tokens": 2,
            "last_used": None,
        }

        listed = _cli(env, "list", "--json")
        assert key not in listed.stdout and key[8:20] not in listed.stdout
        [info] = orjson.loads(listed.stdout)["keys"]
        assert (info["name"], info["prefix"], info["revoked"], info["rpm"]) == ("alice", key[:8], None, 60)
        text = _cli(env, "list")
        assert "alice" in text.stdout and "rpm=60 max_streams=2" in text.stdout and key not in text.stdout

        assert _cli(env, "revoke", "alice").returncode == 0
        with pytest.raises(AuthError, match="invalid API key"):
            gate.authenticate(f"Bearer {key}")
        again = _cli(env, "revoke", "alice")
        assert again.returncode == 1 and "no live key named 'alice'" in again.stderr
    finally:
        gate.close()
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"


def test_usage_shows_a_budget_and_what_of_it_is_used(tmp_path, env):
    assert _cli(env, "create", "alice", "--budget-tokens", "1000", "--budget-days", "7").returncode == 0
    assert _cli(env, "create", "bob").returncode == 0
    gate = Gate.from_config({"auth": "keys"}, str(tmp_path / "xdg" / "neuralpipe" / "default"))
    try:
        for who in ("alice", "bob"):
            gate.admit(Principal(who, "key")).close(prompt_tokens=30, completion_tokens=12)
        assert gate.flush()
    finally:
        gate.close()
    usage = orjson.loads(_cli(env, "usage", "--json").stdout)
    assert (usage["alice"]["budget_tokens"], usage["alice"]["budget_used"]) == (1000, 42)
    assert "budget_tokens" not in usage["bob"] and usage["bob"]["prompt_tokens"] == 30
    assert "42/1000" in _cli(env, "usage").stdout


def test_key_text_output_is_the_key_alone(env):
    made = _cli(env, "create", "bob")
    assert made.returncode == 0 and made.stdout.startswith("np-") and len(made.stdout.strip()) == 46
    assert "shown this once" in made.stderr and made.stdout.strip() not in made.stderr


def test_instances_have_separate_key_stores(tmp_path, env):
    blue = _cli(env, "create", "alice", "--instance", "blue", "--json")
    assert blue.returncode == 0
    assert _cli(env, "create", "alice", "--instance", "green").returncode == 0  # not the same store
    assert (tmp_path / "xdg" / "neuralpipe" / "blue" / DB_FILE).exists()
    assert orjson.loads(_cli(env, "list", "--json").stdout) == {"keys": []}  # default instance: none


def test_state_dir_from_config_and_environment(tmp_path, env):
    configured = tmp_path / "configured"
    config = tmp_path / "engine.toml"
    config.write_text(f'[engine]\nstate_dir = "{configured}"\n')
    assert _cli(env, "create", "alice", "--config", str(config)).returncode == 0
    assert (configured / DB_FILE).exists()
    from_env = env | {"NEURALPIPE_STATE_DIR": str(tmp_path / "from-env")}
    assert _cli(from_env, "create", "alice", "--config", str(config)).returncode == 0
    assert (tmp_path / "from-env" / DB_FILE).exists()  # the environment overrides the file
    config.write_text('[engine]\nstate_dir = "relative/dir"\n')
    bad = _cli(env, "list", "--config", str(config))
    assert bad.returncode == 1 and 'engine.state_dir: must be "" (default) or an absolute path' in bad.stderr


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["create", "../up"], "key name must be 1-64 characters"),
        (["create", "x" * 65], "key name must be 1-64 characters"),
        (["create", "alice", "--rpm", "0"], "'--rpm': 0 is not in the range"),
        (["create", "alice", "--tpm", "99999999999999999999"], "'--tpm'"),
        (["create", "alice", "--budget-tokens", "lots"], "'--budget-tokens': 'lots' is not a valid integer"),
        (["create", "alice", "--instance", "../../etc"], "instance id must be 1-32 characters"),
        (["usage", "nobody"], "no key named 'nobody'"),
        (["usage", "bad name"], "key name must be"),
        (["revoke", "nobody"], "no live key named 'nobody'"),
    ],
)
def test_hostile_arguments_are_clear_errors(env, args, problem):
    result = CliRunner().invoke(main, ["keys", *args], env=env)
    assert result.exit_code != 0 and problem in result.output
    assert "Traceback" not in result.output


def test_a_corrupt_database_is_a_clear_error(tmp_path, env):
    state = tmp_path / "xdg" / "neuralpipe" / "default"
    state.mkdir(parents=True, mode=0o700)
    (state / DB_FILE).write_bytes(b"\x00garbage" * 1000)
    result = _cli(env, "list")
    assert result.returncode == 1 and "not a usable key database" in result.stderr and "move it away" in result.stderr
    assert "Traceback" not in result.stderr


def test_curve_commands_moved(env):
    result = CliRunner().invoke(main, ["curve", "--help"], env=env)
    assert result.exit_code == 0 and "new" in result.output and "allow" in result.output
    assert CliRunner().invoke(main, ["keys", "new", "x"], env=env).exit_code != 0
