"""Shared-memory data plane: rings, record and batch layout, segment naming and registry.

Usable alone (it imports neither ``engine`` nor ``stages``), e.g. by a consumer in another
program that maps a ring read-only.
"""

from shm.batch import BatchColumns, TokenBatch, batch_size, write_batch
from shm.ring import Consumer, Producer, RecordTooLarge, Ring, RingCorrupt, RingError, RingHeader
from shm.wait import WaitStrategy

__all__ = [
    "BatchColumns",
    "Consumer",
    "Producer",
    "RecordTooLarge",
    "Ring",
    "RingCorrupt",
    "RingError",
    "RingHeader",
    "TokenBatch",
    "WaitStrategy",
    "batch_size",
    "write_batch",
]
