"""The analytic DiT FLOP count (model/flops.py) against torch's own count of a real forward.

`torch.utils.flop_counter.FlopCounterMode` counts matmul-class ops (mm/addmm/bmm, convolution,
the fused SDPA kernels) at 2 FLOPs per multiply-add and ignores elementwise work, which is
exactly what the analytic count covers. On CPU, SDPA runs a fused kernel FlopCounterMode does
not know, so the forward runs under the MATH SDPA backend: attention then decomposes into the
two bmm calls torch counts. Tolerance: none — the counts must be equal integers.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from streamdiff.cache.kv_cache import AttnBatch, KVPool
from streamdiff.cache.slots import SlotTable
from streamdiff.config import load_config
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.model.flops import dit_flops_per_step, dit_forward_flops, tokens_per_frame
from streamdiff.model.loading import random_init_

WINDOW, SINKS = 6, 3
LATENT_H, LATENT_W = 6, 8  # latent frame size -> 3 x 4 = 12 tokens (a 64x48 video frame)
TOKENS = (LATENT_H // 2) * (LATENT_W // 2)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny", ["text.max_length=40"])
    model = CausalWanModel(cfg.model).eval()
    random_init_(model, 0)
    return cfg, model


def measured_flops(cfg, model, rows: int, frames: int, filled: list[int]) -> tuple[int, list[int]]:
    """FlopCounterMode total of one forward over `rows` lanes, lane j holding filled[j] frames
    before this chunk's write. Returns (FLOPs, each row's attended frames)."""
    table = SlotTable(rows * WINDOW, WINDOW, SINKS, cfg.model.rope_max_seq_len)
    table.add_stream("s", rows)
    for j, n in enumerate(filled):
        for _ in range(n):
            table.lane("s", j).plan(1)
    plans = [table.lane("s", j).plan(frames) for j in range(rows)]
    batch = AttnBatch.from_plans(plans, "cpu", 6)
    pool = KVPool(model.layer_ids, rows * WINDOW, TOKENS, cfg.model.num_heads, cfg.model.head_dim, torch.float32, "cpu", 6)
    text = torch.randn(1, cfg.text.max_length, cfg.model.text_dim)
    cross = model.stack_prompt_kv([model.prompt_kv(text) for _ in range(rows)])  # per prompt: not counted
    x = torch.randn(rows, 16, frames, LATENT_H, LATENT_W)
    t = torch.full((rows, frames), 500.0)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x, t, cross, batch, pool)
    return counter.get_total_flops(), [len(p.attend_slots) for p in plans]


@pytest.mark.parametrize(
    ("rows", "frames", "filled"),
    [
        (1, 2, [0]),  # a first chunk: 2 latent frames, empty lane
        (1, 1, [2]),  # sinks filling
        (3, 1, [5, 5, 5]),  # full windows (steady state), 3 rows
        (4, 1, [9, 9, 9, 9]),  # the ring has wrapped
        (2, 2, [1, 1]),
    ],
)
def test_analytic_count_equals_flop_counter(tiny, rows, frames, filled):
    cfg, model = tiny
    measured, context = measured_flops(cfg, model, rows, frames, filled)
    assert len(set(context)) == 1
    analytic = dit_forward_flops(cfg.model, rows, frames, TOKENS, context[0], cfg.text.max_length)
    assert analytic.total == measured
    assert dit_flops_per_step(cfg, rows, frames, 64, 48, context[0]) == measured


def test_uneven_rows_count_useful_work_while_the_torch_path_pads(tiny):
    """Rows at different fill levels: the torch reference pads every row to the widest one,
    so torch counts the padded work; the analytic per-row count is smaller by exactly that."""
    cfg, model = tiny
    measured, context = measured_flops(cfg, model, 2, 1, [0, 4])
    assert context == [1, 5]
    useful = dit_forward_flops(cfg.model, 2, 1, TOKENS, context, cfg.text.max_length).total
    padded = dit_forward_flops(cfg.model, 2, 1, TOKENS, max(context), cfg.text.max_length).total
    assert padded == measured
    assert useful < measured


def test_attention_terms_scale_with_context_and_prompt_length(tiny):
    cfg, _ = tiny
    d = cfg.model.dim
    a = dit_forward_flops(cfg.model, 2, 1, 10, 3, 40)
    b = dit_forward_flops(cfg.model, 2, 1, 10, 6, 80)
    assert b.self_attn == 2 * a.self_attn == 2 * 2 * 2 * (2 * 10) * (3 * 10) * d
    assert b.cross_attn == 2 * a.cross_attn
    assert (b.self_proj, b.ffn, b.patch_embed, b.head) == (a.self_proj, a.ffn, a.patch_embed, a.head)


def test_real_architecture_sizes():
    """1.3B at 512x512: ~2.6 GFLOP per token from the weights (2 x ~1.3e9 matmul parameters)."""
    cfg = load_config("wan-1.3b", ["weights.format=random", "text.kind=tiny"])
    assert tokens_per_frame(512, 512) == 1024 and tokens_per_frame(832, 480) == 1560
    f = dit_forward_flops(cfg.model, 1, 1, 1024, 1, 0)  # no prompt, attention over itself only
    weights_per_token = (f.total - f.num_layers * f.self_attn - f.time_embed) / 1024 / 2
    assert 1.2e9 < weights_per_token < 1.5e9


def test_bad_arguments():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match="sees its own chunk"):
        dit_forward_flops(cfg.model, 1, 2, 10, 1, 8)
    with pytest.raises(ValueError, match="2 rows"):
        dit_forward_flops(cfg.model, 2, 1, 10, [3], 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        tokens_per_frame(500, 500)
