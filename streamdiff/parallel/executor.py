"""StagedExecutor: the engine's Executor over a chain of pipeline stages, plans overlapping.

Owns: turning a StepPlan into forwards through the stages, up to `depth` (= stages) plans in
flight and collected oldest first; carrying each forward's flows back to the first stage with
a later message (a stream has at most D chunks in flight, its lane stride, so the flows of its
forward p are back before its forward p + D needs them); live changes riding with the next
forward (`StageInput.updates`); stream add / remove / steps changes on every stage (with nothing
in flight); per-stage timing fed to the `Rebalancer` and the block moves it asks for (the
forwards in flight are taken in first); and recovery when a stage fails (every plan in flight
is lost; streams resume on a rebuilt pipeline with a fresh cache, or are closed).
A plan with first chunks runs to the end at submit (their denoise steps need each other's
flows), after taking in the forwards in flight. `micro_batches` > 1 splits a plan's rows into
forwards one stage apart.
Does not own: where the stages run (a `Stages` transport: in-process ones in transport.py, Ray
actors in ray_executor.py) or the model math (stage.py).

Equality with LocalExecutor holds by construction: the first stage runs the same StreamState
code as ModelRunner, the stages run the same blocks on the same slot plans in the same order,
and flows are applied before the lane they feed is needed. With a lane stride D > 1 the frames
are those of D = 1, (steps - 1)(D - 1) chunks later. Only batched-VAE grouping may differ (per
forward instead of per step), which changes float rounding only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
from streamdiff.parallel.stage import StageInput, StageSpec, StepOut
from streamdiff.parallel.transport import InProcessStages, StageFailure, Stages, ThreadedStages, TickStages
from streamdiff.scheduler.types import StepPlan

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Plan:
    """A plan in flight: its forwards' handles until collected (then their outputs)."""

    plan: StepPlan
    t0: float
    handles: list
    outs: list[StepOut] | None = None
    wall_ms: float | None = None  # plans run to the end at submit (first chunks): their wall time


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
        self._updates: list[tuple[str, StreamParams, bool]] = []  # live changes for the next forward
        self._in_flight: deque[_Plan] = deque()
        self.peak_in_flight = 0  # the most plans in flight at once so far
        self.stage_busy_ms = [0.0] * self.num_stages  # each stage's time running forwards, so far
        self.rebalances: list[tuple[list[int], list[int]]] = []  # (before, after) splits
        self.last_stage_ms: list[float] = []

    @property
    def num_stages(self) -> int:
        return len(self.stages.specs)

    @property
    def depth(self) -> int:
        """Plans in flight at most: one per stage (plan p + 1 enters stage 0 as p enters stage 1)."""
        return self.num_stages

    @property
    def counts(self) -> list[int]:
        return [s.block_range[1] - s.block_range[0] for s in self.stages.specs]

    # -------------------------------------------------------------- streams

    def add_stream(self, stream_id: str, params: StreamParams) -> None:
        if stream_id in self.params:
            raise KeyError(f"stream {stream_id!r} already exists")
        self._drain()
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
        self._drain()
        self._updates = [u for u in self._updates if u[0] != stream_id]
        held = self.stages.call(0, "remove_stream", stream_id)
        for k in range(1, self.num_stages):
            self.stages.call(k, "remove_stream", stream_id)
            self.stages.call(k, "clear_slots", held)
        idle = getattr(self.stages, "idle", None)
        if not self.params and idle is not None:
            idle()  # nothing flows until the next stream: let the transport rest

    def update_stream(self, stream_id: str, changes: Mapping[str, object]) -> None:
        """A steps change restarts the stream on every stage (after the plans in flight are
        back); other live changes ride with the next forward (`StageInput.updates`)."""
        changes = validate_changes(changes)
        old = self.params[stream_id]
        params = old.with_changes(changes)
        self.params[stream_id] = params
        if params.steps != old.steps:
            self._drain()
            self._updates = [u for u in self._updates if u[0] != stream_id]
            held = self.stages.call(0, "restart_stream", stream_id, params)
            for k in range(1, self.num_stages):
                self.stages.call(k, "restart_stream", stream_id, params)
                self.stages.call(k, "clear_slots", held)
            return
        self._updates.append((stream_id, params, "prompt" in changes))

    # -------------------------------------------------------------- plans

    def submit(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> None:
        """Start a plan's forwards. Steady plans just enter the pipeline (up to `depth` in
        flight); a plan with first chunks first takes in every forward in flight, since its
        denoise steps run one after another, each needing the previous one's flows."""
        t0 = time.perf_counter()
        chunks = {c.stream_id: inputs[c.stream_id] for c in plan.chunks if c.stream_id in self.params}
        preparing = any(c.first for c in plan.chunks if c.stream_id in self.params)
        steady_rows = sum(c.lanes for c in plan.chunks if not c.first and c.stream_id in self.params)
        overlapping = any(self.params[c.stream_id].lane_stride > 1 for c in plan.chunks
                          if not c.first and c.stream_id in self.params)
        groups = self.micro_batches(steady_rows, overlapping)
        try:
            if preparing:
                self._fetch_all()
                outs = self._forwards(plan.step_id, chunks, True, groups)
                self._in_flight.append(_Plan(plan, t0, [], outs, (time.perf_counter() - t0) * 1000.0))
                return
            flows, updates = self._take_flows(), self._take_updates()
            handles = [self.stages.submit(StageInput(plan.step_id, g, "steady", chunks if g == 0 else {},
                                                     flows if g == 0 else [], group=g, groups=groups,
                                                     updates=updates if g == 0 else []))
                       for g in range(groups)]
        except StageFailure as exc:
            raise self._recover(exc) from exc
        self._in_flight.append(_Plan(plan, t0, handles))
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))

    def collect(self) -> EngineStepResult:
        """The oldest plan's result. `step_ms` is the pipeline period it took: its slowest stage
        (a plan run to the end at submit: its wall time)."""
        if not self._in_flight:
            raise RuntimeError("no plan in flight")
        try:
            entry = self._in_flight[0]
            outs = self._fetch(entry)
            self._in_flight.popleft()
            # 1. Finished frames; every forward's flows went to `_flows` (the next forward takes them).
            outputs: dict[str, StreamOutput] = {}
            for out in outs:
                outputs.update(out.finished)
            forwards = sum(1 for out in outs if out.rows)
            period_ms = self._observe(outs)
        except StageFailure as exc:
            raise self._recover(exc) from exc
        step_ms = entry.wall_ms if entry.wall_ms is not None or period_ms is None else period_ms
        if step_ms is None:
            step_ms = (time.perf_counter() - entry.t0) * 1000.0
        return EngineStepResult(entry.plan.step_id, step_ms, self.clock(), outputs=outputs, forwards=forwards)

    def ready(self) -> bool:
        """Whether the oldest plan's forwards are back (transports that cannot tell: True)."""
        if not self._in_flight or self._in_flight[0].outs is not None:
            return True
        done = getattr(self.stages, "ready", None)
        return done is None or all(done(h) for h in self._in_flight[0].handles)

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        self._drain()
        self.submit(plan, inputs)
        return self.collect()

    def _fetch(self, entry: _Plan) -> list[StepOut]:
        """Read a plan's forwards (in submission order: Ray counts an unread result as in flight)."""
        if entry.outs is None:
            outs = []
            for handle in entry.handles:
                out = self.stages.get(handle)
                self._flows.append((out.key, out.flows))
                outs.append(out)
            entry.outs = outs
        return entry.outs

    def _fetch_all(self) -> None:
        """Take in every forward in flight (their plans stay to be collected)."""
        for entry in self._in_flight:
            self._fetch(entry)

    def _drain(self) -> None:
        """Nothing may be in flight here (add / remove / restart on every stage): the engine
        collects first; a direct caller gets its forwards taken in (results kept for collect)."""
        try:
            self._fetch_all()
        except StageFailure as exc:
            raise self._recover(exc) from exc

    def micro_batches(self, steady_rows: int, overlapping: bool = True) -> int:
        """Forwards for a plan's stream-batch rows: `parallel.micro_batches`, at most one per
        row, 1 on a single stage. 0 = automatic: one when the plan's streams overlap plans (a
        lane stride > 1 keeps the stages busy, and every extra forward costs a pass through
        each stage), one per stage when none does (stride-1 streams cannot overlap plans, so
        their rows fill the pipeline instead)."""
        if self.num_stages == 1 or steady_rows <= 1:
            return 1
        want = self.cfg.parallel.micro_batches or (1 if overlapping else self.num_stages)
        return max(1, min(want, steady_rows))

    def _forwards(self, step_id: int, chunks: dict[str, ChunkInput], preparing: bool, groups: int) -> list[StepOut]:
        """A plan run to the end: the steady rows (the new chunks' encode rides on the first) in
        `groups` micro-batches, and when first chunks are in the plan their denoise steps, each
        needing the previous one's flows."""
        # 1. Rows of one plan are independent: the micro-batches and the first prepare forward
        #    are all in flight, a stage apart. Results are taken in submission order.
        flows, updates = self._take_flows(), self._take_updates()
        handles = [self.stages.submit(StageInput(step_id, g, "steady", chunks if g == 0 else {},
                                                 flows if g == 0 else [], group=g, groups=groups,
                                                 updates=updates if g == 0 else []))
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

    def _take_updates(self) -> list:
        updates, self._updates = self._updates, []
        return updates

    # -------------------------------------------------------------- balance

    def _observe(self, outs: list[StepOut]) -> float | None:
        """Each stage's time over the plan's forwards that carried rows -> the rebalancer.
        Returns the slowest stage's time (the pipeline period the plan took), None if no rows."""
        ran = [out.stage_ms for out in outs if out.rows and len(out.stage_ms) == self.num_stages]
        if not ran:
            return None
        samples = [StageSample(sum(f[k]["total"] for f in ran), sum(f[k]["blocks"] for f in ran),
                               int(ran[0][k]["num_blocks"])) for k in range(self.num_stages)]
        self.last_stage_ms = [s.total_ms for s in samples]
        self.stage_busy_ms = [busy + t for busy, t in zip(self.stage_busy_ms, self.last_stage_ms)]
        self.rebalancer.observe(samples)
        if self.rebalance_enabled and (target := self.rebalancer.proposal()) is not None:
            self.repartition(target)
        return max(self.last_stage_ms)

    def repartition(self, target: list[int]) -> None:
        """Move blocks (weights, K/V, prompt K/V) between neighbours until the split is `target`.
        Streams keep going: the forwards in flight are taken in first (their plans stay to be
        collected), and every layer's K/V moves."""
        self._fetch_all()
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
        self._flows, self._updates = [], []
        self._in_flight.clear()  # every plan in flight is lost with the pipeline
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
            "plans_in_flight": len(self._in_flight),
        }

    def shutdown(self) -> None:
        try:
            self._fetch_all()
        except StageFailure:
            log.warning("a stage failed while shutting down", exc_info=True)
        self._in_flight.clear()
        for stream_id in list(self.params):
            self.remove_stream(stream_id)
        self.stages.shutdown()


__all__ = ["InProcessStages", "StageFailure", "StagedExecutor", "Stages", "ThreadedStages", "TickStages"]
