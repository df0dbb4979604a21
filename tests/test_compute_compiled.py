"""The compute stage's C kernel (stages/compute/compiled.c) called directly: that it is built, and
that arguments it cannot use are refused with an error naming them, never read or written past.
Its values against numpy's: tests/test_compute_stage.py."""

from __future__ import annotations

import numpy as np
import pytest

from stages.compute import stage as stage_module

WIDTH, SLOTS, ROWS, CELLS = 20, 2, 3, 16


def test_the_kernel_is_built():
    # setup.py builds it wherever pip install -e . finds a C compiler (tools/test.sh's machines do)
    assert stage_module._compiled is not None, "stages/compute/compiled.c is not built: pip install -e . with gcc"


def arguments(**change) -> dict:
    """A valid call for 3 token rows of 2 streams (window 4, ngram 2), with ``change`` applied."""
    args = {
        "kind": np.full(ROWS, 2, np.uint8),
        "slot": np.array([0, 1, 0], np.intp),
        "token_id": np.array([3, 3, 3], np.uint32),
        "logprob": np.array([-0.5, np.nan, -0.1], np.float32),
        "running": np.zeros((SLOTS, 3)),
        "origin": np.full(SLOTS, -5, np.int64),
        "keys": np.zeros((SLOTS, WIDTH), np.uint64),
        "flags": np.zeros((SLOTS, WIDTH), np.uint8),
        "fired": np.zeros(SLOTS, bool),
        "xy": np.zeros((CELLS, 2), np.float32),
        "base": np.ones((CELLS, 4), np.float32),
        "hilbert": np.zeros((ROWS, 2), np.float32),
        "conf": np.zeros(ROWS, np.float32),
        "rgba": np.zeros((ROWS, 4), np.uint8),
        "entropy": np.zeros(ROWS, np.float32),
        "ppl": np.zeros(ROWS, np.float32),
        "rep": np.zeros(ROWS, np.float32),
        "repflag": np.zeros(ROWS, np.uint8),
        "rows": ROWS,
        "width": WIDTH,
        "mask": CELLS - 1,
        "ngram": 2,
        "window": 4,
        "threshold": 0.5,
    }
    args.update(change)
    return args


def call(args: dict) -> list[int]:
    return stage_module._compiled.record(*args.values())


@pytest.fixture(autouse=True)
def _built():
    if stage_module._compiled is None:
        pytest.skip("the C kernel is not built (test_the_kernel_is_built says so)")


def test_a_valid_call_moves_the_state_on():
    args = arguments()
    assert call(args) == []
    assert args["running"][:, 2].tolist() == [2, 1]  # tokens seen per stream
    assert args["running"][:, 1].tolist() == [2, 0]  # with a logprob: stream 1's one had none
    assert args["ppl"][1] == 0 and args["conf"][1] == 1  # no logprob: no perplexity yet, confidence 1
    assert args["ppl"][2] == pytest.approx(np.exp(0.3), rel=1e-6)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"kind": np.zeros(2, np.uint8)}, "kind"),
        ({"keys": np.zeros((SLOTS, WIDTH - 1), np.uint64)}, "keys"),
        ({"flags": np.zeros(SLOTS * WIDTH - 1, np.uint8)}, "flags"),
        ({"repflag": np.zeros(ROWS - 1, np.uint8)}, "repflag"),
        ({"slot": np.array([0, 2, 0], np.intp)}, "slot 2"),
        ({"slot": np.array([0, -1, 0], np.intp)}, "slot -1"),
        ({"mask": CELLS}, "mask"),
        ({"width": 5}, "width"),
        ({"window": 0}, "window"),
        ({"origin": np.array([-5, 3], np.int64)}, "origin"),  # a state whose row has no window before the token
    ],
)
def test_what_does_not_fit_is_refused_by_name(change, named):
    with pytest.raises(ValueError, match=named):
        call(arguments(**change))


def test_read_only_state_and_wrong_types_are_refused():
    frozen = np.zeros((SLOTS, 3))
    frozen.flags.writeable = False
    with pytest.raises(TypeError):
        call(arguments(running=frozen))
    with pytest.raises(TypeError):
        call(arguments(kind=[2, 2, 2]))
    with pytest.raises(TypeError, match="argument 13"):  # a strided view: not one contiguous buffer
        call(arguments(conf=np.zeros(2 * ROWS, np.float32)[::2]))
