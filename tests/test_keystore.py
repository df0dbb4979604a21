"""engine/auth/keystore.py on a real SQLite file: keys hashed and shown once, names validated,
revocation, the usage ledger and budgets, several processes at once, hostile files."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from engine.auth.keystore import DB_FILE, KeyStore, KeyStoreError, hash_key, keystore_path
from engine.auth.limits import Limits
from engine.statedir import state_dir


@pytest.fixture
def store(tmp_path):
    with KeyStore(str(tmp_path / DB_FILE)) as ks:
        yield ks


def test_create_find_list_revoke(store):
    limits = Limits(rpm=10, tpm=1000, max_streams=2, budget_tokens=10**6)
    key = store.create("alice", limits)
    assert key.startswith("np-") and len(key) == 46
    found = store.find(key)
    assert found is not None and (found.name, found.kind, found.limits) == ("alice", "key", limits)
    [info] = store.list()
    assert (info.name, info.prefix, info.revoked, info.limits) == ("alice", key[:8], None, limits)
    assert store.revoke("alice") and not store.revoke("alice")
    assert store.find(key) is None
    assert store.list()[0].revoked is not None


def test_the_key_itself_is_never_stored(tmp_path):
    path = str(tmp_path / DB_FILE)
    with KeyStore(path) as ks:
        key = ks.create("alice")
        ks.add_usage("alice", 1, 2, 3, 0)
    files = [p for p in os.listdir(tmp_path) if p.startswith(DB_FILE)]
    blob = b"".join((tmp_path / p).read_bytes() for p in files)
    assert key.encode() not in blob and key[8:].encode() not in blob
    assert hash_key(key) in blob  # what is kept instead


def test_a_live_name_is_not_reused_a_revoked_one_is(store):
    old = store.create("alice")
    with pytest.raises(KeyStoreError, match="a key named 'alice' exists"):
        store.create("alice")
    store.add_usage("alice", 1, 10, 20, 5)
    store.revoke("alice")
    new = store.create("alice", Limits(rpm=1))
    assert store.find(old) is None and store.find(new).limits.rpm == 1
    assert store.usage("alice")["alice"]["requests"] == 1  # the ledger goes on under the name


@pytest.mark.parametrize(
    "name", ["", "-flag", ".hidden", "../etc", "a/b", "a" * 65, "é", "a b", "a\x00b", "x\n", 7, None]
)
def test_hostile_names_are_refused(store, name):
    with pytest.raises(KeyStoreError, match="key name must be 1-64 characters"):
        store.create(name)
    assert store.list() == []


@pytest.mark.parametrize(
    "key", ["", "np-", "np-" + "A" * 42, "np-" + "A" * 44, "xx-" + "A" * 43, "np-" + "A" * 42 + "!", "n" * 10**6, None]
)
def test_malformed_keys_are_not_found(store, key):
    store.create("alice")
    assert store.find(key) is None


@pytest.mark.parametrize(
    ("field", "value"), [("rpm", 0), ("tpm", -1), ("max_streams", 10**16), ("budget_tokens", True), ("rpm", 1.5)]
)
def test_hostile_limits_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}: must be"):
        Limits(**{field: value})


def test_usage_is_kept_across_a_reopen(tmp_path):
    path = str(tmp_path / DB_FILE)
    with KeyStore(path) as ks:
        ks.create("alice")
        ks.create("bob")
        ks.add_usage("alice", 1, 10, 20, 5)
        ks.add_usage("alice", 1, 1, 2, 0)
        ks.add_usage("carol-sub", 1, 3, 4, 0, kind="jwt")
    with KeyStore(path) as ks:
        usage = ks.usage()
        assert usage["alice"] | {"last_used": 0} == {
            "requests": 2,
            "prompt_tokens": 11,
            "completion_tokens": 22,
            "cached_tokens": 5,
            "last_used": 0,
        }
        assert usage["bob"]["requests"] == 0 and usage["bob"]["last_used"] is None
        assert "carol-sub" not in usage and ks.usage(kind="jwt")["carol-sub"]["prompt_tokens"] == 3
        assert ks.usage("alice").keys() == {"alice"} and ks.usage("nobody") == {}


@pytest.mark.parametrize("counts", [(-1, 0, 0, 0), (1, 10**16, 0, 0), (1, 0, 1.5, 0), (1, 0, 0, True), (1, 0, 0, "3")])
def test_hostile_usage_is_refused_and_nothing_written(store, counts):
    with pytest.raises(ValueError, match="must be an integer in 0"):
        store.add_usage("alice", *counts)
    assert store.usage(kind="key") == {} and store.budget_used("alice", 0) == 0


def test_budget_counts_prompt_and_completion_per_hour(store):
    now = 1_800_001_800.0  # the middle of an hour
    store.add_usage("alice", 1, 100, 50, 0, now=now - 3 * 3600)
    store.add_usage("alice", 1, 10, 5, 5, now=now - 10)
    store.add_usage("alice", 1, 1, 1, 0, now=now)
    assert store.budget_used("alice", now - 3600) == 17
    assert store.budget_used("alice", now - 4 * 3600) == 167
    assert [tokens for _, tokens in store.budget_hours("alice", 0)] == [150, 17]


def test_budget_hours_older_than_a_year_are_pruned(store):
    now = 1_800_000_000.0
    store.add_usage("alice", 1, 100, 0, 0, now=now - 400 * 86400)
    store.add_usage("alice", 1, 1, 0, 0, now=now)  # the first write of this process prunes
    assert store.budget_used("alice", 0) == 1
    assert store.usage("alice") == {}  # no key named alice: the totals of keys list keys
    assert store.usage(kind="key") == {}


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / DB_FILE
    path.write_bytes(b"this is not a database" * 300)
    with pytest.raises(KeyStoreError, match=f"{path}: not a usable key database .*move it away"):
        KeyStore(str(path))


def test_truncated_database_is_a_clear_error(tmp_path):
    path = tmp_path / DB_FILE
    with KeyStore(str(path)) as ks:
        for i in range(200):
            ks.create(f"k{i}")
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 4000 + data[4100:])
    with pytest.raises(KeyStoreError, match="not a usable key database"), KeyStore(str(path)) as ks:
        ks.list()


def test_a_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / DB_FILE)
    KeyStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(KeyStoreError, match="made by a newer neuralpipe"):
        KeyStore(path)


def test_files_are_private_and_never_followed_through_a_symlink(tmp_path):
    state = tmp_path / "state"
    KeyStore(keystore_path(str(state))).close()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / DB_FILE).st_mode) == 0o600
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / DB_FILE).symlink_to(target)
    with pytest.raises(KeyStoreError, match="symbolic link"):
        KeyStore(str(other / DB_FILE))
    (tmp_path / "linked").symlink_to(state)
    with pytest.raises(KeyStoreError, match="symbolic link"):
        KeyStore(str(tmp_path / "linked" / DB_FILE))
    assert target.read_bytes() == b""


def test_state_dir_precedence_and_checks(tmp_path):
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert state_dir("", env=env) == str(tmp_path / "xdg" / "neuralpipe" / "default")
    assert state_dir("blue", env=env) == str(tmp_path / "xdg" / "neuralpipe" / "blue")
    env["NEURALPIPE_STATE_DIR"] = str(tmp_path / "from-env")
    assert state_dir("blue", env=env) == str(tmp_path / "from-env")
    assert state_dir("blue", str(tmp_path / "configured"), env) == str(tmp_path / "configured")
    assert stat.S_IMODE(os.stat(tmp_path / "configured").st_mode) == 0o700
    with pytest.raises(RuntimeError, match="NEURALPIPE_STATE_DIR must be an absolute path"):
        state_dir("blue", env={"NEURALPIPE_STATE_DIR": "relative"})
    with pytest.raises(RuntimeError, match="instance id must be"):
        state_dir("../up", env={"XDG_STATE_HOME": str(tmp_path)})
    (tmp_path / "link").symlink_to(tmp_path / "configured")
    with pytest.raises(RuntimeError, match="symbolic link"):
        state_dir("blue", str(tmp_path / "link"))


def _add_usage_many_times(path: str, name: str, times: int) -> None:
    with KeyStore(path) as ks:
        for _ in range(times):
            ks.add_usage(name, 1, 2, 3, 1)


@pytest.mark.timeout(120)
def test_several_processes_write_the_ledger_at_once(tmp_path):
    path = str(tmp_path / DB_FILE)
    with KeyStore(path) as ks:
        ks.create("alice")
        ctx = multiprocessing.get_context("spawn")
        writers = [ctx.Process(target=_add_usage_many_times, args=(path, "alice", 150)) for _ in range(4)]
        for p in writers:
            p.start()
        for _ in range(150):  # this process writes and reads beside them
            ks.add_usage("alice", 1, 2, 3, 1)
            assert ks.find("np-" + "A" * 43) is None
        for p in writers:
            p.join(60)
        assert [p.exitcode for p in writers] == [0] * 4
        usage = ks.usage("alice")["alice"]
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (750, 1500, 2250)


def test_a_writer_busy_past_the_timeout_is_a_clear_error(tmp_path):
    path = str(tmp_path / DB_FILE)
    with KeyStore(path, busy_timeout_s=0.2) as ks:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(KeyStoreError, match="busy"):
            ks.add_usage("alice", 1, 1, 1, 0)
        assert time.monotonic() - started < 5
        assert ks.find("np-" + "A" * 43) is None  # WAL: reads go on beside the writer
        other.execute("ROLLBACK")
        other.close()
        ks.add_usage("alice", 1, 1, 1, 0)
        assert ks.budget_used("alice", 0) == 2


def test_a_shared_directory_is_refused_not_taken(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(RuntimeError, match="is a shared directory \\(mode 1777\\)"):
        state_dir("blue", str(shared))
    with pytest.raises(KeyStoreError, match="is a shared directory"):
        KeyStore(str(shared / DB_FILE))
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777 and not os.listdir(shared)


def _cli_usage(path: str) -> dict:
    code = (
        "import sys, json; from engine.auth.keystore import KeyStore\n"
        "with KeyStore(sys.argv[1]) as ks: print(json.dumps(ks.usage()))"
    )
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_two_stores_in_one_process_and_another_process_agree(tmp_path):
    """The gateway holds two connections (its reads, the ledger thread); opening the second must not
    drop the first's SQLite locks, or another process rebuilds the WAL index under them and their
    writes vanish for it (fails when the file check opens and closes the database)."""
    path = str(tmp_path / DB_FILE)
    with KeyStore(path) as reads, KeyStore(path) as writes:
        reads.create("alice")
        assert _cli_usage(path)["alice"]["requests"] == 0
        writes.add_usage("alice", 1, 11, 7, 2)
        assert reads.usage()["alice"]["requests"] == 1
        assert _cli_usage(path)["alice"]["requests"] == 1


def _make_keys(path: str, count: int) -> None:
    with KeyStore(path) as ks:
        for i in range(count):
            ks.create(f"cli{i}")
            if i % 2:
                ks.revoke(f"cli{i}")


@pytest.mark.timeout(120)
def test_a_gateway_and_a_cli_process_at_once(tmp_path):
    """The gateway's two connections (reads on its loop, the ledger thread) beside another process
    making and revoking keys: nothing lost on either side."""
    from engine.auth.gate import Gate
    from engine.auth.principal import Principal

    gate = Gate.from_config({"auth": "keys"}, str(tmp_path))
    try:
        key = gate.store.create("alice")
        cli = multiprocessing.get_context("spawn").Process(target=_make_keys, args=(gate.store.path, 40))
        cli.start()
        for _ in range(300):
            gate.admit(gate.authenticate(f"Bearer {key}")).close(2, 3, 1)
            gate.admit(Principal("bob", "jwt")).close(1, 1, 0)
        cli.join(60)
        assert cli.exitcode == 0 and gate.flush()
        assert gate.store.usage("alice")["alice"]["completion_tokens"] == 900
        assert gate.store.usage(kind="jwt")["bob"]["requests"] == 300
        infos = {info.name: info.revoked for info in gate.store.list()}
        assert len(infos) == 41 and sum(revoked is not None for revoked in infos.values()) == 20
    finally:
        gate.close()
    assert _cli_usage(gate.store.path)["alice"]["requests"] == 300
