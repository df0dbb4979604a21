"""Requests as large as long-context and vision models take: a long document in one message, an
image in a data URL. The gateway's ``max_body_bytes`` is the one limit a client meets; what it lets
through, ingest takes (before, ingest's own fixed limits refused it)."""

from __future__ import annotations

import base64
import concurrent.futures
import uuid

import openai
import pytest
from gateway_harness import GatewayEngine, default_topology

pytestmark = pytest.mark.timeout(120)

MODEL = "neuralpipe-echo"
BIG = 8 << 20


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = GatewayEngine(
        tmp_path_factory.mktemp("big"),
        default_topology(gateway=f"max_body_bytes = {BIG}"),  # ingest follows it
        "b" + uuid.uuid4().hex[:10],
    )
    try:
        engine.start()
        with openai.OpenAI(base_url=engine.url, api_key="unused", max_retries=0, timeout=60) as c:
            yield c
    finally:
        engine.stop()


def test_a_long_document_in_one_message_is_answered(client):
    """A 100k-token document is ~400 KB: before, any message over 256 KiB was refused (422)."""
    document = "The river runs past the mill and the old stone bridge. " * 8000  # 440 KB
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": document + "\nSummarise."}], max_tokens=4
    )
    assert reply.choices[0].message.content


def test_an_image_of_megabytes_is_answered_while_other_requests_go_on(client):
    """A 3 MB image as a data URL (how the official client sends a local image): before, ingest's
    1 MiB request limit refused it whatever max_body_bytes allowed."""
    image = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 9000).decode()  # ~3 MB
    content = [{"type": "text", "text": "What is in it?"}, {"type": "image_url", "image_url": {"url": image}}]

    def small() -> str:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(small) for _ in range(3)]
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4
        )
        assert reply.choices[0].message.content
        assert all(f.result(timeout=60).choices[0].message.content for f in others)


def test_a_body_over_the_limit_is_413(client):
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * (BIG + 1)}])
    assert refused.value.status_code == 413
