"""`neuralpipe bench ipc` as a user runs it: a quick run through the console script, its JSON,
and that it leaves nothing behind (the autouse fixture checks processes and segments), even when
interrupted."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shm.wait import KINDS

NUMBERS = (
    "payload",
    "bytes",
    "p50_us",
    "p99_us",
    "p999_us",
    "wake_p50_us",
    "wake_p99_us",
    "msgs_per_s",
    "tokens_per_s",
)
REPO = Path(__file__).resolve().parent.parent


def _neuralpipe(*args: str) -> list[str]:
    script = shutil.which("neuralpipe")
    if script:
        return [script, *args]
    return [sys.executable, "-c", "from engine.cli import main; main()", *args]


def _run(*args: str, timeout: float = 100) -> subprocess.CompletedProcess:
    return subprocess.run(_neuralpipe("bench", "ipc", *args), capture_output=True, text=True, timeout=timeout)


def _faster_fifo_installed() -> bool:
    try:
        import faster_fifo  # noqa: F401
    except ImportError:
        return False
    return True


def _generated_files() -> dict[Path, float]:
    """What a full run would write, with mtimes: a quick run must touch none of it."""
    paths = [REPO / "docs" / "benchmarks.md", *(REPO / "bench" / "results").glob("*.json")]
    return {path: path.stat().st_mtime for path in paths if path.exists()}


@pytest.mark.timeout(120)
def test_quick_json_has_every_row_with_positive_numbers() -> None:
    before = _generated_files()
    done = _run("--quick", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # one JSON object and nothing else on stdout
    transports = ["queue", "pipe", "zmq"] + (["faster-fifo"] if _faster_fifo_installed() else [])
    expected = {("ring", wait, payload) for wait in KINDS for payload in (1, 64, 4096)}
    expected |= {(transport, "native", payload) for transport in transports for payload in (1, 64, 4096)}
    assert {(row["transport"], row["wait"], row["payload"]) for row in result["rows"]} == expected
    for row in result["rows"]:
        for key in NUMBERS:
            value = row[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row, key)
        assert row["tokens_per_s"] == pytest.approx(row["msgs_per_s"] * row["payload"], rel=1e-6)
    assert result["machine"]["cores"] >= 1 and len(result["load_before"]) == 3
    assert _generated_files() == before


@pytest.mark.timeout(120)
def test_filters_and_human_table() -> None:
    done = _run("--quick", "--transport", "pipe", "--transport", "ring", "--payload", "8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("transport"))
    rows = [line.split() for line in lines[lines.index(header) + 1 :] if line.startswith(("ring ", "pipe "))]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        [("ring", wait, "8") for wait in KINDS] + [("pipe", "native", "8")]
    )
    assert "lower p50" not in done.stdout  # no queue or zmq row to compare the ring with


@pytest.mark.timeout(60)
def test_unknown_transport_is_a_usage_error() -> None:
    done = _run("--quick", "--transport", "carrier-pigeon")
    assert done.returncode == 2
    assert "carrier-pigeon" in done.stderr


@pytest.mark.timeout(120)
def test_interrupted_run_leaves_nothing_behind() -> None:
    """Ctrl-C in the middle of a run: the fixture then finds no process and no segment left."""
    process = subprocess.Popen(
        _neuralpipe("bench", "ipc", "--transport", "ring", "--payload", "64"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C would reach
        # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started, and a
        # test runner started in the background has it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert "[1/" in process.stderr.readline()  # the first run is done, the second under way
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
        assert process.returncode != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()


@pytest.mark.timeout(120)
def test_doorbell_quick_measures_every_candidate(capsys: pytest.CaptureFixture[str]) -> None:
    from neuralpipe_bench import doorbell

    before = _generated_files()
    result = doorbell.main(as_json=True, quick=True)
    assert json.loads(capsys.readouterr().out) == result
    assert [row["doorbell"] for row in result["rows"]] == list(doorbell.DOORBELLS)
    for row in result["rows"]:
        for key, value in row.items():
            assert key == "doorbell" or (math.isfinite(value) and value > 0), (row, key)
    assert _generated_files() == before
