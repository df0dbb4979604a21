"""engine/auth/limiter.py and gate.py: each limit, its Retry-After and OpenAI code, the budget read
back from the ledger after a restart, bounded memory, and a ledger that cannot be written."""

from __future__ import annotations

import sqlite3

import pytest

from engine.auth.errors import AuthError, LimitExceeded
from engine.auth.gate import Gate
from engine.auth.keystore import HOUR_S, KeyStore, keystore_path
from engine.auth.ledger import LedgerWriter
from engine.auth.limiter import SlidingWindow
from engine.auth.limits import Limits
from engine.auth.principal import ANONYMOUS, Principal

T0 = 1_800_000_000.0 + 1800  # mid-hour


class Clock:
    """Time that moves only when told: one minute of limits without waiting one."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock(T0)


@pytest.fixture
def gate(tmp_path, clock):
    g = Gate("keys", KeyStore(keystore_path(str(tmp_path))), clock=clock, wall_clock=clock)
    yield g
    g.close()


def _key(name: str, **limits) -> Principal:
    return Principal(name, "key", Limits(**limits))


def _refused(gate: Gate, principal: Principal) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        gate.admit(principal)
    return caught.value


def test_requests_per_minute(gate, clock):
    alice = _key("alice", rpm=3)
    for _ in range(3):
        gate.admit(alice).close()
        clock.now += 10  # requests at 0, 10, 20 s
    refused = _refused(gate, alice)  # at 30 s
    assert (refused.status, refused.reason, refused.code) == (429, "rpm", "rate_limit_exceeded")
    assert refused.retry_after_s == pytest.approx(30.0)  # the request at 0 s leaves the window at 60 s
    assert refused.retry_after_header == "30"
    assert refused.openai_error()["error"]["code"] == "rate_limit_exceeded"
    clock.now += 30
    gate.admit(alice).close()
    gate.admit(_key("bob", rpm=3)).close()  # each principal has its own window


def test_tokens_per_minute_count_delivered_tokens(gate, clock):
    alice = _key("alice", tpm=100)
    lease = gate.admit(alice)
    lease.tokens(60)
    clock.now += 20
    lease.tokens(40)
    lease.close(prompt_tokens=500, completion_tokens=100)  # prompt tokens are not delivered ones
    refused = _refused(gate, alice)
    assert (refused.reason, refused.code, refused.type) == ("tpm", "rate_limit_exceeded", "tokens")
    assert refused.retry_after_s == pytest.approx(40.0)  # the first 60 leave at 60 s, 40 < 100
    clock.now += 40
    gate.admit(alice).close()


def test_rate_headers_say_each_limit_what_is_left_and_when_it_is_all_back(gate, clock):
    """OpenAI's x-ratelimit-* headers, for the per-minute limits a key has."""
    alice = _key("alice", rpm=3, tpm=100)
    first = gate.admit(alice)  # at 0 s
    assert first.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "1m0s",  # this request leaves the window at 60 s
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "0s",
    }
    first.tokens(30)
    clock.now += 10.5
    second = gate.admit(alice)
    assert second.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-reset-requests"] == "1m0s"  # 59.5 s, rounded up
    assert (second.headers["x-ratelimit-remaining-tokens"], second.headers["x-ratelimit-reset-tokens"]) == ("70", "50s")
    gate.admit(alice).close()
    _refused(gate, alice)
    assert gate.rate_headers(alice)["x-ratelimit-remaining-requests"] == "0"  # what a 429 carries
    first.close()
    second.close()
    streams_only = gate.admit(_key("bob", max_streams=2))
    assert streams_only.headers == {} and gate.admit(ANONYMOUS).headers == {}  # no per-minute limit: no headers


def test_concurrent_streams(gate):
    alice = _key("alice", max_streams=2)
    first, second = gate.admit(alice), gate.admit(alice)
    refused = _refused(gate, alice)
    assert (refused.reason, refused.retry_after_header) == ("streams", "1")
    first.close()
    first.close()  # twice counts once
    third = gate.admit(alice)
    assert _refused(gate, alice).reason == "streams"
    second.close()
    third.close()


