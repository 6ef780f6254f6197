"""StagedExecutor: the engine's Executor over a chain of pipeline stages.

Owns: turning a StepPlan into forwards through the stages (the step's stream-batch forward,
then the denoise steps of first chunks, which depend on each other), carrying each forward's
flows back to the first stage with the next message, stream add / remove / live changes on
every stage, per-stage timing fed to the `Rebalancer` and the block moves it asks for, and
recovery when a stage fails (streams resume on a rebuilt pipeline with a fresh cache, or are
closed with the reason). Micro-batches: the two independent forwards of a step (steady rows
and the first denoise step of first chunks) are in flight together, one stage apart.
Does not own: where the stages run (a `Stages` transport: `InProcessStages` here, Ray actors
in ray_executor.py) or the model math (stage.py).

Equality with LocalExecutor holds by construction: the first stage runs the same StreamState
code as ModelRunner, the stages run the same blocks on the same slot plans, and flows are
applied before the stream's next forward. Only batched-VAE grouping may differ (per forward
instead of per step), which changes float rounding only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from streamdiff.config import Config
from streamdiff.engine.types import (
    ChunkInput,
    EngineStepResult,
    StreamOutput,
    StreamParams,
    StreamsLost,
    validate_changes,
)
from streamdiff.parallel.partition import Rebalancer, StageSample, moves, ranges
from streamdiff.parallel.stage import StageInput, StageSpec, StageWorker, StepOut
from streamdiff.scheduler.types import StepPlan

log = logging.getLogger(__name__)


class StageFailure(RuntimeError):
    """A stage died, hung past the step timeout, or raised."""


class Stages(Protocol):
    specs: list[StageSpec]

    def submit(self, msg: StageInput) -> object: ...

    def get(self, handle: object) -> StepOut: ...

    def call(self, index: int, method: str, *args) -> object: ...

    def recover(self) -> str: ...

    def shutdown(self) -> None: ...


class InProcessStages:
    """StageWorkers called one after another in this process (tests, and a reference for the
    Ray transport: same messages, no serialization)."""

    def __init__(self, cfg: Config, counts: list[int], device: str | None = None):
        self.specs = [StageSpec(k, len(counts), r) for k, r in enumerate(ranges(counts))]
        self.workers = [StageWorker(cfg, spec, device) for spec in self.specs]

    def submit(self, msg: StageInput) -> object:
        out = msg
        for worker in self.workers:
            out = worker.run(out)
        return out

    def get(self, handle: object) -> StepOut:
        return handle

    def call(self, index: int, method: str, *args) -> object:
        return getattr(self.workers[index], method)(*args)

    def recover(self) -> str:  # pragma: no cover - in-process stages do not die
        raise StageFailure("in-process stages cannot be rebuilt")

    def shutdown(self) -> None:
        self.workers.clear()


class StagedExecutor:
    def __init__(self, cfg: Config, stages: Stages, clock: Callable[[], float] = time.monotonic,
                 rebalance: bool | None = None):
        self.cfg = cfg
        self.stages = stages
        self.clock = clock
        par = cfg.parallel
        self.rebalance_enabled = par.rebalance if rebalance is None else rebalance
        self.rebalancer = Rebalancer(self.counts, par.rebalance_threshold, par.rebalance_after_steps)
        self.params: dict[str, StreamParams] = {}
        self._flows: list[tuple[tuple[int, int], object]] = []  # flows not yet at the first stage
        self.rebalances: list[tuple[list[int], list[int]]] = []  # (before, after) splits
        self.last_stage_ms: list[float] = []

    @property
    def num_stages(self) -> int:
        return len(self.stages.specs)

    @property
    def counts(self) -> list[int]:
        return [s.block_range[1] - s.block_range[0] for s in self.stages.specs]

    # -------------------------------------------------------------- streams

    def add_stream(self, stream_id: str, params: StreamParams) -> None:
        if stream_id in self.params:
            raise KeyError(f"stream {stream_id!r} already exists")
        added = []
        try:
            for k in range(self.num_stages):
                self.stages.call(k, "add_stream", stream_id, params)
                added.append(k)
        except BaseException:
            for k in added:
                self.stages.call(k, "remove_stream", stream_id)
            raise
        self.params[stream_id] = params

    def remove_stream(self, stream_id: str) -> None:
        if self.params.pop(stream_id, None) is None:
            return
        held = self.stages.call(0, "remove_stream", stream_id)
        for k in range(1, self.num_stages):
            self.stages.call(k, "remove_stream", stream_id)
            self.stages.call(k, "clear_slots", held)
        idle = getattr(self.stages, "idle", None)
        if not self.params and idle is not None:
            idle()  # nothing flows until the next stream: let the transport rest
    def update_stream(self, stream_id: str, changes: Mapping[str, object]) -> None:
        changes = validate_changes(changes)
        old = self.params[stream_id]
        params = old.with_changes(changes)
        self.params[stream_id] = params
        if params.steps != old.steps:
            held = self.stages.call(0, "restart_stream", stream_id, params)
            for k in range(1, self.num_stages):
                self.stages.call(k, "restart_stream", stream_id, params)
                self.stages.call(k, "clear_slots", held)
            return
        self.stages.call(0, "update_stream", stream_id, params, changes)

    # -------------------------------------------------------------- one step

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        t0 = time.perf_counter()
        chunks = {c.stream_id: inputs[c.stream_id] for c in plan.chunks if c.stream_id in self.params}
        preparing = any(c.first for c in plan.chunks if c.stream_id in self.params)
        steady_rows = sum(c.lanes for c in plan.chunks if not c.first and c.stream_id in self.params)
        try:
            outs = self._forwards(plan.step_id, chunks, preparing, self.micro_batches(steady_rows))
        except StageFailure as exc:
            raise self._recover(exc) from exc
        # 1. Collect finished frames; every forward's flows go to the first stage next time.
        outputs: dict[str, StreamOutput] = {}
        for out in outs:
            outputs.update(out.finished)
        forwards = sum(1 for out in outs if out.rows)
        self._observe(outs)
        step_ms = (time.perf_counter() - t0) * 1000.0
        return EngineStepResult(plan.step_id, step_ms, self.clock(), outputs=outputs, forwards=forwards)

    def micro_batches(self, steady_rows: int) -> int:
        """Micro-batches for a step's stream-batch rows: `parallel.micro_batches` (0: one per
        stage), at most one per row; 1 on a single stage."""
        if self.num_stages == 1 or steady_rows <= 1:
            return 1
        want = self.cfg.parallel.micro_batches or self.num_stages
        return max(1, min(want, steady_rows))

    def _forwards(self, step_id: int, chunks: dict[str, ChunkInput], preparing: bool, groups: int) -> list[StepOut]:
        """The step's forwards: the steady rows (the new chunks' encode rides on the first) in
        `groups` micro-batches, and when first chunks are in the plan their denoise steps, each
        needing the previous one's flows."""
        # 1. Rows of one step are independent: the micro-batches and the first prepare forward
        #    are all in flight, a stage apart. Results are taken in submission order (Ray
        #    counts an unread result as in flight).
        flows = self._take_flows()
        handles = [self.stages.submit(StageInput(step_id, g, "steady", chunks if g == 0 else {},
                                                 flows if g == 0 else [], group=g, groups=groups))
                   for g in range(groups)]
        prepare = self.stages.submit(StageInput(step_id, groups, "prepare")) if preparing else None
        outs = []
        for handle in handles:
            out = self.stages.get(handle)
            self._flows.append((out.key, out.flows))
            outs.append(out)
        if prepare is None:
            return outs
        # 2. Later denoise steps of the first chunks, each after the previous one's flows.
        out = self.stages.get(prepare)
        outs.append(out)
        while any(not r.finishes for r in out.rows):
            flows = [(out.key, out.flows)]
            out = self.stages.get(self.stages.submit(StageInput(step_id, out.key[1] + 1, "prepare", flows=flows)))
            outs.append(out)
        self._flows.append((out.key, out.flows))
        return outs

    def _take_flows(self) -> list:
        flows = [(key, f) for key, f in self._flows if f is not None]
        self._flows = []
        return flows

    # -------------------------------------------------------------- balance

    def _observe(self, outs: list[StepOut]) -> None:
        """Each stage's time over the step's forwards that carried rows -> the rebalancer."""
        ran = [out.stage_ms for out in outs if out.rows and len(out.stage_ms) == self.num_stages]
        if not ran:
            return
        samples = [StageSample(sum(f[k]["total"] for f in ran), sum(f[k]["blocks"] for f in ran),
                               int(ran[0][k]["num_blocks"])) for k in range(self.num_stages)]
        self.last_stage_ms = [s.total_ms for s in samples]
        self.rebalancer.observe(samples)
        if self.rebalance_enabled and (target := self.rebalancer.proposal()) is not None:
            self.repartition(target)

    def repartition(self, target: list[int]) -> None:
        """Move blocks (weights, K/V, prompt K/V) between neighbours until the split is `target`.
        Streams keep going: nothing is in flight between steps, and every layer's K/V moves."""
        before = self.counts
        for layer, src, dst in moves(before, target):
            package = self.stages.call(src, "give_blocks", [layer])
            self.stages.call(dst, "take_blocks", package)
        specs = [StageSpec(k, self.num_stages, r) for k, r in enumerate(ranges(target))]
        self.stages.specs[:] = specs
        self.rebalancer.reset(target)
        self.rebalances.append((before, list(target)))
        log.info("re-partitioned blocks %s -> %s (stage ms %s)", before, target,
                 [round(t, 1) for t in self.last_stage_ms])

    # -------------------------------------------------------------- faults

    def _recover(self, exc: StageFailure) -> StreamsLost:
        """Rebuild the pipeline; streams resume on it with a fresh cache, or are closed."""
        ids = list(self.params)
        self._flows = []
        try:
            what = self.stages.recover()  # replaced dead stages; survivors keep their blocks
            for k in range(self.num_stages):
                for stream_id in ids:
                    self.stages.call(k, "remove_stream", stream_id)
                self.stages.call(k, "clear_all")
            for stream_id in ids:
                for k in range(self.num_stages):
                    self.stages.call(k, "add_stream", stream_id, self.params[stream_id])
        except Exception as again:  # the pipeline could not be rebuilt: close the streams
            self.params.clear()
            return StreamsLost(ids, f"pipeline stage failed ({exc}) and could not be rebuilt ({again})", False)
        return StreamsLost(ids, f"pipeline stage failed ({exc}); {what}; streams restart with a fresh cache", True)

    # -------------------------------------------------------------- accounting

    def resources(self) -> dict[str, int]:
        infos = [self.stages.call(k, "info") for k in range(self.num_stages)]
        return {
            "streams": len(self.params),
            "stages": self.num_stages,
            "pool_bytes": sum(i["pool_bytes"] for i in infos),
            "stage_streams": max(i["streams"] for i in infos),
            "free_slots": self.stages.call(0, "free_slots"),
            "pending_flows": len(self._flows),
        }

    def shutdown(self) -> None:
        for stream_id in list(self.params):
            self.remove_stream(stream_id)
        self.stages.shutdown()


__all__ = ["InProcessStages", "StageFailure", "StagedExecutor", "Stages"]
