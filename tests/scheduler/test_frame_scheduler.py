"""The frame scheduler on a fake clock: EDF order, fair share, drop-to-newest, lag and removal."""

from __future__ import annotations

import heapq

import pytest

from streamdiff.scheduler import (
    FixedCostModel,
    FrameScheduler,
    LinearLaw,
    StepPlan,
    StepResult,
    StreamSLO,
)

CHEAP = LinearLaw(base_ms=20.0, ms_per_row=10.0, ms_per_ktoken=0.0)


class Sim:
    """An engine on a fake clock: streams push frames at their own rate (with a phase), one
    step runs at a time and lasts what `step_ms(plan)` says, and `schedule` is called whenever
    the engine is idle. Events at the same instant: step end, then frames, then schedule."""

    def __init__(self, sched: FrameScheduler, step_ms=None):
        self.sched = sched
        self.step_ms = step_ms or (lambda plan: plan.predicted_ms)
        self.inputs: dict[str, tuple[float, float]] = {}  # stream_id -> (fps, phase_s)
        self.next_frame_id = 0
        self.plans: list[StepPlan] = []
        self.max_pending = 0
        self.dropped_ids: dict[str, list[int]] = {}

    def feed(self, stream_id: str, fps: float, phase_s: float = 0.0) -> None:
        self.inputs[stream_id] = (fps, phase_s)
        self.dropped_ids[stream_id] = []

    def run(self, until_s: float) -> None:
        frames = [(phase, sid, 0) for sid, (fps, phase) in self.inputs.items()]  # (time, id, n)
        heapq.heapify(frames)
        running: tuple[float, StepPlan] | None = None
        now = 0.0
        while True:
            # 1. The next event: a step end or a frame arrival.
            t_frame = frames[0][0] if frames else float("inf")
            now = min(t_frame, running[0]) if running else t_frame
            if now > until_s:
                break
            # 2. Finish the step ending now.
            if running and running[0] <= now:
                self.sched.update(running[1], StepResult(running[1].step_id, self.step_ms(running[1]), now))
                running = None
            # 3. Push every frame arriving now (streams removed meanwhile stop pushing).
            while frames and frames[0][0] <= now:
                _, sid, n = heapq.heappop(frames)
                if sid not in self.sched.stream_ids:
                    continue
                fps, phase = self.inputs[sid]
                self.dropped_ids[sid] += self.sched.push_frame(sid, self.next_frame_id, now)
                self.next_frame_id += 1
                heapq.heappush(frames, (phase + (n + 1) / fps, sid, n + 1))
                pending = len(self.sched.pending_frame_ids(sid))
                self.max_pending = max(self.max_pending, pending)
            # 4. Idle engine: ask for a step.
            if running is None:
                plan = self.sched.schedule(now)
                if plan is not None:
                    self.plans.append(plan)
                    running = (now + self.step_ms(plan) / 1000.0, plan)

    def chunks(self, stream_id: str) -> int:
        return sum(stream_id in plan.stream_ids for plan in self.plans)


def _push(sched: FrameScheduler, stream_id: str, count: int, t0: float, fps: float, first_id: int = 0):
    for i in range(count):
        sched.push_frame(stream_id, first_id + i, t0 + i / fps)


def test_earliest_deadline_first_and_the_urgent_chunk_goes_alone_when_both_do_not_fit():
    cost = FixedCostModel(LinearLaw(50.0, 0.0, 0.0))
    sched = FrameScheduler(cost, max_streams=4)
    # The relaxed stream is admitted first, so admission order cannot explain the result.
    assert sched.add_stream("relaxed", StreamSLO(30.0, 1000.0), tokens_per_frame=64, lanes=1, now=0.0)
    assert sched.add_stream("urgent", StreamSLO(30.0, 250.0), tokens_per_frame=64, lanes=1, now=0.0)
    _push(sched, "relaxed", 5, 0.0, 30.0, first_id=100)
    _push(sched, "urgent", 5, 0.0, 30.0, first_id=200)
    now = 4 / 30
    # 1. Both fit (50 ms): both go, earliest due first.
    plan = sched.schedule(now)
    assert plan.stream_ids == ("urgent", "relaxed")
    assert plan.chunks[0].due_s == pytest.approx(0.25) and plan.chunks[1].due_s == pytest.approx(1.0)
    assert plan.chunks[0].first and plan.chunks[0].frame_ids == (200, 201, 202, 203, 204)
    assert plan.chunks[0].latents == 2 and plan.chunks[0].tokens == 2 * 64
    sched.update(plan, StepResult(plan.step_id, 50.0, now + 0.05))
    # 2. The GPU slows down: alone 110 ms ends before urgent's due, together 170 ms does not.
    cost.law = LinearLaw(50.0, 60.0, 0.0)
    t1 = 0.3
    _push(sched, "relaxed", 4, t1, 30.0, first_id=110)
    _push(sched, "urgent", 4, t1, 30.0, first_id=210)
    now = t1 + 3 / 30
    plan = sched.schedule(now)
    assert plan.stream_ids == ("urgent",)
    assert plan.chunks[0].frame_ids == (210, 211, 212, 213) and not plan.chunks[0].first
    sched.update(plan, StepResult(plan.step_id, 110.0, now + 0.11))
    plan = sched.schedule(now + 0.11)
    assert plan.stream_ids == ("relaxed",)


