"""Chaos by stalls: workers of a gateway engine stopped (SIGSTOP) and resumed at random while
clients stream chat completions through the gateway. A stall is what a long GC pause, a swapped-out
or descheduled process or a debugger looks like: nothing dies, everything waits. The supervisor
is stalled too, for up to 7 s: past the hang timeout, yet no worker may be taken for hung. Kills
are tests/test_chaos.py's; this is the other way a worker fails.

The promise: every request ends as OpenAI's streams end, whole (every token, usage, [DONE]), or
with an explicit error (here only a 503 when ingest did not take it within submit_timeout_s); no
stream is started that no client follows (a submit ingest reads after the gateway gave up starts
nothing; one accepted too late is cancelled); nothing is restarted (every stall is under the hang
timeout). Three defects were found this way (tests/test_gateway_restarts.py, test_supervisor.py).

The default run stalls for SECONDS (10); `NEURALPIPE_STALL_SECONDS=300 pytest
tests/test_stall_chaos.py` is the long run.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import threading
import time

import aiohttp
import orjson
import pytest
from engine_harness import wait_for
from gateway_harness import GatewayEngine, default_topology, serving

SECONDS = float(os.environ.get("NEURALPIPE_STALL_SECONDS", "10"))
WORKERS = ("ingest", "compute", "cache", "broadcast", "gateway")
VICTIMS = (*WORKERS, "supervisor")
CLIENTS = 20
TOKENS = 20
LONGEST_STALL_S = 2.5  # under the harness's 5 s hang timeout: never taken for a hung worker
LONGEST_SUPERVISOR_STALL_S = 7.0  # past it: the time the supervisor did not run is not its workers'
SEED = 20261204

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120 + 2 * SECONDS)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # ingest must take a request within 1 s: the longer ingest stalls give 503s and expired submits
    yield from serving(
        tmp_path_factory, "stall", default_topology(gateway="submit_timeout_s = 1.0", embedded="tokens_per_s = 100")
    )


async def one_request(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    """How a streamed chat completion ended: "complete", "503 <code>", or what went wrong."""
    body = {
        "model": "neuralpipe-echo",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    async with session.post(f"{url}/chat/completions", json=body) as answer:
        if answer.status != 200:
            return f"{answer.status} {orjson.loads(await answer.read())['error']['code']}"
        finish = usage = error = None
        done = False
        async for line in answer.content:
            if not line.startswith(b"data: "):
                continue  # keep-alive comments, blank lines
            if line.strip() == b"data: [DONE]":
                done = True
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["code"]
            usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
            finish = next((c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")), finish)
        if error:
            return f"error event {error}"
        return "complete" if (done, finish, usage) == (True, "length", TOKENS) else f"SILENT {finish} {usage} {done}"


async def clients(url: str, stop: threading.Event) -> collections.Counter:
    endings: collections.Counter = collections.Counter()

    async def loop(client: int) -> None:
        think = random.Random(client)
        n = 0
        while not stop.is_set():
            n += 1
            endings[await one_request(session, url, f"stall {client} {n}")] += 1
            await asyncio.sleep(think.uniform(0, 0.3))  # a user's pause: some submit while ingest is stalled

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(loop(i) for i in range(CLIENTS)))
    return endings


def stall_at_random(engine: GatewayEngine, stop: threading.Event, stalls: list[tuple[str, float]]) -> None:
    rng = random.Random(SEED)
    pids = {w["name"]: w["pid"] for w in engine.status()["workers"]} | {"supervisor": engine.pid}
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        victim = rng.choice(VICTIMS)
        pause = rng.uniform(0.05, LONGEST_SUPERVISOR_STALL_S if victim == "supervisor" else LONGEST_STALL_S)
        os.kill(pids[victim], signal.SIGSTOP)
        try:
            time.sleep(pause)  # the stall itself
        finally:
            os.kill(pids[victim], signal.SIGCONT)
        stalls.append((victim, pause))
        time.sleep(rng.uniform(0.1, 0.5))  # the engine runs between stalls
    stop.set()


def test_random_stalls_under_load_lose_nothing_and_start_nothing_unfollowed(engine):
    stop, stalls = threading.Event(), []
    chaos = threading.Thread(target=stall_at_random, args=(engine, stop, stalls), daemon=True)
    chaos.start()
    try:
        endings = asyncio.run(clients(engine.url, stop))
    finally:
        stop.set()
        chaos.join(LONGEST_STALL_S + 5)
    assert not chaos.is_alive()
    assert set(endings) <= {"complete", "503 engine_unavailable"}, (endings, stalls)
    assert endings["complete"] > CLIENTS, endings  # the load went on between the stalls
    assert {w["name"]: w["restarts"] for w in engine.status()["workers"]} == dict.fromkeys(WORKERS, 0)

    def settled() -> tuple[dict, dict] | None:  # ingest and the gateway, from heartbeats after the load
        ingest, gateway = engine.stats("ingest"), engine.stats("gateway")
        followed = gateway.get("submitted", 0) + gateway.get("requests_cancelled_late", 0)
        return (ingest, gateway) if ingest["active"] == 0 and ingest["accepted"] == followed else None

    ingest, gateway = wait_for(settled, 30, "every stream ingest started to be one the gateway followed")
    assert (gateway["completed"], gateway["failed"]) == (endings["complete"], 0), (ingest, gateway, endings)
