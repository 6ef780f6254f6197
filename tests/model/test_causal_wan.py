"""The causal DiT against diffusers' WanTransformer3DModel on the same random weights (fp32).

Tolerance: 1e-4 absolute on outputs of magnitude ~1 (observed ~1e-6; the only differences are
RoPE computed in fp32 here versus fp64 in diffusers, and summation order).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from streamdiff.cache.kv_cache import AttnBatch, KVPool
from streamdiff.cache.slots import SlotTable
from streamdiff.config import ModelConfig
from streamdiff.model.causal_wan import CausalWanModel

ATOL = 1e-4
GRID = (4, 6)  # latent 8x12 -> 4x6 tokens per latent frame
TOKENS = GRID[0] * GRID[1]


def tiny_diffusers(cfg: ModelConfig) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=16, out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps,
    ).eval()


def ours_from(ref: WanTransformer3DModel, cfg: ModelConfig, **kw) -> CausalWanModel:
    model = CausalWanModel(cfg, **kw).eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not missing
    partial = ("blocks.", "patch_embedding.", "proj_out.", "scale_shift_table", "norm_out.")
    assert all(k.startswith(partial) for k in unexpected)  # only what a partial range leaves out
    return model


class MaskedSelfAttn(WanAttnProcessor):
    """diffusers' processor with a fixed self-attention mask (the oracle's block-causal mask)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def sink_ring_mask(chunk_of_frame: list[int], chunk_end: list[int], sinks: int, ring: int) -> torch.Tensor:
    """Frame-level mask: a frame sees the sinks and the last `ring` frames up to its chunk's end."""
    n = len(chunk_of_frame)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for fq in range(n):
        end = chunk_end[chunk_of_frame[fq]]
        for fk in range(end + 1):
            allowed[fq, fk] = fk < sinks or fk > end - ring
    return allowed.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)  # token level


def run_streaming(model, chunks, timesteps, text, window=6, sinks=3, rope_len=1024):
    """Feed chunks [1, 16, F, 8, 12] one by one through one lane; returns the outputs."""
    cfg = model.cfg
    table = SlotTable(window, window, sinks, rope_len, policy="rolling", refresh=False)
    table.add_stream("s", 1)
    pool = KVPool(model.layer_ids, window, TOKENS, cfg.num_heads, cfg.head_dim, torch.float32, "cpu", window)
    cross = model.prompt_kv(text)
    outs = []
    for x, t in zip(chunks, timesteps):
        lane = table.lane("s", 0)
        plan = lane.plan(x.shape[2])
        if plan.rebase_delta:
            cos, sin = model.rope_tables()
            pool.rebase_(plan.rebase_slots, plan.rebase_delta, cos, sin, model.rope.t_dim)
        batch = AttnBatch.from_plans([plan], "cpu", 6, policy="rolling")
        tt = torch.full((1, x.shape[2]), float(t))
        outs.append(model(x, tt, cross, batch, pool))
    return outs


