"""Segment registry: live and stale segments, and the removal of stale ones only."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import shm_helpers as h

from shm import descriptor as d
from shm.naming import SHM_DIR, segment_name, segment_path
from shm.registry import list_segments, remove_stale
from shm.ring import Consumer, Producer, read_header


def _raw_segment(name: str, with_magic: bool) -> str:
    """A bare file in /dev/shm that nobody locks: what a dead owner leaves behind, or (without
    a magic yet) a ring whose creator is still writing its header."""
    path = segment_path(name)
    with open(path, "wb") as f:
        f.write(d.MAGIC.to_bytes(8, "little") if with_magic else b"\0" * 8)
        f.write(b"\0" * (d.HEADER_SIZE + d.MIN_CAPACITY - 8))
    return path


@contextlib.contextmanager
def raw_segments(*names: str, with_magic: bool = True):
    try:
        yield [_raw_segment(name, with_magic) for name in names]
    finally:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment_path(name))


@pytest.mark.timeout(60)
def test_killed_owner_leaves_a_stale_segment_that_remove_stale_removes(instance: str, tmp_path) -> None:
    mine, theirs = segment_name(instance, "mine"), segment_name(instance, "theirs")
    ready = h.SPAWN.Event()
    with h.make_ring(mine, 4096), Producer.attach(mine), Consumer.attach(mine):
        with h.child(h.create_ring_and_die, theirs, str(tmp_path), ready) as owner:
            assert ready.wait(20), "the child never created its ring"
            assert {(s.name, s.live) for s in list_segments(instance)} == {(mine, True), (theirs, True)}
            assert remove_stale(instance, grace_s=0) == []  # a live owner's ring stays
            h.kill_and_reap(owner)

        # the kernel dropped the dead owner's lock: its ring is stale, ours is not
        assert {(s.name, s.live) for s in list_segments(instance)} == {(mine, True), (theirs, False)}
        assert remove_stale(instance, grace_s=0) == [theirs]
        assert not os.path.exists(segment_path(theirs))
        assert [s.name for s in list_segments(instance)] == [mine]
        assert remove_stale(instance, grace_s=0) == []
        assert read_header(mine).owner_pid == os.getpid()  # ours is untouched and still a ring


def test_segment_info_fields(instance: str) -> None:
    name = segment_name(instance, "stage.out-0")
    with h.make_ring(name, 8192):
        (info,) = list_segments(instance)
        assert (info.name, info.instance, info.ring, info.live) == (name, instance, "stage.out-0", True)
        assert info.size == d.segment_size(8192)
        assert 0 <= info.age_s < 60


def test_segment_without_magic_is_live_during_the_grace_period(instance: str) -> None:
    """An unlocked segment without a magic may be a ring being created right now (the creator
    takes its lock just after creating the file): it is left alone until ``grace_s`` passes."""
    name = segment_name(instance, "creating")
    with raw_segments(name, with_magic=False):
        assert [s.live for s in list_segments(instance, grace_s=60)] == [True]
        assert remove_stale(instance, grace_s=60) == []
        assert [s.live for s in list_segments(instance, grace_s=0)] == [False]
        assert remove_stale(instance, grace_s=0) == [name]


def test_unlocked_segment_with_magic_is_stale_at_once(instance: str) -> None:
    name = segment_name(instance, "orphan")
    with raw_segments(name):
        assert [s.live for s in list_segments(instance, grace_s=3600)] == [False]
        assert remove_stale(instance, grace_s=3600) == [name]


def test_remove_stale_keeps_to_its_instance(instance: str) -> None:
    other = instance + "x"
    ours, theirs = segment_name(instance, "r"), segment_name(other, "r")
    with raw_segments(ours, theirs):
        assert [s.name for s in list_segments(instance)] == [ours]
        assert remove_stale(instance) == [ours]
        assert os.path.exists(segment_path(theirs))
        assert remove_stale(other) == [theirs]


def test_names_outside_the_scheme_are_ignored(instance: str) -> None:
    odd = [f"neuralpipe-{instance}", f"neuralpipe-{instance}!-r", f"neuralpipe-{instance}--r"]
    with raw_segments(*odd):
        listed = {s.name for s in list_segments()}
        assert not listed & set(odd)
        remove_stale(instance, grace_s=0)
        assert all(os.path.exists(os.path.join(SHM_DIR, name)) for name in odd)


def test_a_ring_removed_while_listing_is_skipped(instance: str, monkeypatch) -> None:
    name = segment_name(instance, "vanishing")
    with raw_segments(name):
        real_stat = os.stat

        def stat_after_unlink(path, *args, **kwargs):
            if path == segment_path(name):
                os.unlink(path)
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", stat_after_unlink)
        assert list_segments(instance) == []


def test_age_follows_the_last_write(instance: str) -> None:
    name = segment_name(instance, "old")
    with raw_segments(name) as (path,):
        an_hour_ago = time.time() - 3600
        os.utime(path, (an_hour_ago, an_hour_ago))
        (info,) = list_segments(instance)
        assert 3590 < info.age_s < 3700
