"""End to end: the default topology (upstream -> ingest -> compute -> cache -> broadcast) as real
processes, real HTTP, real rings and sockets, read by the consumer client."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from engine_harness import chat, full_config, wait_for

from engine.clients.consumer import StreamConsumer
from engine.clients.requests import RequestClient
from engine.protocol import wire
from engine.protocol.requests import ingest_endpoint
from stages.ingest.upstream_server import UpstreamServerConfig, serve_in_process

pytestmark = pytest.mark.timeout(180)
COMPUTE_COLUMNS = {"hilbert", "conf", "rgba", "entropy", "ppl", "rep", "repflag"}


def collect(consumer: StreamConsumer, sids: list[int], idle_s: float = 15) -> dict[int, list[wire.Message]]:
    """Messages per stream until every stream in ``sids`` has ended (or ``idle_s`` of silence)."""
    seen: dict[int, list[wire.Message]] = {}
    ended = 0
    for message in consumer.messages(idle_timeout_s=idle_s):
        seen.setdefault(message.stream, []).append(message)
        ended += message.type in ("end", "error")
        if ended == len(sids):
            break
    return seen


def token_seqs(messages: list[wire.Message]) -> list[int]:
    return np.concatenate([m.columns["seq"] for m in messages if m.type == "tokens"] or [[]]).astype(int).tolist()


def assert_complete(messages: list[wire.Message], tokens: int) -> None:
    """START, every token in order with compute's columns, END: nothing lost, nothing twice."""
    assert [messages[0].type, messages[-1].type] == ["start", "end"], [m.type for m in messages]
    assert token_seqs(messages) == list(range(1, tokens + 1))
    assert all(set(m.columns) >= COMPUTE_COLUMNS for m in messages if m.type == "tokens")


def submit(engine, bodies: list[dict]) -> list[int]:
    with RequestClient(ingest_endpoint(engine.info()["runtime_dir"])) as client:
        return [client.submit(body) for body in bodies]


def test_concurrent_prompts_arrive_in_order_with_computed_columns(start_engine):
    engine = start_engine(full_config(rate=300))
    with StreamConsumer.for_engine(engine.info()["runtime_dir"]) as consumer:
        assert consumer.join(10)
        sids = submit(engine, [chat(f"concurrent {i}", 50, temperature=0.8) for i in range(24)])
        seen = collect(consumer, sids)
    assert sorted(seen) == sorted(sids)
    for messages in seen.values():
        assert_complete(messages, 50)
        conf = np.concatenate([m.columns["conf"] for m in messages if m.type == "tokens"])
        assert ((conf > 0) & (conf <= 1)).all()


def test_a_repeated_prompt_is_a_cache_hit_that_never_reaches_the_upstream(start_engine):
    engine = start_engine(full_config(rate=500))
    rd = engine.info()["runtime_dir"]
    body = chat("the same question twice", 40)
    texts = []
    for attempt in range(2):
        (sid,) = submit(engine, [body])
        with StreamConsumer.for_engine(rd, stream=sid) as consumer:
            messages = list(consumer.messages(idle_timeout_s=15))
        assert_complete(messages, 40)
        assert messages[0].header["cached"] is (attempt == 1)
        texts.append("".join(t for m in messages for t in m.text))
        if attempt == 0:
            wait_for(lambda: engine.worker("ingest")["stats"].get("tokens") == 40, 10, "ingest's count of 40 tokens")
    assert texts[0] == texts[1]
    ingest = wait_for(lambda: (s := engine.worker("ingest")["stats"]).get("cache_hits") == 1 and s, 10, "a hit")
    assert ingest["tokens"] == 40  # nothing more came from the upstream


