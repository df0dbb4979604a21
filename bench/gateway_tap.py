"""A tap on the engine's broadcast for ``neuralpipe bench gateway``, in a process of its own: every
token the broadcast publishes, read as the gateway reads it (the binary encoding, every stream), with
its latency from the upstream's send stamp in its text to this subscriber having received it. Set
beside the client's latency through the gateway, it splits the engine path from the gateway worker's
own part."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from engine.clients.consumer import StreamConsumer
from engine.protocol.wire import Batch
from shm.batch import Kind

POLL_S = 0.02  # how often the pipe to the bench is looked at while the broadcast is quiet


def _stamps(batch: Batch) -> np.ndarray:
    """The send stamps of the batch's token rows whose text is one."""
    texts = batch.texts
    found = (texts[i].strip() for i in np.flatnonzero(batch.columns["kind"] == Kind.TOKEN).tolist())
    return np.array([int(text) for text in found if text.isdigit()], dtype=np.int64)


def serve(runtime_dir: str, conn: Any) -> None:
    """The child's main (bench.proc.ChildProcess): "ready" once subscribed; then, for each request,
    the latencies (ns) collected since the last one: {"broadcast_ns": [...]}; None ends it."""
    with StreamConsumer.for_engine(runtime_dir, binary=True) as consumer:
        if not consumer.join():
            raise RuntimeError("the engine's broadcast did not answer")
        conn.send("ready")
        to_tap: list[np.ndarray] = []
        while True:
            for batch in consumer.batches(idle_timeout_s=POLL_S):
                now = time.monotonic_ns()
                to_tap.append(now - _stamps(batch))
                if conn.poll():
                    break
            if conn.poll():
                if conn.recv() is None:
                    return
                conn.send({"broadcast_ns": np.concatenate(to_tap or [np.empty(0, np.int64)]).tolist()})
                to_tap = []
