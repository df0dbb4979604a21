"""The gateway's usage ledger writer: stream ends are handed over in memory and written by a thread
of its own, on a connection of its own, so the event loop never waits on SQLite.

A commit is ~20 µs, but every few hundred commits SQLite checkpoints the WAL into the database and
syncs it: 18 ms at p99.9 and up to 54 ms here, a stall of every stream if the loop did it. The thread
writes whatever piled up in one transaction, at once after each stream end; what it cannot write (the
database busy past its timeout, a full disk) stays pending, is reported through ``on_error`` and is
tried again a second later. :meth:`LedgerWriter.close` writes what is left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from engine.auth.keystore import KeyStore, KeyStoreError
from engine.auth.limits import MAX_LIMIT

MAX_PENDING = 100_000  # principals whose use awaits a write (the database failing for long)
RETRY_S = 1.0

Key = tuple[str, str]  # (kind, name)


class LedgerWriter:
    def __init__(
        self,
        path: str,
        on_error: Callable[[str], None] | None = None,
        busy_timeout_s: float = 5.0,
        retry_s: float = RETRY_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = KeyStore(path, busy_timeout_s=busy_timeout_s)
        self._on_error = on_error
        self._retry_s = retry_s
        self._wall = wall_clock
        self._changed = threading.Condition()
        self._pending: dict[Key, list[int]] = {}  # requests, prompt, completion, cached
        self._writing: dict[Key, list[int]] = {}  # taken by the thread, not committed yet
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def add(self, kind: str, name: str, prompt: int, completion: int, cached: int) -> None:
        """One stream's use (counts already clamped to 0..MAX_LIMIT); written within milliseconds."""
        with self._changed:
            entry = self._pending.get((kind, name))
            if entry is None:
                if len(self._pending) >= MAX_PENDING:
                    self._report(f"ledger: {len(self._pending)} principals' use unsaved; dropping {kind}:{name}'s")
                    return
                entry = self._pending[(kind, name)] = [0, 0, 0, 0]
            for i, value in enumerate((1, prompt, completion, cached)):
                entry[i] = min(MAX_LIMIT, entry[i] + value)
            self._changed.notify_all()

    def unwritten_tokens(self, kind: str, name: str) -> int:
        """Prompt + completion tokens handed over and not known to be in the database yet (a batch
        being committed counts too: at worst counted twice for a moment, never missed)."""
        with self._changed:
            return sum(e[1] + e[2] for e in (self._pending.get((kind, name)), self._writing.get((kind, name))) if e)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything handed over is written; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._writing, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is pending (trying for up to ``timeout_s``) and stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._report(f"ledger: still writing after {timeout_s:g} s at close; the rest is lost")
        else:
            self._store.close()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return  # closing, nothing left
                batch, self._pending = self._pending, {}
                self._writing = batch
            entries = [(kind, name, *counts) for (kind, name), counts in batch.items()]
            try:
                self._store.add_usage_many(entries, self._wall())
                failed = False
            except (KeyStoreError, ValueError) as exc:
                self._report(f"ledger write failed (kept, retried in {self._retry_s:g} s): {exc}")
                failed = True
            with self._changed:
                self._writing = {}
                if failed:
                    for key, counts in batch.items():
                        entry = self._pending.setdefault(key, [0, 0, 0, 0])
                        for i, value in enumerate(counts):
                            entry[i] = min(MAX_LIMIT, entry[i] + value)
                self._changed.notify_all()
                if failed:  # try again after a while (sooner when more comes, or at close)
                    self._changed.wait(self._retry_s)

    def _report(self, message: str) -> None:
        if self._on_error is not None:
            self._on_error(message)
