"""A /dev/shm too small for the engine's rings: a clear error at start, never SIGBUS later.

Each test runs in its own mount namespace (``unshare -m``) with a small tmpfs over /dev/shm, so
the machine's real /dev/shm is never filled. That needs root (CI and the dev machines run as root);
elsewhere the tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1) for a private /dev/shm"
)


def _in_small_shm(script: str, size: str = "2M", timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a ``size`` tmpfs mounted over /dev/shm in a private mount namespace;
    the script's last line lists what it left in /dev/shm."""
    wrapped = f"mount -t tmpfs -o size={size} tmpfs /dev/shm || exit 97\n{script}\necho LEFT: $(ls /dev/shm)"
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", wrapped], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return proc


@pytest.mark.timeout(60)
def test_create_segment_reserves_pages_or_says_what_is_missing() -> None:
    code = textwrap.dedent(
        """
        from shm.segment import NoSharedMemory, create_segment
        try:
            create_segment("neuralpipe-fulltest-a", 4 << 20)
        except NoSharedMemory as exc:
            print("ERROR:", exc)
        else:
            print("CREATED")
        """
    )
    proc = _in_small_shm(f"{sys.executable} -c '{code}'")
    assert "ERROR: not enough shared memory" in proc.stdout, proc.stdout + proc.stderr
    assert "need 4,194,304 bytes" in proc.stdout
    assert proc.stdout.strip().endswith("LEFT:"), f"a segment was left behind: {proc.stdout}"


@pytest.mark.timeout(90)
def test_engine_start_on_a_full_dev_shm_fails_with_one_line(tmp_path) -> None:
    config = tmp_path / "engine.toml"
    config.write_text("[ring_defaults]\ncapacity = 1048576\n")  # three 1 MiB rings: more than 2 MiB
    env = f"NEURALPIPE_RUNTIME_DIR={tmp_path / 'run'} NEURALPIPE_METRICS_PORT=-1 NEURALPIPE_INSTANCE=fulltest"
    proc = _in_small_shm(
        f"{env} timeout 40 {sys.executable} -m engine.cli run --config {config}; echo EXIT: $?", timeout=80
    )
    out = proc.stdout + proc.stderr
    assert "not enough shared memory" in out, out
    assert "Traceback" not in out, out
    exit_line = next(line for line in proc.stdout.splitlines() if line.startswith("EXIT:"))
    assert exit_line not in ("EXIT: 0", "EXIT: 124"), out  # non-zero, and not hung until the timeout
    assert proc.stdout.strip().endswith("LEFT:"), f"segments were left behind: {proc.stdout}"
