"""LatentStream (the public latent-level API, default sdv2 policy) against a straightforward
oracle: diffusers' WanTransformer3DModel on the same weights, run chunk by chunk with a self-
attention processor that keeps each layer's cache as a list of slots, applies StreamDiffusionV2's
rules (tests/cache/sdv2_reference.py), concatenates the held slots and calls SDPA. fp32, 60
chunks across the RoPE restart at 50, per-chunk timesteps that vary, three thresholds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from streamdiff.config import CacheConfig, ModelConfig
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.pipeline import LatentStream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cache"))
from sdv2_reference import Sdv2LayerRef, rope_starts  # noqa: E402

ATOL = 1e-5
W, SINKS = 6, 3
LATENT_HW = (8, 12)  # -> 4 x 6 tokens per latent frame
TOKENS = 24


class ShiftedRope(torch.nn.Module):
    """diffusers' rotary embedding for frames [start, start + F) instead of [0, F)."""

    def __init__(self, rope):
        super().__init__()
        self.rope, self.start = rope, 0

    def forward(self, hidden_states):
        _, _, frames, height, width = hidden_states.shape
        pph, ppw = height // 2, width // 2
        split = [self.rope.t_dim, self.rope.h_dim, self.rope.w_dim]
        out = []
        for table in (self.rope.freqs_cos, self.rope.freqs_sin):
            t, h, w = table.split(split, dim=1)
            t = t[self.start : self.start + frames].view(frames, 1, 1, -1).expand(frames, pph, ppw, -1)
            h = h[:pph].view(1, pph, 1, -1).expand(frames, pph, ppw, -1)
            w = w[:ppw].view(1, 1, ppw, -1).expand(frames, pph, ppw, -1)
            out.append(torch.cat([t, h, w], dim=-1).reshape(1, frames * pph * ppw, 1, -1))
        return tuple(out)


def rotate(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out


class SlotListAttention:
    """Self-attention over a plain list of cached slots, under the reference's rules."""

    def __init__(self, threshold: float):
        self.rules = Sdv2LayerRef(W, SINKS, threshold)
        self.k: list[torch.Tensor | None] = [None] * W
        self.v: list[torch.Tensor | None] = [None] * W
        self.frames: list[int] = []
        self.refreshed = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [1, N, H, D]
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)

        def cos(cached, new):
            if cached is None:
                return 0.0
            return F.cosine_similarity(cached.mean(1).flatten(), new.mean(1).flatten(), dim=0).item()

        sims = [0.5 * (cos(self.k[s], k) + cos(self.v[s], v)) for s in range(SINKS)]
        was_full = self.rules.full
        entries = self.rules.chunk(self.frames, sims)
        self.refreshed += was_full and entries[0] < SINKS
        for i, entry in enumerate(entries):
            self.k[entry] = k[:, i * TOKENS : (i + 1) * TOKENS]
            self.v[entry] = v[:, i * TOKENS : (i + 1) * TOKENS]
        keys = torch.cat([t for t in self.k if t is not None], dim=1)  # [1, held*T, H, D]
        values = torch.cat([t for t in self.v if t is not None], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        return attn.to_out[0](out.transpose(1, 2).flatten(2))


def tiny_pair(cfg: ModelConfig):
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=16, out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps,
    ).eval()
    ours = CausalWanModel(cfg).eval()
    missing, _ = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing
    return ref, ours


@pytest.mark.parametrize("threshold", [-1.0, 0.2, 0.85])
@torch.no_grad()
def test_latent_stream_equals_the_slot_list_oracle(threshold):
    cfg = ModelConfig()
    ref, model = tiny_pair(cfg)
    processors = [SlotListAttention(threshold) for _ in ref.blocks]
    for block, proc in zip(ref.blocks, processors):
        block.attn1.set_processor(proc)
    ref.rope = ShiftedRope(ref.rope)
    stream = LatentStream(model, CacheConfig(refresh_threshold=threshold))
    g = torch.Generator().manual_seed(3)
    text = torch.randn(1, 10, cfg.text_dim, generator=g)
    sizes = [2] + [1] * 59
    starts = rope_starts(sizes, W, 50)
    base = torch.randn(1, 16, 1, *LATENT_HW, generator=g)
    frame = 0
    for c, (size, start) in enumerate(zip(sizes, starts)):
        x = base + 0.7 * torch.randn(1, 16, size, *LATENT_HW, generator=g)  # related frames, some drift
        t = [float(700 - 11 * ((c * 7 + i) % 50)) for i in range(size)]
        flow = stream.step(x, t, text)
        for proc in processors:
            proc.frames = list(range(frame, frame + size))
        ref.rope.start = start
        token_t = torch.tensor(t).repeat_interleave(TOKENS)[None]
        expected = ref(x, token_t, text, return_dict=False)[0]
        torch.testing.assert_close(flow, expected, atol=ATOL, rtol=0, msg=lambda m: f"chunk {c}: {m}")
        held = stream.held_frames()
        for layer, proc in enumerate(processors):
            assert held[layer] == proc.rules.holds, (c, layer)
            assert stream.queue(layer) == list(proc.rules.queue), (c, layer)
        frame += size
    assert expected.abs().max() > 0.1
    refreshed = sum(p.refreshed for p in processors)
    if threshold == -1.0:
        assert refreshed == 0
    else:
        assert refreshed > 0  # the full-window refresh really happened in some layer
    if threshold == 0.2:
        # the reference's signature: sink 2 was empty at chunk 1, so chunk 5 took it
        assert all(p.rules.holds[2] != 2 for p in processors)


def test_latent_stream_refuses_bad_input():
    model = CausalWanModel(ModelConfig()).eval()
    stream = LatentStream(model)
    with pytest.raises(ValueError, match=r"latents must be \[1, 16, F, h, w\]"):
        stream.step(torch.zeros(1, 8, 2, 8, 12), 700, torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="one per latent frame"):
        stream.step(torch.zeros(1, 16, 2, 8, 12), [700, 600, 500], torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="prompt_embeds"):
        stream.step(torch.zeros(1, 16, 2, 8, 12), 700, torch.zeros(1, 4, 31))


def test_latent_stream_sees_a_prompt_changed_in_place():
    """A caller that refills one embedding tensor between steps gets the new prompt's output,
    as if it had passed a new tensor (it kept the old prompt's K/V; a review)."""
    torch.manual_seed(0)
    model = CausalWanModel(ModelConfig()).eval()
    latents = [torch.randn(1, 16, 2, *LATENT_HW), torch.randn(1, 16, 1, *LATENT_HW)]
    p1, p2 = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    fresh = LatentStream(model)
    fresh.step(latents[0], 700, p1)
    want = fresh.step(latents[1], 700, p2)
    stream, buffer = LatentStream(model), p1.clone()
    stream.step(latents[0], 700, buffer)
    buffer.copy_(p2)
    got = stream.step(latents[1], 700, buffer)
    assert torch.allclose(got, want, atol=ATOL)
    kept = LatentStream(model)
    kept.step(latents[0], 700, p1)
    assert not torch.allclose(got, kept.step(latents[1], 700, p1), atol=1e-3)  # the prompt matters here
