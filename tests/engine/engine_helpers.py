"""Engine test helpers: a fake clock, a fake executor, and a deterministic driver that feeds
chunk-sized pushes and steps the core until idle (fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np

from streamdiff.engine import EngineCore, EngineStepResult, LocalExecutor, StreamOutput, StreamParams
from streamdiff.engine.executor import RunsAtOnce
from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw, StreamSLO

W, H = 64, 48
RELAXED = StreamSLO(target_fps=7.5, deadline_ms=1e6)  # every stream admitted, every chunk on time


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def params(cfg, prompt: str, **changes) -> StreamParams:
    return StreamParams.defaults(cfg, prompt).with_changes(changes)


def model_core(comps, clock: FakeClock, max_streams: int = 4) -> EngineCore:
    """EngineCore over the real ModelRunner; a fixed cost model keeps the plans deterministic."""
    from streamdiff.engine.model_runner import ModelRunner

    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.1, 0.0)), max_streams=max_streams)
    return EngineCore(comps.cfg, LocalExecutor(ModelRunner(comps, max_streams), clock), scheduler=sched, clock=clock)


class Feeder:
    """Feeds each stream's clip one chunk at a time (5 frames first, then 4), pts = frame index,
    steps the core until nothing is ready, advances the clock by one chunk period per round,
    and collects every stream's output frames."""

    def __init__(self, core: EngineCore, clock: FakeClock, clips: dict[str, np.ndarray]):
        self.core, self.clock, self.clips = core, clock, clips
        self.pos = {sid: 0 for sid in clips}
        self.outputs: dict[str, list] = {sid: [] for sid in clips}
        self.reports = []

    def feed(self, sid: str, n: int | None = None) -> None:
        n = n if n is not None else (5 if self.pos[sid] == 0 else 4)
        for _ in range(n):
            self.core.push_frame(sid, self.clips[sid][self.pos[sid]], pts=self.pos[sid])
            self.pos[sid] += 1

    def round(self, sids=None) -> None:
        for sid in sids if sids is not None else list(self.clips):
            self.feed(sid)
        self.drain()
        self.clock.t += 4 / 30

    def drain(self) -> None:
        while (report := self.core.step()) is not None:
            self.reports.append(report)
        for sid in self.outputs:
            if sid in self.core.stream_ids:
                self.outputs[sid] += self.core.pop_outputs(sid)

    def frames(self, sid: str) -> np.ndarray:
        return np.stack([o.frame for o in self.outputs[sid]])


class FakeExecutor(RunsAtOnce):
    """Echoes each chunk's input frames as its output after `step_ms` of fake time (one lane:
    no lag). Implements the Executor protocol."""

    def __init__(self, clock: FakeClock, step_ms: float):
        self.clock, self.step_ms = clock, step_ms
        self.streams: dict[str, StreamParams] = {}
        self.executed = 0

    def apply(self, plan):
        """The plan's stream commands, as every executor applies them."""
        for sid in plan.finished_streams:
            self.streams.pop(sid, None)
        for start in (*plan.restarted_streams, *plan.new_streams):
            self.streams[start.stream_id] = start.params
        for update in plan.updated_streams:
            self.streams[update.stream_id] = update.params

    def execute(self, plan, inputs):
        self.apply(plan)
        if not plan.chunks:  # commands only
            return EngineStepResult(plan.step_id, 0.0, self.clock.t)
        self.executed += 1
        self.clock.t += self.step_ms / 1000.0
        outputs = {sid: StreamOutput(chunk.frames, chunk.metas) for sid, chunk in inputs.items()}
        return EngineStepResult(plan.step_id, self.step_ms, self.clock.t, outputs=outputs, forwards=1)

    def resources(self):
        return {"streams": len(self.streams)}

    def shutdown(self):
        self.streams.clear()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max()) if a.size else 0
