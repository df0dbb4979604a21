"""The open-file limit: the engine raises its soft limit to the hard one, and ingest running out of
file descriptors is ingest's own trouble: the streams past it wait for one, as for an upstream's
slot, and a healthy upstream is never taken out of service for it (before: "Too many open files" on
connect counted as the upstream's failure, so streams failed and, after three, every request failed
for 5 s with "no healthy upstream")."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
from engine_harness import Engine, chat, follow_ends, full_config

from engine.clients.requests import RequestClient
from engine.protocol.requests import ingest_endpoint

STREAMS = 160  # more connections than ingest can open under the limit below
OPEN_FILES = 120  # soft = hard: the engine cannot raise it


def _local_errors(info: dict) -> float:
    """neuralpipe_upstream_errors_total{kind="local"} from the supervisor's /metrics."""
    url = f"http://{info['metrics_host']}:{info['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    found = re.findall(r'^neuralpipe_upstream_errors_total\{[^}]*kind="local"[^}]*\} ([0-9.e+]+)$', text, re.M)
    return sum(float(value) for value in found)


@pytest.mark.timeout(120)
def test_running_out_of_file_descriptors_delays_streams_and_blames_no_upstream(tmp_path, instance):
    engine = Engine(tmp_path, full_config(rate=20), instance, open_files=(OPEN_FILES, OPEN_FILES)).start()
    ended: dict[int, tuple[str, str]] = {}
    joined, done = threading.Event(), threading.Event()
    reader = threading.Thread(target=follow_ends, args=(engine.info()["runtime_dir"], ended, joined, done), daemon=True)
    reader.start()
    try:
        assert joined.wait(15), "the consumer did not join the broadcast"
        with RequestClient(ingest_endpoint(engine.info()["runtime_dir"]), timeout_s=5.0) as client:
            ids = [client.submit(chat(f"descriptors {i}", 30, temperature=0.9)) for i in range(STREAMS)]
            deadline = time.monotonic() + 60
            while set(ids) - set(ended) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not set(ids) - set(ended), "streams that never ended"
            # the streams past the limit waited for a descriptor (as for an upstream's slot): all served
            errors = [reason for kind, reason in (ended[i] for i in ids) if kind == "error"]
            assert not errors, f"{len(errors)} streams failed: {errors[:2]}"
            assert _local_errors(engine.info()) > 0, "the limit was not reached: raise STREAMS"
            # the upstream was never at fault, so never cooled down: a request right after is served
            late = client.submit(chat("descriptors after", 5, temperature=0.9))
            deadline = time.monotonic() + 10
            while late not in ended and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ended.get(late, ("none", ""))[0] == "end", ended.get(late)
    finally:
        done.set()
        reader.join(10)
        engine.stop()
        engine.kill_all()


@pytest.mark.timeout(60)
def test_the_soft_limit_is_raised_to_the_hard_one_for_every_worker(tmp_path, instance):
    engine = Engine(tmp_path, full_config(), instance, open_files=(256, 4096)).start()
    try:
        for worker in engine.status()["workers"]:
            with open(f"/proc/{worker['pid']}/limits") as f:
                line = next(line for line in f if line.startswith("Max open files"))
            assert line.split()[3:5] == ["4096", "4096"], (worker["name"], line)
        assert '"open_files_limit":4096' in engine.log().replace(" ", "")
    finally:
        engine.stop()
        engine.kill_all()
