"""StagedExecutor: the engine's Executor over a chain of pipeline stages.

Owns: turning a StepPlan into forwards through the stages (the step's stream-batch forward,
then the denoise steps of first chunks, which depend on each other), carrying each forward's
flows back to the first stage with the next message, the plan's stream commands (they ride
in the step's first message and every stage applies them), per-stage timing fed to the
`Rebalancer` and the block moves it asks for, and recovery when a stage fails (streams resume
on a rebuilt pipeline with a fresh cache, or are closed with the reason). Micro-batches: the two independent forwards of a step (steady rows
and the first denoise step of first chunks) are in flight together, one stage apart.
Does not own: where the stages run (a `Stages` transport: `InProcessStages` here, Ray actors
in ray_executor.py) or the model math (engine/model_runner.py, one runner per stage).

Equality with LocalExecutor holds by construction: every stage is the same ModelRunner with its
stage spec, the first runs the same StreamState code, the stages run the same blocks on the same slot plans, and flows are
applied before the stream's next forward. Only batched-VAE grouping may differ (per forward
instead of per step), which changes float rounding only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from streamdiff.config import Config
from streamdiff.engine.types import ChunkInput, EngineStepResult, StreamOutput, StreamsLost
from streamdiff.parallel.messages import stage_specs
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
        self.specs = stage_specs(ranges(counts), cfg.parallel.vae_stages)
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
        self.params: dict[str, object] = {}  # the streams the stages hold (from the plans' commands)
        self._flows: list[tuple[tuple[int, int], object]] = []  # flows not yet at the first stage
        self.rebalances: list[tuple[list[int], list[int]]] = []  # (before, after) splits
        self.last_stage_ms: list[float] = []

    @property
    def num_stages(self) -> int:
        return len(self.stages.specs)

    @property
    def dit_stages(self) -> list[int]:
        """Indices of the stages that hold blocks (VAE stages hold none)."""
        return [k for k, s in enumerate(self.stages.specs) if s.has_blocks]

    @property
    def counts(self) -> list[int]:
        return [self.stages.specs[k].num_blocks for k in self.dit_stages]

    # -------------------------------------------------------------- one step

    def _track(self, plan: StepPlan) -> None:
        """The streams the stages hold once they applied the plan's commands."""
        for stream_id in plan.finished_streams:
            self.params.pop(stream_id, None)
        for start in (*plan.restarted_streams, *plan.new_streams):
            self.params[start.stream_id] = start.params
        for update in plan.updated_streams:
            if update.stream_id in self.params:
                self.params[update.stream_id] = update.params

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        t0 = time.perf_counter()
        if not plan.chunks and not (plan.new_streams or plan.restarted_streams or plan.updated_streams) \
                and not any(sid in self.params for sid in plan.finished_streams):
            return EngineStepResult(plan.step_id, 0.0, self.clock())  # nothing for the stages
        self._track(plan)
        chunks = {c.stream_id: inputs[c.stream_id] for c in plan.chunks if c.stream_id in self.params}
        preparing = any(c.first for c in plan.chunks if c.stream_id in self.params)
        steady_rows = sum(c.lanes for c in plan.chunks if not c.first and c.stream_id in self.params)
        try:
            outs = self._forwards(plan, chunks, preparing, self.micro_batches(steady_rows))
        except StageFailure as exc:
            raise self._recover(exc) from exc
        idle = getattr(self.stages, "idle", None)
        if not self.params and plan.finished_streams and idle is not None:
            idle()  # nothing flows until the next stream: let the transport rest
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

    def _forwards(self, plan: StepPlan, chunks: dict[str, ChunkInput], preparing: bool, groups: int) -> list[StepOut]:
        """The step's forwards: the steady rows (the new chunks' encode rides on the first) in
        `groups` micro-batches, and when first chunks are in the plan their denoise steps, each
        needing the previous one's flows."""
        # 1. Rows of one step are independent: the micro-batches and the first prepare forward
        #    are all in flight, a stage apart. Results are taken in submission order (Ray
        #    counts an unread result as in flight).
        step_id = plan.step_id
        flows = self._take_flows()
        commands = plan if plan.has_commands else None  # every stage applies them before the forward
        handles = [self.stages.submit(StageInput(step_id, g, "steady", chunks if g == 0 else {},
                                                 flows if g == 0 else [], group=g, groups=groups,
                                                 plan=commands if g == 0 else None))
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
        dit = self.dit_stages  # VAE stages hold no blocks: their time is a floor for any split
        vae_ms = [samples[k].total_ms for k in range(self.num_stages) if k not in dit]
        self.rebalancer.observe([samples[k] for k in dit], floor_ms=max(vae_ms, default=0.0))
        if self.rebalance_enabled and (target := self.rebalancer.proposal()) is not None:
            self.repartition(target)

    def repartition(self, target: list[int]) -> None:
        """Move blocks (weights, K/V, prompt K/V) between neighbours until the split is `target`.
        Streams keep going: nothing is in flight between steps, and every layer's K/V moves."""
        before, dit = self.counts, self.dit_stages
        for layer, src, dst in moves(before, target):
            package = self.stages.call(dit[src], "give_blocks", [layer])
            self.stages.call(dit[dst], "take_blocks", package)
        self.stages.specs[:] = stage_specs(ranges(target), len(dit) < self.num_stages)
        self.rebalancer.reset(target)
        self.rebalances.append((before, list(target)))
        log.info("re-partitioned blocks %s -> %s (stage ms %s)", before, target,
                 [round(t, 1) for t in self.last_stage_ms])

    # -------------------------------------------------------------- faults

    def _recover(self, exc: StageFailure) -> StreamsLost:
        """Rebuild the pipeline with no stream on it; the engine core restarts the streams (a
        restarted-streams command in its next plan: fresh cache), or they are closed."""
        ids = list(self.params)
        self._flows = []
        self.params.clear()
        try:
            what = self.stages.recover()  # replaced dead stages; survivors keep their blocks
            for k in range(self.num_stages):
                self.stages.call(k, "clear_all")
        except Exception as again:  # the pipeline could not be rebuilt: close the streams
            for k in range(self.num_stages):  # survivors forget them (best effort)
                try:
                    self.stages.call(k, "clear_all")
                except Exception:
                    log.debug("clear_all on stage %d", k, exc_info=True)
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
            "free_slots": self.stages.call(self.dit_stages[0], "free_slots"),
            "pending_flows": len(self._flows),
        }

    def shutdown(self) -> None:
        self.params.clear()
        self.stages.shutdown()


__all__ = ["InProcessStages", "StageFailure", "StagedExecutor", "Stages"]
