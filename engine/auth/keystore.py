"""The gateway's API keys and usage ledger: one SQLite database (stdlib sqlite3, WAL) in the state
directory (engine/statedir.py), shared by the gateway and the ``neuralpipe keys`` commands, which may
run while the gateway does.

Keys are ``np-`` and 43 characters of base64url (256 random bits, ``secrets``). Only their SHA-256
is stored: a key is high-entropy, so a fast hash is as good as a slow one (there is no dictionary to
try), and it lets each request look its key up by index. The key itself is returned once by
:meth:`KeyStore.create` and never stored, logged or shown again; ``list`` shows its first 8
characters so an operator can tell keys apart.

The ledger keeps per principal (a key, or a JWT subject) running totals of requests, prompt,
completion and cached tokens, and the tokens per hour of the last year for budgets (bounded: old
hours are pruned). Several processes share the file: WAL lets readers run beside one writer, every
write is one short ``BEGIN IMMEDIATE`` transaction, and a writer waits up to ``busy_timeout_s`` for
another's. A file that is not a usable database is a :class:`KeyStoreError` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from engine.auth.limits import MAX_BUDGET_PERIOD_S, MAX_LIMIT, NO_LIMITS, Limits
from engine.auth.principal import Kind, Principal
from engine.rundir import RuntimeDirError, open_private_dir
from engine.statedir import refuse_shared_dir

DB_FILE = "gateway.sqlite3"
SCHEMA_VERSION = 1
KEY_PREFIX = "np-"
_KEY = re.compile(r"np-[A-Za-z0-9_-]{43}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# a JWT subject as a ledger name; "jwt:<sub>" is also the gateway's client name at ingest (<= 256 bytes)
MAX_SUBJECT_BYTES = 200
HOUR_S = 3600
_PRUNE_EVERY_S = HOUR_S
_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    hash BLOB UNIQUE,                -- SHA-256 of the key, NULL once revoked
    prefix TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    rpm INTEGER, tpm INTEGER, max_streams INTEGER, budget_tokens INTEGER,
    budget_period_s INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    kind TEXT NOT NULL, name TEXT NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS budget (
    kind TEXT NOT NULL, name TEXT NOT NULL, hour INTEGER NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (kind, name, hour)
);
"""


class KeyStoreError(Exception):
    """The key store cannot be used or refuses an operation; the text names the file or the
    problem (one line) and never holds a key."""


@dataclass(frozen=True)
class KeyInfo:
    name: str
    prefix: str  # the key's first 8 characters
    created: float  # unix time
    revoked: float | None
    limits: Limits

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "prefix": self.prefix,
            "created": self.created,
            "revoked": self.revoked,
            **self.limits.as_dict(),
        }


def keystore_path(state_dir: str) -> str:
    return os.path.join(state_dir, DB_FILE)


