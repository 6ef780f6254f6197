"""The scheduler owns KV capacity: it allocates pool lanes (one per denoise step) and admits a
stream only if its lanes are free, so a 2-step stream holds 2 lanes, not 4."""

from __future__ import annotations

import pytest

from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw, StreamSLO
from streamdiff.scheduler.kv_lanes import KVLanes

SLO = StreamSLO(target_fps=1.0, deadline_ms=1e9)


def _sched(kv_lanes: int, max_streams: int = 8) -> FrameScheduler:
    return FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.0, 0.0)), max_streams=max_streams, kv_lanes=kv_lanes)


def test_streams_hold_one_lane_per_denoise_step_and_admission_counts_free_lanes():
    sched = _sched(kv_lanes=5)
    assert sched.add_stream("a", SLO, 12, lanes=2, now=0.0)
    assert sched.add_stream("b", SLO, 12, lanes=2, now=0.0)
    assert sched.kv_lanes_of("a") == (0, 1) and sched.kv_lanes_of("b") == (2, 3)
    refused = sched.add_stream("c", SLO, 12, lanes=2, now=0.0)
    assert not refused and "KV pool full: 2 lanes needed, 1 of 5 free" in refused.reason
    assert sched.add_stream("d", SLO, 12, lanes=1, now=0.0)  # one lane still fits
    assert sched.kv_lanes_of("d") == (4,) and sched.kv.free == 0
    sched.remove_stream("a")
    assert sched.kv.free == 2
    assert sched.add_stream("c", SLO, 12, lanes=2, now=0.0) and sched.kv_lanes_of("c") == (0, 1)


def test_the_default_pool_has_four_lanes_per_stream_and_the_stream_cap_still_holds():
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.0, 0.0)), max_streams=2)
    assert sched.kv.num_lanes == 8
    assert sched.add_stream("a", SLO, 12, lanes=4, now=0.0) and sched.add_stream("b", SLO, 12, lanes=1, now=0.0)
    refused = sched.add_stream("c", SLO, 12, lanes=1, now=0.0)
    assert not refused and "2 stream slots" in refused.reason


def test_a_stream_readmitted_right_after_its_release_keeps_its_lanes():
    kv = KVLanes(6)
    kv.alloc("x", 1)
    kv.alloc("s", 2)  # lanes 1, 2
    kv.release("x")  # lane 0 free, below s's lanes
    kv.release("s")
    assert kv.alloc("s", 3) == (1, 2, 0)  # a steps change 2 -> 3: the old lanes, then the lowest free
    kv.release("s")
    assert kv.alloc("t", 2) == (0, 1)  # another stream: lowest first
    with pytest.raises(ValueError, match="KV pool full"):
        kv.alloc("u", 5)


def test_a_pool_smaller_than_one_stream_is_a_config_error():
    from streamdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cache.pool_lanes=1 cannot hold one stream of sampling.steps=2"):
        load_config("tiny", ["cache.pool_lanes=1", "sampling.steps=2"])
    assert load_config("tiny", ["cache.pool_lanes=2", "sampling.steps=2"]).cache.pool_lanes == 2


def test_more_steps_than_the_whole_pool_has_lanes_is_a_lasting_refusal():
    """A probe: a first stream asking 4 steps of a 3-lane pool was told "KV pool full" with
    Retry-After on an empty server (and a running stream's steps change the same)."""
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.0, 0.0)), max_streams=2, kv_lanes=3)
    refused = sched.add_stream("a", SLO, 12, lanes=4, now=0.0)
    assert not refused and refused.lasting and "full" not in refused.reason, refused
    assert "the pool has 3 in all (cache.pool_lanes): at most 3 steps fit" in refused.reason, refused
    busy = sched.add_stream("b", SLO, 12, lanes=3, now=0.0) and sched.add_stream("c", SLO, 12, lanes=1, now=0.0)
    assert not busy and not busy.lasting and "KV pool full" in busy.reason  # the others leaving would help
    admission, _ = sched.restart_stream("b", 4, now=0.0)
    assert not admission and admission.lasting and sched.kv_lanes_of("b") == (0, 1, 2)  # left as it was


def test_a_refused_restart_leaves_the_stream_slots_as_they_were():
    """A steps change the pool cannot take is refused and the stream keeps running as it was:
    it still holds its stream slot, so the server never admits more than cache.max_streams."""
    sched = _sched(kv_lanes=8, max_streams=2)
    assert sched.add_stream("a", SLO, 12, lanes=1, now=0.0)
    assert sched.free_stream_slots == 1
    admission, waiting = sched.restart_stream("a", 9, now=1.0)  # more lanes than the pool has
    assert not admission and waiting == []
    assert sched.free_stream_slots == 1
    assert sched.add_stream("b", SLO, 12, lanes=1, now=2.0)
    refused = sched.add_stream("c", SLO, 12, lanes=1, now=3.0)
    assert not refused and "stream slots" in refused.reason
    assert sched.stream_ids == ["a", "b"]