@pytest.mark.parametrize("phase_step_s", [0.0, 0.001])
def test_fair_share_between_streams_of_equal_slo(phase_step_s):
    # Admitted while cheap; then the GPU slows so only 3 of the 4 chunks fit on time per step.
    cost = FixedCostModel(CHEAP)
    sched = FrameScheduler(cost, max_streams=8)
    slo = StreamSLO(30.0, 400.0)
    ids = [f"s{i}" for i in range(4)]
    for sid in ids:
        assert sched.add_stream(sid, slo, tokens_per_frame=64, lanes=1, now=0.0)
    cost.law = LinearLaw(20.0, 50.0, 0.0)  # 3 rows: 170 ms, 4 rows: 220 ms
    sim = Sim(sched)
    for i, sid in enumerate(ids):
        sim.feed(sid, fps=30.0, phase_s=i * phase_step_s)  # phase: near-ties, not exact ones
    sim.run(until_s=20.0)
    counts = [sim.chunks(sid) for sid in ids]
    assert max(counts) - min(counts) <= 1, counts
    assert len(sim.plans) > 50
    assert all(len(plan.chunks) < 4 for plan in sim.plans[5:])  # it really was contended


def test_overload_drops_oldest_frames_and_never_builds_a_queue():
    # Three streams admitted at 15 fps (a chunk every 267 ms); the step takes 260 ms. The
    # cameras deliver 30 fps: input at twice the capacity for 10 simulated seconds.
    sched = FrameScheduler(FixedCostModel(LinearLaw(200.0, 20.0, 0.0)), max_streams=4)
    ids = ["a", "b", "c"]
    for sid in ids:
        assert sched.add_stream(sid, StreamSLO(15.0, 1000.0), tokens_per_frame=64, lanes=1, now=0.0)
    sim = Sim(sched)
    for i, sid in enumerate(ids):
        sim.feed(sid, fps=30.0, phase_s=0.003 * i)
    sim.run(until_s=10.0)
    # 1. Pending frames stay within one chunk (5 for the first) plus the extra bound (3).
    assert sim.max_pending <= 8
    for sid in ids:
        st = sched.stats(sid)
        # 2. Every frame is accounted for: consumed, dropped or still pending.
        assert st.pushed_frames >= 299
        assert st.dropped_frames == st.pushed_frames - st.consumed_frames - st.waiting_frames
        assert st.dropped_frames == len(sim.dropped_ids[sid])
        assert st.dropped_frames > 0.4 * st.pushed_frames  # about half the input is dropped
        assert st.waiting_frames <= 7
        # 3. Latency stays bounded: nothing waits in a queue, so no deadline is missed.
        assert st.deadline_misses == 0 and 0 < st.max_latency_ms < 1000.0
    # 4. Dropped frames are the oldest: ids consumed by a stream only ever increase.
    for sid in ids:
        consumed = [f for plan in sim.plans for c in plan.chunks if c.stream_id == sid for f in c.frame_ids]
        assert consumed == sorted(consumed)
        assert not set(consumed) & set(sim.dropped_ids[sid])


