"""The engine's value types and parameter validation (no torch).

Owns: `StreamParams` (what a stream may set live, with allowed ranges and the validation that
names the field), `FrameMeta` (an input frame's id, pts and arrival), `ChunkInput` (what the
core hands the executor per planned chunk), `StreamOutput` / `EngineStepResult` (what the
executor hands back), `OutputFrame` (what a caller of `next_frame` gets).
`StreamCommands`: the stream commands the core has decided and no executor has seen yet,
coalesced per stream, until they ride in the next plan.
Does not own: scheduling types (streamdiff.scheduler.types: `StepPlan`, `StepResult`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import numpy as np

from streamdiff.config import MAX_BLEND_CHUNKS, MAX_SEED, Config
from streamdiff.scheduler.types import COMMANDS_ONLY_STEP, StepPlan, StepResult, StreamStart, StreamUpdate


# field -> (kind, low, high); the text of every ValueError comes from here.
PARAM_RANGES: dict[str, tuple[type, float, float]] = {
    "steps": (int, 1, 4),
    "seed": (int, 0, MAX_SEED),
    "noise_strength": (float, 0.1, 1.0),
    "prompt_blend_chunks": (int, 0, MAX_BLEND_CHUNKS),
}


class StreamClosedError(RuntimeError):
    """The stream was removed (or the engine stopped) while waiting for its frames."""


class StreamsLost(RuntimeError):
    """An executor lost the model-side state of streams (a pipeline stage died). `resumed`:
    the executor re-created them with a fresh cache (the engine re-prepares them); otherwise
    the engine closes them with `reason`."""

    def __init__(self, stream_ids: list[str], reason: str, resumed: bool):
        super().__init__(reason)
        self.stream_ids = list(stream_ids)
        self.reason = reason
        self.resumed = resumed


@dataclass(frozen=True)
class StreamParams:
    """A stream's live parameters.

    prompt: the text prompt. prompt_blend_chunks: a prompt change blends the text embeddings
    linearly over this many chunks (0: switch at the next chunk). steps: denoise steps 1-4
    (a change re-prepares the stream). seed: noise seed. noise_strength: s0 of the motion
    controller (0.1-1.0). motion_aware: the motion controller on/off (off: s = s0).
    """

    prompt: str
    steps: int
    seed: int
    noise_strength: float
    motion_aware: bool
    prompt_blend_chunks: int = 0
    # Not a live parameter: the stream's lane stride D, set by the engine at admission
    # (0: `parallel.lane_stride`, else 1). Lane j of its p-th forward holds chunk p - j·D.
    lane_stride: int = 0

    @staticmethod
    def defaults(cfg: Config, prompt: str = "") -> "StreamParams":
        s = cfg.sampling
        return StreamParams(prompt, s.steps, s.seed, s.noise_strength, s.motion_aware, 0)

    def with_changes(self, changes: Mapping[str, object]) -> "StreamParams":
        return replace(self, **validate_changes(changes))


PARAM_NAMES = tuple(f.name for f in fields(StreamParams) if f.name != "lane_stride")


def short_repr(value: object, limit: int = 60) -> str:
    """A client's value as an error message may quote it: `repr`, cut to about `limit`
    characters (a fuzzing client's 100 kB string came back whole in the 400's body)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit
        return f"a {type(value).__name__} too long to show"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def validate_changes(changes: Mapping[str, object]) -> dict[str, object]:
    """Check live parameter changes; returns them normalised (ints as int, strength as float).
    Raises ValueError naming the field and its allowed range / type."""
    out: dict[str, object] = {}
    for name, value in changes.items():
        if name not in PARAM_NAMES:
            raise ValueError(f"unknown stream parameter {short_repr(name)} (known: {', '.join(PARAM_NAMES)})")
        if name == "prompt":
            if not isinstance(value, str):
                raise ValueError(f"prompt must be a string, got {type(value).__name__}")
            out[name] = value
        elif name == "motion_aware":
            if not isinstance(value, bool):
                raise ValueError(f"motion_aware must be true or false, got {short_repr(value)}")
            out[name] = value
        else:
            kind, lo, hi = PARAM_RANGES[name]
            ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
            # whole numbers in full (the seed's top, 2**63 - 1, as the CLI says it; "0 or more"
            # read wrong for 2**63, which is refused)
            allowed = f"{lo} to {hi}" if kind is int else f"{lo:g} to {hi:g}"
            if isinstance(value, bool) or not ok_type:
                what = "a number" if kind is float else "a whole number"
                raise ValueError(f"{name} must be {what} from {allowed}, got {short_repr(value)}")
            if not lo <= value <= hi:
                raise ValueError(f"{name}={short_repr(value)} is out of range: allowed {allowed}")
            out[name] = kind(value)
    return out


@dataclass(frozen=True)
class FrameMeta:
    """An input frame: engine-wide id, the caller's pts, arrival time on the engine clock."""

    frame_id: int
    pts: object
    arrival_s: float


