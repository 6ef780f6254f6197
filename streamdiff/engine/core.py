"""EngineCore: the engine loop's steps — schedule -> submit -> collect -> update — for many streams.

Owns: the streams the engine serves (their live parameters and SLOs), the input frame buffers
(payloads keyed by frame id; the scheduler decides which ids to keep, and the core frees the
ones it drops at once), the bounded per-stream output queues, live parameter changes applied
between steps, warm-up, and the metrics of all of it.
Does not own: which chunks a step batches (FrameScheduler), the model (the Executor), threads
or asyncio (async_engine.py). No torch here: a fake executor drives it in tests.

Threading: not thread-safe; one thread owns it (AsyncEngine's loop thread, or a test).

One `step(now)`:
  1. while fewer than `executor.depth` plans are in flight:
       plan = scheduler.schedule(now)            (None: no stream has a full chunk)
       take the planned frames out of the buffers -> ChunkInput per stream
       executor.submit(plan, inputs)
  2. when the pipeline is full, or nothing new was submitted, collect the OLDEST plan:
       result = executor.collect()               (step_ms = the pipeline period, output frames)
       scheduler.update(plan, result)            (cost model, lag and deadline bookkeeping)
       output frames -> the streams' output queues; metrics.
  A local executor has depth 1: every step submits one plan and collects it, as before plans
  could overlap. Pipeline stages have depth = their number: plan p + 1 enters the first stage
  while plan p is in the second. The scheduler lets a stream have at most D chunks in flight
  (its lane stride, chosen at admission: `FrameScheduler.add_stream`), which is what keeps the
  frames those of D = 1. Adding or removing a stream and a steps change drain the plans in
  flight first (`drain`); live prompt / seed / noise changes do not (they ride with the
  stream's next chunk). The executor drains what it must itself (first chunks, re-partitioning,
  recovery).

Stream commands: the core decides, executors apply. Adding, removing, restarting a stream and
live changes become commands (new / finished / restarted / updated streams, coalesced in
`StreamCommands`) that ride in a plan: with nothing in flight they go at once, in a plan with
no chunks (`_flush`); with plans in flight (only live changes can be decided then: adding,
removing and restarting drain first) they ride with the next plan submitted, so a change
applies from the chunk that plan starts on. New and restarted streams carry the KV lanes the
scheduler allocated.

Live changes (`update_params`): prompt, prompt blend, seed, noise strength and the motion
controller take effect at the stream's next chunk (an `updated_streams` command). A new step
count changes the stream's lanes, so the stream is re-admitted to the scheduler with the new
lane count and re-prepared (a `restarted_streams` command): the chunks in flight (steps - 1
chunks of lag) are dropped (counted as dropped frames, cause "restart"), its KV lanes, VAE
caches and motion state are reset, and its next chunk is a first chunk again (5 frames);
frames already waiting are kept.

Admission (FrameScheduler.add_stream): an empty engine always admits (best effort when its own
SLO cannot hold); a refusal protects a running stream and its reason ends with what would
help. A refusal also asks for `measure()` (the AsyncEngine loop runs it once no stream is
left): the cost model forgets its samples and the dummy stream is measured again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from streamdiff.config import Config, padded_rows
from streamdiff.engine.executor import Executor
from streamdiff.engine.types import (
    ChunkInput,
    EngineStepResult,
    FrameMeta,
    PARAM_RANGES,
    OutputFrame,
    StreamParams,
    StreamClosedError,
    StreamCommands,
    StreamsLost,
    validate_changes,
)
from streamdiff.metrics import EngineMetrics
from streamdiff.scheduler import (
    Admission,
    FixedCostModel,
    FrameScheduler,
    LinearLaw,
    OnlineCostModel,
    StepPlan,
    StreamSLO,
)

DEFAULT_DEADLINE_MS = 1000.0
WARMUP_STREAM = "__warmup__"
# Extra warm-up chunks with runtime.compile_vae: a stream's VAE calls change their cache layout
# (each a graph) over its first chunks; the tiny Wan decoder's four layouts took four.
COMPILED_VAE_WARMUP_CHUNKS = 4
REFUSAL_HINT = ("what would help: fewer denoise steps, a smaller frame size (video.width/height), "
                "another GPU, or a lower service level (serve --target-fps/--deadline-ms, or slo: in the config)")
POOL_HINT = "what would help: a larger cache.max_streams or cache.pool_lanes, or another GPU"


class AdmissionRefused(ValueError):
    """A live change (a larger step count) would break an SLO; nothing was changed. `lasting`:
    refused whatever the other streams do (more steps than the KV pool has lanes), so retrying
    later cannot help."""

    def __init__(self, message: str, *, lasting: bool = False):
        super().__init__(message)
        self.lasting = lasting


@dataclass(eq=False)
class _Stream:
    params: StreamParams
    slo: StreamSLO
    outputs: deque
    frames: dict[int, tuple[np.ndarray, FrameMeta]] = field(default_factory=dict)  # input buffers
    consumed: int = 0  # frames handed to the executor since the last (re)prepare
    emitted: int = 0  # frames output since the last (re)prepare
    out_index: int = 0  # frames output ever
    admission: Admission | None = None  # the latest (re-)admission: what the stream can expect


@dataclass(frozen=True)
class StepReport:
    """What one `step` did: the plan collected, the executor's result, frames delivered per
    stream (or a plan just submitted, with `result` None, while the pipeline fills)."""

    plan: StepPlan
    result: EngineStepResult | None  # None: the plan was submitted and is still in flight
    delivered: dict[str, int]


class EngineCore:
    def __init__(
        self,
        cfg: Config,
        executor: Executor,
        *,
        scheduler: FrameScheduler | None = None,
        clock: Callable[[], float] = time.monotonic,
        output_queue_frames: int = 64,
        max_extra_frames: int = 3,
        metrics: EngineMetrics | None = None,
    ):
        if output_queue_frames < 1:
            raise ValueError(f"output_queue_frames={output_queue_frames} must be >= 1")
        self.cfg = cfg
        self.executor = executor
        self.clock = clock
        self.width, self.height = cfg.video.width, cfg.video.height
        self.tokens_per_frame = (self.height // 16) * (self.width // 16)
        self.depth = max(1, int(getattr(executor, "depth", 1)))  # plans in flight at most
        self.scheduler = scheduler or FrameScheduler(
            OnlineCostModel(), max_streams=cfg.cache.max_streams, max_extra_frames=max_extra_frames,
            kv_lanes=cfg.cache.pool_lanes or None,
        )
        # The scheduler reasons in periods: a plan's way through takes `period_depth` of them
        # (the stages; fewer when stage threads share fewer CPU cores).
        self.period_depth = int(getattr(executor, "period_depth", self.depth))  # bounded by the scheduler
        self.scheduler.pipeline_depth, self.scheduler.period_depth = self.depth, self.period_depth
        self._in_flight: deque[tuple[StepPlan, float]] = deque()  # (plan, submit time), oldest first
        self.output_queue_frames = output_queue_frames
        # `metrics` counts into `served_metrics`, except while measure() runs its dummy stream (a
        # scratch object then); readers such as /metrics read `served_metrics`, which never sees
        # the dummy (a probe: a scrape during a re-measure saw every counter reset and then jump
        # back, and a "__warmup__" stream)
        self.metrics = self.served_metrics = metrics or EngineMetrics()
        self._streams: dict[str, _Stream] = {}
        self._next_frame_id = 0
        self.closed: dict[str, str] = {}  # stream -> reason, for streams the engine closed itself
        self.wants_measure = False  # a stream was refused: re-measure the step once the engine is idle
        self.restarted: dict[str, str] = {}  # stream -> reason of its last restart after a failure
        self._commands = StreamCommands()  # decided, not yet in a plan

    # ------------------------------------------------------------------ streams

    @property
    def stream_ids(self) -> list[str]:
        return list(self._streams)

    def default_slo(self) -> StreamSLO:
        """The config's service level (`slo:`; target fps 0 means video.fps)."""
        slo = self.cfg.slo
        return StreamSLO(slo.target_fps or self.cfg.video.fps, slo.deadline_ms)

    def add_stream(self, stream_id: str, params: StreamParams, slo: StreamSLO | None = None,
                   now: float | None = None, input_fps: float | None = None) -> Admission:
        """Admit a stream (the scheduler checks every SLO and the KV pool) and create its
        model-side state; `input_fps`: the rate its frames will arrive at (default video.fps).
        Returns the Admission; a refused stream leaves no trace."""
        if not isinstance(stream_id, str) or not stream_id:
            raise ValueError(f"stream_id must be a non-empty string, got {stream_id!r}")
        validate_changes({k: v for k, v in asdict(params).items() if k != "lane_stride"})
        slo = slo or self.default_slo()
        now = self.clock() if now is None else now
        if stream_id in self._streams:
            return Admission(stream_id, False, f"stream {stream_id!r} is already admitted", 0.0,
                             self.scheduler.free_stream_slots)
        self.drain()  # a new stream's first chunk and its state change what is in flight
        admission = self._admit(stream_id, slo, params.steps, now, params.lane_stride, input_fps)
        if not admission:
            if admission.lasting:  # no measure or hint helps: its reason says what fits
                return admission
            self.wants_measure = True
            hint = POOL_HINT if "KV pool full" in admission.reason else REFUSAL_HINT
            return replace(admission, reason=f"{admission.reason}; {hint}")
        params = replace(params, lane_stride=admission.lane_stride)
        try:
            self._commands.add(stream_id, params, self.scheduler.kv_lanes_of(stream_id))
            try:
                self._flush()
            except StreamsLost as lost:  # a stage died while no plan ran (a probe: the offer got 500)
                if not lost.resumed:
                    raise
                # the pipeline was rebuilt with no stream on it: the others restart, this one is
                # added again (its command went with the failed plan); a second failure propagates
                self._lost(lost, now)
                self._commands.add(stream_id, params, self.scheduler.kv_lanes_of(stream_id))
                self._flush()
        except BaseException:
            self.scheduler.remove_stream(stream_id)
            raise
        self._streams[stream_id] = _Stream(params, slo, deque(maxlen=self.output_queue_frames), admission=admission)
        self.metrics.stream_added(stream_id, now, slo.deadline_ms)
        return admission

    def _chunks(self) -> dict:
        """A stream's chunk shape and input rate, as the scheduler's admission calls take them."""
        s = self.cfg.sampling
        return {"first_chunk_latents": s.first_chunk_latents, "chunk_latents": s.chunk_latents,
                "input_fps": self.cfg.video.fps}

    def _admit(self, stream_id: str, slo: StreamSLO, steps: int, now: float, stride: int = 0,
               input_fps: float | None = None) -> Admission:
        """The scheduler's admission; the lane stride is `stride`, else `parallel.lane_stride`,
        else (0) the scheduler's choice for this stream's SLO (D = depth unless it needs less latency)."""
        chunks = self._chunks()
        if input_fps:  # what the client said its camera sends (else video.fps)
            chunks["input_fps"] = input_fps
        return self.scheduler.add_stream(stream_id, slo, self.tokens_per_frame, steps, now, **chunks,
                                         lane_stride=stride or self.cfg.parallel.lane_stride)

    def expect(self, steps: int | None = None) -> tuple[float, float, float]:
        """(step ms, fps, latency ms) one more stream could expect now (the cost model's view)."""
        return self.scheduler.estimate(self.tokens_per_frame, steps or self.cfg.sampling.steps, **self._chunks(),
                                       lane_stride=self.cfg.parallel.lane_stride)

    def outlooks(self) -> dict[str, tuple[float, float]]:
        """(fps, latency ms) each stream can expect beside the streams served now (the cost
        model's view; at admission it was told the same beside the streams then)."""
        return self.scheduler.outlooks()

    def remove_stream(self, stream_id: str) -> bool:
        """Forget the stream: scheduler entry, input buffers, output queue, model-side state
        (KV slots back to the pool, VAE caches dropped) and its metrics. False if unknown."""
        if stream_id not in self._streams:
            return False
        self.drain()
        entry = self._streams.pop(stream_id)
        # what it still held: frames waiting, and frames in the model's stream-batch lag
        self.metrics.frames_dropped(stream_id, len(entry.frames) + entry.consumed - entry.emitted, "removed")
        self.scheduler.remove_stream(stream_id)
        entry.frames.clear()
        entry.outputs.clear()
        self._commands.remove(stream_id)
        self._flush_or_lose()
        self.metrics.stream_removed(stream_id)
        self.restarted.pop(stream_id, None)
        return True

    def _stream(self, stream_id: str) -> _Stream:
        """The stream's entry; KeyError naming it for a stream not (or no longer) served (a
        caller whose stream was removed meanwhile got KeyError('<id>'), its bare id)."""
        try:
            return self._streams[stream_id]
        except KeyError:
            raise KeyError(f"unknown stream {stream_id!r}") from None

    def params(self, stream_id: str) -> StreamParams:
        return self._stream(stream_id).params

    def admission(self, stream_id: str) -> Admission:
        """The stream's latest admission (at its start, or when a steps change re-admitted it):
        the fps and latency it can expect, and whether it runs best effort."""
        return self._stream(stream_id).admission

    def update_params(self, stream_id: str, now: float | None = None, **changes: object) -> StreamParams:
        """Apply live changes (validated; ValueError names the field and its range). See the
        module docstring for what each does. Returns the stream's new parameters."""
        changes = validate_changes(changes)
        entry = self._stream(stream_id)
        new = entry.params.with_changes(changes)
        if new.steps != entry.params.steps:
            self.drain()
            self._restart(stream_id, entry, new, self.clock() if now is None else now)
        elif changes:
            self._commands.update(stream_id, new, tuple(changes))
        entry.params = new
        self._flush_or_lose(now)
        if stream_id in self.closed:  # the change went to a pipeline that failed under it
            raise StreamClosedError(f"stream {stream_id!r} was closed: {self.closed[stream_id]}")
        return new

    def _flush(self) -> None:
        """Pending stream commands go to the executor now, in a plan with no chunks, when
        nothing is in flight; otherwise they ride with the next plan submitted (`step`)."""
        if self._commands and not self._in_flight:
            self.executor.execute(self._commands.plan(self.clock()), {})

    def _flush_or_lose(self, now: float | None = None) -> None:
        """`_flush`; a stage that fails under it loses its streams as in a step (restarted or
        closed, `_lost`). A fault probe: a prompt change whose plan failed raised out of
        `update_params`, the executor forgot the streams and the core kept them: frozen, their
        sessions "connected" until the client left."""
        try:
            self._flush()
        except StreamsLost as lost:
            self._lost(lost, self.clock() if now is None else now)

    def _restart(self, stream_id: str, entry: _Stream, new: StreamParams, now: float) -> None:
        """Re-admit with the new lane count, keeping waiting frames; refused, the stream runs on
        untouched (the scheduler's restart is atomic) and AdmissionRefused says why."""
        admission, waiting = self.scheduler.restart_stream(stream_id, new.steps, now, **self._chunks())
        if not admission:
            raise AdmissionRefused(f"steps={new.steps} refused for stream {stream_id!r}: {admission.reason}",
                                   lasting=admission.lasting)
        entry.admission = admission
        self._repush(stream_id, entry, waiting)
        self._commands.restart(stream_id, new, self.scheduler.kv_lanes_of(stream_id))
        self.metrics.frames_dropped(stream_id, entry.consumed - entry.emitted, "restart")
        entry.consumed = entry.emitted = 0

    def _lost(self, lost: StreamsLost, now: float) -> None:
        """The executor lost these streams' model state: restart them like a step-count change
        (their chunks in flight are dropped, next chunk is a first chunk), or close them."""
        self.metrics.pipeline_failed(lost.resumed)
        for stream_id in lost.stream_ids:
            entry = self._streams.get(stream_id)
            if entry is None:
                continue
            if lost.resumed:
                try:
                    self._restart(stream_id, entry, entry.params, now)
                    self.restarted[stream_id] = lost.reason
                    continue
                except AdmissionRefused:
                    pass
            self.remove_stream(stream_id)
            self.closed[stream_id] = lost.reason
        self._flush()

    def take_closed(self) -> dict[str, str]:
        """Streams the engine closed on its own since the last call, with the reason."""
        closed, self.closed = self.closed, {}
        return closed

    def _repush(self, stream_id: str, entry: _Stream, frame_ids: list[int]) -> None:
        for frame_id in frame_ids:
            dropped = self.scheduler.push_frame(stream_id, frame_id, entry.frames[frame_id][1].arrival_s, again=True)
            self._free(stream_id, entry, dropped)

    # ------------------------------------------------------------------ frames in

    def push_frame(self, stream_id: str, frame: np.ndarray, pts: object = None, now: float | None = None) -> int:
        """Hand the engine one input frame [H, W, 3] uint8 (kept by reference: do not modify it
        afterwards). Older waiting frames may be dropped. Returns the frame id."""
        entry = self._stream(stream_id)
        if not isinstance(frame, np.ndarray) or frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            got = f"{frame.dtype} {list(frame.shape)}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frame must be uint8 [{self.height}, {self.width}, 3], got {got}")
        now = self.clock() if now is None else now
        frame_id = self._next_frame_id
        self._next_frame_id += 1
        entry.frames[frame_id] = (frame, FrameMeta(frame_id, pts, now))
        self.metrics.frame_in(stream_id)
        self._free(stream_id, entry, self.scheduler.push_frame(stream_id, frame_id, now))
        return frame_id

    def _free(self, stream_id: str, entry: _Stream, frame_ids: list[int]) -> None:
        for frame_id in frame_ids:
            del entry.frames[frame_id]
        self.metrics.frames_dropped(stream_id, len(frame_ids), "input")

    def waiting_frames(self, stream_id: str | None = None) -> int:
        """Input frame payloads held (one stream, or all)."""
        if stream_id is not None:
            return len(self._stream(stream_id).frames)
        return sum(len(e.frames) for e in self._streams.values())

    # ------------------------------------------------------------------ one step

    def step(self, now: float | None = None, block: bool = True) -> StepReport | None:
        """One turn of the loop (see the module docstring). Returns the report of the plan it
        collected; a plan submitted but not collected yet (the pipeline has room) gives a
        report with `result` None; None when nothing was ready and nothing is in flight, or
        (`block` False) when nothing new was ready and the oldest plan is not back yet: a live
        loop then waits for input or the plan, whichever comes first, instead of for the plan."""
        now = self.clock() if now is None else now
        # 1. Decide and submit while the pipeline has room.
        submitted: StepPlan | None = None
        while len(self._in_flight) < self.depth:
            plan = self.scheduler.schedule(now)
            if plan is None:
                break
            if self._commands:  # decided while plans were in flight: they ride with this one
                plan = self._commands.attach(plan)
            inputs = self._gather(plan)
            t0 = self.clock()
            try:
                self.executor.submit(plan, inputs)
            except StreamsLost as lost:
                self._in_flight.append((plan, t0))
                return self._fail_in_flight(lost)
            except BaseException:
                self.scheduler.update(plan, self._failed(plan, t0))
                raise
            self._in_flight.append((plan, t0))
            submitted = plan
        if not self._in_flight:
            return None
        # 2. Collect the oldest when the pipeline is full or nothing new came.
        if submitted is not None and len(self._in_flight) < self.depth:
            return StepReport(submitted, None, {})
        if submitted is None and not block and not getattr(self.executor, "ready", lambda: True)():
            return None
        return self._collect()

    def drain(self) -> list[StepReport]:
        """Collect every plan in flight (oldest first), delivering their frames."""
        reports = []
        while self._in_flight:
            reports.append(self._collect())
        return reports

    @property
    def plans_in_flight(self) -> int:
        return len(self._in_flight)

    def _gather(self, plan: StepPlan) -> dict[str, ChunkInput]:
        """The planned frames; their buffers leave the core now."""
        inputs: dict[str, ChunkInput] = {}
        for chunk in plan.chunks:
            entry = self._streams[chunk.stream_id]
            taken = [entry.frames.pop(frame_id) for frame_id in chunk.frame_ids]
            inputs[chunk.stream_id] = ChunkInput(np.stack([f for f, _ in taken]), tuple(m for _, m in taken))
            entry.consumed += len(taken)
        return inputs

    def _collect(self) -> StepReport:
        """Collect the oldest plan in flight: account it and deliver its frames (on failure,
        close it so the scheduler stays consistent; streams an executor lost are re-prepared
        on its rebuilt state, or closed with the reason)."""
        plan, t0 = self._in_flight[0]
        try:
            result = self.executor.collect()
        except StreamsLost as lost:
            return self._fail_in_flight(lost)
        except BaseException:
            self._in_flight.popleft()
            self.scheduler.update(plan, self._failed(plan, t0))
            raise
        self._in_flight.popleft()
        if result.step_id != plan.step_id:
            raise RuntimeError(f"executor returned step {result.step_id}, the oldest in flight is {plan.step_id}")
        end_s = result.end_s if result.end_s is not None else self.clock()
        result = replace(result, end_s=end_s)
        # 1. Account.
        self.scheduler.update(plan, result)
        # 2. Deliver.
        delivered: dict[str, int] = {}
        for stream_id, out in result.outputs.items():
            entry = self._streams.get(stream_id)
            if entry is None:
                continue
            latencies_ms = []
            for frame, meta in zip(out.frames, out.metas):
                if len(entry.outputs) == entry.outputs.maxlen:
                    self.metrics.frames_overwritten(stream_id, 1)
                item = OutputFrame(stream_id, frame, meta.frame_id, meta.pts, meta.arrival_s, end_s, entry.out_index)
                entry.outputs.append(item)
                entry.out_index += 1
                latencies_ms.append(item.latency_ms)
            entry.emitted += len(latencies_ms)
            delivered[stream_id] = len(latencies_ms)
            self.metrics.frames_out(stream_id, end_s, latencies_ms)
        self.metrics.step(plan.rows, len(plan.chunks), result.step_ms, self.scheduler.last_decision_us,
                          result.forwards)
        return StepReport(plan, result, delivered)

    def _failed(self, plan: StepPlan, t0: float) -> EngineStepResult:
        """The result of a plan lost with a failure: it closes the plan, and teaches nothing."""
        return EngineStepResult(plan.step_id, (self.clock() - t0) * 1000.0, self.clock(), failed=True)

    def _fail_in_flight(self, lost: StreamsLost) -> StepReport:
        """Every plan in flight failed with the executor's pipeline: close them all, then restart
        or close the streams it lost."""
        failed = None
        while self._in_flight:
            plan, t0 = self._in_flight.popleft()
            failed_result = self._failed(plan, t0)
            self.scheduler.update(plan, failed_result)
            failed = failed or StepReport(plan, failed_result, {})
        self._lost(lost, self.clock())
        return failed

    # ------------------------------------------------------------------ frames out

    def pop_outputs(self, stream_id: str, limit: int | None = None) -> list[OutputFrame]:
        """Take up to `limit` (default all) output frames of the stream, oldest first."""
        queue = self._stream(stream_id).outputs
        n = len(queue) if limit is None else min(limit, len(queue))
        return [queue.popleft() for _ in range(n)]

    def output_frames_waiting(self, stream_id: str) -> int:
        return len(self._stream(stream_id).outputs)

    # ------------------------------------------------------------------ warm-up, stats

    def warmup(self, steps: int | None = None, seed: int = 0, every_shape: bool = True) -> float:
        """Run dummy streams at the configured frame size through their prepare and stream-batch
        steps: first to make weights, kernels and buffers resident and, with a compiled or
        graphed DiT, to build the graph of every batch shape streams can make (`_shape_mixes`);
        none of those times is shown to the cost model. Then the dummy stream at `steps`, at a
        second step count, and two of them together, measured by the scheduler's cost model like
        any step (`_measured_mixes`). `every_shape=False` (a benchmark of one batch shape): the
        dummy stream at `steps` only, resident then measured. Returns the warm-up time in ms. Call
        before any stream is added; the engine's metrics start afresh afterwards."""
        if self._streams:
            raise RuntimeError("warmup() must run before any stream is added")
        t0 = time.perf_counter()
        params = StreamParams.defaults(self.cfg, prompt="warm-up")
        params = replace(params, steps=steps or params.steps)
        measured = self.scheduler
        passes = self._measured_mixes(params.steps) if every_shape else [(params.steps,)]
        counts = tuple(mix[0] for mix in passes if len(mix) == 1)
        try:
            self.scheduler = FrameScheduler(FixedCostModel(LinearLaw(0.0, 0.0, 0.0)),
                                            max_streams=measured.max_streams, kv_lanes=measured.kv.num_lanes,
                                            pipeline_depth=self.depth, period_depth=self.period_depth)
            # resident: the preset's steps; with graphs to build, every shape (an eager DiT's first
            # call at the second step count costs no more than its later ones: measured at once)
            graphs = self.cfg.runtime.compile or self.cfg.runtime.cuda_graphs
            mixes = [(n,) for n in (counts if graphs else counts[:1])] + \
                (self._shape_mixes(counts) if every_shape else [])
            for mix in mixes:
                self._dummy_streams([replace(params, steps=n) for n in mix], seed)
            self.scheduler = measured
            self._measured_passes(params, passes, seed)
        finally:
            self.scheduler = measured
        self._measured_provisional()
        warmup_ms = (time.perf_counter() - t0) * 1000.0
        self.metrics = self.served_metrics = EngineMetrics()
        self.metrics.warmup_ms = warmup_ms
        return warmup_ms

    def measure(self, seed: int = 0) -> bool:
        """Re-measure the step on an idle engine (after a refusal): forget the cost model's
        samples and run the measured passes again. False (nothing done) while streams run."""
        self.wants_measure = False
        if self._streams:
            return False
        reset = getattr(self.scheduler.cost_model, "reset", None)
        if reset is not None:
            reset()
        metrics, self.metrics = self.metrics, EngineMetrics()  # the dummy stream is not served (nor shown)
        params = StreamParams.defaults(self.cfg, prompt="warm-up")
        try:
            self._measured_passes(params, self._measured_mixes(params.steps), seed)
        finally:
            self.metrics = metrics
        self._measured_provisional()
        return True

    def _measured_provisional(self) -> None:
        """Serving steps replace the measured passes' samples (a busy start, or a re-measure on a
        busy machine, is not for ever: a re-measure's samples stayed for the whole window)."""
        mark = getattr(self.scheduler.cost_model, "mark_provisional", None)
        if mark is not None:
            mark()

    def _measured_mixes(self, steps: int) -> list[tuple[int, ...]]:
        """The dummy streams measured at warm-up, each mix a pass of streams joining together (their
        step counts): one stream at `steps`; one at a second step count (2 after 1, else 1); two at
        one step together (the cheapest third shape); each where the KV pool and the stream limit
        have room. One stream at one step count has as many rows as chunks in every step, so the
        cost model could not tell a row's cost (the DiT, per denoise step) from a chunk's (the VAE,
        once a chunk): its prior split them, and a stream asking other steps than the preset's was
        told the wrong fps (a probe: steps 1 on the tiny preset told 8.2 fps, got 4.2). And every
        step of one stream has one chunk, so the step's fixed cost and a chunk's stood together: the
        prior put most of it in the fixed cost, and streams joining together were told what one
        alone gets (a probe: four demo users told 30 fps got 10-15, six told 30 under a 12 fps SLO
        got 8.4)."""
        lanes = self.scheduler.kv.num_lanes
        other = 2 if steps == 1 else 1
        mixes = [(steps,)] + ([(other,)] if other <= lanes else [])
        if self.scheduler.max_streams >= 2 and 2 <= lanes:
            mixes.append((1, 1))
        return mixes

    def _measured_passes(self, params: StreamParams, mixes: list[tuple[int, ...]], seed: int) -> None:
        """Each mix of dummy streams, measured; the cost model's fit of them then becomes its prior
        (`calibrate_prior`), so that what serving steps cannot tell apart (while every stream runs
        the same steps, rows and chunks rise together) stays split as measured here once the
        warm-up's samples are replaced."""
        for mix in mixes:
            self._dummy_streams([replace(params, steps=n) for n in mix], seed)
        calibrate = getattr(self.scheduler.cost_model, "calibrate_prior", None)
        if calibrate is not None:
            calibrate()

    def _shape_mixes(self, counts: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Step counts of dummy streams joining together that, beside one stream at each of
        `counts`, make every batch shape streams can make: a compiled or graphed DiT has one
        graph per rows bucket (`runtime.row_buckets`) and latent frames (a first chunk's forward
        has 2, batching the streams that join in one step; later ones 1, every lane of every
        stream). A shape first met while serving was compiled then, and every stream stalled
        for it (a probe: 11-31 s on the tiny preset when a second stream joined). Empty for an
        eager DiT, which has no graphs."""
        rt = self.cfg.runtime
        if not (rt.compile or rt.cuda_graphs):
            return []
        buckets = sorted(rt.row_buckets)

        def bucket(rows: int) -> int:
            return padded_rows(rows, rt.row_buckets)

        def padded_to(most: int) -> list[int]:
            """A row count for each bucket that 1..`most` rows pad to (past the largest bucket
            rows run unpadded, a graph per count: those are not built here)."""
            return [b for b in buckets if b < most] + ([most] if bucket(most) in buckets else [])

        most_steps = int(PARAM_RANGES["steps"][2])
        streams = min(self.scheduler.max_streams, self.scheduler.kv.num_lanes)
        max_rows = min(self.scheduler.kv.num_lanes, most_steps * self.scheduler.max_streams)
        steady = {bucket(n) for n in counts}
        first = {bucket(1)}
        mixes: list[tuple[int, ...]] = []
        for rows in padded_to(max_rows):
            if bucket(rows) in steady:
                continue
            mix = (most_steps,) * (rows // most_steps) + ((rows % most_steps,) if rows % most_steps else ())
            mixes.append(mix)
            steady.add(bucket(rows))
            first.add(bucket(len(mix)))
        for joining in padded_to(streams):
            if bucket(joining) not in first:
                mixes.append((1,) * joining)
                first.add(bucket(joining))
        return mixes

    def _dummy_streams(self, params: list[StreamParams], seed: int) -> None:
        """Dummy streams joining in one step, fed until each has had its prepare and its lanes'
        first outputs; then removed."""
        ids = [WARMUP_STREAM if i == 0 else f"{WARMUP_STREAM}{i}" for i in range(len(params))]
        added = []
        try:
            for sid, p in zip(ids, params):
                admission = self.add_stream(sid, p, StreamSLO(1e-3, 1e12))
                if not admission:
                    raise RuntimeError(f"warm-up stream refused: {admission.reason}")
                added.append(sid)
            rng = np.random.default_rng(seed)
            # The prepare, then until the first lag output; with a compiled VAE on until its calls
            # reach their steady cache, so that every graph a stream meets is compiled here.
            steps = max(p.steps for p in params)
            chunks = 1 + steps + (COMPILED_VAE_WARMUP_CHUNKS if self.cfg.runtime.compile_vae else 0)
            for chunk in range(chunks):
                for sid in ids:
                    for _ in range(5 if chunk == 0 else 4):
                        self.push_frame(sid, rng.integers(0, 256, (self.height, self.width, 3), np.uint8))
                if self.step() is None:
                    raise RuntimeError("warm-up step was not scheduled")
        finally:
            for sid in added:
                self.remove_stream(sid)

    def stats(self) -> dict:
        """Bookkeeping sizes (for leak checks and /healthz-style reporting)."""
        return {
            "streams": len(self._streams),
            "plans_in_flight": len(self._in_flight),
            "waiting_frames": self.waiting_frames(),
            "output_frames": sum(len(e.outputs) for e in self._streams.values()),
            "scheduler_streams": len(self.scheduler.stream_ids),
            "scheduler_free_stream_slots": self.scheduler.free_stream_slots,
            "executor": self.executor.resources(),
        }


__all__ = ["AdmissionRefused", "DEFAULT_DEADLINE_MS", "EngineCore", "StepReport", "WARMUP_STREAM"]
