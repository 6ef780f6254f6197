"""StagedExecutor: the engine's Executor over a chain of pipeline stages, plans overlapping.

Owns: turning a StepPlan into forwards through the stages, up to `depth` (= stages) plans in
flight and collected oldest first; carrying each forward's flows back to the first stage with
a later message (a stream has at most D chunks in flight, its lane stride, so the flows of its
forward p are back before its forward p + D needs them); the plan's stream commands (they ride
in the plan's first message and every stage applies them before that forward: live changes
thus apply from the chunk that plan starts on, never racing a plan in flight); per-stage timing
fed to the `Rebalancer` and the block moves it asks for (the forwards in flight are taken in
first); and recovery when a stage fails (every plan in flight is lost; the stages are cleared
and the engine core re-creates the streams as restarted, or closes them).
A plan with first chunks, or with new / finished / restarted streams, first takes in the
forwards in flight (the core drains before such commands anyway); a plan with first chunks
then runs to the end at submit (their denoise steps need each other's flows).
`micro_batches` > 1 splits a plan's rows into forwards one stage apart.
Does not own: where the stages run (a `Stages` transport: in-process ones in transport.py, Ray
actors in ray_executor.py) or the model math (engine/model_runner.py, one runner per stage).

Equality with LocalExecutor holds by construction: every stage is the same ModelRunner with its
stage spec, the first runs the same StreamState code, the stages run the same blocks on the
same slot plans in the same order, and flows are applied before the lane they feed is needed.
With a lane stride D > 1 the frames are those of D = 1, (steps - 1)(D - 1) chunks later. Only
batched-VAE grouping may differ (per forward instead of per step), which changes float
rounding only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from streamdiff.config import Config
from streamdiff.engine.types import ChunkInput, EngineStepResult, StreamOutput, StreamParams, StreamsLost
from streamdiff.model.loading import first_line
from streamdiff.parallel.messages import stage_specs
from streamdiff.parallel.partition import Rebalancer, StageSample, moves, ranges
from streamdiff.parallel.stage import StageInput, StepOut
from streamdiff.parallel.transport import (
    InProcessStages,
    StageFailure,
    Stages,
    StreamsNotRestarted,
    ThreadedStages,
    TickStages,
)
from streamdiff.scheduler.types import StepPlan

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Plan:
    """A plan in flight: its forwards' handles until collected (then their outputs)."""

    plan: StepPlan
    t0: float
    handles: list
    outs: list[StepOut] | None = None
    wall_ms: float | None = None  # a plan with nothing for the stages: 0 (its step took no time)


def pipeline_period_ms(stage_ms: list[float], shared_cores: int | None = None) -> float:
    """How often a pipeline of stages taking `stage_ms` each can take a new forward: its slowest
    stage; when the stages share `shared_cores` CPU cores (threads on one CPU), no less than
    their summed work spread over those cores."""
    period = max(stage_ms)
    return max(period, sum(stage_ms) / shared_cores) if shared_cores else period


def cpu_period_ms(stage_cpu_ms: list[float], free_cores: float, helper_ms: float = 0.0) -> float:
    """The period of stages that share a CPU, from their CPU time: their summed work and their
    helpers' for the plan (`helper_ms`: the codecs' of its chunks) over the cores they had
    (`free_cores`), no less than the busiest stage's (one thread, one core)."""
    return max(max(stage_cpu_ms), (sum(stage_cpu_ms) + helper_ms) / free_cores)


