"""Segment naming, the owner lock, and the resource tracker that must not unlink shared rings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import shm_helpers as h
from hypothesis import given
from hypothesis import strategies as st

from shm.naming import (
    NameError_,
    check_instance,
    new_instance_id,
    parse_segment_name,
    segment_name,
    segment_path,
)
from shm.ring import Consumer, Producer, read_header
from shm.segment import close_segment, create_segment, map_readonly, owner_alive, remove_segment

# ---------------------------------------------------------------------------------------------
# naming

INSTANCES = st.from_regex(r"[A-Za-z0-9_]{1,32}", fullmatch=True)
RINGS = st.from_regex(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}", fullmatch=True)


@given(instance=INSTANCES, ring=RINGS)
def test_segment_name_round_trip(instance: str, ring: str) -> None:
    name = segment_name(instance, ring)
    assert name.startswith("neuralpipe-")
    assert parse_segment_name(name) == (instance, ring)
    assert segment_path(name) == "/dev/shm/" + name


@pytest.mark.parametrize(
    ("instance", "ring"),
    [
        ("", "r"),
        ("has-dash", "r"),
        ("x" * 33, "r"),
        ("sp ace", "r"),
        ("i", ""),
        ("i", "-leading-dash"),
        ("i", "a/b"),
        ("i", "x" * 101),
        ("i", "ümlaut"),
    ],
)
def test_segment_name_rejects_bad_parts(instance: str, ring: str) -> None:
    with pytest.raises(NameError_, match="instance id" if ring == "r" else "ring name"):
        segment_name(instance, ring)
    assert issubclass(NameError_, ValueError)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "neuralpipe",
        "neuralpipe-inst",
        "neuralpipe--ring",
        "neuralpipe-inst-",
        "neuralpipe-inst--ring",
        "neuralpipe-in$t-ring",
        "other-inst-ring",
        "Neuralpipe-inst-ring",
        "neuralpipe-inst-a/b",
        "neuralpipe-" + "x" * 33 + "-ring",
    ],
)
def test_parse_segment_name_rejects_foreign_names(name: str) -> None:
    assert parse_segment_name(name) is None


def test_ring_names_may_contain_dashes_and_dots() -> None:
    assert parse_segment_name("neuralpipe-abc_1-compute.out-3") == ("abc_1", "compute.out-3")


def test_new_instance_ids_are_valid_and_fresh() -> None:
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(check_instance(i) == i and len(i) == 8 for i in ids)


# ---------------------------------------------------------------------------------------------
# segments and the owner lock


def test_owner_lock_follows_the_owner_descriptor(instance: str) -> None:
    name = segment_name(instance, "seg")
    seg = create_segment(name, 4096)
    try:
        assert owner_alive(name)  # held even against another descriptor of this same process
        close_segment(seg)
        assert not owner_alive(name)  # closing the owner's descriptor drops the lock
        assert os.path.exists(segment_path(name))  # ... but does not unlink
    finally:
        close_segment(seg)
        assert remove_segment(name) is True
    assert remove_segment(name) is False


def test_close_segment_with_a_view_still_held(instance: str) -> None:
    """An owner that closes while a record view is still held drops its lock at once; the
    mapping itself lives on with the view."""
    name = segment_name(instance, "seg")
    seg = create_segment(name, 4096)
    try:
        view = seg.buf[100:108]
        view[:] = b"retained"
        close_segment(seg)
        assert not owner_alive(name)
        assert bytes(view) == b"retained"
        view.release()
    finally:
        remove_segment(name)


def test_map_readonly_cannot_write(instance: str) -> None:
    name = segment_name(instance, "seg")
    seg = create_segment(name, 4096)
    try:
        seg.buf[:5] = b"hello"
        mapping = map_readonly(name)
        try:
            assert mapping[:5] == b"hello"
            with pytest.raises(TypeError):
                mapping[:5] = b"HELLO"
        finally:
            mapping.close()
    finally:
        close_segment(seg)
        remove_segment(name)


# ---------------------------------------------------------------------------------------------
# the resource tracker (Python 3.11 registers every SharedMemory, attached or created, and
# unlinks whatever is still registered when its process tree ends)


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a new interpreter: a process tree of its own, with its own tracker."""
    preamble = f"import sys\nsys.path.insert(0, {h.TESTS_DIR!r})\n"
    return subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _assert_clean_run(run: subprocess.CompletedProcess, expect: str) -> None:
    assert run.returncode == 0, run.stderr
    assert expect in run.stdout
    assert "leaked shared_memory" not in run.stderr
    assert "resource_tracker" not in run.stderr, run.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_spawned_child_attaching_leaves_the_segment(instance: str, role: str) -> None:
    name = segment_name(instance, "ring")
    with h.make_ring(name, 4096) as ring:
        if role == "consumer":  # the child consumer reads seq 0, written here
            with Producer.attach(name) as first:
                h.write_sequence(first, 0, 1)
        with h.child(h.attach_and_exit, name, role) as attacher:
            h.join_ok(attacher)
        assert os.path.exists(segment_path(name))
        assert read_header(name).capacity == 4096
        assert ring.header().write_cursor > 0  # seq 0 went through, whoever wrote it
        with Producer.attach(name) as producer, Consumer.attach(name) as consumer:
            if role == "producer":
                h.read_sequence(consumer, 0, 1, timeout=5)
            h.write_sequence(producer, 1, 100)
            h.read_sequence(consumer, 1, 100, timeout=5)


