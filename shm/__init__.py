"""Shared-memory data plane: rings, record and batch layout, segment naming and registry.

Usable alone (it imports neither ``engine`` nor ``stages``), e.g. by a consumer in another
program that maps a ring read-only. Import the modules you need (``shm.ring``, ``shm.batch``,
...): nothing is imported eagerly here, so a process that never touches batches never loads numpy.
"""
