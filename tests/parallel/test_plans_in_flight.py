"""Plans in flight: pipeline stages with one plan per stage in flight and the automatic lane
stride D = number of stages give the frames of the local executor at stride 1, frame for
frame, with live prompt and seed changes, each chunk's output (steps - 1)(D - 1) chunks
later; and a transport that advances one stage per tick (forward p at stage 1 while p + 1 is
at stage 0), driven through EngineCore, equals the local stride-D run exactly."""

from __future__ import annotations

import numpy as np
import pytest

from stage_helpers import CHUNKS, SEED_AT, drive, frames_of, local
from streamdiff.config import with_overrides
from streamdiff.parallel.executor import StagedExecutor, ThreadedStages, TickStages
from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw

@pytest.mark.parametrize("steps,counts", [(1, [1, 1, 1, 1]), (2, [1, 1, 1, 1]), (4, [2, 2])])
def test_stride_d_through_the_engine_equals_stride_one_later(cfg_auto, comps4, steps, counts):
    stages = TickStages(cfg_auto, counts, "cpu")
    executor = StagedExecutor(cfg_auto, stages)
    core, got, emitted, depth_seen = drive(cfg_auto, executor, steps)
    _, ref, ref_emitted, _ = drive(cfg_auto, local(comps4), steps)  # depth 1: stride 1
    depth = len(counts)
    assert core.params("s").lane_stride == depth  # chosen: as many as stages (the SLO is relaxed)
    # 1. Frame for frame the video of stride 1 (each chunk keeps its prompt and seed), minus
    #    the chunks still in the lag at the end.
    assert len(got) == 5 + 4 * (CHUNKS - 1 - (steps - 1) * depth)
    assert len(got) > 4 * SEED_AT  # the live changes are in what is compared
    ref = ref[: len(got)]
    assert [o.pts for o in got] == [o.pts for o in ref]
    assert np.abs(frames_of(got).astype(int) - frames_of(ref).astype(int)).max() <= 1
    # 2. Each chunk leaves with the plan of the chunk (steps - 1)·D later ((steps - 1)(D - 1)
    #    chunks later than with stride 1).
    for entering, out in emitted.items():
        if entering:
            assert out == entering - (steps - 1) * depth
    for entering, out in ref_emitted.items():
        if entering:
            assert out == entering - (steps - 1)
    # 3. The plans really overlapped: the pipeline was full, and some tick ran two forwards.
    assert executor.peak_in_flight == depth and depth_seen == depth - 1
    by_tick: dict[int, set] = {}
    for tick, _, key in stages.trace:
        by_tick.setdefault(tick, set()).add(key)
    assert max(len(keys) for keys in by_tick.values()) >= 2


@pytest.mark.parametrize("counts", [[2, 2], [1, 2, 1]])
def test_tick_stages_equal_the_local_stride_d_run_exactly(cfg_auto, comps4, counts):
    """Forward p at stage k + 1 while p + 1 is at stage k, through EngineCore: the same frames
    as the local executor running the same stride D = stages (one stream: the VAE calls are
    the same, so nothing may differ)."""
    steps, depth = 2, len(counts)
    _, got, _, _ = drive(cfg_auto, StagedExecutor(cfg_auto, TickStages(cfg_auto, counts, "cpu")), steps)
    cfg_d = with_overrides(cfg_auto, parallel={"lane_stride": depth})
    _, ref, _, _ = drive(cfg_d, local(comps4), steps)
    assert len(got) == len(ref) > 20
    assert np.array_equal(frames_of(got), frames_of(ref))


def test_threaded_stages_equal_tick_stages(cfg_auto):
    """A thread per stage (what the drill and the bench run) gives the same frames."""
    _, ref, _, _ = drive(cfg_auto, StagedExecutor(cfg_auto, TickStages(cfg_auto, [2, 2], "cpu")), 2)
    executor = StagedExecutor(cfg_auto, ThreadedStages(cfg_auto, [2, 2], "cpu"))
    try:
        _, got, _, _ = drive(cfg_auto, executor, 2)
    finally:
        executor.shutdown()
    assert np.array_equal(frames_of(got), frames_of(ref))


def test_latency_needs_pick_a_smaller_stride(cfg_auto):
    """D = stages unless the stream's deadline needs less latency: a tight deadline gets the
    largest D that keeps it."""
    from streamdiff.scheduler import StreamSLO

    sched = FrameScheduler(FixedCostModel(LinearLaw(20.0, 0.0, 0.0)), max_streams=3, pipeline_depth=4)
    # 2 lanes at 30 fps: gathering + (D + 1) chunks of lag + 5 periods of 20 ms in flight.
    loose = sched.add_stream("loose", StreamSLO(30.0, 5000.0), 12, 2, 0.0)
    tight = sched.add_stream("tight", StreamSLO(30.0, 500.0), 12, 2, 0.0)
    pinned = sched.add_stream("pinned", StreamSLO(30.0, 5000.0), 12, 2, 0.0, lane_stride=1)
    assert loose.lane_stride == 4 and pinned.lane_stride == 1
    assert 1 <= tight.lane_stride < 4
    assert tight.expected_latency_ms <= 500.0 < loose.expected_latency_ms
