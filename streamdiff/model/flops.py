"""Analytic FLOP count of one forward of the block-causal Wan DiT (causal_wan.py).

Owns: how many floating-point operations one `CausalWanModel.forward` over B rows x F latent
frames costs for a given architecture, frame size, attention context and prompt length, split
into the parts of the network. `streamdiff bench` divides it by measured time for TFLOP/s and
model FLOP utilisation (MFU). Does not own: measuring anything, or the VAE (not counted).

What is counted: matmul-class work only, at 2 FLOPs per multiply-add — every `nn.Linear`, the
patch-embedding convolution, and the two matrix products of each attention (Q·Kᵀ and P·V).
Elementwise work (norms, modulation, RoPE, softmax, GELU, residuals, biases) is not counted:
it is a few percent of the total at real sizes and it is what
`torch.utils.flop_counter.FlopCounterMode` leaves out too, which the tests compare against.

Symbols: B rows (a row is one lane of one stream), F latent frames each row writes, T tokens
per latent frame ((H/16)·(W/16)), N = F·T query tokens per row, C context tokens per row
(the row's valid slots after this chunk's write, times T: sinks + ring slots that hold frames
+ the chunk itself), L prompt tokens (`text.max_length`: Wan attends to the zero padding too),
d = heads·head_dim, f = ffn_dim, c_in / c_out latent channels, p = 4 (patch 1x2x2),
q = freq_dim.

Per forward:
- patch embedding (Conv3d c_in -> d, kernel 1x2x2):     2·B·N·d·c_in·p
- time embedding per (row, frame): q->d, d->d, d->6d:   2·B·F·(q·d + d·d + 6·d·d)
- per block (x num_layers):
    self-attention Q, K, V, O projections:             4 · 2·B·N·d·d
    self-attention scores and values over the cache:   2 · 2·B·N·C·d
    cross-attention Q and O projections:                2 · 2·B·N·d·d
    cross-attention scores and values over the prompt: 2 · 2·B·N·L·d
    feed-forward d -> f -> d:                           2 · 2·B·N·d·f
- output head (Linear d -> c_out·p):                    2·B·N·d·c_out·p
Not per forward (excluded): the prompt's cross-attention K/V projections and the text
embedder. They run once per prompt (`CausalWanModel.prompt_kv`) and are cached.

Context caveat: the torch reference attention (kernels `sink_window_attention_ref`) pads every
row of a batch to the widest row's slot count and masks the padding, so when rows differ in
fill level it computes more than the count here; the Triton kernel does not. The count here is
the useful work (each row's own context).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streamdiff.config import Config, ModelConfig

PATCH_VOLUME = 4  # patch (1, 2, 2)
SPATIAL_DOWN = 16  # VAE 8x, patch 2x: pixels per token side


@dataclass(frozen=True)
class DiTFlops:
    """One forward's FLOPs by part (ints). `per_block` is one block; `total` is the whole model."""

    patch_embed: int
    time_embed: int
    self_proj: int  # per block
    self_attn: int  # per block
    cross_proj: int  # per block
    cross_attn: int  # per block
    ffn: int  # per block
    head: int
    num_layers: int

    @property
    def per_block(self) -> int:
        return self.self_proj + self.self_attn + self.cross_proj + self.cross_attn + self.ffn

    @property
    def total(self) -> int:
        return self.patch_embed + self.time_embed + self.num_layers * self.per_block + self.head

    def as_dict(self) -> dict[str, int]:
        return {
            "patch_embed": self.patch_embed, "time_embed": self.time_embed, "self_proj": self.self_proj,
            "self_attn": self.self_attn, "cross_proj": self.cross_proj, "cross_attn": self.cross_attn,
            "ffn": self.ffn, "head": self.head, "num_layers": self.num_layers, "per_block": self.per_block,
            "total": self.total,
        }


def tokens_per_frame(width: int, height: int) -> int:
    """Tokens of one latent frame at a video frame size (both multiples of 16)."""
    if width % SPATIAL_DOWN or height % SPATIAL_DOWN:
        raise ValueError(f"frame size {width}x{height} must be a multiple of 16 in both sides")
    return (width // SPATIAL_DOWN) * (height // SPATIAL_DOWN)


def dit_forward_flops(
    model: ModelConfig,
    rows: int,
    latent_frames: int,
    tokens: int,
    context_frames: int | Sequence[int],
    text_len: int,
) -> DiTFlops:
    """FLOPs of one forward (see the module docstring for every term).

    tokens: per latent frame. context_frames: latent frames each row attends to after its write
    (one int for every row, or one per row); each must be at least `latent_frames`."""
    if rows < 1 or latent_frames < 1 or tokens < 1 or text_len < 0:
        raise ValueError(f"need rows, latent_frames, tokens >= 1 and text_len >= 0, got "
                         f"{rows}, {latent_frames}, {tokens}, {text_len}")
    ctx = [int(context_frames)] * rows if isinstance(context_frames, int) else [int(c) for c in context_frames]
    if len(ctx) != rows:
        raise ValueError(f"context_frames has {len(ctx)} entries for {rows} rows")
    if min(ctx) < latent_frames:
        raise ValueError(f"context_frames {min(ctx)} < latent_frames {latent_frames}: a row always sees its own chunk")
    d, f = model.dim, model.ffn_dim
    n_all = rows * latent_frames * tokens  # query tokens of the whole forward (B·N)
    ctx_tokens = sum(c * tokens for c in ctx)  # Σ_rows C
    n_row = latent_frames * tokens  # N
    return DiTFlops(
        patch_embed=2 * n_all * d * model.in_channels * PATCH_VOLUME,
        time_embed=2 * rows * latent_frames * (model.freq_dim * d + d * d + 6 * d * d),
        self_proj=4 * 2 * n_all * d * d,
        self_attn=2 * 2 * n_row * ctx_tokens * d,
        cross_proj=2 * 2 * n_all * d * d,
        cross_attn=2 * 2 * n_all * text_len * d,
        ffn=2 * 2 * n_all * d * f,
        head=2 * n_all * d * model.out_channels * PATCH_VOLUME,
        num_layers=model.num_layers,
    )


def dit_flops_per_step(
    cfg: Config, rows: int, latent_frames: int, width: int, height: int, context_frames: int | Sequence[int]
) -> int:
    """FLOPs of one DiT forward of the configured architecture at a frame size, with the prompt
    length of the config (`text.max_length`)."""
    return dit_forward_flops(
        cfg.model, rows, latent_frames, tokens_per_frame(width, height), context_frames, cfg.text.max_length
    ).total


__all__ = ["DiTFlops", "dit_flops_per_step", "dit_forward_flops", "tokens_per_frame"]