def test_a_request_of_several_choices_holds_a_stream_slot_per_choice(gate, clock):
    """n choices are n engine streams: they count n against max_streams and one request."""
    alice = _key("alice", max_streams=3, rpm=2)
    three = gate.admit(alice, streams=3)
    assert _refused(gate, alice).reason == "streams"
    three.close()
    with pytest.raises(LimitExceeded, match="3 concurrent streams") as never:
        gate.admit(alice, streams=4)  # more than the key may ever hold at once
    assert "4 streams (its choices) can never fit" in str(never.value)
    gate.admit(alice, streams=2).close()
    assert _refused(gate, alice).reason == "rpm"  # two requests, whatever their choices


def test_budget_from_the_ledger_survives_a_restart(tmp_path, clock):
    path = keystore_path(str(tmp_path))
    alice = _key("alice", budget_tokens=1000, budget_period_s=2 * HOUR_S)
    gate = Gate("keys", KeyStore(path), clock=clock, wall_clock=clock)
    lease = gate.admit(alice)
    lease.tokens(700)
    lease.close(prompt_tokens=400, completion_tokens=700)  # 1100 >= 1000
    refused = _refused(gate, alice)
    assert (refused.reason, refused.code, refused.type) == ("budget", "insufficient_quota", "insufficient_quota")
    gate.close()

    restarted = Gate("keys", KeyStore(path), clock=Clock(0.0), wall_clock=clock)  # a new process's clocks
    refused = _refused(restarted, alice)
    assert refused.reason == "budget"
    # used in the hour starting at T0 - 1800: it leaves the 2 h window at that hour's end + 2 h
    assert refused.retry_after_s == pytest.approx(1800 + 2 * HOUR_S)
    clock.now += refused.retry_after_s
    restarted.admit(alice).close()
    restarted.close()


def test_budget_counts_tokens_of_open_streams(gate, clock):
    alice = _key("alice", budget_tokens=100)
    lease = gate.admit(alice)
    lease.tokens(100)
    assert _refused(gate, alice).reason == "budget"
    lease.close(0, 100)
    assert gate.flush() and gate.store.budget_used("alice", 0) == 100


def test_revoked_key_is_refused_at_the_next_request(gate):
    key = gate.store.create("alice")
    assert gate.authenticate(f"Bearer {key}").name == "alice"
    gate.store.revoke("alice")
    with pytest.raises(AuthError, match="invalid API key"):
        gate.authenticate(f"Bearer {key}")
    with pytest.raises(AuthError, match="header too long"):
        gate.authenticate("Bearer " + "x" * 100_000)


def test_usage_of_every_stream_end_is_in_the_ledger(gate):
    key = gate.store.create("alice")
    alice = gate.authenticate(f"Bearer {key}")
    full = gate.admit(alice)
    full.tokens(5)
    full.close(prompt_tokens=10, completion_tokens=5, cached_tokens=5)
    partial = gate.admit(alice)
    partial.tokens(3)
    partial.close()  # a client that went away: what was delivered counts
    hostile = gate.admit(alice)
    hostile.close(prompt_tokens=-5, completion_tokens=float("nan"), cached_tokens=10**30)
    assert gate.flush()
    assert gate.store.usage("alice")["alice"] | {"last_used": None} == {
        "requests": 3,
        "prompt_tokens": 10,
        "completion_tokens": 8,
        "cached_tokens": 5,
        "last_used": None,
    }


def test_anonymous_and_unlimited_callers_keep_no_state(gate):
    for i in range(100):
        gate.admit(_key(f"k{i}")).close(1, 1)
        gate.admit(ANONYMOUS).close(1, 1)
    assert len(gate._limiter) == 0 and gate.flush()
    assert "anonymous" not in gate.store.usage(kind="anonymous")


