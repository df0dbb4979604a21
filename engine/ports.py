"""The engine's rings as ports: ``[engine] transport`` names what carries records between workers.
``shm`` (the default and the product) is ``shm.ring`` itself, with no wrapper; anything else is a
reference ``package.module:NAME`` to a :class:`shm.ports.PortFactory` (the comparison transports of
``neuralpipe bench pipeline`` live in bench/ring_transports.py: the engine has no case for them)."""

from __future__ import annotations

import importlib
import re
from typing import Any

from shm.ports import PortFactory, RecordConsumer, RecordProducer
from shm.ring import Consumer, Producer

SHM = "shm"
REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def port_factory(ref: str) -> PortFactory | None:
    """The factory ``ref`` names; None for the built-in shared-memory rings."""
    if ref == SHM:
        return None
    module_name, _, attr = ref.partition(":")
    found = getattr(importlib.import_module(module_name), attr)
    if not isinstance(found, PortFactory):
        raise TypeError(f"transport {ref!r} is not a port factory (shm.ports.PortFactory)")
    return found


def open_consumer(end: Any, zmq_ctx: Any) -> RecordConsumer:
    """The reading end of ``end`` (a worker's RingEnd): the shm Consumer itself, or the factory's."""
    factory = port_factory(end.transport)
    return Consumer.attach(end.segment, end.wait) if factory is None else factory.consumer(end.channel, zmq_ctx)


def open_producer(end: Any, zmq_ctx: Any) -> RecordProducer:
    """The writing end of ``end``: the shm Producer itself, or the factory's."""
    factory = port_factory(end.transport)
    return Producer.attach(end.segment, end.wait) if factory is None else factory.producer(end.channel, zmq_ctx)