class StagedExecutor:
    def __init__(self, cfg: Config, stages: Stages, clock: Callable[[], float] = time.monotonic,
                 rebalance: bool | None = None):
        self.cfg = cfg
        self.stages = stages
        self.clock = clock
        par = cfg.parallel
        self.rebalance_enabled = par.rebalance if rebalance is None else rebalance
        self.rebalancer = Rebalancer(self.counts, par.rebalance_threshold, par.rebalance_after_steps)
        self.params: dict[str, StreamParams] = {}  # the streams the stages hold (from the plans' commands)
        self._flows: list[tuple[tuple[int, int], object]] = []  # flows not yet at the first stage
        self._in_flight: deque[_Plan] = deque()
        self.peak_in_flight = 0  # the most plans in flight at once so far
        self.stage_busy_ms = [0.0] * self.num_stages  # each stage's time running forwards, so far
        self.chunks_done = 0  # streams' chunks through the stages, so far (the core meter's count)
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
    def period_depth(self) -> int:
        """The periods a plan's way through the stages takes, as the scheduler reasons (a plan
        ends `period_depth` periods after it starts): the stages, or for stages that share a
        CPU's cores the cores, when fewer. There the period is the plans' CPU work over the
        cores (`cpu_period_ms`, `pipeline_period_ms`), and a plan alone in the pipeline takes its
        whole work on one core at a time, cores x period, not stages x period: with 3 stage
        threads on 2 cores, 2 plans in flight keep both cores busy and a stream of lane stride
        2 gets a chunk every period (served demo: 30 fps out of 30, told 12.5 with 3 / 2 periods)."""
        shared = self.stages.shared_cores
        return max(1, min(self.num_stages, shared)) if shared else self.num_stages

    @property
    def dit_stages(self) -> list[int]:
        """Indices of the stages that hold blocks (VAE stages hold none)."""
        return [k for k, s in enumerate(self.stages.specs) if s.has_blocks]

    @property
    def counts(self) -> list[int]:
        return [self.stages.specs[k].num_blocks for k in self.dit_stages]

    # -------------------------------------------------------------- plans

    def _track(self, plan: StepPlan) -> None:
        """The streams the stages hold once they applied the plan's commands."""
        for stream_id in plan.finished_streams:
            self.params.pop(stream_id, None)
        for start in (*plan.restarted_streams, *plan.new_streams):
            self.params[start.stream_id] = start.params
        for update in plan.updated_streams:
            if update.stream_id in self.params:
                self.params[update.stream_id] = update.params

    def submit(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> None:
        """Start a plan's forwards. Steady plans just enter the pipeline (up to `depth` in
        flight); a plan with first chunks first takes in every forward in flight, since its
        denoise steps run one after another, each needing the previous one's flows."""
        t0 = time.perf_counter()
        if not plan.chunks and not (plan.new_streams or plan.restarted_streams or plan.updated_streams) \
                and not any(sid in self.params for sid in plan.finished_streams):
            self._in_flight.append(_Plan(plan, t0, [], [], 0.0))  # nothing for the stages
            return
        try:
            if plan.new_streams or plan.finished_streams or plan.restarted_streams:
                self._fetch_all()  # a stream's state changes on every stage: nothing may be in flight
            self._track(plan)
            chunks = {c.stream_id: inputs[c.stream_id] for c in plan.chunks if c.stream_id in self.params}
            preparing = any(c.first for c in plan.chunks if c.stream_id in self.params)
            steady_rows = sum(c.lanes for c in plan.chunks if not c.first and c.stream_id in self.params)
            overlapping = any(self.params[c.stream_id].lane_stride > 1 for c in plan.chunks
                              if not c.first and c.stream_id in self.params)
            groups = self.micro_batches(steady_rows, overlapping)
            commands = plan if plan.has_commands else None  # every stage applies them before the forward
            if preparing:
                self._fetch_all()
                outs = self._forwards(plan.step_id, chunks, True, groups, commands)
                self._in_flight.append(_Plan(plan, t0, [], outs))
                return
            self._make_room(groups)
            handles = self._submit_steady(plan.step_id, chunks, groups, commands)
        except StageFailure as exc:
            raise self._recover(exc) from exc
        self._in_flight.append(_Plan(plan, t0, handles))
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))

    def collect(self) -> EngineStepResult:
        """The oldest plan's result. `step_ms` is the pipeline period it took: its slowest
        stage's time, from the stages' own clocks. That holds for a plan run to the end at submit
        (first chunks) too: its wall time is a latency (about its forwards times the stages'
        sum), and the scheduler, which takes a plan to end `depth` periods after it starts,
        would learn it as a period `depth` times too long. Its wall time only when no forward
        carried rows (commands alone)."""
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
            period_ms = self._observe(outs, len(entry.plan.chunks))
        except StageFailure as exc:
            raise self._recover(exc) from exc
        idle = getattr(self.stages, "idle", None)
        if not self.params and not self._in_flight and entry.plan.finished_streams and idle is not None:
            idle()  # nothing flows until the next stream: let the transport rest
        step_ms = period_ms if period_ms is not None else entry.wall_ms
        if step_ms is None:
            step_ms = (time.perf_counter() - entry.t0) * 1000.0
        return EngineStepResult(entry.plan.step_id, step_ms, self.clock(), outputs=outputs, forwards=forwards)

    def ready(self) -> bool:
        """Whether the oldest plan's forwards are back (transports that cannot tell: True); True
        too once it is overdue (parallel.step_timeout_s): `collect` then waits with the
        transport's bound and reports the stage that stopped answering. (A Ray probe: with the
        cluster gone, a channel never had data, the live loop only ever asked `ready`, and the
        streams froze without a word until Ray ended the process.)"""
        if not self._in_flight or self._in_flight[0].outs is not None:
            return True
        if time.perf_counter() - self._in_flight[0].t0 > self.cfg.parallel.step_timeout_s:
            return True
        done = getattr(self.stages, "ready", None)
        return done is None or all(done(h) for h in self._in_flight[0].handles)

    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> EngineStepResult:
        if self._in_flight:
            raise RuntimeError("execute with plans in flight: collect them first")
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

    def _make_room(self, forwards: int) -> None:
        """Take in the oldest plans' forwards until `forwards` more fit the transport's bound
        (`max_executions`: Ray's compiled graph refuses one past it, a stage failure that restarts
        every stream). A Ray fuzzer: stride-1 plans go in one micro-batch per stage and up to
        `depth` plans are in flight, stages^2 forwards where the graph held stages + 1."""
        cap = self.stages.max_executions
        if cap is None:
            return
        for entry in self._in_flight:
            if sum(len(e.handles) for e in self._in_flight if e.outs is None) + forwards <= cap:
                return
            self._fetch(entry)

    def _fetch_all(self) -> None:
        """Take in every forward in flight (their plans stay to be collected)."""
        for entry in self._in_flight:
            self._fetch(entry)

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

    def _submit_steady(self, step_id: int, chunks: dict[str, ChunkInput], groups: int,
                       commands: StepPlan | None) -> list:
        """The plan's steady rows in `groups` micro-batches, a stage apart; the first carries
        the new chunks (their encode), the flows back so far and the plan's commands."""
        flows = self._take_flows()
        return [self.stages.submit(StageInput(step_id, g, "steady", chunks if g == 0 else {},
                                              flows if g == 0 else [], group=g, groups=groups,
                                              plan=commands if g == 0 else None))
                for g in range(groups)]

    def _forwards(self, step_id: int, chunks: dict[str, ChunkInput], preparing: bool, groups: int,
                  commands: StepPlan | None) -> list[StepOut]:
        """A plan run to the end: the steady rows (the new chunks' encode rides on the first) in
        `groups` micro-batches, and when first chunks are in the plan their denoise steps, each
        needing the previous one's flows."""
        # 1. Rows of one plan are independent: the micro-batches and the first prepare forward
        #    are all in flight, a stage apart. Results are taken in submission order.
        handles = self._submit_steady(step_id, chunks, groups, commands)
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

    def _observe(self, outs: list[StepOut], chunks: int = 0) -> float | None:
        """Each stage's time over the plan's forwards -> the rebalancer. Returns the pipeline
        period the plan took: its slowest stage's time; for stages that share a CPU's cores
        (`stages.shared_cores`), their CPU time and their helpers' for the plan's `chunks` over
        the cores they had (`core_share`, where the transport measures it: `cpu_period_ms`), else
        their summed wall time over those cores if that is longer; None if no forward carried rows."""
        if not any(out.rows for out in outs):
            return None
        self.chunks_done += chunks
        # A first chunk's encode rides on a forward of its own (no rows): its time counts too.
        ran = [out.stage_ms for out in outs if len(out.stage_ms) == self.num_stages]
        samples = [StageSample(sum(f[k]["total"] for f in ran), sum(f[k]["blocks"] for f in ran),
                               int(ran[0][k]["num_blocks"])) for k in range(self.num_stages)]
        self.last_stage_ms = [s.total_ms for s in samples]
        self.stage_busy_ms = [busy + t for busy, t in zip(self.stage_busy_ms, self.last_stage_ms)]
        dit = self.dit_stages  # VAE stages hold no blocks: their time is a floor for any split
        vae_ms = [samples[k].total_ms for k in range(self.num_stages) if k not in dit]
        self.rebalancer.observe([samples[k] for k in dit], floor_ms=max(vae_ms, default=0.0))
        if self.rebalance_enabled and (target := self.rebalancer.proposal()) is not None:
            self.repartition(target)
        # Stages sharing a CPU: their wall time counts every wait for a core, and the sum over the
        # cores counts those waits again (a 3-chunk plan read 740 ms where plans ended every 190-230).
        # Their CPU time over the cores they had is the period, where the transport can say; the
        # codecs' time goes with the chunks that caused it (a newcomer's grows the period by its own).
        share = getattr(self.stages, "core_share", lambda chunks_done: None)(self.chunks_done)
        if share is not None:
            return cpu_period_ms([sum(f[k]["cpu"] for f in ran) for k in range(self.num_stages)], share.free,
                                 share.helper_ms_per_chunk * chunks)
        return pipeline_period_ms(self.last_stage_ms, self.stages.shared_cores)

    def repartition(self, target: list[int]) -> None:
        """Move blocks (weights, K/V, prompt K/V) between neighbours until the split is `target`.
        Streams keep going: the forwards in flight are taken in first (their plans stay to be
        collected), and every layer's K/V moves."""
        self._fetch_all()
        before, dit = self.counts, self.dit_stages
        counts = list(before)  # the split as moved so far: the specs follow each move
        try:
            for layer, src, dst in moves(before, target):
                package = self.stages.call(dit[src], "give_blocks", [layer])
                try:
                    self.stages.call(dit[dst], "take_blocks", package)
                except Exception:
                    self.stages.call(dit[src], "take_blocks", package)  # the donor takes it back
                    raise
                counts[src], counts[dst] = counts[src] - 1, counts[dst] + 1
                self.stages.specs[:] = stage_specs(ranges(counts), len(dit) < self.num_stages)
        except StageFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - a review: one (the receiving GPU out of memory) ended
            # every stream and the server, and the block it carried was held by no stage
            self.rebalancer.reset(counts)
            self.rebalance_enabled = False
            log.warning("moving blocks %s -> %s stopped at %s (%s: %s); the split stays, rebalancing is off",
                        before, list(target), counts, type(exc).__name__, first_line(exc))
            return
        self.rebalancer.reset(target)
        self.rebalances.append((before, list(target)))
        log.info("re-partitioned blocks %s -> %s (stage ms %s)", before, target,
                 [round(t, 1) for t in self.last_stage_ms])

    # -------------------------------------------------------------- faults

    def _recover(self, exc: StageFailure) -> StreamsLost:
        """Rebuild the pipeline with no stream on it (every plan in flight is lost with it); the
        engine core restarts the streams (a restarted-streams command in its next plan: fresh
        cache), or they are closed."""
        ids = list(self.params)
        self._flows = []
        self._in_flight.clear()
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
            plural = "" if len(ids) == 1 else "s"
            if isinstance(again, StreamsNotRestarted):  # the stages serve again; their streams end
                log.error("pipeline stage failed (%s); %s: %d stream%s closed", exc, again, len(ids), plural)
                return StreamsLost(ids, f"pipeline stage failed ({exc}); start the stream again", False)
            log.error("pipeline stage failed (%s) and could not be rebuilt (%s): %d stream%s closed",
                      exc, again, len(ids), plural)
            return StreamsLost(ids, f"pipeline stage failed ({exc}) and could not be rebuilt ({again})", False)
        # one line of our own: a killed stage actor otherwise shows only Ray's noise
        log.warning("pipeline stage failed (%s); %s; %d stream%s restart with a fresh cache",
                    exc, what, len(ids), "" if len(ids) == 1 else "s")
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
            "plans_in_flight": len(self._in_flight),
        }

    def shutdown(self) -> None:
        try:
            self._fetch_all()
        except StageFailure:
            log.warning("a stage failed while shutting down", exc_info=True)
        self._in_flight.clear()
        self.params.clear()
        self.stages.shutdown()


__all__ = ["InProcessStages", "StageFailure", "StagedExecutor", "Stages", "ThreadedStages", "TickStages",
           "cpu_period_ms", "pipeline_period_ms"]
