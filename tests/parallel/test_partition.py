"""The block partitioner: balanced splits, block moves between neighbours, the rebalancer."""

from __future__ import annotations

import itertools

import pytest

from streamdiff.parallel.partition import (
    Rebalancer,
    StageSample,
    balance,
    even_split,
    initial_counts,
    moves,
    ranges,
    stage_times,
)


def brute_force(num_blocks, fixed, per_block):
    best = None
    for cut in itertools.combinations(range(1, num_blocks), len(fixed) - 1):
        bounds = (0,) + cut + (num_blocks,)
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        t = max(stage_times(counts, fixed, per_block))
        best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("fixed,per_block,blocks", [
    ([5.0, 0.0, 7.0], [1.0, 1.0, 1.0], 12),
    ([0.0, 0.0], [1.0, 3.0], 9),
    ([20.0, 1.0, 1.0, 15.0], [2.0, 2.0, 5.0, 2.0], 30),
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 3),
])
def test_balance_is_optimal(fixed, per_block, blocks):
    counts = balance(blocks, fixed, per_block)
    assert sum(counts) == blocks and min(counts) >= 1
    assert max(stage_times(counts, fixed, per_block)) == pytest.approx(brute_force(blocks, fixed, per_block))


def test_even_split_and_ranges():
    assert even_split(30, 4) == [8, 8, 7, 7]
    assert ranges([8, 8, 7, 7]) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    with pytest.raises(ValueError):
        even_split(2, 3)


@pytest.mark.parametrize("current,target", [([2, 2], [1, 3]), ([1, 2, 1], [2, 1, 1]), ([1, 1, 6], [4, 3, 1]),
                                            ([6, 1, 1], [1, 1, 6])])
def test_moves_reach_target_keeping_every_stage(current, target):
    counts = list(current)
    bounds = ranges(counts)
    for layer, src, dst in moves(current, target):
        assert abs(src - dst) == 1
        start, end = bounds[src]
        assert layer in (start, end - 1)  # from the edge that touches the neighbour
        assert layer == (end - 1 if dst > src else start)
        counts[src] -= 1
        counts[dst] += 1
        assert min(counts) >= 1
        bounds = ranges(counts)
    assert counts == target


def test_rebalancer_needs_a_persistent_imbalance():
    reb = Rebalancer([2, 2], threshold=1.25, after_steps=3, smoothing=1.0)
    slow = [StageSample(10.0, 10.0, 2), StageSample(40.0, 40.0, 2)]  # stage 1's blocks 4x slower
    even = [StageSample(10.0, 10.0, 2), StageSample(10.5, 10.5, 2)]
    reb.observe(slow)
    reb.observe(slow)
    assert reb.proposal() is None  # not for long enough
    reb.observe(even)  # the streak breaks
    assert reb.imbalanced_steps == 0 and reb.proposal() is None
    for _ in range(3):
        reb.observe(slow)
    assert reb.proposal() == [3, 1]
    reb.reset([3, 1])
    assert reb.proposal() is None
    for _ in range(3):
        reb.observe(slow)  # a streak on [3, 1] (15 vs 20 ms)
    reb.reset([3, 1])  # as after a move: the streak starts again
    reb.observe([StageSample(30.0, 30.0, 3), StageSample(10.0, 10.0, 1)])  # one forward that favours [2, 2]
    assert reb.proposal() is None  # no blocks move on one forward's word


def test_rebalancer_moves_no_blocks_for_a_small_gain():
    """A new split is proposed only when it shortens the slowest stage by at least
    (threshold - 1) / 2 (12.5 % at 1.25): each move ships weights and K/V mid-stream."""
    reb = Rebalancer([4, 2], threshold=1.25, after_steps=5)
    for _ in range(10):  # stage 0: 4 blocks of 1 ms; stage 1: 0.9 ms fixed + 2 blocks of 1 ms
        reb.observe([StageSample(4.0, 4.0, 4), StageSample(2.9, 2.0, 2)])
    assert reb.imbalanced_steps >= 5  # 4 / 2.9 = 1.38: imbalanced
    assert reb.proposal() is None  # [3, 3] takes 3.9 ms instead of 4: a 2.5 % gain
    assert reb.imbalanced_steps == 0  # the refused split waits for a new streak, not the next forward


def test_rebalancer_moves_blocks_for_a_gain_of_half_the_threshold_over_one():
    """At threshold 1.25 a split that shortens the slowest stage by 20 % (above 12.5 %) is
    proposed."""
    reb = Rebalancer([5, 1], threshold=1.25, after_steps=3, smoothing=1.0)
    for _ in range(3):  # stage 0: 5 blocks of 1 ms; stage 1: 2 ms fixed + 1 block of 1 ms
        reb.observe([StageSample(5.0, 5.0, 5), StageSample(3.0, 1.0, 1)])
    assert reb.proposal() == [4, 2]  # 4 ms instead of 5


def test_balance_of_equal_stages_is_the_even_split():
    """Ties go to the earlier stage, as the even split's remainder does: stages of equal cost
    started evenly are already balanced (no blocks move)."""
    for blocks, stages in [(3, 2), (7, 3), (30, 4)]:
        assert balance(blocks, [0.0] * stages, [1.0] * stages) == even_split(blocks, stages)
    with pytest.raises(ValueError):
        balance(4, [0.0, 0.0], [1.0])


def test_initial_counts_follow_a_partition_that_names_every_stage():
    """parallel.partition is the split a pipeline starts from; one for another number of stages
    falls back to the even split."""
    assert initial_counts([3, 1], 4, 2) == [3, 1]
    assert initial_counts([3, 1], 4, 3) == [2, 1, 1]
    assert initial_counts([2, 1, 1], 4, 2) == [2, 2]
