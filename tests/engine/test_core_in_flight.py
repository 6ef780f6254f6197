"""EngineCore with an executor that keeps plans in flight (a fake pipeline of depth 3): the
core fills it, collects the oldest, drains only for add / remove / steps changes (live changes ride with the next plan), waits for
neither input nor plan when told not to block, and a lost pipeline fails every plan in flight."""

from __future__ import annotations

from collections import deque

import numpy as np

from engine_helpers import RELAXED, FakeClock, H, W, params
from streamdiff.engine import EngineCore, EngineStepResult, StreamOutput
from streamdiff.engine.types import StreamsLost
from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw


class FakePipeline:
    """Echoes each chunk's frames when its plan is collected; `depth` plans in flight."""

    def __init__(self, depth: int = 3):
        self.depth = depth
        self.queue: deque = deque()
        self.streams: dict = {}
        self.updates: list = []
        self.max_in_flight = 0
        self.back = True  # what ready() says
        self.fail_next_collect = False

    def _apply(self, plan):
        """The plan's stream commands: streams are created or released only with nothing in
        flight; live changes are recorded with the plans in flight when they arrive."""
        if plan.new_streams or plan.finished_streams or plan.restarted_streams:
            assert not self.queue, "streams created or released with plans in flight"
        for sid in plan.finished_streams:
            self.streams.pop(sid, None)
        for start in plan.restarted_streams:
            self.updates.append((len(self.queue), ("restart", start.params.steps)))
        for start in (*plan.restarted_streams, *plan.new_streams):
            self.streams[start.stream_id] = start.params
        for update in plan.updated_streams:
            self.updates.append((len(self.queue), update.changed))
            self.streams[update.stream_id] = update.params

    def execute(self, plan, inputs):
        assert not self.queue, "execute with plans in flight"
        self.submit(plan, inputs)
        return self.collect()

    def submit(self, plan, inputs):
        self._apply(plan)
        self.queue.append((plan, inputs))
        self.max_in_flight = max(self.max_in_flight, len(self.queue))

    def ready(self):
        return self.back

    def collect(self):
        if self.fail_next_collect:
            self.fail_next_collect = False
            self.queue.clear()
            raise StreamsLost(list(self.streams), "stage died; replaced", True)
        plan, inputs = self.queue.popleft()
        outputs = {sid: StreamOutput(c.frames, c.metas) for sid, c in inputs.items()}
        return EngineStepResult(plan.step_id, 10.0, None, outputs=outputs, forwards=1)

    def resources(self):
        return {}

    def shutdown(self):
        pass


def make(depth=3):
    clock = FakeClock()
    executor = FakePipeline(depth)
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.0, 0.0)), max_streams=4)
    core = EngineCore(_cfg(), executor, scheduler=sched, clock=clock)
    return core, executor, clock


def _cfg():
    from streamdiff.config import load_config

    return load_config("tiny", [f"video.width={W}", f"video.height={H}", "runtime.device=cpu"])


def push_chunk(core, sid, first=False):
    for _ in range(5 if first else 4):
        core.push_frame(sid, np.zeros((H, W, 3), np.uint8))


def test_core_fills_the_pipeline_and_collects_the_oldest():
    core, ex, _ = make(3)
    cfg = core.cfg
    admission = core.add_stream("s", params(cfg, "p", steps=1), RELAXED)
    assert admission.lane_stride == 3 and core.params("s").lane_stride == 3  # D = depth
    push_chunk(core, "s", first=True)
    first = core.step()
    assert first.result is None and core.plans_in_flight == 1  # submitted, room left: no wait
    push_chunk(core, "s")
    assert core.step().result is None and core.plans_in_flight == 2
    push_chunk(core, "s")
    full = core.step()  # the third fills the pipeline: the oldest comes back
    assert full.result is not None and full.plan.step_id == first.plan.step_id and core.plans_in_flight == 2
    assert ex.max_in_flight == 3
    # Nothing new and the oldest not back: a non-blocking step returns; a blocking one collects.
    ex.back = False
    assert core.step(block=False) is None and core.plans_in_flight == 2
    assert core.step().result is not None and core.plans_in_flight == 1
    # A live prompt change does not drain; a steps change does.
    push_chunk(core, "s")
    core.step()
    assert core.plans_in_flight == 2
    core.update_params("s", prompt="q")
    assert core.plans_in_flight == 2 and ex.streams["s"].prompt == "p"  # waits for the next plan
    push_chunk(core, "s")
    report = core.step()  # the change rides with the plan submitted behind the two in flight
    assert ex.updates[-1] == (2, ("prompt",)) and ex.streams["s"].prompt == "q"
    assert core.plans_in_flight == 2 and report.result is not None
    assert [u.stream_id for u in ex.queue[-1][0].updated_streams] == ["s"]
    core.update_params("s", steps=2)
    assert ex.updates[-1] == (0, ("restart", 2)) and core.plans_in_flight == 0
    assert core.params("s").lane_stride == 3  # a restart keeps the stream's stride


def test_adding_and_removing_streams_drain_and_deliver():
    core, ex, _ = make(2)
    cfg = core.cfg
    core.add_stream("a", params(cfg, "p", steps=1), RELAXED)
    push_chunk(core, "a", first=True)
    core.step()
    assert core.plans_in_flight == 1
    core.add_stream("b", params(cfg, "p", steps=1), RELAXED)  # drains first (FakePipeline asserts)
    assert core.plans_in_flight == 0 and core.output_frames_waiting("a") == 5
    push_chunk(core, "a")
    push_chunk(core, "b", first=True)
    core.step()
    core.remove_stream("b")
    assert core.plans_in_flight == 0 and core.stream_ids == ["a"]


def test_a_lost_pipeline_fails_every_plan_in_flight_and_restarts_streams():
    core, ex, _ = make(3)
    cfg = core.cfg
    core.add_stream("s", params(cfg, "p", steps=1), RELAXED)
    push_chunk(core, "s", first=True)
    core.step()
    push_chunk(core, "s")
    core.step()
    assert core.plans_in_flight == 2
    ex.fail_next_collect = True
    core.step()  # nothing new: collect the oldest, which fails with the pipeline
    assert core.plans_in_flight == 0 and "replaced" in core.restarted["s"]
    assert core.scheduler.stats("s").chunks_planned == 0  # re-admitted afresh
    push_chunk(core, "s", first=True)  # next chunk is a first chunk again
    assert core.step().plan.chunks[0].first


def test_a_removed_stream_forgets_its_restart():
    """`restarted` (a stream's reason for its last restart after a failure) keeps only live
    streams: it would grow with every session that ever saw a pipeline failure, and a new stream
    reusing the id would read as restarted."""
    core, ex, _ = make(3)
    core.add_stream("s", params(core.cfg, "p", steps=1), RELAXED)
    push_chunk(core, "s", first=True)
    core.step()
    push_chunk(core, "s")
    core.step()
    ex.fail_next_collect = True
    core.step()  # the pipeline is lost: "s" restarts
    assert "s" in core.restarted
    core.remove_stream("s")
    assert "s" not in core.restarted