def test_stream_batch_lag_and_deadline_misses():
    sched = FrameScheduler(FixedCostModel(LinearLaw(10.0, 0.0, 0.0)), max_streams=2)
    assert sched.add_stream("s", StreamSLO(30.0, 700.0), tokens_per_frame=32, lanes=3, now=0.0)
    emitted = []
    frame_id, t = 0, 0.0
    for chunk in range(5):
        # 1. Gather the chunk's frames (5 for the first, then 4) at 30 fps.
        for _ in range(5 if chunk == 0 else 4):
            sched.push_frame("s", frame_id, t)
            frame_id, t = frame_id + 1, t + 1 / 30
        plan = sched.schedule(t)
        (c,) = plan.chunks
        emitted.append(c.emit_frame_ids)
        sched.update(plan, StepResult(plan.step_id, 10.0))
    # 2. The first chunk leaves at once; chunk k >= 1 leaves with chunk k + 2 (3 lanes).
    assert emitted == [(0, 1, 2, 3, 4), (), (), (5, 6, 7, 8), (9, 10, 11, 12)]
    st = sched.stats("s")
    assert st.chunks_done == 5 and st.output_frames == 13
    # 3. The last output chunk starts with frame 9 (arrived at 9/30 s); it left with the chunk
    #    planned at 21/30 s, 10 ms later: 410 ms, within the 700 ms deadline.
    assert st.deadline_misses == 0
    assert st.last_latency_ms == pytest.approx((21 / 30 - 9 / 30) * 1000 + 10.0)


def test_deadline_miss_is_counted_per_output_frame():
    sched = FrameScheduler(FixedCostModel(LinearLaw(10.0, 0.0, 0.0)), max_streams=2)
    assert sched.add_stream("s", StreamSLO(30.0, 200.0), tokens_per_frame=32, lanes=1, now=0.0)
    _push(sched, "s", 5, 0.0, 30.0)
    plan = sched.schedule(4 / 30)
    # The step ran long and ended at 250 ms: frame 0 (arrived at 0 ms) took 250 ms and frame 1
    # (33 ms) 217 ms, two misses; frames 2..4 made it.
    sched.update(plan, StepResult(plan.step_id, 116.7, end_s=0.25))
    st = sched.stats("s")
    assert st.output_frames == 5 and st.deadline_misses == 2
    assert st.last_latency_ms == pytest.approx(250.0) and st.max_latency_ms == pytest.approx(250.0)


def test_plan_never_includes_a_removed_stream():
    sched = FrameScheduler(FixedCostModel(CHEAP), max_streams=3)
    slo = StreamSLO(30.0, 500.0)
    for sid in ("a", "b", "c"):
        assert sched.add_stream(sid, slo, tokens_per_frame=64, lanes=2, now=0.0)
        _push(sched, sid, 6, 0.0, 30.0, first_id={"a": 0, "b": 100, "c": 200}[sid])
    # 1. Removed before scheduling: never planned; its pending frame ids come back to free.
    assert sched.remove_stream("b") == [100, 101, 102, 103, 104, 105]
    plan = sched.schedule(0.2)
    assert set(plan.stream_ids) == {"a", "c"}
    # 2. Removed while its chunk is in flight: update skips it, the slot is free at once.
    sched.remove_stream("c")
    assert sched.free_stream_slots == 2
    # ... and a new stream under the same id is a different stream.
    assert sched.add_stream("c", slo, tokens_per_frame=64, lanes=2, now=0.2)
    sched.update(plan, StepResult(plan.step_id, 30.0))
    assert sched.stats("c").chunks_done == 0 and sched.stats("a").chunks_done == 1
    # 3. Later plans only name live streams.
    for k in range(20):
        for j, sid in enumerate(sched.stream_ids):
            _push(sched, sid, 4, 0.3 + 0.2 * k, 30.0, first_id=1000 * (k + 1) + 10 * j)
        if k == 5:
            sched.remove_stream("a")
        plan = sched.schedule(0.45 + 0.2 * k)
        assert plan is not None and set(plan.stream_ids) <= set(sched.stream_ids)
        sched.update(plan, StepResult(plan.step_id, 30.0))
    assert sched.stream_ids == ["c"]
    sched.remove_stream("c")
    assert sched.free_stream_slots == 3


