"""The DiT's training forward and the demo's flow-matching training samples.

Owns: `train_forward`, a differentiable pass of `CausalWanModel` over a whole short clip with a
block-causal mask — the same operations as the cached `_block` (per-frame modulation, RoPE at
the frame's index, chunk-causal self-attention, prompt cross-attention), tested equal to the
chunk-by-chunk cached pass; and `make_batch`, which turns cached latents into v2v samples at
the project's timesteps.
Does not own: the network (model/causal_wan.py), the schedule (sampling/), the stages (train.py).

Samples (DESIGN §2, sampling/noise_schedule.py): the first lane sees the source latent noised
with strength s and is told t = 1000 s - 100, its x0 = x_t - sigma(t) v; later lanes see an
x0 estimate re-noised at their fixed timestep. So 3 in 4 samples are first-lane samples
(s ~ U(0.15, 0.5) mostly, up to 1.0 sometimes) and 1 in 4 later-lane samples (the target
re-noised at t in 700 / 500 / 400 / 200). The loss is on x0. One sample in five blends two
prompts' embeddings with weight a and targets the same blend of their latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamdiff.kernels.cache_write import apply_rope_ref
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.sampling.noise_schedule import FlowMatchSchedule, strength_to_timestep

LATER_LANE_TIMESTEPS = (700, 500, 400, 200)


def rope_for(model: CausalWanModel, frame_pos: torch.Tensor, grid: tuple[int, int], offset: tuple[int, int]):
    """cos/sin [B, F*T, D] for frames at frame_pos [B, F] and token rows/cols from `offset`."""
    cos, sin = model.rope_tables()
    t_dim, h_dim, w_dim = model.rope_split
    pph, ppw = grid
    oh, ow = offset
    b, f = frame_pos.shape

    def table(freqs: torch.Tensor) -> torch.Tensor:
        ft, fh, fw = freqs.split((t_dim, h_dim, w_dim), dim=1)
        tt = ft[frame_pos.reshape(-1)].view(b, f, 1, 1, t_dim).expand(b, f, pph, ppw, t_dim)
        hh = fh[oh : oh + pph].view(1, 1, pph, 1, h_dim).expand(b, f, pph, ppw, h_dim)
        ww = fw[ow : ow + ppw].view(1, 1, 1, ppw, w_dim).expand(b, f, pph, ppw, w_dim)
        return torch.cat([tt, hh, ww], dim=-1).reshape(b, f * pph * ppw, -1)  # [B, F*T, D]

    return table(cos), table(sin)


def chunk_mask(chunk_ids: list[int], tokens: int, device) -> torch.Tensor:
    """[F*T, F*T] bool: a token sees every token of its own and earlier chunks."""
    ids = torch.tensor(chunk_ids, device=device).repeat_interleave(tokens)  # [F*T]
    return ids[:, None] >= ids[None, :]


def train_forward(model: CausalWanModel, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                  frame_pos: torch.Tensor, chunk_ids: list[int], offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """x [B, 16, F, h, w], timestep [B, F], text [B, L, text_dim], frame_pos [B, F] -> flow [B, 16, F, h, w]."""
    b, _, f, h, w = x.shape
    grid = (h // 2, w // 2)
    tokens = grid[0] * grid[1]
    temb, tproj = model.time_embedding(timestep)  # [B, F, dim], [B, F, 6, dim]
    hidden = model.embed(x)  # [B, F*T, dim]
    ctx = model.condition_embedder.text_embedder(text.to(model.dtype))  # [B, L, dim]
    cos, sin = rope_for(model, frame_pos, grid, offset)  # [B, F*T, D]
    mask = chunk_mask(chunk_ids, tokens, x.device)  # [F*T, F*T]
    for _, block in model._blocks():
        hidden = _block(block, hidden, tproj, ctx, cos, sin, mask, f)
    return model.head(hidden, temb, (f, h, w)).float()


def _heads(attn, t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(2, (attn.heads, -1))  # [B, N, H, D]


def _block(block, x, tproj, ctx, cos, sin, mask, frames):
    """CausalWanModel._block with the cache replaced by a masked attention over the whole clip."""
    b, n, dim = x.shape
    mod = (block.scale_shift_table.unsqueeze(0) + tproj.float()).unsqueeze(3)  # [B, F, 6, 1, dim]
    shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(2)  # [B, F, 1, dim] each
    xs = x.view(b, frames, n // frames, dim)  # [B, F, T, dim]
    # 1. Self-attention, chunk-causal.
    h = (block.norm1(xs.float()) * (1 + scale) + shift).type_as(x).view(b, n, dim)
    a1 = block.attn1
    q = apply_rope_ref(_heads(a1, a1.norm_q(a1.to_q(h))), cos, sin)  # [B, N, H, D]
    k = apply_rope_ref(_heads(a1, a1.norm_k(a1.to_k(h))), cos, sin)  # [B, N, H, D]
    v = _heads(a1, a1.to_v(h))  # [B, N, H, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    xs = (xs.float() + a1.to_out[0](out.transpose(1, 2).flatten(2)).view_as(xs) * gate).type_as(x)
    # 2. Cross-attention to the prompt.
    h = block.norm2(xs.float()).type_as(x).view(b, n, dim)
    a2 = block.attn2
    q = _heads(a2, a2.norm_q(a2.to_q(h)))  # [B, N, H, D]
    k = _heads(a2, a2.norm_k(a2.to_k(ctx)))  # [B, L, H, D]
    v = _heads(a2, a2.to_v(ctx))  # [B, L, H, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    xs = xs + a2.to_out[0](out.transpose(1, 2).flatten(2)).view_as(xs)
    # 3. Feed-forward.
    h = (block.norm3(xs.float()) * (1 + c_scale) + c_shift).type_as(x)
    xs = (xs.float() + block.ffn(h).float() * c_gate).type_as(x)
    return xs.view(b, n, dim)


def make_batch(latents: torch.Tensor, table: torch.Tensor, schedule: FlowMatchSchedule, batch: int, crop: int,
               gen: torch.Generator, max_gap: int = 24) -> dict:
    """Training samples from cached latents [clips, prompts, 16, F, h, w] and the prompt table
    [prompts, L, text_dim]. Returns x, timestep, sigma, text, target, frame_pos, chunk_ids, offset."""
    clips, prompts, _, frames, lh, lw = latents.shape

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    def randint(hi, *shape):
        return torch.randint(0, hi, shape, generator=gen)

    # 1. Clip, crop (even latent offsets = whole tokens), prompt (or a blend of two).
    oh, ow = 2 * int(randint((lh - crop) // 2 + 1)), 2 * int(randint((lw - crop) // 2 + 1))
    idx = randint(clips, batch)
    lat = latents[idx][..., oh : oh + crop, ow : ow + crop]  # [B, P, 16, F, c, c]
    pa, pb = randint(prompts, batch), randint(prompts, batch)
    alpha = torch.where(rand(batch) < 0.2, rand(batch), torch.zeros(batch))  # [B]
    ar = torch.arange(batch)
    a5 = alpha.view(-1, 1, 1, 1, 1)
    target = (1 - a5) * lat[ar, pa] + a5 * lat[ar, pb]  # [B, 16, F, c, c]
    text = (1 - alpha.view(-1, 1, 1)) * table[pa] + alpha.view(-1, 1, 1) * table[pb]  # [B, L, D]
    source = lat[:, 0]  # [B, 16, F, c, c]
    # 2. Noise level and input per sample (first lane or a later lane).
    first = rand(batch) < 0.75
    strength = torch.where(rand(batch) < 0.8, 0.15 + 0.35 * rand(batch), 0.5 + 0.5 * rand(batch))
    later_t = torch.tensor(LATER_LANE_TIMESTEPS)[randint(len(LATER_LANE_TIMESTEPS), batch)]
    t = torch.where(first, torch.tensor([strength_to_timestep(float(s)) for s in strength]), later_t)
    t = t.clamp(min=0)
    sigma = torch.tensor([schedule.sigma(float(v)) for v in t])  # [B]
    noise_level = torch.where(first, strength, sigma).view(-1, 1, 1, 1, 1)
    clean = torch.where(first.view(-1, 1, 1, 1, 1), source, target)
    noise = torch.randn(clean.shape, generator=gen)
    x = (1 - noise_level) * clean + noise_level * noise  # [B, 16, F, c, c]
    # 3. Frame positions: the first chunk is 2 latent frames, then 1 per chunk; a random gap
    #    after the first chunk stands for the distance between sinks and the ring.
    gap = int(randint(max_gap + 1))
    frame_pos = torch.tensor([0, 1] + [2 + gap + i for i in range(frames - 2)]).expand(batch, -1)
    chunk_ids = [0, 0] + list(range(1, frames - 1))
    return {"x": x, "timestep": t.float().view(-1, 1).expand(-1, frames).contiguous(), "sigma": sigma,
            "text": text, "target": target, "frame_pos": frame_pos, "chunk_ids": chunk_ids, "offset": (oh // 2, ow // 2)}


__all__ = ["LATER_LANE_TIMESTEPS", "chunk_mask", "make_batch", "rope_for", "train_forward"]
