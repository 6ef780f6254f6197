"""The demo DiT's training forward equals the cached chunk-by-chunk inference path (fp32)."""

from __future__ import annotations

import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool
from streamdiff.cache.slots import SlotTable
from streamdiff.config import ModelConfig
from streamdiff.demo.dit_train import make_batch, train_forward
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