@dataclass(frozen=True)
class ChunkInput:
    """One planned chunk's frames [n, H, W, 3] uint8 and their metadata (same order)."""

    frames: np.ndarray
    metas: tuple[FrameMeta, ...]


@dataclass(frozen=True)
class StreamOutput:
    """Frames a stream finished in one step [m, H, W, 3] uint8, one input FrameMeta per frame."""

    frames: np.ndarray
    metas: tuple[FrameMeta, ...]


@dataclass(frozen=True)
class EngineStepResult(StepResult):
    """The scheduler's StepResult plus what the executor produced: per-stream output frames
    and the number of DiT forwards the step ran (1, plus one per denoise step of prepares)."""

    outputs: Mapping[str, StreamOutput] = field(default_factory=dict)
    forwards: int = 0


class StreamCommands:
    """Commands for the executors, coalesced per stream until they ride in a plan: a stream
    added and removed before any plan never reaches an executor; changes to a stream not yet
    created (or re-created) fold into its start; a removal cancels its pending changes.

    Changes to a running stream fold only where applying the fold once equals applying them in
    turn: into a pending change that changes no prompt (its fields are all set again by the later
    one). After a prompt change the next change is kept apart, in order: a prompt change starts a
    swap or a blend from what conditions the stream then, so a swap then a blend, a blend then
    the blend length alone, or a swap then the blend length, folded, blended from the prompt
    before them (a fuzzer, with plans in flight; the local executor sends each change at once)."""

    def __init__(self):
        self.new: dict[str, StreamStart] = {}
        self.finished: list[str] = []
        self.restarted: dict[str, StreamStart] = {}
        self.updated: list[StreamUpdate] = []  # in the order they were made; a stream may have several

    def __bool__(self) -> bool:
        return bool(self.new or self.finished or self.restarted or self.updated)

    def add(self, stream_id: str, params: StreamParams, kv_lanes: tuple[int, ...]) -> None:
        self.new[stream_id] = StreamStart(stream_id, params, tuple(kv_lanes))

    def _drop_updates(self, stream_id: str) -> None:
        self.updated = [update for update in self.updated if update.stream_id != stream_id]

    def remove(self, stream_id: str) -> None:
        self.restarted.pop(stream_id, None)
        self._drop_updates(stream_id)
        if self.new.pop(stream_id, None) is not None and stream_id not in self.finished:
            return  # never reached an executor
        if stream_id not in self.finished:
            self.finished.append(stream_id)

    def restart(self, stream_id: str, params: StreamParams, kv_lanes: tuple[int, ...]) -> None:
        self._drop_updates(stream_id)
        start = StreamStart(stream_id, params, tuple(kv_lanes))
        if stream_id in self.new:
            self.new[stream_id] = start
        else:
            self.restarted[stream_id] = start

    def update(self, stream_id: str, params: StreamParams, changed) -> None:
        for pending in (self.new, self.restarted):
            if stream_id in pending:
                pending[stream_id] = replace(pending[stream_id], params=params)
                return
        at = next((i for i in range(len(self.updated) - 1, -1, -1) if self.updated[i].stream_id == stream_id), None)
        if at is not None and "prompt" not in self.updated[at].changed:
            names = tuple(dict.fromkeys((*self.updated[at].changed, *changed)))
            self.updated[at] = StreamUpdate(stream_id, params, names)
        else:
            self.updated.append(StreamUpdate(stream_id, params, tuple(changed)))

    def attach(self, plan: StepPlan) -> StepPlan:
        """`plan` carrying every pending command; nothing is pending afterwards."""
        plan = replace(plan, new_streams=tuple(self.new.values()), finished_streams=tuple(self.finished),
                       restarted_streams=tuple(self.restarted.values()), updated_streams=tuple(self.updated))
        self.__init__()
        return plan

    def plan(self, now_s: float) -> StepPlan:
        """A plan carrying the pending commands and no chunks."""
        return self.attach(StepPlan(COMMANDS_ONLY_STEP, now_s, (), 0, 0, 0.0))


@dataclass(frozen=True)
class OutputFrame:
    """One output frame and where it came from (for latency measurement)."""

    stream_id: str
    frame: np.ndarray  # [H, W, 3] uint8
    frame_id: int  # the input frame it was made from
    pts: object  # that input frame's pts, as pushed
    arrival_s: float  # when that input frame reached the engine (engine clock)
    output_s: float  # end of the step that produced it (engine clock)
    index: int  # output frames of this stream before this one

    @property
    def latency_ms(self) -> float:
        return (self.output_s - self.arrival_s) * 1000.0


__all__ = [
    "ChunkInput",
    "EngineStepResult",
    "FrameMeta",
    "OutputFrame",
    "PARAM_NAMES",
    "PARAM_RANGES",
    "StreamClosedError",
    "StreamCommands",
    "StreamsLost",
    "StreamOutput",
    "StreamParams",
    "short_repr",
    "validate_changes",
]
