"""The frame scheduler: which streams' chunks one engine step batches, and who may join.

Owns: admission (SLO and KV-pool capacity), the per-stream input-frame bookkeeping (ids and
arrival times only, newest kept, oldest dropped under overload), the choice of chunks for each
step (earliest deadline first, fair share, cost-model-bounded), the stream-batch lag bookkeeping
(which input frames' output leaves at each step), deadline-miss accounting, and the counter of
free KV-pool stream slots.
Does not own: pixels or tensors (the engine keeps frame buffers keyed by frame id and frees the
ids this scheduler reports as dropped), KV slots themselves (cache/), running the step
(engine/ Executor), or the diffusion timesteps (sampling/). CPU integers and floats only; this
package never imports torch.

The loop the engine runs:
    ids_to_free = sched.push_frame(stream_id, frame_id, now)   # per input frame
    plan = sched.schedule(now)                                  # None: nothing ready
    result = executor.execute(plan)                             # -> StepResult
    sched.update(plan, result)

Deadline: a frame meets it when the step that outputs it ends within `deadline_ms` of the
frame's arrival. With `lanes` denoise steps a chunk's output leaves `lanes - 1` chunks later
(the stream-batch lag), except the first chunk (prepared directly), so the step that must hurry
for a stream is the one that outputs its oldest chunk still in the lag.

Policy, per step: (1) ready chunks are ordered by due time plus a fair-share handicap (a stream
k chunks ahead of the least-served ready stream is treated as due k of its chunk periods later;
without it, drop-to-newest lets a stream whose frames arrive a millisecond later starve);
(2) on-time chunks join in that order while the predicted step still ends before every joined
chunk's due time; (3) late chunks (they miss even alone, or did not fit) then join in the same
order while they push no on-time chunk past its due time - all of them when none is on time.
The scheduler is work-conserving: any ready chunk means a plan.

Admission: with every stream batched in one step, the predicted step must stay within what
every RUNNING stream was promised: for a stream whose SLO held at admission, its chunk period
(fps is a rate, so this is judged on the steady step, every stream past its first chunk) and
the longest step that keeps its latency (gathering at the rate frames arrive, the lag, then two
steps: the one running when a chunk gets ready, then its own) within its deadline (judged on the
next step as it will run, unprepared streams with their bigger first chunk);
for a stream admitted best effort, no longer steady step than the batch it joined beside
(rows, tokens), nor than its own SLO's longest step, whichever is longer: both judged by the
cost model as it predicts now, like every other promise (a promise kept as the milliseconds one
model state predicted locked the server once a later fit predicted more for the same batch).
A refusal therefore only ever protects a stream already inside. The newcomer's own SLO decides only how
it is admitted: with the SLO, or best effort (an empty server always admits its first stream)
with the fps and latency it can expect.

Plans in flight (pipeline stages): the executor keeps up to `pipeline_depth` plans in flight,
so the cost model's step time is the pipeline *period* (slowest stage + hop), a plan ends
depth = `period_depth` periods after it starts (the stages; the cores when stage threads share
fewer CPU cores), and a stream may have D <= `pipeline_depth` chunks in flight (its lane
stride; its output leaves (lanes - 1)·D chunks after its entry). Admission reasons in periods:
fps from one chunk per period (per depth/D periods when D < depth), latency from gathering +
the lag + (depth + 1) periods. D is chosen per stream at admission (`_choose_stride`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

from streamdiff.scheduler.cost_model import OnlineCostModel, StepCostModel
from streamdiff.scheduler.kv_lanes import KVLanes
from streamdiff.scheduler.types import (
    Admission,
    PlannedChunk,
    StepPlan,
    StepResult,
    StreamSLO,
    StreamStats,
    frames_for_latents,
)

FAIR_LAG_CHUNKS = 2  # a stream idle for a while is owed at most this many chunks of priority
ARRIVALS_KEPT = 16  # a stream's input rate is measured over its latest frames' arrivals ...
ARRIVALS_MEASURED = 8  # ... once this many came
ARRIVAL_GAP_S = 1.0  # a longer gap between two (a paused camera) counts as this long


@dataclass(eq=False, slots=True)
class _Stream:
    """Everything the scheduler knows about one stream (integers, floats, ids)."""

    stream_id: str
    slo: StreamSLO
    tokens_per_frame: int
    lanes: int
    first_latents: int
    chunk_latents: int
    order: int  # admission order, the last tiebreak
    stride: int = 1  # lane stride D: up to D chunks in flight, output (lanes - 1)·D chunks later
    depth: int = 1  # periods a plan's way through takes (the scheduler's `periods_through`: the stages, or fewer shared cores)
    input_fps: float = 0.0  # the rate its frames arrive at (0: its target fps), until measured
    arrivals: deque = field(default_factory=lambda: deque(maxlen=ARRIVALS_KEPT))  # its latest frames' arrival times
    measured_fps: float = 0.0  # the rate its frames arrived at lately (0: too few yet)
    vt_s: float = 0.0  # fair-share clock: advances by (frames planned / target_fps)
    pending: deque = field(default_factory=deque)  # (frame_id, arrival_s), oldest first
    lag: deque = field(default_factory=deque)  # arrival times of planned chunks not yet output
    prepared: bool = False  # its first chunk has been planned
    in_plans: int = 0  # its chunks in plans not yet updated
    last_step: int = -1
    removed: bool = False
    pushed: int = 0
    dropped: int = 0
    consumed: int = 0
    chunks_planned: int = 0
    chunks_done: int = 0
    output_frames: int = 0
    deadline_misses: int = 0
    last_latency_ms: float = 0.0
    max_latency_ms: float = 0.0
    best_effort: bool = False  # admitted although its own SLO could not hold
    # best effort: the steady batch (rows, tokens, chunks, firsts) it joined beside
    promised_batch: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def need_frames(self) -> int:
        """Input frames the next chunk consumes (5 for a 2-latent first chunk, then 4)."""
        if self.prepared:
            return frames_for_latents(self.chunk_latents, first=False)
        return frames_for_latents(self.first_latents, first=True)

    @property
    def next_latents(self) -> int:
        return self.chunk_latents if self.prepared else self.first_latents

    @property
    def chunk_period_ms(self) -> float:
        """How often a steady chunk must be produced to sustain target_fps."""
        return 1000.0 * frames_for_latents(self.chunk_latents, first=False) / self.slo.target_fps

    @property
    def lag_chunks(self) -> int:
        """Chunks between a chunk's entry and its output: (lanes - 1)·D."""
        return (self.lanes - 1) * self.stride

    @property
    def arrival_fps(self) -> float:
        """The rate its frames arrive at: measured once enough came (a probe's clients sent 10-15
        fps and were told figures for 30, the preset's `video.fps`), at least its target fps (the
        service level assumes that much input: a slower camera is its own limit, not the others')."""
        return max(self.measured_fps or self.input_fps, self.slo.target_fps)

    def arrived(self, now: float) -> None:
        """An input frame arrived at `now`: the measured rate follows."""
        times = self.arrivals
        times.append(now)
        if len(times) >= ARRIVALS_MEASURED:
            span = sum(min(b - a, ARRIVAL_GAP_S) for a, b in zip(times, itertools.islice(times, 1, None)))
            if span > 0:
                self.measured_fps = (len(times) - 1) / span

    def _gathering_ms(self) -> tuple[float, float, float]:
        """At the rate frames arrive: a steady chunk's oldest frame waiting for its newest, a
        steady chunk's whole gathering, and the first chunk's oldest frame waiting."""
        steady = frames_for_latents(self.chunk_latents, first=False)
        first = frames_for_latents(self.first_latents, first=True)
        return (1000.0 * (steady - 1) / self.arrival_fps, 1000.0 * steady / self.arrival_fps,
                1000.0 * (first - 1) / self.arrival_fps)

    def latency_ms(self, period_ms: float, *, first_chunk: bool = True) -> float:
        """The longest latency of its frames at a pipeline period of `period_ms`: gathering a
        chunk at the rate frames arrive (the oldest frame waits for the newest), the stream-batch
        lag (the oldest frame of chunk k is output once chunk k + (lanes-1)·D is in: each of those
        chunks takes its gathering or its interval, whichever is longer), then the chunk's time
        in flight. `first_chunk`: the first chunk's frames too (more of them, no lag); False
        gives the steady state, what the stream's user sees."""
        gather_ms, chunk_ms, first_ms = self._gathering_ms()
        lagged_ms = gather_ms + self.lag_chunks * max(chunk_ms, self.interval_ms(period_ms))
        if first_chunk:
            lagged_ms = max(lagged_ms, first_ms)
        return lagged_ms + self.in_flight_ms(period_ms)

    def interval_ms(self, period_ms: float) -> float:
        """How often it can get a chunk out with a pipeline period of `period_ms`: one per
        period while D >= depth; a plan takes `depth` periods, so D chunks per depth periods."""
        return period_ms * max(1.0, self.depth / self.stride)

    def in_flight_ms(self, period_ms: float) -> float:
        """A chunk's time from readiness to output beyond the lag: waiting for a plan (one
        period) and the plan's way through `depth` stages."""
        return (self.depth + 1) * period_ms

    def slo_step_ms(self) -> float:
        """The longest period that keeps its SLO: one chunk per chunk period, and
        `latency_ms(period)` within the deadline (it grows with the period: solved piece by
        piece, where the lag's chunks take their gathering, then where they take the interval)."""
        by_fps = self.chunk_period_ms / max(1.0, self.depth / self.stride)
        a, g, f = self._gathering_ms()
        k, lag, c, deadline = max(1.0, self.depth / self.stride), self.lag_chunks, self.depth + 1, self.slo.deadline_ms
        by_gathering = (deadline - max(a + lag * g, f)) / c  # while k·p <= g
        by_deadline = by_gathering if by_gathering * k <= g else min((deadline - a) / (lag * k + c), (deadline - f) / c)
        return min(by_fps, by_deadline)


