"""The IPC bench's channels: what a producer sent reaches its consumer, however far behind the
consumer is when the producer closes its end (libzmq drops what is still queued at close when the
peer's high-water mark is reached, whatever LINGER says: zeromq/libzmq#4660)."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from bench.message import make_message
from bench.transports import TRANSPORTS, open_channel, open_receiver, open_sender, unavailable

MESSAGES = 3_000
TIMEOUT_S = 5.0
TOKENS = 64  # per message: the channel holds ~170 of them (a low high-water mark is what loses them)


def _send_all_and_close(transport: str, end: object, ready: object) -> None:
    """Child: send MESSAGES flat out, then close at once, as the bench's producer does."""
    message = make_message(TOKENS)
    if not ready.wait(TIMEOUT_S):
        raise SystemExit(3)
    sender = open_sender(transport, end, "block", message, TIMEOUT_S)
    try:
        for seq in range(MESSAGES):
            sender.send(seq)
    finally:
        sender.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_consumer_behind_at_close_still_gets_every_message(transport: str) -> None:
    why = unavailable(transport)
    if why:
        pytest.skip(why)
    ctx = multiprocessing.get_context("spawn")
    message = make_message(TOKENS)
    ready = ctx.Event()
    with open_channel(transport, ctx, len(message.template)) as (producer_end, consumer_end):
        receiver = open_receiver(transport, consumer_end, "block", TIMEOUT_S)
        producer = ctx.Process(target=_send_all_and_close, args=(transport, producer_end, ready), daemon=True)
        producer.start()
        seqs = []
        try:
            ready.set()
            for i in range(MESSAGES):
                try:
                    buf = receiver.recv()
                except Exception:  # each transport's own timeout: what never came is the finding
                    break
                seqs.append(message.read(buf)[0])
                receiver.done()
                if i % 10 == 9:
                    time.sleep(0.005)  # a consumer that falls behind, as one on a loaded machine does
        finally:
            receiver.close()
            producer.join(TIMEOUT_S * 3)
            if producer.is_alive():
                producer.kill()
                producer.join()
    assert producer.exitcode == 0
    assert seqs == list(range(MESSAGES)), f"{MESSAGES - len(seqs)} messages lost"
