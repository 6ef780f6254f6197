"""The engine serving N streams gives each the frames N separate StreamPipelines give.

Tolerance: at most 1 grey level per pixel. The engine stacks rows of several streams (other
prompts, lanes, fill levels) into one forward; batched matmuls round differently from 1-3-row
ones, which can move a pixel across a rounding boundary. Everything else (noise, VAE caches,
lanes, slot fill) is per stream and identical by construction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import RELAXED, FakeClock, Feeder, max_abs_diff, model_core, params
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_pipeline import StreamPipeline

TOL = 1
SPECS = {  # stream -> (prompt, steps, seed, clip seed)
    "a": ("a watercolor city", 2, 1, 11),
    "b": ("a charcoal sketch", 1, 2, 12),
    "c": ("a neon night", 4, 3, 13),
}


def reference(comps, sid, frames, *, change_at=None, change=None):
    """StreamPipeline output for `frames`; `change(pipe)` is applied after `change_at` frames."""
    prompt, steps, seed, _ = SPECS[sid]
    pipe = StreamPipeline(comps, prompt, steps=steps, seed=seed)
    if change_at is None:
        return pipe.push(frames)
    before = pipe.push(frames[:change_at])
    change(pipe)
    return np.concatenate([before, pipe.push(frames[change_at:])])


def start(comps, cfg, clip_frames=41, sids=("a", "b", "c")):
    clock = FakeClock()
    core = model_core(comps, clock)
    clips = {sid: synthetic_clip(clip_frames, 64, 48, seed=SPECS[sid][3]) for sid in sids}
    for sid in sids:
        prompt, steps, seed, _ = SPECS[sid]
        assert core.add_stream(sid, params(cfg, prompt, steps=steps, seed=seed), RELAXED)
    return core, Feeder(core, clock, clips)


def test_three_streams_equal_three_pipelines(comps, cfg):
    """Streams with 2, 1 and 4 denoise steps; "c" joins two chunks late, so one step holds
    its prepare (2-latent rows, own forwards) next to the others' stream-batch rows."""
    core, feeder = start(comps, cfg)
    for r in range(8):
        feeder.round(["a", "b"] + (["c"] if r >= 2 else []))
    # 1. Every step batched every ready stream into one stream-batch forward (+ prepares).
    mixed = [rep for rep in feeder.reports if len({c.first for c in rep.plan.chunks}) == 2]
    assert mixed and all(rep.result.forwards == 1 + 4 for rep in mixed)  # 1 batch + c's 4 prepare steps
    assert max(rep.plan.rows for rep in feeder.reports) == 2 + 1 + 4
    for sid in SPECS:
        # 2. Same frames as a StreamPipeline fed the same input, same lag.
        got, ref = feeder.frames(sid), reference(comps, sid, feeder.clips[sid][: feeder.pos[sid]])
        assert len(got) == len(ref) == feeder.pos[sid] - 4 * (SPECS[sid][1] - 1)
        assert max_abs_diff(got, ref) <= TOL
        # 3. Each output names the input frame it came from, in order.
        assert [o.pts for o in feeder.outputs[sid]] == list(range(len(got)))
    # 4. The scheduler's lag bookkeeping names exactly the frames the runner output.
    for rep in feeder.reports:
        for chunk in rep.plan.chunks:
            assert rep.delivered.get(chunk.stream_id, 0) == len(chunk.emit_frame_ids)


def test_prompt_change_shows_within_two_chunks_and_leaves_others_alone(comps, cfg):
    core, feeder = start(comps, cfg)
    for _ in range(3):
        feeder.round()
    changed_at = feeder.pos["a"]
    outputs_before = len(feeder.outputs["a"])
    core.update_params("a", prompt="a bronze statue")
    for _ in range(4):
        feeder.round()
    frames_a = feeder.clips["a"][: feeder.pos["a"]]
    # 1. "a" equals a pipeline whose prompt was swapped at the same chunk boundary ...
    swapped = reference(comps, "a", frames_a, change_at=changed_at, change=lambda p: p.set_prompt("a bronze statue"))
    assert max_abs_diff(feeder.frames("a"), swapped) <= TOL
    # 2. ... and differs from the unchanged stream within 2 chunks (8 frames) of the change.
    unchanged = reference(comps, "a", frames_a)
    window = slice(outputs_before, outputs_before + 8)
    assert max_abs_diff(feeder.frames("a")[window], unchanged[window]) > TOL
    assert max_abs_diff(feeder.frames("a")[:outputs_before], unchanged[:outputs_before]) <= TOL
    # 3. The other streams are untouched.
    for sid in ("b", "c"):
        assert max_abs_diff(feeder.frames(sid), reference(comps, sid, feeder.clips[sid][: feeder.pos[sid]])) <= TOL


