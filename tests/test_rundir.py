"""The runtime base directory against another local user (issue 13, Security): opened without
following symlinks and checked ours before anything is swept in it; files inside 0600, directories
0700; the detach log opened the same way."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from engine.config import load_config
from engine.launcher import LaunchError, launch_detached
from engine.rundir import InstanceDir, RuntimeDirError, live_instances, remove_dead_instances


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def restore_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def test_supervisor_json_and_the_directories_are_private(tmp_path, restore_umask):
    os.umask(0o022)  # what a shell usually has: files 0644 unless made otherwise
    base = tmp_path / "run"
    d = InstanceDir(str(base), "inst")
    try:
        d.write_info({"instance": "inst", "started": 1})
        assert _mode(base / "inst" / "supervisor.json") == 0o600
        assert {_mode(p) for p in (base, base / "inst", base / "inst" / "bells", base / "inst" / "state")} == {0o700}
        assert [i["instance"] for i in live_instances(str(base))] == ["inst"]
        with open(base / "inst" / "made-by-a-worker", "w"):
            pass  # the umask the workers inherit
        assert _mode(base / "inst" / "made-by-a-worker") == 0o600
    finally:
        d.remove()
    assert not (base / "inst").exists()


def test_a_loose_mode_of_our_own_base_is_tightened(tmp_path):
    base = tmp_path / "run"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o777)
    remove_dead_instances(str(base))
    assert _mode(base) == 0o700


def test_a_symlinked_base_is_refused_and_nothing_behind_it_is_swept(tmp_path):
    victim = tmp_path / "victim"
    (victim / "precious").mkdir(parents=True)
    old = time.time() - 3600
    os.utime(victim / "precious", (old, old))  # looks like a long-dead instance's directory
    base = tmp_path / "run"
    base.symlink_to(victim)
    for use in (remove_dead_instances, lambda b: InstanceDir(b, "inst"), live_instances):
        with pytest.raises(RuntimeDirError, match="is a symbolic link; refusing to follow it"):
            use(str(base))
    assert (victim / "precious").is_dir() and not (victim / "inst").exists()


def test_a_symlink_inside_the_base_is_never_followed_by_the_sweep(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    (base / "dead").symlink_to(victim)
    old = time.time() - 3600
    os.utime(base / "dead", (old, old), follow_symlinks=False)
    assert remove_dead_instances(str(base)) == []
    assert (victim / "keep").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory another user owns")
def test_a_base_another_user_owns_is_refused_with_one_line(tmp_path):
    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    (base / "dead").mkdir()
    os.chown(base, 65534, 65534)
    with pytest.raises(RuntimeDirError) as caught:
        remove_dead_instances(str(base), grace_s=0)
    assert str(caught.value).startswith(f"{base} belongs to uid 65534, not to this user")
    assert "\n" not in str(caught.value)
    assert (base / "dead").is_dir()
    with pytest.raises(RuntimeDirError, match="belongs to uid 65534"):
        live_instances(str(base))


def _cfg(tmp_path, stage: str = "no_such_module:Nothing"):
    path = tmp_path / "c.toml"
    path.write_text(
        f'[engine]\ninstance = "det"\nruntime_dir = "{tmp_path / "run"}"\nmetrics_port = -1\n'
        f'[workers.only]\nstage = "{stage}"\n'
    )
    return load_config(str(path)), str(path)


def test_the_detach_log_is_never_opened_through_a_symlink(tmp_path):
    cfg, path = _cfg(tmp_path)
    (tmp_path / "run").mkdir(mode=0o700)
    target = tmp_path / "elsewhere.txt"
    target.write_text("mine\n")
    (tmp_path / "run" / "det.log").symlink_to(target)
    with pytest.raises(LaunchError, match=r"det\.log is a symbolic link; refusing to follow it"):
        launch_detached(cfg, path, timeout_s=10)
    assert target.read_text() == "mine\n"


@pytest.mark.timeout(60)
def test_the_detach_log_is_private(tmp_path):
    cfg, path = _cfg(tmp_path)  # a worker that cannot start: the engine exits at once
    with pytest.raises(LaunchError):
        launch_detached(cfg, path, timeout_s=30)
    assert _mode(tmp_path / "run" / "det.log") == 0o600


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory another user owns")
@pytest.mark.parametrize("command", [["run"], ["status"]])
def test_the_commands_refuse_another_users_base_in_one_line(tmp_path, command):
    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    os.chown(base, 65534, 65534)
    env = dict(os.environ, NEURALPIPE_RUNTIME_DIR=str(base), NEURALPIPE_METRICS_PORT="-1")
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: {'engine not started: ' if command == ['run'] else ''}{base} belongs to uid 65534, not to this user"
        f" (uid 0); refusing to use it (remove it, or set engine.runtime_dir)"
    ]
