"""The block-causal Wan2.1 DiT with a rolling sink + ring KV cache.

Owns: the network (diffusers `WanTransformer3DModel` modules and parameter names, so its
weights load directly) and its own loop over the blocks: per-frame timestep modulation, RoPE
at absolute frame indices, K/V written into a KV pool slot per latent frame, attention over the
slots of each batch row, cross-attention against cached prompt K/V. Any block range [i, j)
runs on its own (pipeline stages hold only theirs).
Does not own: which slots a chunk uses (cache/slots.py), sampling (sampling/), loading
weights (loading.py) or the attention kernels (model/attention.py picks one).

One forward = one chunk of F latent frames for each of B rows (a row is one lane of one stream).
Shapes: x [B, 16, F, H/8, W/8] -> tokens [B, F*T, dim] with T = (H/16)*(W/16) per latent frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)

from streamdiff.cache.kv_cache import AttnBatch, KVPool, PoolLayer, choose_writes, sink_similarity, swap_refresh_
from streamdiff.config import ModelConfig
from streamdiff.model.attention import Attention, rope_angles
from streamdiff.kernels.cache_write import apply_rope_ref

PATCH = (1, 2, 2)
# Modules diffusers keeps in fp32 when the rest runs in bf16 (its `_keep_in_fp32_modules`).
FP32_MODULES = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

CrossKV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (k, v) each [B, L, H, D]


class CausalWanModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        block_range: tuple[int, int] | None = None,
        has_embed: bool = True,
        has_head: bool = True,
        attention: Attention | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        start, end = block_range if block_range is not None else (0, cfg.num_layers)
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(f"block range [{start}, {end}) is outside 0..{cfg.num_layers}")
        self.block_range = (start, end)
        self.has_embed = has_embed
        self.has_head = has_head
        self.attention = attention or Attention("torch")

        # 1. Position and condition embeddings (every stage needs the timestep modulation).
        self.rope = WanRotaryPosEmbed(cfg.head_dim, PATCH, cfg.rope_max_seq_len)
        if has_embed:
            self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=PATCH, stride=PATCH)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=dim, time_freq_dim=cfg.freq_dim, time_proj_dim=dim * 6, text_embed_dim=cfg.text_dim
        )
        # 2. The blocks of this range, named blocks.{i} as in diffusers.
        self.blocks = nn.ModuleDict(
            {
                str(i): WanTransformerBlock(
                    dim, cfg.ffn_dim, cfg.num_heads, "rms_norm_across_heads", cfg.cross_attn_norm, cfg.eps, None
                )
                for i in range(start, end)
            }
        )
        # 3. Output head.
        if has_head:
            self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
            self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(PATCH))
            self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self._rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ set-up helpers

    @property
    def layer_ids(self) -> list[int]:
        return list(range(*self.block_range))

    @property
    def rope_split(self) -> tuple[int, int, int]:
        return (self.rope.t_dim, self.rope.h_dim, self.rope.w_dim)

    def cast_(self, dtype: torch.dtype) -> "CausalWanModel":
        """Cast to `dtype`, keeping the modules diffusers keeps in fp32 in fp32, and the RoPE
        tables as computed (a cast rounded them through bf16: cos^2 + sin^2 - 1 up to 5e-3)."""
        self.to(dtype)
        device = self.rope.freqs_cos.device
        self.rope = WanRotaryPosEmbed(self.cfg.head_dim, PATCH, self.cfg.rope_max_seq_len).to(device)
        for name, module in self.named_modules():
            if name.split(".")[-1] in FP32_MODULES:
                module.float()
        for name, param in self.named_parameters():
            if name.split(".")[-1] in FP32_MODULES:
                param.data = param.data.float()
        self._rope_tables = None
        self._dtype = None
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The blocks' compute dtype (cached: it is read several times per forward; any
        `.to()` / `cast_` goes through `_apply`, which forgets it)."""
        if self._dtype is None:
            self._dtype = next(p.dtype for n, p in self.named_parameters() if "blocks" in n and p.ndim == 2)
        return self._dtype

    def materialize_(self, device: torch.device | str) -> "CausalWanModel":
        """A model built on the meta device (to be filled from a checkpoint) gets storage on
        `device`, uninitialised, in the dtypes it has (cast_ works on meta); the RoPE tables,
        computed at construction and never saved, are computed again."""
        self.to_empty(device=device)
        self.rope = WanRotaryPosEmbed(self.cfg.head_dim, PATCH, self.cfg.rope_max_seq_len).to(device)
        return self

    def _apply(self, fn, recurse=True):
        self._dtype = None
        self._rope_tables = None
        return super()._apply(fn, recurse)

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 copies of the RoPE cos/sin tables [P, D] (the kernels read fp32)."""
        cos = self.rope.freqs_cos
        if self._rope_tables is None or self._rope_tables[0].device != cos.device:
            self._rope_tables = (cos.float().contiguous(), self.rope.freqs_sin.float().contiguous())
        return self._rope_tables

    # ------------------------------------------------------------------ prompt K/V cache

    @torch.no_grad()
    def prompt_kv(self, text_states: torch.Tensor) -> CrossKV:
        """Cross-attention K/V of this range's blocks for one prompt: text [1, L, text_dim]."""
        ctx = self.condition_embedder.text_embedder(text_states.to(self.dtype))  # [1, L, dim]
        out: CrossKV = {}
        for layer, block in self._blocks():
            attn = block.attn2
            k = attn.norm_k(attn.to_k(ctx)).unflatten(2, (attn.heads, -1))  # [1, L, H, D]
            v = attn.to_v(ctx).unflatten(2, (attn.heads, -1))  # [1, L, H, D]
            out[layer] = (k, v)
        return out

    @staticmethod
    def stack_prompt_kv(rows: list[CrossKV]) -> CrossKV:
        """One CrossKV per batch row -> batched; rows sharing one prompt are expanded, not copied."""
        if all(r is rows[0] for r in rows):
            return {layer: (k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1)) for layer, (k, v) in rows[0].items()}
        return {layer: (torch.cat([r[layer][0] for r in rows]), torch.cat([r[layer][1] for r in rows])) for layer in rows[0]}

    # ------------------------------------------------------------------ forward pieces

    def _blocks(self):
        return ((int(name), block) for name, block in self.blocks.items())

    def time_embedding(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B, F] -> temb [B, F, dim] and the block modulation input [B, F, 6, dim]."""
        ce = self.condition_embedder
        batch, frames = timestep.shape
        t = ce.timesteps_proj(timestep.flatten()).unflatten(0, (batch, frames))  # [B, F, freq]
        t = t.to(next(ce.time_embedder.parameters()).dtype)
        temb = ce.time_embedder(t).to(self.dtype)  # [B, F, dim]
        tproj = ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))  # [B, F, 6, dim]
        return temb, tproj

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F, h, w] -> tokens [B, F*T, dim]."""
        return self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()

    def run_blocks(
        self,
        hidden: torch.Tensor,
        tproj: torch.Tensor,
        cross_kv: CrossKV,
        batch: AttnBatch,
        pool: KVPool,
        grid: tuple[int, int],
        block_fn=None,
    ) -> torch.Tensor:
        """Run this model's blocks over hidden [B, F*T, dim]; writes this chunk's K/V into the pool
        (the cache policy's per-layer slot choice and sink refresh travel in `batch`). `block_fn`:
        what runs one block (`run_block`'s signature; model/dit_step.py passes a compiled one)."""
        block_fn = block_fn or self.run_block
        freqs_cos, freqs_sin = self.rope_tables()
        cos_q, sin_q = rope_angles(freqs_cos, freqs_sin, self.rope_split, batch.write_pos, grid)  # [B, F*T, D]
        for layer, block in self._blocks():
            hidden = block_fn(block, pool.at(layer), hidden, tproj, cross_kv[layer], batch, grid, (cos_q, sin_q),
                              (freqs_cos, freqs_sin))
        return hidden

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """Tokens [B, F*T, dim] -> flow prediction [B, C, F, h, w]."""
        frames, height, width = latent_shape
        batch = hidden.shape[0]
        pph, ppw = height // PATCH[1], width // PATCH[2]
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)  # [B, F, 1, dim] each
        h = hidden.view(batch, frames, pph * ppw, -1)  # [B, F, T, dim]
        h = (self.norm_out(h.float()) * (1 + scale) + shift).type_as(hidden)
        h = self.proj_out(h)  # [B, F, T, C*4]
        h = h.reshape(batch, frames, pph, ppw, PATCH[0], PATCH[1], PATCH[2], -1)
        return h.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, h, w]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cross_kv: CrossKV,
        batch: AttnBatch,
        pool: KVPool,
        block_fn=None,
    ) -> torch.Tensor:
        """Full model (embed + all blocks + head) on one chunk per row: x [B, C, F, h, w],
        timestep [B, F] -> flow [B, C, F, h, w] (fp32). `block_fn`: see `run_blocks`."""
        if not (self.has_embed and self.has_head):
            raise RuntimeError("forward() needs the embeddings and the head; a stage calls run_blocks()")
        _, _, frames, height, width = x.shape
        grid = (height // PATCH[1], width // PATCH[2])
        temb, tproj = self.time_embedding(timestep)
        hidden = self.embed(x)
        hidden = self.run_blocks(hidden, tproj, cross_kv, batch, pool, grid, block_fn)
        return self.head(hidden, temb, (frames, height, width)).float()

    # ------------------------------------------------------------------ one block

    def run_block(
        self,
        block: WanTransformerBlock,
        pool: PoolLayer,
        x: torch.Tensor,
        tproj: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttnBatch,
        grid: tuple[int, int],
        rope_q: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """diffusers' WanTransformerBlock.forward with per-frame modulation, cached self-attention
        and cached cross-attention K/V. Same operations in the same precision.

        Everything per layer comes in as arguments (the block's weights, its pool views, its
        prompt K/V): nothing here knows which layer it runs, so one compiled `run_block` serves
        them all (regional compilation, model/dit_step.py)."""
        b, n, dim = x.shape
        frames = batch.num_frames
        mod = (block.scale_shift_table.unsqueeze(0) + tproj.float()).unsqueeze(3)  # [B, F, 6, 1, dim]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(2)  # [B, F, 1, dim] each
        xs = x.view(b, frames, n // frames, dim)  # [B, F, T, dim]

        # 1. Self-attention over the cache (this chunk's K/V written first).
        h = (block.norm1(xs.float()) * (1 + scale) + shift).type_as(x).view(b, n, dim)
        attn_out = self._self_attention(block.attn1, pool, h, batch, grid, rope_q, rope)  # [B, N, dim]
        xs = (xs.float() + attn_out.view_as(xs) * gate).type_as(x)

        # 2. Cross-attention to the prompt.
        h = block.norm2(xs.float()).type_as(x).view(b, n, dim)
        attn2 = block.attn2
        q = attn2.norm_q(attn2.to_q(h)).unflatten(2, (attn2.heads, -1))  # [B, N, H, D]
        out = self.attention.cross(q, *cross_kv).flatten(2).type_as(q)  # [B, N, H*D]
        xs = xs + attn2.to_out[0](out).view_as(xs)

        # 3. Feed-forward.
        h = (block.norm3(xs.float()) * (1 + c_scale) + c_shift).type_as(x)
        ff = block.ffn(h)
        xs = (xs.float() + ff.float() * c_gate).type_as(x)
        return xs.view(b, n, dim)

    def _self_attention(
        self,
        attn: nn.Module,
        pool: PoolLayer,
        h: torch.Tensor,
        batch: AttnBatch,
        grid: tuple[int, int],
        rope_q: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        k = attn.norm_k(attn.to_k(h)).unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        v = attn.to_v(h).unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        k_pool, v_pool = pool.k, pool.v
        # 1. Where this layer writes: the plan's slots, or (sdv2, full window) its queue's choice,
        #    after the sink-refresh test against the cache as it is before the write.
        write_slots = batch.write_slots
        if batch.choose:
            sim = None
            if batch.test_before:
                sim = sink_similarity(k_pool, v_pool, batch.sink_slots, apply_rope_ref(k, *rope_q), v)  # [B, sinks]
            write_slots = choose_writes(pool, batch, sim)  # [B, F]
        # 2. Write (RoPE fused), attend to every held slot of the row.
        q = apply_rope_ref(q, *rope_q)
        self.attention.write(k, v, k_pool, v_pool, write_slots, batch.write_pos, *rope, self.rope_split, grid)
        pool.record_frames(write_slots, batch.frames)
        out = self.attention.attend(q, k_pool, v_pool, batch)  # [B, N, H, D]
        # 3. rolling: the refresh swaps a sink with the frame just written, for later chunks.
        if batch.swap_after:
            swap_refresh_(pool, batch, write_slots)
        return attn.to_out[0](out.flatten(2).type_as(q))
