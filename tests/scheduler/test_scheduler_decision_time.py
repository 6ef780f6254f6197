"""Decision time of `schedule` with many streams: a measuring helper, not a timed test.

Run `python tests/scheduler/test_scheduler_decision_time.py [streams] [steps]` to print the
numbers; the test below runs the same loop briefly and checks only that the plans are sound.
"""

from __future__ import annotations

import statistics
import sys
import time

from streamdiff.scheduler import FrameScheduler, LinearLaw, OnlineCostModel, StepResult, StreamSLO


def measure_decision_time_us(n_streams: int = 64, steps: int = 2000) -> dict[str, float]:
    """Drive `n_streams` 1-2-lane streams, every one with a chunk ready at every step, through
    `steps` schedule/update rounds on a fake clock; time `schedule` and `update` separately."""
    law = LinearLaw(base_ms=2.0, ms_per_row=0.1, ms_per_ktoken=0.01)
    cost = OnlineCostModel(prior=law)
    sched = FrameScheduler(cost, max_streams=n_streams)
    for i in range(n_streams):
        adm = sched.add_stream(f"s{i}", StreamSLO(30.0, 2000.0), tokens_per_frame=256 * (1 + i % 4),
                               lanes=1 + i % 2, now=0.0)
        assert adm, adm.reason
    ids = sched.stream_ids
    schedule_us: list[float] = []
    update_us: list[float] = []
    frame_id, now = 0, 0.0
    for step in range(steps):
        # 1. Every stream receives a chunk's worth of frames (5 before its first chunk).
        for sid in ids:
            for _ in range(5 if step == 0 else 4):
                sched.push_frame(sid, frame_id, now)
                frame_id += 1
        now += 4 / 30
        # 2. Decide (timed), then account a step that took what the law says (timed).
        t0 = time.perf_counter()
        plan = sched.schedule(now)
        t1 = time.perf_counter()
        step_ms = law.predict_ms(plan.rows, plan.tokens)
        sched.update(plan, StepResult(plan.step_id, step_ms, now + step_ms / 1000.0))
        t2 = time.perf_counter()
        schedule_us.append((t1 - t0) * 1e6)
        update_us.append((t2 - t1) * 1e6)
        assert len(set(plan.stream_ids)) == len(plan.chunks)
    schedule_us.sort()
    return {
        "streams": n_streams,
        "steps": steps,
        "schedule_median_us": statistics.median(schedule_us),
        "schedule_p99_us": schedule_us[int(0.99 * (len(schedule_us) - 1))],
        "update_median_us": statistics.median(update_us),
        "chunks_per_step": sum(sched.stats(s).chunks_done for s in ids) / steps,
    }


def test_decision_loop_with_64_streams_plans_every_ready_stream():
    result = measure_decision_time_us(n_streams=64, steps=50)
    print(f"\n64 streams: schedule median {result['schedule_median_us']:.0f} us, "
          f"p99 {result['schedule_p99_us']:.0f} us; update median {result['update_median_us']:.0f} us")
    # Every stream has a chunk ready each step and the law is cheap: all 64 are batched.
    assert result["chunks_per_step"] == 64


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    for name, value in measure_decision_time_us(n, k).items():
        print(f"{name:>20}: {value:.1f}" if isinstance(value, float) else f"{name:>20}: {value}")
