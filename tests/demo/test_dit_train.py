"""The demo DiT's training forward equals the cached chunk-by-chunk inference path (fp32)."""

from __future__ import annotations

import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool
from streamdiff.cache.slots import SlotTable
from streamdiff.config import ModelConfig
from streamdiff.demo.dit_train import LATER_LANE_TIMESTEPS, make_batch, rope_for, train_forward
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.model.loading import random_init_
from streamdiff.sampling.noise_schedule import FlowMatchSchedule

GRID = (4, 6)
TOKENS = GRID[0] * GRID[1]


def cached_chunks(model, chunks, t, text):
    table = SlotTable(6, 6, 3, 1024)
    table.add_stream("s", 1)
    pool = KVPool(model.layer_ids, 6, TOKENS, model.cfg.num_heads, model.cfg.head_dim, torch.float32, "cpu")
    cross = model.prompt_kv(text)
    outs = []
    for x in chunks:
        batch = AttnBatch.from_plans([table.lane("s", 0).plan(x.shape[2])], "cpu", 6)
        outs.append(model(x, torch.full((1, x.shape[2]), float(t)), cross, batch, pool))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def test_training_forward_equals_cached_streaming():
    cfg = ModelConfig(num_heads=2, head_dim=48, ffn_dim=64, num_layers=2, text_dim=32)
    model = random_init_(CausalWanModel(cfg).eval(), seed=3)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 4, 2 * GRID[0], 2 * GRID[1])
    text = torch.randn(1, 4, cfg.text_dim)
    expected = cached_chunks(model, [x[:, :, :2], x[:, :, 2:3], x[:, :, 3:4]], 400, text)
    got = train_forward(model, x, torch.full((1, 4), 400.0), text, torch.arange(4)[None], [0, 0, 1, 2])
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the mask matters: a non-causal pass differs for the earlier chunks
    leaky = train_forward(model, x, torch.full((1, 4), 400.0), text, torch.arange(4)[None], [0, 0, 0, 0])
    assert (leaky[:, :, :2] - expected[:, :, :2]).abs().max() > 1e-3


def test_samples_follow_the_first_lane_rule():
    """First-lane samples: x = (1 - s) z_src + s eps and t = 1000 s - 100; targets are the prompt's latents."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(5, 9, 16, 3, 8, 8)
    table = torch.randn(9, 4, 32)
    b = make_batch(latents, table, FlowMatchSchedule(), 64, 4, gen)
    assert b["x"].shape == (64, 16, 3, 4, 4) and b["timestep"].shape == (64, 3)
    assert b["chunk_ids"] == [0, 0, 1]
    # every target is a (possibly blended) crop of some clip's prompt latents, and the text matches
    t = b["timestep"][:, 0]
    assert ((t >= 0) & (t <= 900)).all()
    assert set(t.tolist()) & {700.0, 500.0, 400.0, 200.0}  # later-lane samples are present


def test_samples_noise_the_source_in_the_first_lane_and_the_target_in_later_lanes():
    """First lane: x = (1 - s) z_src + s eps with t = 1000 s - 100; later lanes: the target
    re-noised at sigma(t); a blended sample's text and target mix the same prompts alike."""
    latents = torch.arange(9.0).view(1, 9, 1, 1, 1, 1).expand(3, 9, 16, 3, 8, 8)  # prompt p: p (the source 0)
    table = torch.arange(9.0).view(9, 1, 1).expand(9, 4, 32)  # prompt p's embedding: p
    b = make_batch(latents, table, FlowMatchSchedule(), 256, 4, torch.Generator().manual_seed(1))
    t, sigma = b["timestep"][:, 0], b["sigma"]
    s = (t + 100) / 1000
    mean, std = b["x"].mean(dim=(1, 2, 3, 4)), b["x"].std(dim=(1, 2, 3, 4))
    target = b["target"].mean(dim=(1, 2, 3, 4))
    first = (mean.abs() < 0.2 * s) & ((std - s).abs() < 0.15 * s)  # the source (0) noised by s
    later = (torch.isin(t, torch.tensor(LATER_LANE_TIMESTEPS, dtype=t.dtype))
             & ((mean - (1 - sigma) * target).abs() < 0.2 * sigma) & ((std - sigma).abs() < 0.15 * sigma))
    assert bool((first | later).all())
    assert 20 < int((later & ~first).sum()) < 110
    torch.testing.assert_close(b["text"].mean(dim=(1, 2)), target)
    assert (target != target.round()).sum() > 20  # blends are present


def test_samples_tell_rope_where_the_crop_was_cut_and_a_random_gap_after_the_first_chunk():
    rows = torch.arange(8.0).view(8, 1) * 10 + torch.arange(8.0)  # latent pixel (i, j): 10 i + j
    latents = rows.expand(2, 9, 16, 3, 8, 8)
    offsets, gaps = set(), set()
    for seed in range(12):
        b = make_batch(latents, torch.zeros(9, 4, 32), FlowMatchSchedule(), 2, 4, torch.Generator().manual_seed(seed))
        corner = round(float(b["target"][0, 0, 0, 0, 0]))
        assert b["offset"] == ((corner // 10) // 2, (corner % 10) // 2)  # in tokens of 2x2 latent pixels
        offsets.add(b["offset"])
        pos = b["frame_pos"][0].tolist()
        assert pos[:2] == [0, 1] and 2 <= pos[2] <= 26
        gaps.add(pos[2] - 2)
    assert len(offsets) > 3 and len(gaps) > 3


def test_rope_rows_follow_the_crops_offset_and_each_frames_position():
    cfg = ModelConfig(num_heads=2, head_dim=48, ffn_dim=64, num_layers=1, text_dim=32)
    model = CausalWanModel(cfg)
    full = rope_for(model, torch.arange(8)[None], (6, 8), (0, 0))  # cos, sin [1, 8*6*8, D]
    part = rope_for(model, torch.tensor([[0, 1, 7]]), (2, 3), (1, 4))  # frames 0, 1, 7; rows 1-2, columns 4-6
    for whole, got in zip(full, part):
        want = whole.view(1, 8, 6, 8, -1)[:, [0, 1, 7], 1:3, 4:7].reshape(1, 3 * 2 * 3, -1)
        assert torch.equal(got, want)
        assert not torch.equal(got, whole.view(1, 8, 6, 8, -1)[:, :3, :2, :3].reshape(1, 18, -1))
