"""Executors: where a StepPlan runs. The engine core talks only to this protocol.

Owns: the `Executor` protocol (execute one plan, its stream commands included; report
resources; shut down) and `LocalExecutor`, which runs a `ModelRunner` in this
process and times each step. A Ray executor (parallel/) implements the same protocol with the
runner split into pipeline stages.
Does not own: scheduling, input buffers, output queues (core.py), the model math (model_runner.py).

Contract: calls come from one thread (the engine loop), one at a time. `execute` first applies
the plan's stream commands (new / finished / restarted / updated streams, on the KV lanes the
scheduler allocated; a plan with no chunks carries only commands), then gets, for every
planned chunk, its input frames; it returns an `EngineStepResult` (the scheduler's `StepResult` - step id, measured step_ms, end time - plus per-stream output frames).
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
    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        """Apply the plan's stream commands, then run every planned chunk, its frames in
        `inputs[stream_id]`."""

    def resources(self) -> dict[str, int]:
        """Counters of what the executor holds (streams, free KV slots, ...)."""

    def shutdown(self) -> None:
        """Release the model and the pool."""


class LocalExecutor:
    """The ModelRunner in this process. `clock` is the engine's monotonic clock (end_s)."""

    def __init__(self, runner, clock: Callable[[], float] = time.monotonic):
        self.runner = runner
        self.clock = clock

    @classmethod
    def from_config(cls, cfg: Config, clock: Callable[[], float] = time.monotonic) -> "LocalExecutor":
        from streamdiff.engine.model_runner import ModelRunner
        from streamdiff.model.build import build_components

        return cls(ModelRunner(build_components(cfg)), clock)

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        t0 = time.perf_counter()
        outputs, forwards = self.runner.execute(plan, inputs)
        step_ms = (time.perf_counter() - t0) * 1000.0
        return EngineStepResult(plan.step_id, step_ms, self.clock(), outputs=outputs, forwards=forwards)

    def resources(self) -> dict[str, int]:
        return self.runner.resources()

    def shutdown(self) -> None:
        for stream_id in list(self.runner.params):
            self.runner.remove_stream(stream_id)


__all__ = ["Executor", "LocalExecutor"]
