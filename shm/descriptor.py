"""Layout of a ring segment: the one place that knows where every byte lives.

Every other module reads and writes the header through these constants, the way Agrona's
``RingBufferDescriptor`` and Aeron's ``LogBufferDescriptor`` fix their layouts.

A ring is one shared-memory segment::

    0          128        256        384        512        640        768        896       1024       1280
    +----------+----------+----------+----------+----------+----------+----------+----------+----------+---...
    | static   | write    | read     | consumer | producer | producer | consumer | owner    | doorbell | data
    | config   | cursor   | cursor   | waiting  | waiting  | stats    | stats    | stats    | dir path | area
    +----------+----------+----------+----------+----------+----------+----------+----------+----------+---...

Each block is 128 bytes (two cache lines, so the adjacent-line prefetcher does not make two writers
share a line). The write cursor is written only by the producer, the read cursor only by the
consumer; each ``*_WAITING`` flag is written by the side that parks and read by the other side on
every commit/release, so it lives alone and stays in the shared state while nobody sleeps.

Static config (written once by the creator, before MAGIC)::

    0   MAGIC            u64  b"NPRING\\x00\\x01" as little-endian u64
    8   VERSION          u32  LAYOUT_VERSION
    12  FLAGS            u32  bit 0: FLAG_DROP_WHEN_FULL
    16  CAPACITY         u64  bytes in the data area, a power of two
    24  MAX_RECORD       u64  largest payload a record may carry
    32  CREATED_NS       u64  CLOCK_REALTIME at creation
    40  OWNER_PID        u64  pid of the creating process (the supervisor)

Cursors are byte positions that only grow (never wrapped); the index into the data area is
``cursor & (CAPACITY - 1)``. A cursor of 2**64 bytes is not reachable in practice.

Producer stats (written by the producer only)::

    640 PRODUCER_PID, 648 PRODUCER_HEARTBEAT_NS, 656 RECORDS_WRITTEN, 664 BACKPRESSURE_EVENTS,
    672 DROPS, 680 LAST_RECORD (byte offset in the segment of the last committed record's header,
    0 before the first; lets a restarted producer read back what it published last),
    688 CLAIM (write cursor + 1 where the producer holds an open claim; a claim is open exactly
    when CLAIM == WRITE_CURSOR + 1, so a commit, which moves the cursor, closes it for free)

Consumer stats (written by the consumer only)::

    768 CONSUMER_PID, 776 CONSUMER_HEARTBEAT_NS, 784 RECORDS_READ, 792 LOST_WAKEUPS

Owner stats (written by whoever repairs the ring)::

    896 UNBLOCKS   torn claims of a dead producer that were cleared

Doorbell dir (1024..1279): UTF-8 path, NUL padded, of the directory holding this ring's two FIFOs
(``<segment>.data`` rung by the producer, ``<segment>.space`` rung by the consumer); empty when
the ring was created without one (then only the spin and yield wait strategies are available).

Records in the data area are 8-byte aligned::

    +---------------------------+---------------------------+------------------------+-----+
    | length u32 (payload bytes)| type u32                  | payload (length bytes) | pad |
    +---------------------------+---------------------------+------------------------+-----+

The 8-byte record header is read and written as one u64: ``type << 32 | length``, at commit,
before the write cursor moves past the record; a claimed but uncommitted record is thus never
visible. ``TYPE_PADDING`` fills the tail of the data area when a record would not fit before the
wrap.
"""

from __future__ import annotations

CACHE_LINE = 64
BLOCK = 2 * CACHE_LINE

MAGIC = int.from_bytes(b"NPRING\x00\x01", "little")
LAYOUT_VERSION = 1

# static config block
MAGIC_OFFSET = 0
VERSION_OFFSET = 8
FLAGS_OFFSET = 12
CAPACITY_OFFSET = 16
MAX_RECORD_OFFSET = 24
CREATED_NS_OFFSET = 32
OWNER_PID_OFFSET = 40

# hot blocks, one writer each
WRITE_CURSOR_OFFSET = 1 * BLOCK
READ_CURSOR_OFFSET = 2 * BLOCK
CONSUMER_WAITING_OFFSET = 3 * BLOCK
PRODUCER_WAITING_OFFSET = 4 * BLOCK

# producer stats block
PRODUCER_PID_OFFSET = 5 * BLOCK
PRODUCER_HEARTBEAT_OFFSET = PRODUCER_PID_OFFSET + 8
RECORDS_WRITTEN_OFFSET = PRODUCER_PID_OFFSET + 16
BACKPRESSURE_OFFSET = PRODUCER_PID_OFFSET + 24
DROPS_OFFSET = PRODUCER_PID_OFFSET + 32
LAST_RECORD_OFFSET = PRODUCER_PID_OFFSET + 40
CLAIM_OFFSET = PRODUCER_PID_OFFSET + 48

# consumer stats block
CONSUMER_PID_OFFSET = 6 * BLOCK
CONSUMER_HEARTBEAT_OFFSET = CONSUMER_PID_OFFSET + 8
RECORDS_READ_OFFSET = CONSUMER_PID_OFFSET + 16
LOST_WAKEUPS_OFFSET = CONSUMER_PID_OFFSET + 24

# owner stats block
UNBLOCKS_OFFSET = 7 * BLOCK

DOORBELL_DIR_OFFSET = 8 * BLOCK
DOORBELL_DIR_LENGTH = 2 * BLOCK

HEADER_SIZE = DOORBELL_DIR_OFFSET + DOORBELL_DIR_LENGTH

FLAG_DROP_WHEN_FULL = 1

# records
RECORD_ALIGNMENT = 8
RECORD_HEADER_SIZE = 8
TYPE_PADDING = 1
TYPE_MIN_USER = 16
TYPE_MAX_USER = (1 << 31) - 1
LENGTH_MASK = 0xFFFFFFFF

MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 40


def align(n: int) -> int:
    """Round ``n`` up to the record alignment."""
    return (n + RECORD_ALIGNMENT - 1) & ~(RECORD_ALIGNMENT - 1)


def record_size(payload_length: int) -> int:
    """Bytes a record with ``payload_length`` bytes of payload occupies in the data area."""
    return align(RECORD_HEADER_SIZE + payload_length)


def default_max_record(capacity: int) -> int:
    """Largest payload allowed by default: a quarter of the ring, so a full-size record plus its
    wrap padding always fits in an empty ring and several are in flight at once."""
    return capacity // 4 - RECORD_HEADER_SIZE


def segment_size(capacity: int) -> int:
    return HEADER_SIZE + capacity


def word(offset: int) -> int:
    """Index of the u64 at byte ``offset`` in a ``cast('Q')`` view of the segment."""
    return offset >> 3