@torch.no_grad()
def test_first_chunk_equals_diffusers_forward():
    cfg = ModelConfig()
    ref = tiny_diffusers(cfg)
    model = ours_from(ref, cfg)
    x = torch.randn(1, 16, 2, 8, 12)
    text = torch.randn(1, 20, cfg.text_dim)
    (ours,) = run_streaming(model, [x], [700], text)
    expected = ref(x, torch.full((1, 2 * TOKENS), 700.0), text, return_dict=False)[0]
    assert expected.abs().max() > 0.5  # a real signal, not zeros
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope_len", [1024, 9])  # 9 forces several RoPE re-bases
@torch.no_grad()
def test_chunk_by_chunk_equals_one_masked_pass(rope_len):
    """Streaming with the cache (window rolls after 4 chunks) equals one diffusers pass over the
    whole clip with a frame-block mask that lets each chunk see the sinks and the ring."""
    cfg = ModelConfig(rope_max_seq_len=1024)
    ref = tiny_diffusers(cfg)
    model = ours_from(ref, ModelConfig(rope_max_seq_len=rope_len))
    sizes = [2] + [1] * 10  # first chunk 2 latent frames, then 1
    frames = sum(sizes)
    video = torch.randn(1, 16, frames, 8, 12)
    timesteps = [700, 650, 600, 550, 500, 450, 400, 350, 300, 250, 200]
    text = torch.randn(1, 12, cfg.text_dim)
    chunk_of_frame, chunk_end, per_frame_t, start = [], [], [], 0
    for c, size in enumerate(sizes):
        chunk_of_frame += [c] * size
        per_frame_t += [timesteps[c]] * size
        start += size
        chunk_end.append(start - 1)
    chunks = list(video.split(sizes, dim=2))
    ours = torch.cat(run_streaming(model, chunks, timesteps, text, rope_len=rope_len), dim=2)

    mask = sink_ring_mask(chunk_of_frame, chunk_end, sinks=3, ring=3)
    for block in ref.blocks:
        block.attn1.set_processor(MaskedSelfAttn(mask))
    token_t = torch.tensor(per_frame_t, dtype=torch.float32).repeat_interleave(TOKENS)[None]
    expected = ref(video, token_t, text, return_dict=False)[0]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # The mask matters: a fully causal pass (no eviction) differs once the window has rolled.
    causal = sink_ring_mask(chunk_of_frame, chunk_end, sinks=3, ring=frames)
    for block in ref.blocks:
        block.attn1.set_processor(MaskedSelfAttn(causal))
    no_evict = ref(video, token_t, text, return_dict=False)[0]
    assert (no_evict[:, :, -1] - ours[:, :, -1]).abs().max() > 1e-3


@torch.no_grad()
def test_block_range_stages_compose_to_the_full_model():
    cfg = ModelConfig(num_layers=3)
    ref = tiny_diffusers(cfg)
    full = ours_from(ref, cfg)
    first = ours_from(ref, cfg, block_range=(0, 2), has_head=False)
    last = ours_from(ref, cfg, block_range=(2, 3), has_embed=False)
    assert not hasattr(first, "proj_out") and not hasattr(last, "patch_embedding")
    assert set(first.blocks.keys()) == {"0", "1"} and set(last.blocks.keys()) == {"2"}
    x = torch.randn(1, 16, 2, 8, 12)
    text = torch.randn(1, 7, cfg.text_dim)
    (expected,) = run_streaming(full, [x], [600], text)

    table = SlotTable(6, 6, 3, 1024, policy="rolling", refresh=False)
    table.add_stream("s", 1)
    plan = table.lane("s", 0).plan(2)
    batch = AttnBatch.from_plans([plan], "cpu", 6, policy="rolling")
    t = torch.full((1, 2), 600.0)
    pool0 = KVPool(first.layer_ids, 6, TOKENS, cfg.num_heads, cfg.head_dim, torch.float32, "cpu", 6)
    pool1 = KVPool(last.layer_ids, 6, TOKENS, cfg.num_heads, cfg.head_dim, torch.float32, "cpu", 6)
    temb, tproj = first.time_embedding(t)
    hidden = first.run_blocks(first.embed(x), tproj, first.prompt_kv(text), batch, pool0, GRID)
    temb, tproj = last.time_embedding(t)
    hidden = last.run_blocks(hidden, tproj, last.prompt_kv(text), batch, pool1, GRID)
    out = last.head(hidden, temb, (2, 8, 12)).float()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_rows_of_different_streams_in_one_batch_match_separate_runs():
    """Two streams with different fill levels and prompts batched in one forward equal each alone."""
    cfg = ModelConfig()
    model = ours_from(tiny_diffusers(cfg), cfg)
    texts = [torch.randn(1, 9, cfg.text_dim), torch.randn(1, 9, cfg.text_dim)]
    clips = [[torch.randn(1, 16, 2, 8, 12)] + [torch.randn(1, 16, 1, 8, 12) for _ in range(n)] for n in (5, 2)]
    alone = [run_streaming(model, clip, [500] * len(clip), text) for clip, text in zip(clips, texts)]

    table = SlotTable(12, 6, 3, 1024, policy="rolling", refresh=False)
    pool = KVPool(model.layer_ids, 12, TOKENS, cfg.num_heads, cfg.head_dim, torch.float32, "cpu", 6)
    for sid in (0, 1):
        table.add_stream(sid, 1)
    cross = [model.prompt_kv(t) for t in texts]

    def step(sids, xs):
        plans = [table.lane(s, 0).plan(xs[0].shape[2]) for s in sids]
        batch = AttnBatch.from_plans(plans, "cpu", 6, policy="rolling")
        kv = model.stack_prompt_kv([cross[s] for s in sids])
        t = torch.full((len(sids), xs[0].shape[2]), 500.0)
        return model(torch.cat(xs), t, kv, batch, pool).split(1)

    # stream 0 runs ahead alone for 3 chunks, then both share forwards.
    got = {0: [], 1: []}
    for i in range(4):
        got[0] += step([0], [clips[0][i]])
    got[1] += step([1], [clips[1][0]])
    for i in range(2):
        a, b = step([0, 1], [clips[0][4 + i], clips[1][1 + i]])
        got[0].append(a)
        got[1].append(b)
    for sid in (0, 1):
        torch.testing.assert_close(torch.cat(got[sid], 2), torch.cat(alone[sid], 2), atol=ATOL, rtol=0)