def test_a_stream_has_one_chunk_in_flight_unless_allowed_more():
    for in_flight in (1, 2):
        sched = FrameScheduler(FixedCostModel(CHEAP), max_streams=1, max_chunks_in_flight=in_flight)
        assert sched.add_stream("s", StreamSLO(30.0, 800.0), tokens_per_frame=64, lanes=2, now=0.0)
        _push(sched, "s", 5, 0.0, 30.0)
        first = sched.schedule(0.15)
        _push(sched, "s", 4, 0.2, 30.0, first_id=5)
        second = sched.schedule(0.3)  # the first step has not been updated yet
        assert first.stream_ids == ("s",)
        if in_flight == 1:
            assert second is None
            sched.update(first, StepResult(first.step_id, 30.0))
            second = sched.schedule(0.3)
        assert second.chunks[0].frame_ids == (5, 6, 7, 8) and not second.chunks[0].first
        if in_flight == 2:
            sched.update(first, StepResult(first.step_id, 30.0))
        sched.update(second, StepResult(second.step_id, 30.0))
        assert sched.stats("s").chunks_done == 2
        with pytest.raises(KeyError):
            sched.update(second, StepResult(second.step_id, 30.0))  # already accounted


def test_nothing_ready_gives_no_plan():
    sched = FrameScheduler(FixedCostModel(CHEAP), max_streams=2)
    assert sched.schedule(0.0) is None
    assert sched.add_stream("s", StreamSLO(30.0, 500.0), tokens_per_frame=64, lanes=1, now=0.0)
    _push(sched, "s", 4, 0.0, 30.0)  # a first chunk needs 5
    assert sched.schedule(0.2) is None
    assert sched.stats("s").waiting_frames == 4


def test_a_failed_step_teaches_the_cost_model_nothing():
    """A fault probe: a step lost with a stage that timed out (30 s) was observed like any step,
    and the next stream was told to expect 0.1 fps. Its plan is closed all the same."""
    cost = FixedCostModel(LinearLaw(50.0, 0.0, 0.0))
    sched = FrameScheduler(cost, max_streams=4)
    assert sched.add_stream("s", StreamSLO(30.0, 1000.0), tokens_per_frame=64, lanes=1, now=0.0)
    _push(sched, "s", 5, 0.0, 30.0)
    plan = sched.schedule(4 / 30)
    sched.update(plan, StepResult(plan.step_id, 30_000.0, 30.0, failed=True))
    assert cost.samples == 0
    _push(sched, "s", 4, 30.0, 30.0, first_id=5)
    plan = sched.schedule(30.2)
    assert plan is not None and plan.stream_ids == ("s",)  # the failed plan no longer holds the stream
    sched.update(plan, StepResult(plan.step_id, 50.0))
    assert cost.samples == 1


def test_plan_chunks_are_listed_earliest_due_first_even_when_fair_share_orders_them_otherwise():
    """StepPlan documents its chunks as earliest due first (the order its consumers read them in);
    the fair-share handicap may rank the candidates otherwise, so the plan is sorted again."""
    sched = FrameScheduler(FixedCostModel(CHEAP), max_streams=4)
    assert sched.add_stream("a", StreamSLO(10.0, 10_000.0), tokens_per_frame=12, lanes=1, now=0.0)  # slow target
    assert sched.add_stream("b", StreamSLO(30.0, 10_000.0), tokens_per_frame=12, lanes=1, now=0.0)
    _push(sched, "a", 5, 0.0, 100.0)
    _push(sched, "b", 5, 0.0, 100.0, first_id=100)
    plan = sched.schedule(0.1)
    assert set(plan.stream_ids) == {"a", "b"}
    sched.update(plan, StepResult(plan.step_id, 1.0, 0.2))
    # a's frames are older (due earlier), but a is ahead in fair share: its first chunk moved its
    # clock 0.5 s (5 frames at 10 fps), b's 0.167 s.
    _push(sched, "a", 4, 1.0, 100.0, first_id=10)
    _push(sched, "b", 4, 1.1, 100.0, first_id=110)
    plan = sched.schedule(1.2)
    assert set(plan.stream_ids) == {"a", "b"}
    dues = [c.due_s for c in plan.chunks]
    assert dues == sorted(dues), plan.chunks


