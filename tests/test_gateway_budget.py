"""The gateway's shared bound on what requests hold (stages/gateway/budget.py), under any sequence
of growth and release: the total is what the holders hold, never past the limit once an add
returns, and a cut takes the largest holder first."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.gateway.budget import Budget

pytestmark = pytest.mark.timeout(60)


class Holder:
    def __init__(self, budget: Budget, name: int) -> None:
        self.budget, self.name, self.cut_by = budget, name, ""

    def overflow(self, bound: str) -> None:
        assert self not in self.budget.held  # released before it is told
        self.cut_by = bound


steps = st.lists(st.tuples(st.sampled_from(["add", "release"]), st.integers(0, 5), st.integers(0, 40)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 100), steps=steps)
def test_the_total_stays_within_the_limit_and_the_largest_is_cut_first(limit: int, steps) -> None:
    budget = Budget(limit, "max_total_backlog")
    holders = [Holder(budget, i) for i in range(6)]
    for action, which, amount in steps:
        holder = holders[which]
        if holder.cut_by:  # a cut holder takes no more (its request is ending)
            continue
        if action == "release":
            budget.release(holder)
        else:
            before = dict(budget.held)
            before[holder] = before.get(holder, 0) + amount
            budget.add(holder, amount)
            cut = [h for h in holders if h.cut_by and h in before]
            survivors = [before[h] for h in before if h not in cut]
            # whoever was cut held at least as much as everyone left
            assert all(before[h] >= max(survivors, default=0) for h in cut)
            for h in cut:
                assert h.cut_by == "max_total_backlog"
        assert budget.total == sum(budget.held.values()) <= limit
