"""Shared driver for the stage tests: three streams (2, 1 and 4 denoise steps, one joining
late, one blending to a new prompt) through an EngineCore over any executor."""

from __future__ import annotations

from engine_helpers import RELAXED, FakeClock, Feeder, params
from streamdiff.engine import EngineCore
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