@pytest.mark.timeout(60)
def test_spawned_children_leave_nothing_for_the_tracker_to_unlink() -> None:
    """A whole engine-like tree in a fresh interpreter: an owner creates a ring, spawned children
    attach as producer and consumer and exit, then the tree's tracker shuts down (which unlinks
    whatever is still registered). The ring must still be there and work."""
    script = """
        import shm_helpers as h
        from shm.naming import new_instance_id, segment_name
        from shm.ring import Consumer, Producer, Ring, read_header

        name = segment_name("t" + new_instance_id(), "ring")
        ring = Ring.create(name, 4096)
        try:
            for role in ("producer", "consumer"):
                child = h.SPAWN.Process(target=h.attach_and_exit, args=(name, role))
                child.start()
                child.join(30)
                assert child.exitcode == 0, child.exitcode
            h.stop_resource_tracker()
            header = read_header(name)  # FileNotFoundError if the tracker unlinked it
            assert header.read_cursor == header.write_cursor > 0
            with Producer.attach(name) as producer, Consumer.attach(name) as consumer:
                h.write_sequence(producer, 1, 50)
                h.read_sequence(consumer, 1, 50, timeout=5)
            print("segment survived")
        finally:
            ring.destroy()
    """
    _assert_clean_run(_python(script), "segment survived")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_other_process_tree_attaching_leaves_the_segment(instance: str, role: str) -> None:
    name = segment_name(instance, "ring")
    script = """
        import shm_helpers as h
        h.attach_and_exit(sys.argv[1], sys.argv[2])
        h.stop_resource_tracker()
        print("attached and exited")
    """
    with h.make_ring(name, 4096) as ring:
        if role == "consumer":
            with Producer.attach(name) as producer:
                h.write_sequence(producer, 0, 1)
        _assert_clean_run(_python(script, name, role), "attached and exited")
        assert os.path.exists(segment_path(name))
        header = read_header(name)
        assert header.producer_pid == header.consumer_pid == 0  # it detached cleanly
        with Consumer.attach(name) as consumer:
            if role == "producer":
                h.read_sequence(consumer, 0, 1, timeout=5)
            with Producer.attach(name) as producer:
                h.write_sequence(producer, 1, 10)
            h.read_sequence(consumer, 1, 10, timeout=5)
        assert ring.header().records_written == 10


@pytest.mark.timeout(60)
def test_control_a_plain_shared_memory_attach_would_unlink(instance: str) -> None:
    """Why shm.segment unregisters: the same check catches a plain ``SharedMemory`` attach,
    whose process tree's tracker unlinks the segment under everyone else's feet."""
    name = segment_name(instance, "scratch")
    seg = create_segment(name, 4096)
    try:
        script = """
            from multiprocessing import shared_memory
            import shm_helpers as h
            shared_memory.SharedMemory(name=sys.argv[1]).close()
            h.stop_resource_tracker()
        """
        run = _python(script, name)
        assert run.returncode == 0, run.stderr
        assert "leaked shared_memory" in run.stderr
        assert not os.path.exists(segment_path(name))
    finally:
        close_segment(seg)
        remove_segment(name)
