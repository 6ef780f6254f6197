"""StreamPipeline end to end on the tiny random model (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff.config import with_overrides
from streamdiff.model.build import build_components
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_pipeline import StreamPipeline


@pytest.fixture(scope="module")
def comps():
    from streamdiff.config import load_config

    cfg = load_config("tiny", ["video.width=64", "video.height=48", "runtime.device=cpu"])
    return build_components(cfg)


@pytest.fixture(scope="module")
def rolling(comps):
    """The same components under cache.policy=rolling."""
    return type(comps)(**{**comps.__dict__, "cfg": with_overrides(comps.cfg, cache={"policy": "rolling"})})


def render(comps, clip, prompt="a watercolor city", chunked=(7, 3, 11, 30), **kw):
    pipe = StreamPipeline(comps, prompt, **kw)
    out, i = [], 0
    for n in chunked:  # uneven pushes: chunking must not depend on how frames arrive
        out.append(pipe.push(clip[i : i + n]))
        i += n
    out.append(pipe.push(clip[i:]))
    out.append(pipe.flush())
    return np.concatenate(out), pipe


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_stream_batch_equals_sequential_denoising(comps, steps):
    """One forward per chunk with one lane per step equals running each chunk's steps one after
    another (the lag aside). Tolerance: at most 1 grey level (batched vs single-row matmuls)."""
    clip = synthetic_clip(29, 64, 48, seed=1)
    batched, pipe = render(comps, clip, steps=steps)
    sequential, _ = render(comps, clip, steps=steps, stream_batch=False)
    assert pipe.lag_chunks == steps - 1
    assert batched.shape == sequential.shape == clip.shape
    assert np.abs(batched.astype(int) - sequential.astype(int)).max() <= 1


@pytest.mark.parametrize("frames", [1, 5, 6, 9, 12, 22])
def test_output_has_one_frame_per_input_frame(comps, frames):
    clip = synthetic_clip(frames, 64, 48, seed=2)
    out, _ = render(comps, clip, chunked=(frames,))
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert out.std() > 1.0  # a decoded picture, not a constant


def test_lag_frames_come_out_only_after_later_chunks(comps):
    pipe = StreamPipeline(comps, "x", steps=3)
    clip = synthetic_clip(5 + 4 * 4, 64, 48)
    assert len(pipe.push(clip[:5])) == 5  # first chunk: prepared at once
    got = [len(pipe.push(clip[5 + 4 * i : 9 + 4 * i])) for i in range(4)]
    assert got == [0, 0, 4, 4]  # two chunks of lag with 3 steps
    assert len(pipe.flush()) == 8


@pytest.mark.parametrize("steps", [1, 2])
def test_a_flush_pads_only_its_own_chunk(comps, steps):
    """Frames pushed after a flush come out one for one: the second flush dropped the first
    one's padding again (7 in, then 8 in gave 6 out; a review)."""
    pipe = StreamPipeline(comps, "x", steps=steps)
    clip = synthetic_clip(15, 64, 48)
    assert len(pipe.push(clip[:7])) + len(pipe.flush()) == 7
    assert len(pipe.push(clip[7:15])) + len(pipe.flush()) == 8


def test_seed_and_prompt_change_the_output_and_runs_repeat(comps):
    clip = synthetic_clip(13, 64, 48, seed=3)
    a, _ = render(comps, clip)
    b, _ = render(comps, clip)
    assert np.array_equal(a, b)
    c, _ = render(comps, clip, seed=123)
    d, _ = render(comps, clip, prompt="a charcoal sketch")
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1
    assert np.abs(a.astype(int) - d.astype(int)).mean() > 0.1


def test_prompt_swap_mid_stream_changes_later_chunks_only(comps):
    clip = synthetic_clip(21, 64, 48, seed=4)
    base, _ = render(comps, clip, chunked=(21,), stream_batch=False)
    pipe = StreamPipeline(comps, "a watercolor city", stream_batch=False)
    first = pipe.push(clip[:13])
    pipe.set_prompt("a neon night")
    rest = np.concatenate([pipe.push(clip[13:]), pipe.flush()])
    assert np.array_equal(first, base[:13])
    assert np.abs(rest.astype(int) - base[13:].astype(int)).mean() > 0.1


def test_motion_controller_lowers_strength_under_motion(comps):
    still = np.repeat(synthetic_clip(1, 64, 48)[:1], 13, axis=0)
    moving = synthetic_clip(13, 64, 48, seed=5)
    moving[5::2] = 255 - moving[5::2]  # violent flicker
    strengths = []
    for clip in (still, moving):
        pipe = StreamPipeline(comps, "x")
        pipe.push(clip)
        strengths.append(pipe.motion.strength)
    assert strengths[0] == pytest.approx(0.8)
    assert strengths[1] < 0.75