def test_the_step_that_pushes_a_lagged_chunk_out_is_due_by_that_chunks_deadline():
    """With 2 lanes a chunk's output leaves with the next chunk: that step must hurry for the
    older chunk (its oldest frame's deadline), not the new one, or EDF ranks a stream whose output
    is about to leave too low."""
    deadline_ms = 5_000.0
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.1, 0.0)), max_streams=2)
    assert sched.add_stream("a", StreamSLO(30.0, deadline_ms), tokens_per_frame=12, lanes=2, now=0.0)
    plans, starts = [], []
    frame_id = 0
    for n in (5, 4, 4):  # the first chunk, then two steady ones, at 30 fps
        t0 = frame_id / 30
        _push(sched, "a", n, t0, 30.0, first_id=frame_id)
        frame_id += n
        now = frame_id / 30
        plan = sched.schedule(now)
        sched.update(plan, StepResult(plan.step_id, 1.0, now + 0.001))
        plans.append(plan.chunks[0])
        starts.append(t0)
    assert plans[0].emit_frame_ids == (0, 1, 2, 3, 4)  # prepared: leaves at once
    assert plans[1].emit_frame_ids == ()  # enters the lag
    assert plans[2].emit_frame_ids == plans[1].frame_ids  # pushes chunk 2 out ...
    assert plans[2].due_s == pytest.approx(starts[1] + deadline_ms / 1000.0)  # ... due by chunk 2's deadline


def test_a_stream_back_from_a_pause_is_owed_at_most_fair_lag_chunks_of_priority():
    """A stream that idled (a paused camera) comes back behind in fair share; it may catch up
    FAIR_LAG_CHUNKS chunks, not take every step until its clock catches up while the stream
    that kept running starves."""
    # Admitted while cheap; then one chunk per step fits on time (6 s step, 10 s deadline), two do not.
    sched = FrameScheduler(FixedCostModel(LinearLaw(0.0, 1.0, 0.0)), max_streams=2, max_extra_frames=0)
    slo = StreamSLO(30.0, 10_000.0)
    assert sched.add_stream("a", slo, tokens_per_frame=12, lanes=1, now=0.0)
    assert sched.add_stream("b", slo, tokens_per_frame=12, lanes=1, now=0.0)
    sched.cost_model = FixedCostModel(LinearLaw(0.0, 6000.0, 0.0))
    t, frame_id = 0.0, 0

    def push(stream_id, n):
        nonlocal frame_id
        _push(sched, stream_id, n, t, 1e9, first_id=frame_id)  # n frames at once
        frame_id += n

    def step():
        nonlocal t
        plan = sched.schedule(t)
        t += plan.predicted_ms / 1000.0
        sched.update(plan, StepResult(plan.step_id, plan.predicted_ms, t))
        return plan

    push("a", 5)
    push("b", 5)
    while sched.stats("a").chunks_planned < 1 or sched.stats("b").chunks_planned < 1:
        step()
    for _ in range(20):  # b runs alone for 20 chunks while a's camera is paused
        push("b", 4)
        step()
    order = []
    for _ in range(10):  # both send again
        push("a", 4)
        push("b", 4)
        order += step().stream_ids
    assert order.count("b") >= 3, order


def test_a_stream_one_chunk_ahead_yields_to_one_due_less_than_a_chunk_period_later():
    """The fair-share handicap is counted in chunk periods: a stream one chunk ahead of another
    is treated as due one chunk period (4 frames) later, not one frame period, so it yields a step
    to the other when that one is due less than a chunk period after it."""
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.1, 0.0)), max_streams=2, max_extra_frames=0)
    slo = StreamSLO(30.0, 1500.0)  # a chunk period of 133 ms
    assert sched.add_stream("a", slo, tokens_per_frame=12, lanes=1, now=0.0)
    assert sched.add_stream("b", slo, tokens_per_frame=12, lanes=1, now=0.0)

    def step(now):
        plan = sched.schedule(now)
        sched.update(plan, StepResult(plan.step_id, 1.0, now + 0.001))
        return plan

    _push(sched, "a", 5, 0.0, 1e9)  # frames arriving at once
    _push(sched, "b", 5, 0.0, 1e9, first_id=100)
    assert set(step(0.0).stream_ids) == {"a", "b"}
    _push(sched, "a", 4, 0.2, 1e9, first_id=10)
    assert step(0.2).stream_ids == ("a",)  # a is now one chunk ahead of b
    sched.cost_model = FixedCostModel(LinearLaw(0.0, 1000.0, 0.0))  # 1 s a row: one chunk fits on time
    _push(sched, "a", 4, 1.0, 1e9, first_id=20)
    _push(sched, "b", 4, 1.05, 1e9, first_id=110)  # b due 50 ms after a: less than a's 133 ms handicap
    assert step(1.05).stream_ids == ("b",)
