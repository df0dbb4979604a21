"""Clients of a running engine that need only pyzmq, numpy and orjson: the stream consumer, the
request client, the cache and supervisor clients, and what ``neuralpipe tail`` prints."""
