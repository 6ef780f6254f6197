"""Input faster than the engine: latency and memory stay bounded, the excess is dropped and counted.

A fake executor takes 2 chunk periods per step (fake clock), so two 30 fps streams push twice
what the engine can serve, for 10 s of fake time. Deterministic and fast (no model).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import H, W, FakeClock, FakeExecutor, params
from streamdiff.engine import EngineCore
from streamdiff.scheduler import StreamSLO

FPS = 30.0
CHUNK_PERIOD_MS = 4 / FPS * 1000.0


def run_overloaded(cfg, seconds=10.0, streams=("s0", "s1"), max_extra_frames=3):
    clock = FakeClock()
    executor = FakeExecutor(clock, step_ms=2 * CHUNK_PERIOD_MS)  # capacity: half the input
    core = EngineCore(cfg, executor, clock=clock, max_extra_frames=max_extra_frames, output_queue_frames=16)
    for sid in streams:
        assert core.add_stream(sid, params(cfg, "x", steps=1), StreamSLO(FPS, 1000.0))
    frame = np.zeros((H, W, 3), np.uint8)
    pushed = {sid: 0 for sid in streams}
    out = {sid: [] for sid in streams}
    max_waiting = 0
    next_t = 0.0
    while clock.t < seconds:
        # 1. Every frame that arrived by now, each stream on its 30 fps grid.
        while next_t <= clock.t:
            for sid in streams:
                core.push_frame(sid, frame, pts=pushed[sid], now=next_t)
                pushed[sid] += 1
            next_t += 1 / FPS
        max_waiting = max(max_waiting, core.waiting_frames())
        # 2. One step if anything is ready (it advances the clock), else wait for the next frame.
        if core.step() is None:
            clock.t = next_t
        for sid in streams:
            out[sid] += core.pop_outputs(sid)
    return core, pushed, out, max_waiting


def test_twice_the_capacity_for_ten_seconds_drops_instead_of_queueing(cfg):
    core, pushed, out, max_waiting = run_overloaded(cfg)
    snap = core.metrics.snapshot()
    for sid in pushed:
        stats = core.scheduler.stats(sid)
        dropped = snap["streams"][sid]["dropped_by_cause"]["input"]
        # 1. Waiting input stays a small constant: a chunk (4) + 3 extra, per stream.
        assert core.waiting_frames(sid) <= 4 + 3
        # 2. About half the input is dropped, and every frame is accounted for.
        assert dropped == stats.dropped_frames
        assert pushed[sid] == len(out[sid]) + dropped + core.waiting_frames(sid)
        assert 0.4 * pushed[sid] <= dropped <= 0.6 * pushed[sid]
        # 3. Latency is bounded by gathering + one step, not by how long the overload lasts.
        latencies = [o.latency_ms for o in out[sid]]
        assert max(latencies) <= (4 + 3) / FPS * 1000 + 2 * 2 * CHUNK_PERIOD_MS
        assert max(latencies[-20:]) <= max(latencies[:40]) + 1e-6
        # 4. Output frames come in pts order (newest-first dropping never reorders).
        pts = [o.pts for o in out[sid]]
        assert pts == sorted(pts)
    assert max_waiting <= 2 * (5 + 3)  # both streams, first chunk (5) + 3 extra
    assert snap["totals"]["dropped_frames"] == sum(s["dropped_frames"] for s in snap["streams"].values())


def test_step_batches_both_streams_and_metrics_see_it(cfg):
    core, pushed, out, _ = run_overloaded(cfg, seconds=3.0)
    snap = core.metrics.snapshot()
    assert snap["step_streams"]["p50"] == 2 and snap["step_rows"]["max"] == 2
    assert snap["step_ms"]["p50"] == pytest.approx(2 * CHUNK_PERIOD_MS)
    for sid in pushed:
        s = snap["streams"][sid]
        assert s["fps"] == pytest.approx(FPS / 2, rel=0.05)  # 4 frames per 2 chunk periods
        assert s["jitter_ms"] == pytest.approx(0.0, abs=1e-6)  # one chunk every step, like clockwork
        assert s["time_to_first_frame_ms"] == pytest.approx(5 / FPS * 1000 - 1000 / FPS + 2 * CHUNK_PERIOD_MS, abs=40)
        assert s["latency_ms"]["p50"] <= s["latency_ms"]["p90"] <= s["latency_ms"]["p99"]


def test_a_short_deadline_counts_misses(cfg):
    clock = FakeClock()
    core = EngineCore(cfg, FakeExecutor(clock, step_ms=300.0), clock=clock)
    assert core.add_stream("s", params(cfg, "x", steps=1), StreamSLO(FPS, 400.0))
    frame = np.zeros((H, W, 3), np.uint8)
    for i in range(5):
        core.push_frame("s", frame, pts=i, now=i / FPS)
    clock.t = 4 / FPS
    core.step()  # ends at 133 + 300 ms: frame 0 waited 433 ms > 400, frame 1 400 ms (not late)
    got = core.pop_outputs("s")
    assert [round(o.latency_ms) for o in got] == [433, 400, 367, 333, 300]
    s = core.metrics.snapshot()["streams"]["s"]
    assert s["deadline_misses"] == 1 and s["frames_out"] == 5


def test_a_steps_change_the_slo_cannot_take_is_refused_and_nothing_changes(cfg):
    from streamdiff.engine import AdmissionRefused
    from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw

    clock = FakeClock()
    sched = FrameScheduler(FixedCostModel(LinearLaw(0.0, 40.0, 0.0)), max_streams=4)  # 40 ms per row
    core = EngineCore(cfg, FakeExecutor(clock, step_ms=40.0), scheduler=sched, clock=clock)
    assert core.add_stream("s", params(cfg, "x", steps=1), StreamSLO(FPS, 1000.0))
    assert core.add_stream("o", params(cfg, "y", steps=1), StreamSLO(FPS, 1000.0))  # the one a change could break
    frame = np.zeros((H, W, 3), np.uint8)
    for i in range(7):
        core.push_frame("s", frame, pts=i)
    core.step()  # the first chunk (5 frames); 2 frames wait
    assert core.update_params("s", steps=2).steps == 2  # 3 rows x 40 ms fits a 133 ms chunk period
    assert core.waiting_frames("s") == 2 and sched.pending_frame_ids("s") == [5, 6]  # kept
    with pytest.raises(AdmissionRefused, match="steps=3 refused.*stream 'o'.*target fps"):
        core.update_params("s", steps=3)  # 4 rows: 160 ms > 133 ms for the other stream
    assert core.params("s").steps == 2 and core.executor.streams["s"].steps == 2
    assert sched.pending_frame_ids("s") == [5, 6]
    for i in range(7, 10):
        core.push_frame("s", frame, pts=i)
    assert core.step() is not None  # the re-prepared stream takes its first chunk: frames 5..9
    assert [o.pts for o in core.pop_outputs("s")] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_fewer_steps_are_never_refused_even_when_the_machine_slowed_down(cfg):
    """Found by a soak on a loaded machine: 2 -> 1 steps was refused because the cost model, having
    measured slow steps since, predicted more than a neighbour had been promised. Fewer lanes ask
    for no more work than that promise was made beside; more lanes are still judged."""
    from streamdiff.engine import AdmissionRefused
    from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw

    clock = FakeClock()
    cost = FixedCostModel(LinearLaw(0.0, 40.0, 0.0))  # 40 ms per row
    sched = FrameScheduler(cost, max_streams=4)
    core = EngineCore(cfg, FakeExecutor(clock, step_ms=40.0), scheduler=sched, clock=clock)
    assert core.add_stream("s", params(cfg, "x", steps=2), StreamSLO(FPS, 1000.0))
    assert core.add_stream("o", params(cfg, "y", steps=1), StreamSLO(FPS, 1000.0))
    cost.law = LinearLaw(0.0, 400.0, 0.0)  # the machine got 10x slower: nobody's promise holds now
    with pytest.raises(AdmissionRefused, match="steps=3 refused"):
        core.update_params("s", steps=3)
    assert core.update_params("s", steps=1).steps == 1  # was refused like steps=3
    assert core.executor.streams["s"].steps == 1


def test_a_refused_steps_change_leaves_a_running_stream_mid_stream(cfg):
    """Found by a client that asked for 2 steps on a nearly full server: the refusal re-admitted
    the stream as a new one, so the scheduler planned a 5-frame first chunk for a model that was
    mid-stream, and the engine loop failed for every stream ("encode_chunk after a stream's first
    call takes a multiple of 4 frames, got 5"). Now a refusal changes nothing; the real model
    runner checks the chunk sizes."""
    from streamdiff.engine import AdmissionRefused, LocalExecutor
    from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw

    clock = FakeClock()
    sched = FrameScheduler(FixedCostModel(LinearLaw(0.0, 40.0, 0.0)), max_streams=4)  # 40 ms per row
    core = EngineCore(cfg, LocalExecutor.from_config(cfg), scheduler=sched, clock=clock)
    assert core.add_stream("s", params(cfg, "x", steps=1), StreamSLO(FPS, 1000.0))
    assert core.add_stream("o", params(cfg, "y", steps=1), StreamSLO(FPS, 1000.0))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(13)]
    for i in range(9):
        core.push_frame("s", frames[i], pts=i)
    while core.step() is not None:  # the first chunk (5 frames), then one of 4
        clock.t += 0.2
    core.drain()
    before = [o.pts for o in core.pop_outputs("s")]
    planned = sched.stats("s").chunks_planned
    with pytest.raises(AdmissionRefused, match="steps=3 refused"):
        core.update_params("s", steps=3)
    assert sched.stats("s").chunks_planned == planned and core.params("s").steps == 1
    for i in range(9, 13):
        core.push_frame("s", frames[i], pts=i)
    assert core.step() is not None  # a 4-frame chunk, the model's next
    core.drain()
    after = [o.pts for o in core.pop_outputs("s")]
    assert len(after) == 4 and before + after == sorted(set(before + after)), (before, after)
    core.remove_stream("s"), core.remove_stream("o")
