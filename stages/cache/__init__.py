"""The cache stage: stores finished streams (LRU by bytes, TTL) and replays hits (docs/cache.md)."""
