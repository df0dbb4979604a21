"""Ingest: getting token streams from upstreams into the engine (and the embedded upstream)."""