@dataclass(slots=True)
class _Candidate:
    """A ready chunk while one `schedule` call decides."""

    stream: _Stream
    rows: int
    tokens: int
    due_s: float
    first: int = 0  # 1 for the stream's first chunk (the cost model's `firsts`)
    key: tuple = ()
    chosen: bool = False


class FrameScheduler:
    """SLO-aware, earliest-deadline-first batching of ready chunks (see the module docstring).

    max_streams: KV-pool capacity in streams (`cache.max_streams`).
    max_extra_frames: input frames a stream may hold beyond what its next chunk needs; older
        ones are dropped (the default 3 absorbs one step of jitter without dropping).
    max_chunks_in_flight: chunks of one stream allowed in plans not yet updated, at least
        (a stream may always have its lane stride D in flight).
    pipeline_depth: plans the executor keeps in flight (its stages; 1 for a local executor);
        a stream's lane stride D is at most this.
        The cost model's step time is then the pipeline *period* (slowest stage + hop): a plan
        ends `period_depth` periods after it starts, one plan ends per period.
    period_depth: periods a plan's way through takes (None: `pipeline_depth`); fewer when
        stage threads share fewer CPU cores than there are stages (the executor's `period_depth`).
    kv_lanes: lanes in the KV pool (`cache.pool_lanes`; None: 4 per stream). A stream is
        admitted only if its `lanes` are free; `kv_lanes_of` says which it holds.
    """

    def __init__(
        self,
        cost_model: StepCostModel | None = None,
        max_streams: int = 4,
        max_extra_frames: int = 3,
        max_chunks_in_flight: int = 1,
        kv_lanes: int | None = None,
        pipeline_depth: int = 1,
        period_depth: int | None = None,
    ):
        if max_streams < 1 or max_extra_frames < 0 or max_chunks_in_flight < 1 or pipeline_depth < 1:
            raise ValueError("max_streams >= 1, max_extra_frames >= 0, max_chunks_in_flight >= 1, pipeline_depth >= 1")
        self.pipeline_depth = pipeline_depth
        self.period_depth = period_depth
        self.cost_model: StepCostModel = cost_model if cost_model is not None else OnlineCostModel()
        self.max_streams = max_streams
        self.max_extra_frames = max_extra_frames
        self.max_chunks_in_flight = max_chunks_in_flight
        self.free_stream_slots = max_streams
        self.kv = KVLanes(kv_lanes or 4 * max_streams)
        self.last_decision_us = 0.0  # wall time of the last schedule() call
        self._streams: dict[str, _Stream] = {}
        self._open: dict[int, list[tuple[_Stream, tuple[float, ...]]]] = {}  # step_id -> (stream, emitted arrivals)
        self._next_step_id = 0
        self._next_order = 0

    # -- streams -------------------------------------------------------------------------

    @property
    def periods_through(self) -> int:
        """Periods a plan takes from its start to its end (`period_depth`, else `pipeline_depth`)."""
        return max(1, min(self.period_depth or self.pipeline_depth, self.pipeline_depth))

    @property
    def stream_ids(self) -> list[str]:
        return list(self._streams)

    def add_stream(
        self,
        stream_id: str,
        slo: StreamSLO,
        tokens_per_frame: int,
        lanes: int,
        now: float,
        *,
        first_chunk_latents: int = 2,
        chunk_latents: int = 1,
        input_fps: float | None = None,
        lane_stride: int = 0,
        judge_others: bool = True,
    ) -> Admission:
        """Admit the stream unless, batched with it, a running stream would get less than it was
        promised (see the module docstring) or no KV-pool stream slot is free. A newcomer whose
        own SLO cannot hold is admitted best effort; the Admission says what it can expect
        (`input_fps`, default its target fps, caps the expected fps) and its lane stride D:
        `lane_stride`, or (0) the largest D <= pipeline_depth whose latency keeps its deadline
        (the most fps a stream gets out of the stages), `pipeline_depth` if none does. `now` is
        accepted for symmetry (admission is time-independent). `judge_others=False` (a restart
        that needs no more lanes than the stream held) skips the running streams' promises: it
        asks for no more work than they were promised beside, whatever the cost model predicts
        now."""
        if stream_id in self._streams:
            return self._refuse(stream_id, f"stream {stream_id!r} is already admitted")
        if self.free_stream_slots <= 0:
            return self._refuse(
                stream_id,
                f"KV pool full: all {self.max_streams} stream slots in use (cache.max_streams)",
            )
        if tokens_per_frame < 1 or lanes < 1 or first_chunk_latents < 1 or chunk_latents < 1:
            return self._refuse(stream_id, "tokens_per_frame, lanes and chunk latents must be >= 1")
        if lanes > self.kv.num_lanes:  # (a probe: "KV pool full" and Retry-After on an empty server)
            return self._refuse(stream_id, f"{lanes} denoise steps need {lanes} KV lanes and the pool has "
                                           f"{self.kv.num_lanes} in all (cache.pool_lanes): at most "
                                           f"{self.kv.num_lanes} steps fit", lasting=True)
        if lanes > self.kv.free:
            return self._refuse(stream_id, f"KV pool full: {lanes} lanes needed, {self.kv.free} of "
                                           f"{self.kv.num_lanes} free (cache.pool_lanes)")
        vt_s = min((s.vt_s for s in self._streams.values()), default=0.0)
        if lane_stride < 0:
            return self._refuse(stream_id, f"lane_stride must be >= 0, got {lane_stride}")
        new = _Stream(stream_id, slo, tokens_per_frame, lanes, first_chunk_latents, chunk_latents,
                      order=self._next_order, vt_s=vt_s, depth=self.periods_through, input_fps=input_fps or 0.0)
        streams = [new, *self._streams.values()]
        step_ms, batch = self._batch(streams)  # the next step: first chunks where not prepared
        new.stride = lane_stride or self._choose_stride(new, step_ms)
        steady = self._batch(streams, steady=True)  # every stream past its first chunk
        # 1. Every running stream keeps what it was promised; else refuse (someone is inside).
        for s in streams[1:] if judge_others else ():
            broken = self._breaks(s, (step_ms, batch), steady, newcomer=False)
            if broken:
                return self._refuse(stream_id, broken, step_ms)
        # 2. The newcomer: with its SLO, or best effort with what it can expect (its steady state).
        own = self._breaks(new, (step_ms, batch), steady, newcomer=True)
        new.best_effort = own is not None
        new.promised_batch = self._shape(streams, steady=True)
        fps, latency_ms = self._expect(new, steady[0])
        if new.best_effort:
            reason = f"admitted best effort: {own}"
        else:
            reason = f"admitted: a step batching {batch} is predicted at {step_ms:.1f} ms"
        self._streams[stream_id] = new
        self._next_order += 1
        self.free_stream_slots -= 1
        self.kv.alloc(stream_id, lanes)
        return Admission(stream_id, True, reason, step_ms, self.free_stream_slots, new.best_effort, fps, latency_ms,
                         new.stride, streams=len(self._streams))

    def _choose_stride(self, s: _Stream, period_ms: float) -> int:
        """The largest D <= depth whose latency keeps the deadline (1 when plans do not overlap)."""
        for stride in range(self.pipeline_depth, 0, -1):
            s.stride = stride
            if s.latency_ms(period_ms) <= s.slo.deadline_ms:
                return stride
        return self.pipeline_depth

    def estimate(self, tokens_per_frame: int, lanes: int, *, first_chunk_latents: int = 2,
                 chunk_latents: int = 1, input_fps: float = 30.0, lane_stride: int = 0) -> tuple[float, float, float]:
        """(step ms, fps, latency ms) a stream joining now could expect, admitting nothing; its
        lane stride `lane_stride`, else (0) the pipeline depth (as `add_stream` gives a stream
        with no latency to keep)."""
        probe = _Stream("?", StreamSLO(input_fps, 1e9), tokens_per_frame, lanes, first_chunk_latents,
                        chunk_latents, order=-1, vt_s=0.0, stride=min(lane_stride or self.pipeline_depth,
                                                                      self.pipeline_depth),
                        depth=self.periods_through, input_fps=input_fps)
        step_ms, _ = self._batch([probe, *self._streams.values()], steady=True)
        return (step_ms, *self._expect(probe, step_ms))

    def outlooks(self) -> dict[str, tuple[float, float]]:
        """(fps, latency ms) each admitted stream can expect beside the streams admitted now, every
        one past its first chunk: what it was told at admission, renewed as others join or leave
        (a probe: a stream told 30 fps alone got 10 beside two more and was never told)."""
        step_ms, _ = self._batch(list(self._streams.values()), steady=True)
        return {stream_id: self._expect(s, step_ms) for stream_id, s in self._streams.items()}

    def restart_stream(self, stream_id: str, lanes: int, now: float, *, first_chunk_latents: int = 2,
                       chunk_latents: int = 1, input_fps: float | None = None) -> tuple[Admission, list[int]]:
        """Re-admit a running stream with `lanes` (a step-count change, or model state an executor
        lost), atomically. Admitted: it starts over (its next chunk is a first chunk), on the KV
        lanes it held as far as they reach, with its stride; returns its pending frame ids for the
        engine to push again. Refused: nothing changes, the stream runs on as it was (its pending
        frames stay; []). Before, a refusal re-admitted the stream as a new one at its old lanes:
        the scheduler then planned a first chunk for a stream whose model state was mid-stream (the
        engine loop failed for every stream), or could not re-admit it at all and removed it."""
        old = self._streams.get(stream_id)
        if old is None:
            return self._refuse(stream_id, f"stream {stream_id!r} is not admitted"), []
        del self._streams[stream_id]
        self.free_stream_slots += 1
        self.kv.release(stream_id)
        # fewer steps (or the same, state lost) is never refused: a probe's 2 -> 1 was, when the
        # cost model, measuring a loaded machine, predicted more than a neighbour was promised
        admission = self.add_stream(stream_id, old.slo, old.tokens_per_frame, lanes, now,
                                    first_chunk_latents=first_chunk_latents, chunk_latents=chunk_latents,
                                    input_fps=old.measured_fps or old.input_fps or input_fps,  # measured or declared
                                    lane_stride=old.stride, judge_others=lanes > old.lanes)
        if not admission:  # put it back as it was: its lanes are the ones just released
            self._streams[stream_id] = old
            self.free_stream_slots -= 1
            self.kv.alloc(stream_id, old.lanes)
            return admission, []
        old.removed = True  # plans in flight still name the old entry; update() skips it
        new = self._streams[stream_id]
        new.vt_s, new.arrivals, new.measured_fps = old.vt_s, old.arrivals, old.measured_fps
        frame_ids = [frame_id for frame_id, _ in old.pending]
        old.pending.clear()
        return admission, frame_ids

    def remove_stream(self, stream_id: str) -> list[int]:
        """Forget the stream and free its KV-pool slot. Returns the ids of its pending input
        frames (the engine frees their buffers). Unknown ids are ignored (returns [])."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return []
        stream.removed = True  # plans in flight still name it; update() skips it
        self.free_stream_slots += 1
        self.kv.release(stream_id)
        frame_ids = [frame_id for frame_id, _ in stream.pending]
        stream.pending.clear()
        return frame_ids

    def push_frame(self, stream_id: str, frame_id: int, now: float, *, again: bool = False) -> list[int]:
        """Record an input frame's arrival at `now`. Keeps only the newest `need +
        max_extra_frames` pending frames; returns the ids dropped now (oldest first) so the engine
        frees them. `again`: a frame pushed before (a restarted stream's waiting frames), whose
        arrival is not counted twice in the stream's input rate."""
        stream = self._streams[stream_id]
        stream.pushed += 1
        if not again:
            stream.arrived(now)
        stream.pending.append((frame_id, now))
        dropped: list[int] = []
        keep = stream.need_frames + self.max_extra_frames
        while len(stream.pending) > keep:
            dropped.append(stream.pending.popleft()[0])
        stream.dropped += len(dropped)
        return dropped

    def kv_lanes_of(self, stream_id: str) -> tuple[int, ...]:
        """The KV-pool lanes the stream holds (one per denoise step)."""
        return self.kv.held[stream_id]

    def pending_frame_ids(self, stream_id: str) -> list[int]:
        return [frame_id for frame_id, _ in self._streams[stream_id].pending]

    # -- one step ------------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan | None:
        """Choose the chunks of the next step, or None if no stream has a chunk ready."""
        t0 = time.perf_counter()
        candidates = self._ready(now)
        if not candidates:
            self.last_decision_us = (time.perf_counter() - t0) * 1e6
            return None
        # 1. Fair share: a stream ahead of the least-served ready one (in its own chunk
        #    periods) is treated as if its deadline were that much later; one that idled is
        #    owed at most FAIR_LAG_CHUNKS chunks.
        vt_max = max(c.stream.vt_s for c in candidates)
        for c in candidates:
            floor_s = vt_max - FAIR_LAG_CHUNKS * c.stream.chunk_period_ms / 1000.0
            c.stream.vt_s = max(c.stream.vt_s, floor_s)
        vt_min = min(c.stream.vt_s for c in candidates)
        for c in candidates:
            s = c.stream
            c.key = (c.due_s + (s.vt_s - vt_min), s.vt_s, s.last_step, s.order)
        candidates.sort(key=lambda c: c.key)
        # 2. On time first: earliest deadline first, add a chunk while the predicted step still
        #    ends before its due time and before every chunk already in.
        chosen: list[_Candidate] = []
        rows = tokens = firsts = 0
        min_due_s = math.inf
        for c in candidates:
            end_s = now + self.periods_through * self.cost_model.predict_ms(rows + c.rows, tokens + c.tokens,
                                                                            len(chosen) + 1, firsts + c.first) / 1000.0
            if end_s <= min(min_due_s, c.due_s):
                c.chosen = True
                chosen.append(c)
                rows, tokens, min_due_s = rows + c.rows, tokens + c.tokens, min(min_due_s, c.due_s)
                firsts += c.first
        # 3. Then the late ones (they miss even alone, or did not fit), same order, as long as
        #    no on-time chunk is pushed past its due time. With no on-time chunk, all go.
        for c in (c for c in candidates if not c.chosen):
            end_s = now + self.periods_through * self.cost_model.predict_ms(rows + c.rows, tokens + c.tokens,
                                                                            len(chosen) + 1, firsts + c.first) / 1000.0
            if end_s <= min_due_s:
                chosen.append(c)
                rows, tokens, firsts = rows + c.rows, tokens + c.tokens, firsts + c.first
        chosen.sort(key=lambda c: c.due_s)
        plan = self._commit(chosen, now, rows, tokens)
        self.last_decision_us = (time.perf_counter() - t0) * 1e6
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Account a finished step: teach the cost model, count chunks done, output frames and
        deadline misses. Streams removed meanwhile are skipped."""
        if result.step_id != plan.step_id:
            raise ValueError(f"StepResult {result.step_id} does not belong to StepPlan {plan.step_id}")
        opened = self._open.pop(plan.step_id, None)
        if opened is None:
            raise KeyError(f"step {plan.step_id} is unknown or was already updated")
        end_s = result.end_s if result.end_s is not None else plan.start_s + result.step_ms / 1000.0
        if not result.failed:
            self.cost_model.observe(plan.rows, plan.tokens, result.step_ms, len(plan.chunks),
                                    sum(c.first for c in plan.chunks))
        for stream, emitted_arrivals_s in opened:
            # 1. Release the stream's in-flight count, even if it was removed meanwhile.
            stream.in_plans -= 1
            if stream.removed:
                continue
            stream.chunks_done += 1
            # 2. Latency of each frame whose output left the engine at the end of this step.
            if emitted_arrivals_s:
                latencies_ms = [(end_s - a) * 1000.0 for a in emitted_arrivals_s]
                stream.output_frames += len(latencies_ms)
                stream.deadline_misses += sum(1 for ms in latencies_ms if ms > stream.slo.deadline_ms)
                stream.last_latency_ms = max(latencies_ms)
                stream.max_latency_ms = max(stream.max_latency_ms, stream.last_latency_ms)

    # -- stats ---------------------------------------------------------------------------

    def stats(self, stream_id: str) -> StreamStats:
        s = self._streams[stream_id]
        return StreamStats(
            stream_id=s.stream_id, pushed_frames=s.pushed, dropped_frames=s.dropped,
            consumed_frames=s.consumed, waiting_frames=len(s.pending),
            chunks_planned=s.chunks_planned, chunks_done=s.chunks_done,
            output_frames=s.output_frames, deadline_misses=s.deadline_misses,
            last_latency_ms=s.last_latency_ms, max_latency_ms=s.max_latency_ms,
        )

    def all_stats(self) -> dict[str, StreamStats]:
        return {stream_id: self.stats(stream_id) for stream_id in self._streams}

    # -- internals -----------------------------------------------------------------------

    def _refuse(self, stream_id: str, reason: str, step_ms: float = 0.0, lasting: bool = False) -> Admission:
        return Admission(stream_id, False, reason, step_ms, self.free_stream_slots, lasting=lasting)

    @staticmethod
    def _shape(streams: list[_Stream], steady: bool = False) -> tuple[int, int, int, int]:
        """(rows, tokens, chunks, firsts) of one step batching all `streams` (see `_batch`): a
        chunk of each, a row per lane; the unprepared ones' first chunks unless `steady`."""
        rows = sum(s.lanes for s in streams)
        tokens = sum(s.lanes * (s.chunk_latents if steady else s.next_latents) * s.tokens_per_frame
                     for s in streams)
        firsts = 0 if steady else sum(not s.prepared for s in streams)
        return rows, tokens, len(streams), firsts

    def _batch(self, streams: list[_Stream], steady: bool = False) -> tuple[float, str]:
        """Predicted ms of one step batching all `streams` (unprepared ones with their bigger
        first chunk unless `steady`: every one past it), and its description."""
        rows, tokens, n, firsts = self._shape(streams, steady)
        return (self.cost_model.predict_ms(rows, tokens, n, firsts),
                f"{n} stream{'s' if n > 1 else ''} ({rows} rows, {tokens} tokens)")

    @staticmethod
    def _expect(s: _Stream, step_ms: float) -> tuple[float, float]:
        """(fps, latency ms) a stream can expect with a pipeline period of `step_ms`: a chunk per
        `interval_ms` at most, input at the rate frames arrive at most; latency as `latency_ms`
        in the steady state (its deadline is judged on the same figure, first chunk included)."""
        steady = frames_for_latents(s.chunk_latents, first=False)
        fps = min(s.arrival_fps, 1000.0 * steady / max(s.interval_ms(step_ms), 1e-6))
        return fps, s.latency_ms(step_ms, first_chunk=False)

    def _breaks(self, s: _Stream, next_step: tuple[float, str], steady: tuple[float, str], *,
                newcomer: bool) -> str | None:
        """Why the batch breaks what stream `s` is owed (its SLO, or for a running best-effort
        stream the step it was promised); None if it does not. Each promise is judged on the
        step it is about: fps (a rate) and a best-effort stream's step (a period) on the
        `steady` step, every stream past its first chunk; a running stream's deadline (a
        latency) on the `next_step`, first chunks included, whose frames it also bounds; the
        newcomer's on the steady state, what it is told to expect (`_expect`): its own first
        chunk is its time to first frame, and judged on it, it was called best effort while told
        figures within the service level (a page probe: "expect about 2.2 fps and up to 5.6 s
        latency (best effort: ... cannot reach ... 2 fps within 8 s)"). Each is (predicted ms,
        description)."""
        who = "it" if newcomer else f"stream {s.stream_id!r}"
        steady_ms, steady_batch = steady
        if not newcomer and s.best_effort:
            # Its promise, re-predicted now: the batch it joined beside, or its SLO's longest step.
            # Compared with a step predicted by the same model, so a refit that predicts more for
            # every batch (a busier machine, a wider margin) refuses only what adds work to it.
            promise_ms = max(self.cost_model.predict_ms(*s.promised_batch), s.slo_step_ms())
            if steady_ms > promise_ms:
                return (f"{who}, admitted best effort with steps of {promise_ms:.1f} ms, would slow "
                        f"down: a step batching {steady_batch} is predicted at {steady_ms:.1f} ms")
            return None
        slo = f"{who} ({s.slo.describe()})"
        if s.interval_ms(steady_ms) > s.chunk_period_ms:
            return (f"{slo} would fall below its target fps: it needs a chunk every "
                    f"{s.chunk_period_ms:.1f} ms but a step batching {steady_batch} is predicted at "
                    f"{steady_ms:.1f} ms"
                    + (f" (a chunk every {s.interval_ms(steady_ms):.1f} ms with lane stride {s.stride} over "
                       f"{s.depth} stages)" if s.depth > 1 else ""))
        step_ms, batch = steady if newcomer else next_step
        need_ms = s.latency_ms(step_ms, first_chunk=not newcomer)
        if need_ms > s.slo.deadline_ms:
            in_flight_ms = s.in_flight_ms(step_ms)
            return (f"{slo} would miss its deadline: {need_ms - in_flight_ms:.1f} ms to gather frames at "
                    f"{s.arrival_fps:g} fps with {s.lanes} lane{'s' if s.lanes > 1 else ''} "
                    f"(stream-batch lag included) + {s.depth + 1} x {step_ms:.1f} ms steps ({batch}) = "
                    f"{need_ms:.1f} ms > {s.slo.deadline_ms:g} ms")
        return None

    def _ready(self, now: float) -> list[_Candidate]:
        """Streams with a full chunk pending and room for one more chunk in flight."""
        out = []
        for s in self._streams.values():
            need = s.need_frames
            if len(s.pending) < need or s.in_plans >= max(self.max_chunks_in_flight, s.stride):
                continue
            # The step must end in time for the chunk it outputs: this one if it leaves at once,
            # else the oldest chunk in the lag if this step pushes it out, else this one (warm-up).
            if s.prepared and s.lanes > 1 and len(s.lag) >= s.lag_chunks:
                oldest_arrival_s = s.lag[0][0][0]  # (arrivals_s, frame_ids) of its oldest chunk
            else:
                oldest_arrival_s = s.pending[0][1]
            due_s = oldest_arrival_s + s.slo.deadline_ms / 1000.0
            out.append(_Candidate(s, s.lanes, s.lanes * s.next_latents * s.tokens_per_frame, due_s,
                                  int(not s.prepared)))
        return out

    def _commit(self, chosen: list[_Candidate], now: float, rows: int, tokens: int) -> StepPlan:
        """Take the chosen chunks' frames out of pending and build the plan."""
        step_id = self._next_step_id
        self._next_step_id += 1
        chunks: list[PlannedChunk] = []
        opened: list[tuple[_Stream, tuple[float, ...]]] = []
        for c in chosen:
            s = c.stream
            # 1. Consume the oldest `need` pending frames (the newest kept under overload).
            taken = [s.pending.popleft() for _ in range(s.need_frames)]
            frame_ids = tuple(frame_id for frame_id, _ in taken)
            arrivals_s = tuple(arrival_s for _, arrival_s in taken)
            first, latents = not s.prepared, s.next_latents
            # 2. Stream-batch lag: the first chunk (and every chunk with one lane) leaves now;
            #    later ones enter the lag and push out the one (lanes - 1)·D chunks older.
            if first or s.lanes == 1:
                emitted_ids, emitted_arrivals = frame_ids, arrivals_s
            else:
                s.lag.append((arrivals_s, frame_ids))
                emitted_arrivals, emitted_ids = s.lag.popleft() if len(s.lag) > s.lag_chunks else ((), ())
            # 3. Bookkeeping: fair-share clock, counters, in-flight count.
            s.prepared = True
            s.vt_s += len(frame_ids) / s.slo.target_fps
            s.last_step = step_id
            s.in_plans += 1
            s.consumed += len(frame_ids)
            s.chunks_planned += 1
            chunks.append(PlannedChunk(s.stream_id, frame_ids, s.lanes, first, latents, c.tokens,
                                       c.due_s, emitted_ids))
            opened.append((s, emitted_arrivals))
        self._open[step_id] = opened
        predicted_ms = self.cost_model.predict_ms(rows, tokens, len(chunks), sum(c.first for c in chunks))
        return StepPlan(step_id, now, tuple(chunks), rows, tokens, predicted_ms)
