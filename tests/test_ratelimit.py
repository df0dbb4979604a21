"""Token buckets with injected time."""

from __future__ import annotations

import math

import pytest

from stages.ingest.ratelimit import KeyedBuckets, TokenBucket


def test_bucket_starts_full_and_allows_the_burst():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.try_take(now=0.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_at_rate_up_to_burst():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert bucket.try_take(3, now=0.0)
    assert not bucket.try_take(now=0.05)  # half a unit so far
    assert bucket.try_take(now=0.1)
    assert bucket.try_take(3, now=100.0)  # refilled to burst, not beyond
    assert not bucket.try_take(now=100.0)


def test_failed_take_takes_nothing():
    bucket = TokenBucket(rate=1, burst=2, now=0.0)
    assert not bucket.try_take(3, now=0.0)
    assert bucket.try_take(2, now=0.0)


def test_wait_time_is_exact_and_then_the_take_succeeds():
    bucket = TokenBucket(rate=4, burst=2, now=0.0)
    assert bucket.wait_time(now=0.0) == 0.0
    assert bucket.try_take(2, now=0.0)
    assert bucket.wait_time(now=0.0) == pytest.approx(0.25)
    assert bucket.wait_time(2, now=0.125) == pytest.approx(0.375)
    assert bucket.try_take(2, now=0.5)


def test_wait_time_for_more_than_the_burst_is_infinite():
    assert math.isinf(TokenBucket(rate=100, burst=5, now=0.0).wait_time(6, now=0.0))


def test_clock_going_backwards_adds_nothing():
    bucket = TokenBucket(rate=10, burst=1, now=5.0)
    assert bucket.try_take(now=5.0)
    assert not bucket.try_take(now=4.0)
    assert bucket.try_take(now=5.2)


def test_fractional_units_for_token_costs():
    bucket = TokenBucket(rate=1, burst=1, now=0.0)
    assert bucket.try_take(0.75, now=0.0)
    assert not bucket.try_take(0.5, now=0.0)
    assert bucket.try_take(0.5, now=0.25)


def test_real_clock_is_used_without_now():
    bucket = TokenBucket(rate=1e-3, burst=1)
    assert bucket.try_take()
    assert not bucket.try_take()
    assert bucket.wait_time() > 900


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="rate and burst"):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError, match="rate and burst"):
        KeyedBuckets(rate=1, burst=-1)
    with pytest.raises(ValueError, match="max_keys"):
        KeyedBuckets(rate=1, burst=1, max_keys=0)


def test_keyed_buckets_are_independent_per_key():
    buckets = KeyedBuckets(rate=1, burst=2)
    assert buckets.try_take("alice", 2, now=0.0)
    assert not buckets.try_take("alice", now=0.0)
    assert buckets.try_take("bob", 2, now=0.0)
    assert buckets.wait_time("alice", now=0.5) == pytest.approx(0.5)
    assert buckets.wait_time("carol", now=0.5) == 0.0


def test_keyed_buckets_evict_the_least_recently_used_key():
    buckets = KeyedBuckets(rate=1, burst=1, max_keys=2)
    assert buckets.try_take("a", now=0.0)
    assert buckets.try_take("b", now=0.0)
    assert not buckets.try_take("a", now=0.0)  # uses "a": "b" is now the least recent
    assert buckets.try_take("c", now=0.0)
    assert len(buckets) == 2
    assert "b" not in buckets and "a" in buckets and "c" in buckets
    assert not buckets.try_take("a", now=0.0)  # kept, still empty
