"""The attention switch: torch SDPA | triton, chosen by config and availability.

Owns: the choice of backend and the three calls the model makes per layer — write the chunk's
K/V into the pool, attend over a row's slots, cross-attend to the prompt. CPU always has the
torch path. Does not own: the ops themselves (streamdiff.kernels holds the torch oracles and the
Triton kernels side by side).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from streamdiff.cache.kv_cache import AttnBatch
from streamdiff.kernels import triton_available
from streamdiff.kernels.cache_write import cache_write_ref, rope_angles_ref
from streamdiff.kernels.sink_window_attention import sink_window_attention_ref

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton")  # fastest last; `auto` takes the fastest that runs here

rope_angles = rope_angles_ref


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """`auto` -> triton on CUDA when Triton works (the cache kernels read K/V in place), else torch.
    An explicit backend that cannot run here is an error, not a silent fallback."""
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise ValueError("model.attention_backend=triton needs Triton and CUDA (or TRITON_INTERPRET=1 for tests)")
        return "triton"
    raise ValueError(f"unknown attention backend {requested!r} (known: auto, {', '.join(BACKENDS)})")


class Attention:
    def __init__(self, backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}")
        self.backend = backend
        if backend == "triton":
            from streamdiff.kernels.cache_write import cache_write, cache_write_op
            from streamdiff.kernels.sink_window_attention import sink_window_attention, sink_window_attention_op

            self._write, self._attend = cache_write, sink_window_attention
            self._write_op, self._attend_op = cache_write_op, sink_window_attention_op  # under torch.compile
        else:
            self._write, self._attend = cache_write_ref, sink_window_attention_ref

    def write(self, k, v, k_pool, v_pool, write_slots, write_pos, freqs_cos, freqs_sin, split, grid) -> None:
        """k, v [B, F*T, H, D] -> pool slots write_slots [B, F] at RoPE indices write_pos [B, F]."""
        if self.backend == "triton" and torch.compiler.is_compiling():
            self._write_op(k, v, k_pool, v_pool, write_slots, write_pos, freqs_cos, freqs_sin, split, grid)
            return
        self._write(k, v, k_pool, v_pool, write_slots, write_pos, freqs_cos, freqs_sin, split, grid)

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        """q [B, N, H, D] attends to every slot of its row -> [B, N, H, D]."""
        if self.backend == "triton":
            attend = self._attend_op if torch.compiler.is_compiling() else self._attend
            return attend(q, k_pool, v_pool, batch.slot_table, batch.slot_count)
        return self._attend(q, k_pool, v_pool, batch.slot_table, batch.slot_count, all_valid=batch.table_full)

    def cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, N, H, D], prompt k/v [B, L, H, D] -> [B, N, H, D]. No mask (Wan attends to the
        zero-padded text positions too)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2))
        return out.transpose(1, 2)
