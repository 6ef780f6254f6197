"""cache_write: write a chunk's K and V into KV-pool slots, 3-axis RoPE fused into the K write.

Owns: the pool write op (torch reference `cache_write_ref`, Triton kernel, launcher `cache_write`).
Does not own: which slots to write (cache/slots.py decides) or the RoPE tables (the model's).

Layout (shared with sink_window_attention):
  k_pool, v_pool : [S, T, H, D]   one row per slot; a slot is one latent frame of T tokens
  k, v           : [B, F*T, H, D] the chunk's keys (before RoPE) and values, F latent frames
  slots          : [B, F] int     pool slot of each latent frame
  frame_pos      : [B, F] int     frame index whose RoPE angle each frame's keys get
  freqs_cos/sin  : [P, D] fp32    diffusers WanRotaryPosEmbed tables: columns [0, t) time axis,
                                  [t, t+h) height axis, [t+h, D) width axis, repeat-interleaved
  grid           : (pph, ppw)     token n of a frame sits at row n // ppw, column n % ppw
RoPE pairs are interleaved (x[2i], x[2i+1]), as in diffusers' Wan attention processor.
"""

from __future__ import annotations

import torch


def rope_angles_ref(
    freqs_cos: torch.Tensor,
    freqs_sin: torch.Tensor,
    split: tuple[int, int, int],
    frame_pos: torch.Tensor,
    grid: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin for frames at `frame_pos` ([F] or [B, F]) -> [..., F*T, D] each."""
    t_dim, h_dim, w_dim = split
    pph, ppw = grid
    cos_t, cos_h, cos_w = freqs_cos.split(split, dim=1)
    sin_t, sin_h, sin_w = freqs_sin.split(split, dim=1)
    lead = frame_pos.shape
    n = pph * ppw

    def table(ct: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
        tt = ct[frame_pos.reshape(-1)].view(*lead, 1, 1, t_dim).expand(*lead, pph, ppw, t_dim)
        hh = ch[:pph].view(1, pph, 1, h_dim).expand(*lead, pph, ppw, h_dim)
        ww = cw[:ppw].view(1, 1, ppw, w_dim).expand(*lead, pph, ppw, w_dim)
        return torch.cat([tt, hh, ww], dim=-1).reshape(*lead[:-1], lead[-1] * n, t_dim + h_dim + w_dim)

    return table(cos_t, cos_h, cos_w), table(sin_t, sin_h, sin_w)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D], cos/sin [B or 1, N, D] -> rotated x (interleaved pairs), in fp32 math."""
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, D/2] each
    c = cos[..., 0::2].unsqueeze(-2).float()  # [B, N, 1, D/2]
    s = sin[..., 1::2].unsqueeze(-2).float()
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)  # [B, N, H, D]
    return out.to(x.dtype)


def cache_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    frame_pos: torch.Tensor,
    freqs_cos: torch.Tensor,
    freqs_sin: torch.Tensor,
    split: tuple[int, int, int],
    grid: tuple[int, int],
) -> None:
    """Plain torch oracle: k_pool[slots[b, f]] = rope(k[b, frame f]), v_pool[...] = v[...]."""
    batch, num_frames = slots.shape
    tokens = grid[0] * grid[1]
    cos, sin = rope_angles_ref(freqs_cos, freqs_sin, split, frame_pos.long(), grid)  # [B, F*T, D]
    k_rot = apply_rope_ref(k, cos, sin)  # [B, F*T, H, D]
    flat = slots.reshape(-1).long()
    k_pool[flat] = k_rot.reshape(batch * num_frames, tokens, *k.shape[2:]).to(k_pool.dtype)
    v_pool[flat] = v.reshape(batch * num_frames, tokens, *v.shape[2:]).to(v_pool.dtype)
