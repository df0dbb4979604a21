"""Broadcast stage: XPUB fan-out of token streams with snapshots for late joiners."""
