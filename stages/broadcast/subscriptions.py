"""The subscriptions of one XPUB socket, from the messages ZeroMQ hands it (XPUB_VERBOSER: every
subscribe and unsubscribe, one message each: a first byte 1 or 0, then the topic).

Anything else a subscriber sends (an XSUB can send any bytes) is counted and ignored, as is an
unsubscribe of a topic nobody subscribed to: junk never turns publishing off. The table of
per-stream topics is bounded: a subscription past ``max_topics`` is refused (counted; that
subscriber still gets its stream from the snapshot endpoint).
"""

from __future__ import annotations

from engine.protocol import wire

MAX_TOPICS = 100_000


class Subscriptions:
    def __init__(self, max_topics: int = MAX_TOPICS) -> None:
        self.max_topics = max_topics
        self.everything = 0  # subscriptions that match the ``all`` topic ("", "a", "al", "all", ...)
        self.streams: dict[int, int] = {}  # stream id -> subscriptions to its exact topic
        self.others: dict[bytes, int] = {}  # e.g. "heartbeat" alone; bounded like the streams
        self.counts = {"subscriptions": 0, "junk": 0, "refused": 0}

    @property
    def wants_batches(self) -> bool:
        return self.everything > 0

    def feed(self, frame: bytes) -> None:
        """Account one message the XPUB socket received."""
        if not frame or frame[0] not in (0, 1):
            self.counts["junk"] += 1
            return
        add, topic = frame[0] == 1, frame[1:]
        if wire.ALL_TOPIC.startswith(topic):
            self.everything = max(0, self.everything + (1 if add else -1))
        else:
            sid = wire.parse_topic(topic)
            table = self.streams if sid is not None else self.others
            key = sid if sid is not None else bytes(topic[:64])
            if add:
                if key not in table and len(table) >= self.max_topics:
                    self.counts["refused"] += 1
                    return
                table[key] = table.get(key, 0) + 1
            elif key in table:
                table[key] -= 1
                if table[key] <= 0:
                    del table[key]
            else:
                self.counts["junk"] += 1  # an unsubscribe of a topic no one subscribed to
                return
        self.counts["subscriptions"] += add