@pytest.mark.parametrize("policy, unaffected", [("sdv2", 21), ("rolling", 13)])
def test_adaptive_sink_refresh_changes_the_cache_but_not_the_first_chunks(comps, policy, unaffected):
    """sdv2: refreshes queued while the window fills act from the first full-window chunk (the
    sixth: frames 21..); rolling: a refresh swaps after the first ring write (chunk 2), so it
    shows from chunk 3 (frames 13..)."""
    def variant(threshold):
        cfg = with_overrides(comps.cfg, cache={"policy": policy, "refresh_threshold": threshold})
        return type(comps)(**{**comps.__dict__, "cfg": cfg})

    clip = synthetic_clip(29, 64, 48, seed=6)
    plain, _ = render(variant(-1.0), clip, steps=1)
    fresh, _ = render(variant(1.0), clip, steps=1)
    assert np.array_equal(plain[:unaffected], fresh[:unaffected])
    assert not np.array_equal(plain[unaffected:], fresh[unaffected:])


def test_bad_frames_are_refused(comps):
    pipe = StreamPipeline(comps, "x")
    with pytest.raises(ValueError, match=r"uint8 \[n, 48, 64, 3\]"):
        pipe.push(np.zeros((4, 32, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        StreamPipeline(comps, "x", width=70, height=48)


def test_golden_slice_of_the_tiny_model(comps):
    """Regression guard: a fixed slice of the tiny random model's output for seed 0.
    Regenerate (print `out[...]`) only when a change is meant to alter the numbers (last: the
    first chunk as StreamDiffusionV2 prepares it, noised at s0 with no motion step, and every
    lane starting from the last denoise step's K/V)."""
    clip = synthetic_clip(9, 64, 48, seed=0)
    out, _ = render(comps, clip, chunked=(9,))
    golden = [
        [[103, 165, 147], [106, 166, 146], [110, 173, 143], [109, 169, 140]],
        [[31, 255, 157], [34, 255, 155], [33, 255, 146], [36, 255, 161]],
        [[15, 247, 156], [10, 252, 158], [0, 247, 155], [16, 249, 147]],
    ]
    got = out[[0, 4, 8], 20, 30:34].astype(int).tolist()
    assert np.abs(np.array(got) - np.array(golden)).max() <= 1, got


def test_a_rolling_stream_batch_equals_sequential_denoising(rolling):
    """cache.policy=rolling with more than one denoise step streams through the stream batch
    (its lanes have no sdv2 filler rows) and gives what running the steps one after another gives."""
    clip = synthetic_clip(17, 64, 48, seed=3)
    batched, _ = render(rolling, clip, prompt="x", chunked=(17,), steps=2)
    sequential, _ = render(rolling, clip, prompt="x", chunked=(17,), steps=2, stream_batch=False)
    assert batched.shape == clip.shape
    assert np.abs(batched.astype(int) - sequential.astype(int)).max() <= 1


def test_rolling_lanes_keep_their_own_steps_kv_of_the_first_chunk(rolling):
    """Under `rolling` lane j keeps step j's K/V (docs/architecture.md); only sdv2 copies the
    last step's K/V into every lane after the first chunk's prepare."""
    pipe = StreamPipeline(rolling, "x", steps=2)
    pipe.push(synthetic_clip(9, 64, 48, seed=3))  # the prepare, then one stream-batch forward
    s0 = pipe.slots.lane(0, 0).slots[0]
    s1 = pipe.slots.lane(0, 1).slots[0]
    assert not torch.equal(pipe.pool.k[:, s0], pipe.pool.k[:, s1])  # frame 0 as step 0 saw it vs step 1


def test_a_blend_started_mid_blend_continues_from_the_current_mix(comps):
    """A prompt change during a blend starts from what conditions the stream now (the blend's
    current mix), not from the unfinished blend's target: no visible jump."""
    pipe = StreamPipeline(comps, "a red car", steps=1)
    clip = synthetic_clip(13, 64, 48, seed=7)
    pipe.state.set_prompt("a blue house", blend_chunks=4)
    pipe.push(clip[:9])  # two chunks of four into the blend
    mix = pipe.state.cond_emb.clone()  # [1, L, D]: 0.5 red car + 0.5 blue house
    pipe.state.set_prompt("a green tree", blend_chunks=4)
    pipe.push(clip[9:13])
    target = comps.text.encode("a green tree")  # [1, L, D]
    torch.testing.assert_close(pipe.state.cond_emb, 0.75 * mix + 0.25 * target, atol=1e-5, rtol=0)


def test_a_chunk_carries_its_streams_seed(comps):
    """A chunk is re-noised between denoise steps with its stream's seed (the Lane carries it):
    with steps >= 2 two streams of different seeds differ in every step's noise, not only the first."""
    pipe = StreamPipeline(comps, "x", steps=2, seed=7)
    lane = pipe.state.encode(synthetic_clip(5, 64, 48))
    assert lane.seed == 7
