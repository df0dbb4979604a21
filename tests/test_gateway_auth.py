"""Who may call the gateway, and how much: API keys made with the CLI (``neuralpipe keys``), JWTs
signed with an RS256 key from a JWKS file, the 401s and 429s in OpenAI's shapes, the usage ledger
and the per-key metrics; and the refusal, at config load, of a gateway reachable from other hosts
without auth."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from engine_harness import wait_for
from gateway_harness import GatewayEngine, default_topology
from jwt.algorithms import RSAAlgorithm

MODEL = "neuralpipe-echo"
MESSAGES = [{"role": "user", "content": "who goes there"}]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    engine = GatewayEngine(
        tmp_path_factory.mktemp("gwkeys"),
        default_topology(gateway='auth = "keys"\nmax_connections = 3'),
        "k" + uuid.uuid4().hex[:10],
    )
    try:
        yield engine.start()
    finally:
        engine.stop()


def make_key(engine: GatewayEngine, name: str, *limits: str) -> str:
    made = json.loads(engine.cli("keys", "create", name, *limits, "--json").stdout)
    assert made["name"] == name
    return made["key"]


def test_no_key_or_a_wrong_key_is_401_and_a_good_one_works(keyed):
    for key in (None, "np-wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        answer = httpx.post(
            keyed.url + "/chat/completions", json={"model": MODEL, "messages": MESSAGES}, headers=headers
        )
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    wrong = openai.OpenAI(base_url=keyed.url, api_key="np-wrong-key", max_retries=0)
    for call in (
        wrong.models.list,
        lambda: wrong.models.retrieve(MODEL),
        lambda: wrong.responses.create(model=MODEL, input="who goes there"),
    ):
        with pytest.raises(openai.AuthenticationError):
            call()
    assert httpx.get(keyed.url.removesuffix("/v1") + "/health").status_code == 200  # no key needed

    client = openai.OpenAI(base_url=keyed.url, api_key=make_key(keyed, "alice"), max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [MODEL]
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert answer.usage.completion_tokens == 5


def test_two_authorization_headers_are_refused_whichever_comes_first(keyed):
    """The first of two Authorization headers was taken and the other ignored: a proxy in front
    that checks the last one (or adds its own) and the gateway then judged different credentials."""
    good = make_key(keyed, "twice")
    for pair in ((good, "np-wrong-key"), ("np-wrong-key", good), (good, good)):
        headers = httpx.Headers([("Authorization", f"Bearer {key}") for key in pair])
        answer = httpx.get(keyed.url + "/models", headers=headers)
        assert answer.status_code == 401, (pair == (good, good), answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_api_key" and "more than one Authorization header" in error["message"]
        assert good not in answer.text


def test_a_key_over_its_rate_gets_429_with_retry_after_and_usage_is_in_the_ledger(keyed):
    client = openai.OpenAI(base_url=keyed.url, api_key=make_key(keyed, "bob", "--rpm", "3"), max_retries=0, timeout=30)
    for _ in range(3):
        chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True))
        assert chunks[-1].choices[0].finish_reason
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    headers = refused.value.response.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("3", "0")
    assert re.fullmatch(r"(\d+s|1m0s)", headers["x-ratelimit-reset-requests"])

    usage = json.loads(keyed.cli("keys", "usage", "bob", "--json").stdout)["bob"]
    assert usage["requests"] == 3 and usage["completion_tokens"] == 12 and usage["prompt_tokens"] > 0
    deadline = time.monotonic() + 10
    while not re.search(r'neuralpipe_gateway_limited_total\{[^}]*key="bob"[^}]*reason="rpm"[^}]*\} 1', keyed.metrics()):
        assert time.monotonic() < deadline, "the 429 never showed in /metrics"
        time.sleep(0.1)
    metrics = keyed.metrics()
    assert re.search(r'neuralpipe_gateway_key_requests_total\{[^}]*key="bob"[^}]*\} 3', metrics)
    assert re.search(r'neuralpipe_gateway_key_tokens_total\{[^}]*key="bob"[^}]*kind="completion"[^}]*\} 12', metrics)


def test_answers_to_a_key_with_per_minute_limits_say_what_is_left(keyed):
    """OpenAI's x-ratelimit-* headers, on whole and streamed answers alike."""
    key = make_key(keyed, "erin", "--rpm", "10", "--tpm", "1000")
    client = openai.OpenAI(base_url=keyed.url, api_key=key, max_retries=0, timeout=30)
    whole = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert whole.headers["x-ratelimit-limit-requests"] == "10"
    assert whole.headers["x-ratelimit-remaining-requests"] == "9"
    assert (whole.headers["x-ratelimit-limit-tokens"], whole.headers["x-ratelimit-remaining-tokens"]) == (
        "1000",
        "1000",
    )
    assert whole.parse().usage.completion_tokens == 4
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True
    ) as streamed:
        assert streamed.headers["x-ratelimit-remaining-requests"] == "8"
        assert streamed.headers["x-ratelimit-remaining-tokens"] == "996"  # the first answer's 4 delivered tokens
        assert streamed.headers["x-ratelimit-reset-tokens"].endswith("s")
        assert any(line == "data: [DONE]" for line in streamed.iter_lines())
    unlimited = openai.OpenAI(base_url=keyed.url, api_key=make_key(keyed, "frank"), max_retries=0, timeout=30)
    answer = unlimited.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert not any(name.startswith("x-ratelimit-") for name in answer.headers)


