"""Slot bookkeeping of the `rolling` policy (sinks written once, ring overwritten oldest first,
re-base) and pool accounting. The `sdv2` policy: test_sdv2_policy.py."""

from __future__ import annotations

import pytest

from streamdiff.cache.slots import LaneAllocator, PoolFullError, RollingLane, SlotTable


def test_sinks_fill_first_then_ring_overwrites_oldest():
    lane = RollingLane(1, [6, 7, 8, 9, 10, 11], sinks=3, rope_len=1024, refresh=True)
    first = lane.plan(2)
    assert first.write_slots == [6, 7] and first.write_pos == [0, 1]
    assert sorted(first.attend_slots) == [6, 7]
    written = [lane.plan(1).write_slots[0] for _ in range(7)]
    # frame 2 -> last sink, frames 3..5 -> ring, then the ring wraps over frames 3, 4, 5, 6
    assert written == [8, 9, 10, 11, 9, 10, 11]
    assert lane.positions == [0, 1, 2, 6, 7, 8]
    assert lane.sink_slots() == [6, 7, 8]


def test_only_ring_writes_may_refresh_sinks():
    lane = RollingLane(1, [6, 7, 8, 9, 10, 11], sinks=3, rope_len=1024, refresh=True)
    assert not lane.plan(2).refresh  # filling sinks
    assert not lane.plan(1).refresh  # the last sink
    plan = lane.plan(1)  # first ring write
    assert plan.refresh and plan.sink_slots == [6, 7, 8]


def test_attend_set_is_sinks_plus_last_ring_frames():
    lane = RollingLane(0, list(range(5)), sinks=2, rope_len=1024)
    lane.plan(2)
    for _ in range(9):
        plan = lane.plan(1)
    stored = dict(zip(lane.slots, lane.positions))
    assert sorted(stored[s] for s in plan.attend_slots) == [0, 1, 8, 9, 10]


def test_chunk_larger_than_ring_is_refused():
    lane = RollingLane(0, list(range(4)), sinks=3, rope_len=1024)
    lane.plan(3)
    with pytest.raises(ValueError, match="ring"):
        lane.plan(2)


def test_rebase_shifts_every_position_by_the_same_delta():
    lane = RollingLane(0, list(range(6)), sinks=3, rope_len=10)
    lane.plan(2)
    for _ in range(7):  # frames 2..8
        lane.plan(1)
    before = list(lane.positions)
    plan = lane.plan(1)  # frame 9 fits (9 + 1 <= 10)
    assert plan.rebase_delta == 0
    plan = lane.plan(1)  # frame 10 would leave the table
    assert plan.rebase_delta == 10 - 6
    assert plan.write_pos == [6]  # the next frame lands at index `window`
    assert sorted(plan.rebase_slots) == list(range(6))
    # relative distances between everything stored are unchanged
    assert lane.positions[:3] == [p - 4 for p in before[:3]]


def test_pool_release_returns_to_full_after_many_cycles():
    table = SlotTable(num_slots=48, window=6, sinks=3, rope_len=1024)
    lanes_seen = set()
    for i in range(100):
        table.add_stream(i, lanes=4)
        table.add_stream(f"x{i}", lanes=2)
        for lane in table.streams[i].lanes + table.streams[f"x{i}"].lanes:
            # a lane is `window` contiguous slots starting at lane * window
            assert lane.slots == list(range(lane.lane * 6, lane.lane * 6 + 6))
            lanes_seen.add(lane.lane)
        table.remove_stream(i)
        table.remove_stream(f"x{i}")
    assert table.free_slots == 48 and not table.streams and lanes_seen <= set(range(8))
    for i in range(2):
        table.add_stream(i, lanes=4)
    with pytest.raises(PoolFullError, match="need 24 slots, 0 of 48 free"):
        table.add_stream("late", lanes=4)


def test_a_lane_is_never_handed_to_two_streams():
    """Two streams on one KV lane overwrite each other's cache. A lane released twice raises
    (it would sit twice on the free list), and taking the same lane twice is refused before the
    free list changes (no lane leaks)."""
    alloc = LaneAllocator(4 * 6, 6)  # 4 lanes of 6 slots
    lanes = alloc.alloc(2)
    alloc.release(lanes)
    with pytest.raises(RuntimeError, match="lane released twice"):
        alloc.release(lanes)
    assert sorted(alloc.alloc(4)) == [0, 1, 2, 3]
    alloc.release([0, 1, 2, 3])
    with pytest.raises(PoolFullError):
        alloc.take([1, 1])
    assert alloc.free == 4 * 6


def test_a_stream_gets_exactly_the_lanes_the_scheduler_chose():
    """The engine's scheduler picks a stream's KV lanes (`kv_lanes`), and the engine zeroes those
    lanes when the stream leaves: the slot table must hand out exactly them, not the lowest free
    ones, or a leaving stream would zero another stream's cache and keep its own."""
    table = SlotTable(num_slots=24, window=6, sinks=3, rope_len=1024)
    chosen = table.add_stream("a", 2, lane_ids=[3, 1])
    assert [lane.lane for lane in chosen.lanes] == [3, 1]
    assert chosen.all_slots() == list(range(18, 24)) + list(range(6, 12))
    assert sorted(lane.lane for lane in table.add_stream("b", 2).lanes) == [0, 2]
    table.remove_stream("b")
    with pytest.raises(PoolFullError):
        table.add_stream("c", 1, lane_ids=[1])  # held by "a"