@pytest.mark.timeout(300)
def test_kill_9_of_each_worker_role_loses_and_duplicates_nothing(start_engine):
    """At least 100k tokens: compute, cache and broadcast are SIGKILLed in turn while tokens flow,
    then ingest, after 100k tokens, while the 10 long streams are still open (the 10 short ones have
    ended). Every stream arrives once and in order, without a gap; the streams ingest had open end
    with an explicit error after the tokens they delivered, never silently. (The consumer keeps up:
    what a consumer lagging behind a killed broadcast had not received yet is gone with the
    broadcast's in-memory retention; docs/wire-format.md.)"""
    engine = start_engine(full_config(rate=1000, capacity=1 << 22))
    lengths = [2000] * 10 + [14000] * 10
    with StreamConsumer.for_engine(engine.info()["runtime_dir"]) as consumer:
        assert consumer.join(10)
        sids = submit(engine, [chat(f"kill test {i}", n, temperature=0.9) for i, n in enumerate(lengths)])
        seen: dict[int, list[wire.Message]] = {}
        victims = ["compute", "cache", "broadcast", "ingest"]
        delivered = ended = 0
        for message in consumer.messages(idle_timeout_s=20):
            seen.setdefault(message.stream, []).append(message)
            delivered += len(message.text)
            ended += message.type in ("end", "error")
            if victims and delivered >= (5 - len(victims)) * 25_000:
                os.kill(engine.worker(victims.pop(0))["pid"], signal.SIGKILL)
            if ended == len(lengths):
                break
    assert not victims, f"the load ended before every role was killed ({delivered} tokens)"
    assert sorted(seen) == sorted(sids) and delivered >= 100_000
    complete = 0
    for sid, length in zip(sids, lengths, strict=True):
        messages = seen[sid]
        seqs = token_seqs(messages)
        assert seqs == list(range(1, len(seqs) + 1)), f"stream {sid}: a gap or a duplicate"
        assert messages[0].type == "start" and messages[-1].type in ("end", "error")
        if messages[-1].type == "end":
            assert len(seqs) == length
            complete += 1
        else:
            assert "ingest restarted" in messages[-1].header["reason"]
    assert complete >= 10 and consumer.counts["gaps"] == 0


def test_a_killed_upstream_fails_over_and_streams_complete(start_engine):
    servers = [serve_in_process(UpstreamServerConfig(tokens_per_s=200)) for _ in range(2)]
    try:
        upstreams = ", ".join(f'{{ name = "u{i}", base_url = "{url}" }}' for i, (_, url) in enumerate(servers))
        ingest = f'params.upstreams = [{upstreams}]\nparams.pool = {{ mid_stream = "reissue", retries = 4 }}'
        engine = start_engine(full_config(ingest=ingest))
        with StreamConsumer.for_engine(engine.info()["runtime_dir"]) as consumer:
            assert consumer.join(10)
            sids = submit(engine, [chat(f"failover {i}", 120) for i in range(10)])
            seen: dict[int, list[wire.Message]] = {}
            killed = False
            ended = 0
            for message in consumer.messages(idle_timeout_s=20):
                seen.setdefault(message.stream, []).append(message)
                ended += message.type in ("end", "error")
                if not killed and sum(len(m.text) for s in seen.values() for m in s) > 300:
                    servers[0][0].kill()
                    killed = True
                if ended == len(sids):
                    break
        assert killed
        for messages in seen.values():
            assert_complete(messages, 120)
        (sid,) = submit(engine, [chat("after the failure", 20)])
        with StreamConsumer.for_engine(engine.info()["runtime_dir"], stream=sid) as consumer:
            assert_complete(list(consumer.messages(idle_timeout_s=15)), 20)
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.join(5)


def run_demo(env: dict[str, str], prompts: int, max_tokens: int) -> str:
    """``neuralpipe demo`` in a process of its own; its output, once it exited 0 with its engine stopped."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "demo", "--prompts", str(prompts), "--max-tokens", str(max_tokens)],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stopped" in done.stdout.splitlines()[-1]
    return done.stdout


@pytest.mark.timeout(120)
def test_demo_runs_end_to_end_and_exits_cleanly(tmp_path):
    env = dict(os.environ, NEURALPIPE_RUNTIME_DIR=str(tmp_path / "run"), NEURALPIPE_METRICS_PORT="0")
    for run in range(2):  # the second restores the first's cache (its snapshot in the runtime dir)
        out = run_demo(env, prompts=3, max_tokens=12)
        assert "cache hit" in out and "PAS" in out and "conf" in out
        # live streams come from the upstream, on every run: only the repeat is a cache hit
        assert out.count("start (cached)") == 1, (run, out[-3000:])


@pytest.mark.timeout(120)
def test_demo_runs_while_the_gateways_default_port_is_taken(tmp_path):
    # the demo is the first command a new user runs: another server on 8080 must not stop it
    env = {k: v for k, v in os.environ.items() if k != "NEURALPIPE_GATEWAY_LISTEN"}
    env |= {"NEURALPIPE_RUNTIME_DIR": str(tmp_path / "run"), "NEURALPIPE_METRICS_PORT": "0"}
    with contextlib.ExitStack() as stack:
        taken = stack.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # already taken by someone else: as good
            taken.bind(("127.0.0.1", 8080))
            taken.listen()
        run_demo(env, prompts=2, max_tokens=6)
