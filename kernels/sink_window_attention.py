"""sink_window_attention: a chunk's queries attend to the KV-pool slots of their row, in place.

Owns: the attention op over the rolling sink + ring cache (torch reference, Triton kernel,
launcher). Does not own: the slot tables (cache/slots.py builds them) or the cache write.

Layout (see cache_write.py):
  q              : [B, N, H, D]   queries of each row's chunk (N tokens)
  k_pool, v_pool : [S, T, H, D]   the layer's pool; slot = one latent frame of T tokens
  slot_table     : [B, M] int32   the slots row b attends to, any order; entries past
                                  slot_count[b] are ignored (pad with -1)
  slot_count     : [B] int32      1 <= slot_count[b] <= M
The chunk's own K/V are written to the pool (cache_write) before attention, so its slots are
listed in the row's table. Rows may belong to different streams and lanes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sink_window_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_table: torch.Tensor,
    slot_count: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Torch oracle and CPU path: gather each row's slots, mask the padding, run SDPA."""
    batch, n_q, heads, head_dim = q.shape
    max_slots = slot_table.shape[1]
    tokens = k_pool.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    valid = torch.arange(max_slots, device=q.device)[None, :] < slot_count[:, None].to(q.device)  # [B, M]
    index = torch.where(valid, slot_table.long(), torch.zeros_like(slot_table, dtype=torch.long))
    k = k_pool[index].reshape(batch, max_slots * tokens, heads, head_dim)  # [B, M*T, H, D]
    v = v_pool[index].reshape(batch, max_slots * tokens, heads, head_dim)
    out_dtype = q.dtype
    if bool(valid.all()):
        mask = None
    else:
        mask = valid[:, None, None, :].repeat_interleave(tokens, dim=-1)  # [B, 1, 1, M*T]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, H, N, D]
    return out.transpose(1, 2).to(out_dtype)