def check_name(name: str) -> str:
    """A key's name: 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = name[:70] if isinstance(name, str) else type(name).__name__
        raise KeyStoreError(
            f"key name must be 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit (got {shown!r})"
        )
    return name


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """The database at ``path`` (created 0600 in a 0700 directory when absent). One connection,
    usable from any thread (calls are serialised)."""

    def __init__(self, path: str, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pruned_at = 0.0
        _check_files(path)
        try:
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"{path}: cannot open: {exc}") from None
        try:
            with self._op():
                self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise KeyStoreError(f"{self.path}: cannot use WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise KeyStoreError(
                f"{self.path}: made by a newer neuralpipe (schema {version}, this one reads {SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            with self._write():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- plumbing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        """Serialise calls; SQLite's errors become one-line KeyStoreErrors naming the file."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
                if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise KeyStoreError(f"{self.path}: busy (another process holds it): {exc}") from None
                if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or not code:
                    raise KeyStoreError(
                        f"{self.path}: not a usable key database ({exc}); move it away to start a new one"
                    ) from None
                raise KeyStoreError(f"{self.path}: {exc}") from None  # a full disk, a read-only file, ...

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (a full disk)
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys -------------------------------------------------------------------------------------

    def create(self, name: str, limits: Limits = NO_LIMITS) -> str:
        """A new key named ``name``; returns the key (the only time it exists outside its holder).
        Refused while a key of that name is live; a revoked name may be given a new key (its
        ledger goes on)."""
        check_name(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = (name, hash_key(key), key[:8], time.time(), limits.rpm, limits.tpm, limits.max_streams)
        row += (limits.budget_tokens, limits.budget_period_s)
        with self._op(), self._write():
            cursor = self._db.execute(
                "INSERT INTO keys (name, hash, prefix, created, rpm, tpm, max_streams, budget_tokens, budget_period_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET hash = excluded.hash, prefix = excluded.prefix,"
                " created = excluded.created, revoked = NULL, rpm = excluded.rpm, tpm = excluded.tpm,"
                " max_streams = excluded.max_streams, budget_tokens = excluded.budget_tokens,"
                " budget_period_s = excluded.budget_period_s WHERE keys.revoked IS NOT NULL",
                row,
            )
            if cursor.rowcount != 1:
                raise KeyStoreError(f"a key named {name!r} exists (revoke it first, or pick another name)")
        return key

    def list(self) -> list[KeyInfo]:
        """Every key made here, revoked ones too, by name (no key material)."""
        with self._op():
            rows = self._db.execute(
                "SELECT name, prefix, created, revoked, rpm, tpm, max_streams, budget_tokens, budget_period_s"
                " FROM keys ORDER BY name"
            ).fetchall()
        return [KeyInfo(row[0], row[1], row[2], row[3], self._limits(row[0], row[4:])) for row in rows]

    def revoke(self, name: str) -> bool:
        """Revoke the key ``name`` at once (its hash is deleted); False when no live key has it."""
        check_name(name)
        with self._op(), self._write():
            cursor = self._db.execute(
                "UPDATE keys SET revoked = ?, hash = NULL WHERE name = ? AND revoked IS NULL", (time.time(), name)
            )
            return cursor.rowcount == 1

    def find(self, key: str) -> Principal | None:
        """The live key's principal, or None (malformed, unknown or revoked)."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            return None
        with self._op():
            row = self._db.execute(
                "SELECT name, rpm, tpm, max_streams, budget_tokens, budget_period_s FROM keys WHERE hash = ?",
                (hash_key(key),),
            ).fetchone()
        if row is None:
            return None
        return Principal(row[0], "key", self._limits(row[0], row[1:]))

    def _limits(self, name: str, values: tuple) -> Limits:
        try:
            return Limits(*values)
        except (TypeError, ValueError) as exc:  # a row edited by hand
            raise KeyStoreError(f"{self.path}: key {name!r} has unusable limits: {exc}") from None

    # -- the ledger -------------------------------------------------------------------------------

    def add_usage(
        self,
        name: str,
        requests: int,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        kind: Kind = "key",
        now: float | None = None,
    ) -> None:
        """Add one stream's (or several's) use to the principal's totals and to this hour's budget
        tokens (prompt + completion). One transaction."""
        self.add_usage_many([(kind, name, requests, prompt_tokens, completion_tokens, cached_tokens)], now)

    def add_usage_many(self, entries: list[tuple[Kind, str, int, int, int, int]], now: float | None = None) -> None:
        """Several principals' ``(kind, name, requests, prompt, completion, cached)`` in one
        transaction."""
        now = time.time() if now is None else now
        checked = [
            (_check_kind(kind), _check_ledger_name(kind, name), *_counts(counts)) for kind, name, *counts in entries
        ]
        hour = int(now // HOUR_S)
        with self._op(), self._write():
            for kind, name, requests, prompt, completion, cached in checked:
                self._db.execute(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, name) DO UPDATE SET"
                    " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = completion_tokens + excluded.completion_tokens,"
                    " cached_tokens = cached_tokens + excluded.cached_tokens, last_used = excluded.last_used",
                    (kind, name, requests, prompt, completion, cached, now),
                )
                if prompt + completion:
                    self._db.execute(
                        "INSERT INTO budget VALUES (?, ?, ?, ?) ON CONFLICT (kind, name, hour)"
                        " DO UPDATE SET tokens = tokens + excluded.tokens",
                        (kind, name, hour, prompt + completion),
                    )
            if now - self._pruned_at >= _PRUNE_EVERY_S:  # budgets look back one year at most
                self._db.execute("DELETE FROM budget WHERE hour < ?", ((now - MAX_BUDGET_PERIOD_S) // HOUR_S - 1,))
                self._pruned_at = now

    def usage(self, name: str | None = None, kind: Kind = "key") -> dict[str, dict]:
        """Totals per principal name: requests, prompt_tokens, completion_tokens, cached_tokens,
        last_used (unix time or None). For keys: every key made here (revoked ones too, zeros when
        unused), or only ``name`` ({} when there is no such key)."""
        _check_kind(kind)
        if name is not None:
            _check_ledger_name(kind, name)
        columns = ", ".join(f"coalesce(u.{c}, 0)" for c in _COUNTS) + ", u.last_used"
        if kind == "key":
            sql = f"SELECT k.name, {columns} FROM keys k LEFT JOIN usage u ON u.kind = 'key' AND u.name = k.name"
            where, args = " WHERE k.name = ?", (name,)
        else:
            sql = f"SELECT u.name, {columns} FROM usage u WHERE u.kind = ?"
            where, args = " AND u.name = ?", (kind, name)
        if name is None:
            where, args = "", args[:-1]
        with self._op():
            rows = self._db.execute(sql + where + " ORDER BY 1", args).fetchall()
        return {row[0]: dict(zip((*_COUNTS, "last_used"), row[1:], strict=True)) for row in rows}

    def budget_used(self, name: str, since_s: float, kind: Kind = "key") -> int:
        """Prompt + completion tokens the principal used since the unix time ``since_s`` (counted
        from the start of that hour: the ledger keeps tokens per hour)."""
        return sum(tokens for _, tokens in self.budget_hours(name, since_s, kind))

    def budget_hours(self, name: str, since_s: float, kind: Kind = "key") -> list[tuple[int, int]]:
        """(hour, tokens) since the hour holding ``since_s``, oldest first (hour = unix time // 3600)."""
        _check_kind(kind)
        _check_ledger_name(kind, name)
        with self._op():
            return self._db.execute(
                "SELECT hour, tokens FROM budget WHERE kind = ? AND name = ? AND hour >= ? ORDER BY hour",
                (kind, name, int(since_s // HOUR_S)),
            ).fetchall()


def _check_kind(kind: str) -> str:
    if kind not in ("key", "jwt", "anonymous"):
        raise ValueError(f"kind must be key, jwt or anonymous (got {kind!r})")
    return kind


def _check_ledger_name(kind: str, name: str) -> str:
    if kind == "key":
        return check_name(name)
    if not valid_subject(name):
        raise KeyStoreError(f"a {kind} name must be 1-{MAX_SUBJECT_BYTES} bytes of printable UTF-8")
    return name


def valid_subject(name: object) -> bool:
    return isinstance(name, str) and name.isprintable() and 1 <= len(name.encode(errors="replace")) <= MAX_SUBJECT_BYTES


def _counts(values: list[int]) -> tuple[int, ...]:
    for field, value in zip(_COUNTS, values, strict=True):
        if type(value) is not int or not 0 <= value <= MAX_LIMIT:
            raise ValueError(f"{field}: must be an integer in 0..{MAX_LIMIT} (got {value!r})")
    return tuple(values)


def _check_files(path: str) -> None:
    """The database and its WAL files are regular files of this user in a private directory,
    none a symlink (SQLite itself would follow one).

    Checked with lstat, never by opening them: closing any descriptor of a file drops every POSIX
    lock this process holds on it, SQLite's included, so a check that opened the file while another
    connection of this process had it open (the gateway has two) let a `neuralpipe keys` process
    believe it was alone and rebuild the WAL index under it: its writes vanished for other readers."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        refuse_shared_dir(directory)
        dir_fd = open_private_dir(directory)
    except (RuntimeDirError, OSError) as exc:
        raise KeyStoreError(f"{directory}: {exc}") from None
    try:
        with contextlib.suppress(FileExistsError):  # a new file: no connection can have it open
            os.close(
                os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            )
        for each in (name, name + "-wal", name + "-shm"):
            try:
                st = os.stat(each, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                raise KeyStoreError(f"{path}: {each} is a symbolic link; refusing to follow it (remove it)")
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise KeyStoreError(f"{path}: {each} is not a regular file of this user (uid {os.getuid()})")
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(each, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise KeyStoreError(f"{path}: {exc}") from None
    finally:
        os.close(dir_fd)
