"""Clients of a running engine that need only pyzmq, numpy and orjson: the stream consumer, the
request client, the cache and supervisor clients, and what ``neuralpipe tail`` prints."""

# how long a follower of one stream waits for anything of it before saying there is no such stream
# (or none retained): `neuralpipe tail --stream`'s default, the gateway's feed of one stream
FIRST_MESSAGE_WAIT_S = 30.0