def test_memory_is_bounded_whatever_the_number_of_callers(tmp_path, clock):
    gate = Gate("keys", KeyStore(keystore_path(str(tmp_path))), clock=clock, wall_clock=clock, max_principals=100)
    try:
        busy = _key("busy", max_streams=1)
        held = gate.admit(busy)
        for i in range(5000):
            gate.admit(_key(f"caller{i}", rpm=10))
        assert len(gate._limiter) <= 101
        assert _refused(gate, busy).reason == "streams"  # an open stream's state was kept
        held.close()
        gate.admit(busy).close()
    finally:
        gate.close()


def test_a_stream_end_never_waits_for_the_database(tmp_path):
    """The ledger is written by a thread: a database locked by another process (a long CLI or
    sqlite3 shell transaction) neither blocks lease.close on the event loop nor loses the use."""
    errors: list[str] = []
    path = keystore_path(str(tmp_path))
    store = KeyStore(path)
    ledger = LedgerWriter(path, errors.append, busy_timeout_s=0.05, retry_s=0.05)
    gate = Gate("keys", store, on_error=errors.append, ledger=ledger)
    try:
        key = store.create("alice")
        alice = gate.authenticate(f"Bearer {key}")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        gate.admit(alice).close(1, 2, 0)
        gate.admit(alice).close(1, 2, 0)
        assert not gate.flush(0.5)  # still pending: the lock is held
        assert errors and "kept, retried" in errors[0] and key not in " ".join(errors)
        other.execute("ROLLBACK")
        other.close()
        assert gate.flush()
        usage = store.usage("alice")["alice"]
        assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (2, 2, 4)
    finally:
        gate.close()


def test_close_writes_what_is_pending(tmp_path):
    path = keystore_path(str(tmp_path))
    gate = Gate("keys", KeyStore(path))
    for _ in range(50):
        gate.admit(_key("alice", rpm=1000)).close(1, 1, 0)
    gate.close()
    with KeyStore(path) as store:
        assert store.budget_used("alice", 0) == 100


def test_sliding_window_retry_after():
    window = SlidingWindow()
    window.add(100.5, 5)
    window.add(130.2, 5)
    assert window.total(130.9) == 10
    assert window.seconds_until_below(130.9, 10) == pytest.approx(160 - 130.9)
    assert window.seconds_until_below(130.9, 6) == pytest.approx(160 - 130.9)
    assert window.seconds_until_below(130.9, 11) == 0.0
    assert window.total(160.0) == 5 and window.total(190.0) == 0
    window.add(10_000.0, 1)  # long idle: the window starts over
    assert window.total(10_000.0) == 1


def test_limits_are_refused_in_admission_order(gate, clock):
    alice = _key("alice", rpm=1, max_streams=1)
    lease = gate.admit(alice)
    assert _refused(gate, alice).reason == "rpm"  # a refusal counts nothing
    lease.close()
    clock.now += 60
    gate.admit(alice).close()


def test_from_config(tmp_path):
    assert Gate.from_config({"auth": "off"}, None).authenticate("Bearer anything") is ANONYMOUS
    with pytest.raises(ValueError, match="auth must be one of off, keys, jwt"):
        Gate.from_config({"auth": "maybe"}, str(tmp_path))
    with pytest.raises(ValueError, match="needs the state directory"):
        Gate.from_config({"auth": "keys"}, None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "gateway.sqlite3").write_bytes(b"garbage" * 1000)
    with pytest.raises(ValueError, match="not a usable key database"):
        Gate.from_config({"auth": "keys"}, str(tmp_path / "bad"))


def test_a_lease_dropped_without_close_gives_its_slot_back(gate):
    alice = _key("alice", max_streams=1)
    lease = gate.admit(alice)
    lease.tokens(4)
    del lease  # never closed
    gate.admit(alice).close()
    assert gate.flush()
    assert gate.store.usage(kind="key") == {} and gate.store.budget_used("alice", 0) == 4