def test_a_cast_keeps_the_rope_tables_as_computed():
    """A review: cast_ to bf16 rounded the RoPE tables of a model that had them (the random-weights
    build) through bf16, cos^2 + sin^2 - 1 up to 5e-3; a loaded model's are computed afresh."""
    model = CausalWanModel(ModelConfig(num_heads=2, head_dim=128, ffn_dim=64, num_layers=1))
    cos, sin = (t.clone() for t in model.rope_tables())
    model.cast_(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    after = model.rope_tables()
    assert after[0].dtype == torch.float32 and torch.equal(after[0], cos) and torch.equal(after[1], sin)


def test_a_cast_keeps_the_modules_diffusers_keeps_in_fp32():
    """After cast_(bf16) every module diffusers keeps in fp32 (WanTransformer3DModel's
    _keep_in_fp32_modules: the time embedder, the norms with weights, ...) still holds fp32
    parameters, so a bf16 run matches diffusers' bf16 model; the blocks' linears are bf16."""
    model = CausalWanModel(ModelConfig(num_heads=2, head_dim=32, ffn_dim=64, num_layers=2, text_dim=32))
    model.cast_(torch.bfloat16)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    kept = [name for name, _ in model.named_parameters() if any(part in keep for part in name.split("."))]
    assert any(".norm2." in name for name in kept), kept  # the cross-attention norm's affine weights
    for name, p in model.named_parameters():
        if name in kept:
            assert p.dtype == torch.float32, name
        elif name.startswith("blocks.") and p.ndim == 2:
            assert p.dtype == torch.bfloat16, name


def test_a_bf16_model_embeds_timesteps_in_bf16():
    """The time embedder stays fp32 after cast_(bf16) while time_proj is bf16: its output is cast
    to the blocks' dtype, or every bf16 forward fails on an fp32 input to a bf16 linear."""
    model = CausalWanModel(ModelConfig(num_heads=2, head_dim=32, ffn_dim=64, num_layers=1, text_dim=32)).eval()
    model.cast_(torch.bfloat16)
    with torch.no_grad():
        temb, tproj = model.time_embedding(torch.tensor([[700.0, 500.0]]))  # [B=1, F=2] timesteps
    assert temb.dtype == tproj.dtype == torch.bfloat16
    assert tproj.shape == (1, 2, 6, model.cfg.dim)  # [B, F, 6 modulation vectors, dim]
