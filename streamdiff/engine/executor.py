"""Executors: where a StepPlan runs. The engine core talks only to this protocol.

Owns: the `Executor` protocol (submit a plan, its stream commands included, and collect the
oldest one in flight; report resources; shut down) and `LocalExecutor`, which runs a
`ModelRunner` in this process and times each step. The staged executor (parallel/) implements
the same protocol with the runner split into pipeline stages and `depth` plans in flight.
Does not own: scheduling, input buffers, output queues (core.py), the model math (model_runner.py).

Contract: calls come from one thread (the engine loop), one at a time. `submit` gets the plan
and, for every planned chunk, its input frames; the plan's stream commands (new / finished /
restarted / updated streams, on the KV lanes the scheduler allocated; a plan with no chunks
carries only commands) apply before its chunks start. `collect` returns the `EngineStepResult`
of the oldest plan submitted and not collected yet (the scheduler's `StepResult` - step id,
step_ms, end time - plus per-stream output frames). At most `depth` plans are in flight;
`step_ms` is the pipeline period the plan took (for depth 1: the step's wall time). `execute` =
submit + collect, for callers that run one plan at a time (the core's commands-only plans).
New, finished and restarted streams come only when nothing is in flight (the core drains
first); updated streams may ride in any plan and apply from the stream's chunk in that plan on.
There is no other way to change a stream than a command in a plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from streamdiff.config import Config
from streamdiff.engine.types import ChunkInput, EngineStepResult
from streamdiff.scheduler.types import StepPlan


@runtime_checkable
class Executor(Protocol):
    @property
    def depth(self) -> int:
        """Plans that may be in flight at once (1: every submit is collected before the next)."""

    def submit(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> None:
        """Start one plan: apply its stream commands, then every planned chunk, its frames in
        `inputs[stream_id]`."""

    def collect(self) -> EngineStepResult:
        """Wait for the oldest plan in flight and return its result."""

    def ready(self) -> bool:
        """Whether `collect` would return without waiting (optional; absent means True)."""

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        """submit + collect (nothing else in flight)."""

    def resources(self) -> dict[str, int]:
        """Counters of what the executor holds (streams, free KV slots, ...)."""

    def shutdown(self) -> None:
        """Release the model and the pool."""


class RunsAtOnce:
    """Depth 1 for an executor that runs a plan in one call (`execute`): `submit` runs it,
    `collect` hands the result over. For fakes and measuring stubs; LocalExecutor times its own."""

    depth = 1
    _held: EngineStepResult | None = None

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:  # pragma: no cover
        raise NotImplementedError

    def submit(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> None:
        if self._held is not None:
            raise RuntimeError("depth 1: collect the plan in flight first")
        self._held = self.execute(plan, inputs)

    def collect(self) -> EngineStepResult:
        held, self._held = self._held, None
        if held is None:
            raise RuntimeError("no plan in flight")
        return held


class LocalExecutor:
    """The ModelRunner in this process. `clock` is the engine's monotonic clock (end_s)."""

    depth = 1

    def __init__(self, runner, clock: Callable[[], float] = time.monotonic):
        self.runner = runner
        self.clock = clock
        self._done: EngineStepResult | None = None

    @classmethod
    def from_config(cls, cfg: Config, clock: Callable[[], float] = time.monotonic) -> "LocalExecutor":
        from streamdiff.engine.model_runner import ModelRunner
        from streamdiff.model.build import build_components

        return cls(ModelRunner(build_components(cfg)), clock)

    def submit(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> None:
        if self._done is not None:
            raise RuntimeError("LocalExecutor has depth 1: collect the plan in flight first")
        t0 = time.perf_counter()
        outputs, forwards = self.runner.execute(plan, inputs)
        step_ms = (time.perf_counter() - t0) * 1000.0
        self._done = EngineStepResult(plan.step_id, step_ms, self.clock(), outputs=outputs, forwards=forwards)

    def collect(self) -> EngineStepResult:
        done, self._done = self._done, None
        if done is None:
            raise RuntimeError("no plan in flight")
        return done

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        self.submit(plan, inputs)
        return self.collect()

    def resources(self) -> dict[str, int]:
        return self.runner.resources()

    def shutdown(self) -> None:
        self._done = None
        for stream_id in list(self.runner.params):
            self.runner.remove_stream(stream_id)


__all__ = ["Executor", "LocalExecutor", "RunsAtOnce"]