def test_the_browser_feed_needs_a_key_too(keyed):
    import asyncio

    import aiohttp

    async def connect(query: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(keyed.url + "/feed" + query) as ws:
                    await ws.close()
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(connect("")) == 401
    assert asyncio.run(connect("?access_token=" + make_key(keyed, "carol"))) == 101


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwt_engine(tmp_path_factory, rsa_key):
    tmp = tmp_path_factory.mktemp("gwjwt")
    jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk["kid"] = "k1"
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    gateway = f'auth = "jwt"\njwks_file = "{tmp / "jwks.json"}"\naudience = "neuralpipe-test"'
    engine = GatewayEngine(tmp, default_topology(gateway=gateway), "j" + uuid.uuid4().hex[:10])
    try:
        yield engine.start()
    finally:
        engine.stop()


def test_a_jwt_signed_with_a_jwks_key_is_let_in_and_a_bad_one_is_401(jwt_engine, rsa_key):
    def token(**claims) -> str:
        body = {"sub": "dora", "exp": int(time.time()) + 300, "aud": "neuralpipe-test", **claims}
        return jwt.encode(body, rsa_key, algorithm="RS256", headers={"kid": "k1"})

    client = openai.OpenAI(base_url=jwt_engine.url, api_key=token(), max_retries=0, timeout=30)
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3).usage.completion_tokens == 3
    for bad in (token(exp=int(time.time()) - 10), token(aud="someone-else"), token() + "x"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=jwt_engine.url, api_key=bad, max_retries=0).chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=3
            )
    limited = openai.OpenAI(base_url=jwt_engine.url, api_key=token(sub="eve", np_rpm=1), max_retries=0, timeout=30)
    limited.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)


def test_a_gateway_beyond_loopback_without_auth_is_refused_at_load(tmp_path):
    path = tmp_path / "open.toml"
    path.write_text(default_topology().replace('listen = "127.0.0.1:0"', 'listen = "0.0.0.0:0"'))
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "config", "show", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "NEURALPIPE_GATEWAY_LISTEN"},  # the file's listen
    )  # fmt: skip
    assert done.returncode != 0
    assert "gateway.listen: 0.0.0.0:0 is reachable from other hosts" in done.stderr
    assert 'auth = "keys" or "jwt"' in done.stderr


def test_beyond_max_connections_is_503_until_one_closes(keyed):
    import asyncio

    import aiohttp

    key = make_key(keyed, "dave")
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}

    async def run() -> tuple[int, str | None, str, int]:
        async with aiohttp.ClientSession() as session:
            feeds = [await session.ws_connect(f"{keyed.url}/feed?access_token={key}") for _ in range(3)]
            async with session.post(keyed.url + "/chat/completions", json=body, headers=headers) as busy:
                status, retry, code = busy.status, busy.headers.get("Retry-After"), (await busy.json())["error"]["code"]
            await feeds[0].close()
            for _ in range(100):  # the server sees the close a moment later
                async with session.post(keyed.url + "/chat/completions", json=body, headers=headers) as answer:
                    if answer.status != 503:
                        break
                await asyncio.sleep(0.05)
            for feed in feeds[1:]:
                await feed.close()
            return status, retry, code, answer.status

    assert asyncio.run(run()) == (503, "1", "gateway_busy", 200)


def test_a_request_ingest_refuses_frees_the_keys_stream_slot(tmp_path):
    """Ingest at capacity (its one stream held by another key) refuses the request with 503; the
    key's one stream slot is free again at once, each time."""
    engine = GatewayEngine(
        tmp_path,
        default_topology(gateway='auth = "keys"', ingest="params.max_streams = 1", embedded="tokens_per_s = 20"),
        "r" + uuid.uuid4().hex[:10],
    ).start()
    try:
        holder = openai.OpenAI(base_url=engine.url, api_key=make_key(engine, "hold"), max_retries=0)
        client = openai.OpenAI(
            base_url=engine.url, api_key=make_key(engine, "erin", "--max-streams", "1"), max_retries=0
        )
        held = holder.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, stream=True)
        next(iter(held))  # ingest's one stream is taken
        for _ in range(2):
            with pytest.raises(openai.InternalServerError, match="capacity"):
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        held.close()  # the holder goes: its stream is cancelled, ingest's slot frees

        def answered() -> bool:
            try:
                return (
                    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).usage.completion_tokens
                    == 2
                )
            except openai.InternalServerError:  # ingest's slot not free yet
                return False

        wait_for(answered, 10, "a request of the key after two refused ones")
    finally:
        engine.stop()


def test_a_request_of_more_choices_than_the_key_has_streams_gets_429(keyed):
    """n choices are n streams of the key: n = 3 against --max-streams 2 is refused, n = 2 goes,
    and its usage in the ledger counts both choices' tokens."""
    client = openai.OpenAI(base_url=keyed.url, api_key=make_key(keyed, "fay", "--max-streams", "2"), max_retries=0)
    with pytest.raises(openai.RateLimitError, match="2 concurrent streams"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=3)
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=2)
    assert len(answer.choices) == 2 and answer.usage.completion_tokens == 4