def test_seed_noise_and_motion_changes_apply_at_the_next_chunk(comps, cfg):
    core, feeder = start(comps, cfg, sids=("a", "b"))
    for _ in range(3):
        feeder.round()
    changed_at = feeder.pos["b"]
    core.update_params("b", seed=77, noise_strength=0.6, motion_aware=False)
    for _ in range(3):
        feeder.round()

    def change(pipe):
        pipe.state.seed = 77
        pipe.motion.base_strength, pipe.motion.enabled = 0.6, False

    frames_b = feeder.clips["b"][: feeder.pos["b"]]
    ref_b = reference(comps, "b", frames_b, change_at=changed_at, change=change)
    assert max_abs_diff(feeder.frames("b"), ref_b) <= TOL
    assert max_abs_diff(feeder.frames("b"), reference(comps, "b", frames_b)) > TOL
    assert core.executor.runner.streams["b"].motion.strength == pytest.approx(0.6)
    assert max_abs_diff(feeder.frames("a"), reference(comps, "a", feeder.clips["a"][: feeder.pos["a"]])) <= TOL


def test_steps_change_re_prepares_the_stream(comps, cfg):
    """Steps 2 -> 3: the chunk in flight is dropped (4 frames, counted), the stream restarts as a
    3-step stream from the next frame, and the other stream does not notice."""
    core, feeder = start(comps, cfg, sids=("a", "b"))
    for _ in range(3):
        feeder.round()
    restart_at, outputs_before = feeder.pos["a"], len(feeder.outputs["a"])
    slots_before = core.executor.runner.slots.free_slots
    new = core.update_params("a", steps=3)
    assert new.steps == 3 and core.executor.runner.streams["a"].steps == 3
    assert core.executor.runner.slots.free_slots == slots_before - core.cfg.cache.window  # one more lane
    for _ in range(5):
        feeder.round()
    after = feeder.frames("a")[outputs_before:]
    pipe = StreamPipeline(comps, SPECS["a"][0], steps=3, seed=SPECS["a"][2])
    ref = pipe.push(feeder.clips["a"][restart_at : feeder.pos["a"]])
    assert max_abs_diff(after, ref) <= TOL
    assert [o.pts for o in feeder.outputs["a"][outputs_before:]] == list(range(restart_at, restart_at + len(ref)))
    assert core.metrics.snapshot()["streams"]["a"]["dropped_by_cause"]["restart"] == 4
    assert max_abs_diff(feeder.frames("b"), reference(comps, "b", feeder.clips["b"][: feeder.pos["b"]])) <= TOL


def test_prompt_blend_mixes_text_embeddings_over_k_chunks(comps):
    """With prompt_blend_chunks=k, chunk i after the change is conditioned on (1-i/k)·old + (i/k)·new."""
    pipe = StreamPipeline(comps, "a watercolor city", steps=2)
    clip = synthetic_clip(5 + 4 * 4, 64, 48, seed=3)
    pipe.push(clip[:5])
    old, new = comps.text.encode("a watercolor city"), comps.text.encode("a bronze statue")
    pipe.state.set_prompt("a bronze statue", blend_chunks=3)
    layer = comps.model.layer_ids[0]
    for i in (1, 2, 3):
        pipe.push(clip[5 + 4 * (i - 1) : 5 + 4 * i])
        alpha = i / 3
        want = comps.model.prompt_kv((1 - alpha) * old + alpha * new)[layer][0]
        torch.testing.assert_close(pipe.state.cross_kv[layer][0], want)
    assert pipe.state._blend is None and pipe.prompt == "a bronze statue"
