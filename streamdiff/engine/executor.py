"""Executors: where a StepPlan runs. The engine core talks only to this protocol.

Owns: the `Executor` protocol (add / remove / update a stream's model-side state, submit a plan
and collect the oldest one in flight, report resources, shut down) and `LocalExecutor`, which
runs a `ModelRunner` in this process and times each step. The staged executor (parallel/)
implements the same protocol with the runner split into pipeline stages and `depth` plans in
flight.
Does not own: scheduling, input buffers, output queues (core.py), the model math (model_runner.py).

Contract: calls come from one thread (the engine loop), one at a time. `submit` gets the plan
and, for every planned chunk, its input frames; `collect` returns the `EngineStepResult` of the
oldest plan submitted and not collected yet (the scheduler's `StepResult` - step id, step_ms,
end time - plus per-stream output frames). At most `depth` plans are in flight; `step_ms` is
the pipeline period the plan took (for depth 1: the step's wall time). `execute` = submit +
collect, for callers that run one plan at a time. Add / remove / steps changes come only when
nothing is in flight (the core drains first); other live changes may come at any time and
apply from the stream's next chunk submitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from streamdiff.config import Config
from streamdiff.engine.types import ChunkInput, EngineStepResult, StreamParams
from streamdiff.scheduler.types import StepPlan


@runtime_checkable
class Executor(Protocol):
    def add_stream(self, stream_id: str, params: StreamParams) -> None:
        """Create the stream's model-side state (KV lanes, VAE caches, prompt K/V)."""

    def remove_stream(self, stream_id: str) -> None:
        """Free everything the stream holds. Unknown ids are ignored."""

    def update_stream(self, stream_id: str, changes: Mapping[str, object]) -> None:
        """Apply validated live changes (prompt, steps, seed, noise_strength, motion_aware)."""

    @property
    def depth(self) -> int:
        """Plans that may be in flight at once (1: every submit is collected before the next)."""

    def submit(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> None:
        """Start one plan: every planned chunk, its frames in `inputs[stream_id]`."""

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

    def add_stream(self, stream_id: str, params: StreamParams) -> None:
        self.runner.add_stream(stream_id, params)

    def remove_stream(self, stream_id: str) -> None:
        self.runner.remove_stream(stream_id)

    def update_stream(self, stream_id: str, changes: Mapping[str, object]) -> None:
        self.runner.update_stream(stream_id, changes)

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
        for stream_id in list(self.runner.streams):
            self.runner.remove_stream(stream_id)


__all__ = ["Executor", "LocalExecutor"]
