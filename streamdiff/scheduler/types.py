"""The scheduler's value types: what a stream asks for, what one step runs, what it measured.

Owns: `StreamSLO` (a stream's service objective), `StepPlan` / `PlannedChunk` (the scheduler's
decision for one engine step), `StepResult` (what the executor measured), `Admission` (the
answer to `add_stream`) and `StreamStats` (per-stream counters).
Does not own: any decision (frame_scheduler.py), step-time prediction (cost_model.py), frame
pixels or tensors. Everything here is plain integers, floats, strings and tuples; no torch.

Clock: every `*_s` time is seconds on the caller's monotonic clock (`time.monotonic()` in the
engine, a plain float in tests); durations are `*_ms`.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamdiff.config import VAE_TIME_STRIDE, frames_for_latents  # re-exported: the scheduler's callers use them


@dataclass(frozen=True)
class StreamSLO:
    """A stream's service objective.

    target_fps: output frames per second the stream must sustain (input is gathered at this
        rate too; faster input is dropped down to the newest frames).
    deadline_ms: the longest a frame may take from its arrival at the engine to the end of the
        step that outputs it (frame gathering and stream-batch lag included).
    """

    target_fps: float
    deadline_ms: float

    def __post_init__(self) -> None:
        if not self.target_fps > 0:
            raise ValueError(f"target_fps must be > 0, got {self.target_fps!r}")
        if not self.deadline_ms > 0:
            raise ValueError(f"deadline_ms must be > 0, got {self.deadline_ms!r}")

    def describe(self) -> str:
        return f"{self.target_fps:g} fps, {self.deadline_ms:g} ms deadline"


@dataclass(frozen=True)
class PlannedChunk:
    """One stream's part of a step: one chunk, `lanes` batch rows (one per denoise step)."""

    stream_id: str
    frame_ids: tuple[int, ...]  # input frames consumed, oldest first (5 for a first chunk, else 4)
    lanes: int  # batch rows this stream contributes (= its denoise steps)
    first: bool  # the stream's first chunk: prepared directly, its output leaves this step
    latents: int  # latent frames in the chunk (2 for a first chunk, else 1)
    tokens: int  # query tokens of all its rows: lanes * latents * tokens_per_frame
    due_s: float  # the step must end by this time for this stream to meet its deadline
    emit_frame_ids: tuple[int, ...]  # input frames whose output leaves the engine at this step's end

    @property
    def rows(self) -> int:
        return self.lanes


@dataclass(frozen=True)
class StreamStart:
    """A stream whose model-side state an executor creates (new) or re-creates from scratch
    (restarted: lanes, KV, VAE caches and motion dropped; its next chunk is a first chunk):
    its live parameters (the engine's StreamParams, opaque here) and the KV-pool lanes the
    scheduler allocated to it (one per denoise step)."""

    stream_id: str
    params: object
    kv_lanes: tuple[int, ...]


@dataclass(frozen=True)
class StreamUpdate:
    """A stream's live parameters changed (not its steps): `params` from its next chunk on;
    `changed` names the fields that changed (a prompt change starts a blend or a swap)."""

    stream_id: str
    params: object
    changed: tuple[str, ...]


@dataclass(frozen=True)
class StepPlan:
    """One engine step: a single batched forward over the chunks listed, earliest due first.

    The stream commands (vLLM's SchedulerOutput style): the engine core decides, every executor
    applies them before the step's chunks, in this order: finished streams are dropped,
    restarted streams release their old state, then restarted and new streams are created on
    the KV lanes given, then live updates apply. A plan with no chunks carries commands only
    (step_id -1: not a scheduler step)."""

    step_id: int
    start_s: float  # `now` when the plan was made
    chunks: tuple[PlannedChunk, ...]
    rows: int  # total batch rows
    tokens: int  # total query tokens
    predicted_ms: float  # the cost model's (conservative) step time for this batch
    new_streams: tuple[StreamStart, ...] = ()
    finished_streams: tuple[str, ...] = ()
    restarted_streams: tuple[StreamStart, ...] = ()
    updated_streams: tuple[StreamUpdate, ...] = ()

    @property
    def has_commands(self) -> bool:
        return bool(self.new_streams or self.finished_streams or self.restarted_streams or self.updated_streams)

    @property
    def stream_ids(self) -> tuple[str, ...]:
        return tuple(c.stream_id for c in self.chunks)

    @property
    def predicted_end_s(self) -> float:
        return self.start_s + self.predicted_ms / 1000.0


@dataclass(frozen=True)
class StepResult:
    """What the executor measured for one StepPlan.

    step_ms: wall time of the step (the cost model learns from it, unless `failed`).
    end_s: clock time at the end of the step; None means start_s + step_ms.
    failed: the step was lost with a failed pipeline: its time says nothing of a step's cost
    (a fault probe: a stage that timed out taught the model a 30 s step, and the next stream was
    told to expect 0.1 fps).
    """

    step_id: int
    step_ms: float
    end_s: float | None = None
    failed: bool = False


COMMANDS_ONLY_STEP = -1  # the step_id of a plan that carries stream commands and no chunks


@dataclass(frozen=True)
class Admission:
    """The answer to `add_stream`. Truthy when admitted; `reason` says why not (or the margin)."""

    stream_id: str
    admitted: bool
    reason: str
    predicted_step_ms: float = 0.0  # step time with every admitted stream batched together
    free_stream_slots: int = 0  # KV-pool stream slots left after this decision
    best_effort: bool = False  # admitted although its own SLO cannot hold (it breaks no other stream)
    expected_fps: float = 0.0  # output frames per second it can expect (throughput, capped at input fps)
    expected_latency_ms: float = 0.0  # about how long a frame takes from arrival to output
    lane_stride: int = 1  # its lane stride D: chunks of it in flight at once (pipeline stages)
    lasting: bool = False  # refused whatever other streams do (more lanes than the pool has): no retry helps
    streams: int = 0  # streams admitted with it (itself included): what its expected figures assume

    def __bool__(self) -> bool:
        return self.admitted


@dataclass(frozen=True)
class StreamStats:
    """Per-stream counters (a snapshot)."""

    stream_id: str
    pushed_frames: int
    dropped_frames: int  # input frames dropped to keep only the newest (overload)
    consumed_frames: int  # input frames put into a planned chunk
    waiting_frames: int  # input frames pending now
    chunks_planned: int
    chunks_done: int  # planned chunks whose step finished
    output_frames: int  # frames whose output left the engine
    deadline_misses: int  # output frames later than arrival + deadline
    last_latency_ms: float  # arrival -> output of the oldest frame of the last output chunk
    max_latency_ms: float
