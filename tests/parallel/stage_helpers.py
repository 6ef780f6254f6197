"""Shared drivers for the stage tests: three streams (2, 1 and 4 denoise steps, one joining
late, one blending to a new prompt) through an EngineCore over any executor (`run_streams`);
and one stream fed a chunk before every step, so plans overlap (`drive`)."""

from __future__ import annotations

import numpy as np

from engine_helpers import RELAXED, FakeClock, Feeder, params
from streamdiff.engine import EngineCore, LocalExecutor
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw

SPECS = {  # stream -> (prompt, steps, seed, clip seed)
    "a": ("a watercolor city", 2, 1, 11),
    "b": ("a charcoal sketch", 1, 2, 12),
    "c": ("a neon night", 4, 3, 13),
}
TOL = 1  # grey levels: batched VAE calls group streams per forward instead of per step


def core_for(cfg, executor, clock=None):
    clock = clock or FakeClock()
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.1, 0.0)), max_streams=4)
    return EngineCore(cfg, executor, scheduler=sched, clock=clock), clock


def run_streams(cfg, executor, rounds: int = 8, between=None) -> dict:
    """Output frames per stream; `between(round, core, executor)` runs before each round."""
    core, clock = core_for(cfg, executor)
    clips = {sid: synthetic_clip(5 + 4 * rounds, 64, 48, seed=spec[3]) for sid, spec in SPECS.items()}
    for sid, (prompt, steps, seed, _) in SPECS.items():
        assert core.add_stream(sid, params(cfg, prompt, steps=steps, seed=seed), RELAXED)
    feeder = Feeder(core, clock, clips)
    for r in range(rounds):
        if between is not None:
            between(r, core, executor)
        if r == 4:
            core.update_params("a", prompt="a pencil drawing", prompt_blend_chunks=2)
        feeder.round(["a", "b"] + (["c"] if r >= 2 else []))
    return {sid: feeder.frames(sid) for sid in SPECS}


def reference(cfg, comps, rounds: int = 8) -> dict:
    from streamdiff.engine import LocalExecutor
    from streamdiff.engine.model_runner import ModelRunner

    return run_streams(cfg, LocalExecutor(ModelRunner(comps, 4)), rounds)


CHUNKS = 16
PROMPT_AT, SEED_AT = 5, 8  # live changes before these chunks


def drive(cfg, executor, steps: int) -> tuple[EngineCore, list, dict[int, int], int]:
    """One stream through EngineCore: a chunk pushed before every `step()` (so the pipeline
    fills), a prompt change before chunk PROMPT_AT and a seed change before chunk SEED_AT, then
    drain. Returns (core, output frames, {entering chunk -> chunk emitted by its plan}, the
    most plans seen in flight)."""
    clock = FakeClock()
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.1, 0.0)), max_streams=2)
    core = EngineCore(cfg, executor, scheduler=sched, clock=clock)
    assert core.add_stream("s", params(cfg, "a red fox", steps=steps, seed=7), RELAXED)
    clip = synthetic_clip(5 + 4 * (CHUNKS - 1), 64, 48, seed=21)
    outputs, emitted, depth_seen = [], {}, 0
    reports = []
    for c in range(CHUNKS):
        if c == PROMPT_AT:
            core.update_params("s", prompt="a blue whale")
        if c == SEED_AT:
            core.update_params("s", seed=1234)
        frames = clip[:5] if c == 0 else clip[5 + 4 * (c - 1): 9 + 4 * (c - 1)]
        first = 0 if c == 0 else 5 + 4 * (c - 1)
        for i, frame in enumerate(frames):
            core.push_frame("s", frame, pts=first + i)
        report = core.step()
        assert report is not None
        depth_seen = max(depth_seen, core.plans_in_flight)
        reports.append(report)
        outputs += core.pop_outputs("s")
        clock.t += 4 / 30
    reports += core.drain()
    outputs += core.pop_outputs("s")
    for report in reports:
        if report.result is None:
            continue
        out = report.result.outputs.get("s")
        entering = _chunk_of(report.plan.chunks[0].frame_ids[0]) if report.plan.chunks else None
        if out is not None:
            emitted[entering] = _chunk_of(out.metas[0].pts)
    return core, outputs, emitted, depth_seen


def _chunk_of(frame_index: int) -> int:
    return 0 if frame_index < 5 else 1 + (frame_index - 5) // 4


def frames_of(outputs) -> np.ndarray:
    return np.stack([o.frame for o in outputs])


def local(comps):
    """The local executor; the engine gives each stream its lane stride (params.lane_stride)."""
    from streamdiff.engine.model_runner import ModelRunner

    return LocalExecutor(ModelRunner(comps, 2))
