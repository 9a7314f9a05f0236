"""palign.train.steps: the epoch order is a bijection computed position by position; the step
plan covers every unit each epoch, the same on every call, different between epochs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from palign.train.steps import RowPlan, StepPlan, deal, permute


@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
@settings(max_examples=60, deadline=None)
def test_permute_is_a_bijection(n, seed, epoch):
    order = permute(np.arange(n), n, seed, epoch)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(permute(np.arange(n)[::-1], n, seed, epoch), order[::-1])


def test_permute_shuffles_and_depends_on_seed_and_epoch():
    n = 10_000
    a = permute(np.arange(n), n, 0, 0)
    assert not np.array_equal(a, permute(np.arange(n), n, 0, 1))
    assert not np.array_equal(a, permute(np.arange(n), n, 1, 0))
    # Not the identity nor close to it: neighbours land far apart, no fixed order left.
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05
    assert np.mean(np.abs(np.diff(a))) > n / 5


@given(n=st.integers(1, 200), world=st.integers(1, 4), micro=st.integers(1, 3),
       accum=st.integers(1, 3), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_each_epoch_covers_every_unit_and_ranks_split_the_step(n, world, micro, accum, seed):
    plan = StepPlan(n, world, micro, accum, epochs=2, max_steps=None, seed=seed)
    for epoch in range(2):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        seen = []
        for step in steps:
            by_rank = [u for r in range(world) for mb in plan.micro_batches(step, r) for u in mb]
            assert all(len(mb) == micro for r in range(world)
                       for mb in plan.micro_batches(step, r))
            seen += by_rank
        assert set(seen) == set(range(n))
        assert len(seen) == plan.steps_per_epoch * plan.per_step
        assert len(seen) - n < plan.per_step  # only the last step is filled by repeats


@given(n=st.integers(1, 300), rows=st.integers(1, 40), epochs=st.integers(1, 3),
       seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_a_step_of_rows_takes_that_many_each_row_once_per_epoch(n, rows, epochs, seed):
    plan = RowPlan(n, rows, epochs, max_steps=None, seed=seed)
    assert plan.total_steps == epochs * -(-n // rows)
    for epoch in range(epochs):
        steps = [plan.rows(s) for s in range(epoch * plan.steps_per_epoch,
                                             (epoch + 1) * plan.steps_per_epoch)]
        assert all(len(s) == rows for s in steps[:-1])
        assert 1 <= len(steps[-1]) <= rows  # the epoch's last step: the rest, no repeats
        seen = [r for s in steps for r in s]
        assert sorted(seen) == list(range(n))


@given(bins=st.integers(0, 50), world=st.integers(1, 4), micro=st.integers(1, 3))
@settings(max_examples=100, deadline=None)
def test_deal_gives_every_bin_once_and_every_rank_as_many_micro_batches(bins, world, micro):
    dealt = deal(bins, world, micro)
    assert len(dealt) == world
    rounds = {len(per_rank) for per_rank in dealt}
    assert rounds == {max(1, -(-bins // (world * micro)))}
    assert all(len(mb) == micro for per_rank in dealt for mb in per_rank)
    got = [b for per_rank in dealt for mb in per_rank for b in mb if b is not None]
    assert sorted(got) == list(range(bins))
