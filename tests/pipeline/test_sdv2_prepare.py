"""A stream's start as StreamDiffusionV2 makes it, with several denoise steps (stream batch).

The reference prepares the first chunk in one cache: it is noised at the configured strength,
denoised from the step list's first timestep, each step writing frames 0-1 over the last; then
that cache is repeated for every lane. Its row buffer starts as zeros, so until chunk 1 reaches
lane j, lane j runs stand-ins ("fillers": zeros at its timestep, then what the lane before made
of them), each written where chunk 1 will be written and tested for a sink refresh. Later chunks
are told 1000 s - 100 and go through the lanes, lane j at the step list's j-th timestep.

The oracle here does that with `LatentStream`s, one per lane (a fresh stream that processes only
the prepare's last step holds exactly that step's K/V, as every repeated lane does; a filler is
a step whose slot bookkeeping is put back afterwards), the same noise (`chunk_noise` by chunk
and lane) and the same VAE, and is compared with StreamPipeline, batched and not.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

import streamdiff.model.causal_wan as causal_wan
from streamdiff.config import load_config, with_overrides
from streamdiff.model.build import build_components
from streamdiff.pipeline import LatentStream
from streamdiff.pipeline.frames import frames_to_tensor, synthetic_clip, tensor_to_frames
from streamdiff.pipeline.stream_pipeline import StreamPipeline
from streamdiff.sampling.noise_schedule import chunk_noise, strength_to_timestep, timesteps_for

STRENGTH = 0.6  # off the reference's 0.8, where the first chunk's two timestep rules would agree


@pytest.fixture(scope="module")
def comps():
    cfg = load_config("tiny", ["video.width=64", "video.height=48", "runtime.device=cpu",
                               f"sampling.noise_strength={STRENGTH}", "sampling.motion_aware=false"])
    return build_components(cfg)


@torch.no_grad()
def reference_start(comps, clip: np.ndarray, prompt: str, steps: int) -> np.ndarray:
    schedule, seed, T = comps.schedule, comps.cfg.sampling.seed, timesteps_for(steps)
    emb = comps.text.encode(prompt)
    vae, vae_state = comps.vae, comps.vae.new_state()

    def noise(x, chunk, lane):
        return chunk_noise(tuple(x.shape), seed, chunk, lane, x.device, x.dtype)

    def denoise(stream, x, t):
        return schedule.flow_to_x0(x, stream.step(x, t, emb), schedule.sigma(t))

    def renoise(x0, chunk, lane):
        return schedule.add_noise(x0, noise(x0, chunk, lane), schedule.sigma(T[lane]))

    def filler(stream, x, t):  # writes where the lane's next chunk will, without taking its place
        slots, chunks = copy.deepcopy(stream.slots), stream.chunks
        x0 = denoise(stream, x, t)
        stream.slots, stream.chunks = slots, chunks
        return x0

    out = []
    chunks = [clip[:5]] + [clip[i : i + 4] for i in range(5, len(clip), 4)]
    for k, frames in enumerate(chunks):
        latents = vae.encode_chunk(frames_to_tensor(frames), vae_state)
        x = schedule.add_noise(latents, noise(latents, k, 0), STRENGTH)
        if k == 0:  # prepare: every step from T[0], one cache overwritten step by step
            for j in range(steps):
                x0 = denoise(LatentStream(comps.model, comps.cfg.cache), x, T[j])
                if j < steps - 1:
                    x = renoise(x0, 0, j + 1)
            lanes = [LatentStream(comps.model, comps.cfg.cache) for _ in range(steps)]
            for lane in lanes:  # the cache repeated for every lane: the last step's K/V
                lane.step(x, T[-1], emb)
            fill = {j: torch.zeros_like(latents[:, :, :1]) for j in range(1, steps)}
            while fill:  # forwards 1 .. steps-1: lanes chunk 1 has not reached run fillers
                made = {j: filler(lanes[j], x, T[j]) for j, x in fill.items()}
                fill = {j + 1: renoise(x0, -1, j + 1) for j, x0 in made.items() if j + 1 < steps}
        else:
            t = strength_to_timestep(STRENGTH)
            for j, lane in enumerate(lanes):
                x0 = denoise(lane, x, t)
                if j < steps - 1:
                    x, t = renoise(x0, k, j + 1), T[j + 1]
        out.append(tensor_to_frames(vae.decode_chunk(x0, vae_state)))
    return np.concatenate(out)


@pytest.mark.parametrize("steps", [2, 3, 4])
@pytest.mark.parametrize("stream_batch", [True, False])
def test_a_stream_starts_as_streamdiffusionv2_starts_it(comps, steps, stream_batch):
    """A reviewer read the reference: lane j kept step j's K/V of frames 0-1 here (its sinks for
    the whole stream) where the reference repeats the last step's, and the first chunk was told
    1000 s - 100 where the reference prepares from the step list's start. Then its own code, run
    on CPU, showed the fillers: at 3 steps they queued one more sink refresh in one layer."""
    clip = synthetic_clip(5 + 4 * 8, 64, 48, seed=4)
    pipe = StreamPipeline(comps, "a watercolor city", steps=steps, stream_batch=stream_batch)
    ours = np.concatenate([pipe.push(clip), pipe.flush()])
    theirs = reference_start(comps, clip, "a watercolor city", steps)
    assert ours.shape == theirs.shape == clip.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # batched vs one-row matmuls


def test_fillers_with_a_refresh_that_fires_on_every_chunk(comps):
    """With 4 steps the last lane runs 3 fillers while its window fills; at a threshold that
    fires on every chunk its queue held more pending refreshes than the window (the reference's
    is a list: ours ran out of room, IndexError, in a run against the reference's code)."""
    eager = replace(comps, cfg=with_overrides(comps.cfg, cache={"refresh_threshold": 0.95}))
    clip = synthetic_clip(5 + 4 * 8, 64, 48, seed=5)
    pipe = StreamPipeline(eager, "a watercolor city", steps=4)
    ours = np.concatenate([pipe.push(clip), pipe.flush()])
    theirs = reference_start(eager, clip, "a watercolor city", 4)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    lane = pipe.slots.lane(0, 3).lane
    assert max(int(pipe.pool.q_len[i, lane]) for i in range(len(pipe.pool.layers))) > pipe.pool.window


def test_the_sink_refresh_test_compares_the_keys_as_they_are_written(comps, monkeypatch):
    """StreamDiffusionV2 compares a new chunk's keys with the sinks in the space the cache holds
    them: with RoPE at their absolute frame index, i.e. exactly the keys then written into the
    pool. Other keys change the similarity, hence which sink is refreshed and when."""
    eager = replace(comps, cfg=with_overrides(comps.cfg, cache={"refresh_threshold": 0.99}))
    tested, pairs = [], []
    real_similarity, attention = causal_wan.sink_similarity, comps.model.attention
    real_write = attention.write

    def similarity_spy(k_pool, v_pool, sink_slots, k_new, v_new):
        tested.append(k_new.detach().clone())  # [B, N, H, D]
        return real_similarity(k_pool, v_pool, sink_slots, k_new, v_new)

    def write_spy(k, v, k_pool, v_pool, write_slots, *rest):
        real_write(k, v, k_pool, v_pool, write_slots, *rest)
        if tested:  # this layer ran the refresh test just before its write
            pairs.append((tested.pop(), k_pool[write_slots].flatten(1, 2).clone()))  # both [B, N, H, D]

    monkeypatch.setattr(causal_wan, "sink_similarity", similarity_spy)
    monkeypatch.setattr(attention, "write", write_spy)
    pipe = StreamPipeline(eager, "a cat")
    pipe.push(synthetic_clip(5 + 4 * 8, 64, 48, seed=6))
    assert pairs, "the sdv2 refresh test never ran"
    for k_new, written in pairs:
        torch.testing.assert_close(k_new, written, atol=1e-4, rtol=1e-4)
