"""The attention switch: torch SDPA | triton, chosen by config and availability.

Owns: the choice of backend and the three calls the model makes per layer — write the chunk's
K/V into the pool, attend over a row's slots, cross-attend to the prompt. CPU always has the
torch path. Does not own: the ops themselves (streamdiff.kernels holds the torch oracles and the
Triton kernels side by side).

`auto` on CUDA writes with the Triton kernel (5-11x the torch path on an H200) and, per call
shape, attends with whichever of the Triton kernel and SDPA over a gathered copy ran faster when
it first met that shape (`AttendChoice`): on the H200 the kernel won 1.9x at 1024 tokens x 1 row
and lost 0.57-0.81x at the other seven shapes measured (docs/benchmarks.md), so no fixed choice
is the fastest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from streamdiff.cache.kv_cache import AttnBatch
from streamdiff.kernels import triton_available
from streamdiff.kernels.cache_write import cache_write_ref, rope_angles_ref
from streamdiff.kernels.sink_window_attention import sink_window_attention_ref

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton")  # fastest last; `auto` takes the fastest that runs here

rope_angles = rope_angles_ref


class AttendChoice:
    """Per call shape, which attention path is faster here: both run on the shape's first call
    (one untimed call each: Triton's JIT, cuDNN's plan), then `REPEATS` timed calls each; the
    faster is kept for every later call of that shape (one shape serves every layer of a
    forward). Only eager calls decide: under torch.compile or while a CUDA graph is captured a
    shape not yet timed takes the kernel (a graph's first call runs eagerly first, so captured
    graphs get the timed choice). `timer(fn) -> seconds` is injectable for tests."""

    REPEATS = 3

    def __init__(self, timer: Callable[[Callable[[], object]], float] | None = None):
        self.kernel: dict[tuple, bool] = {}  # shape key -> the Triton kernel is the faster
        self.timer = timer or _time_call

    @staticmethod
    def key(q: torch.Tensor, k_pool: torch.Tensor, batch: AttnBatch) -> tuple:
        return (tuple(q.shape), q.dtype, tuple(k_pool.shape[1:]), tuple(batch.slot_table.shape), batch.table_full)

    def decide(self, key: tuple, kernel: Callable[[], torch.Tensor], sdpa: Callable[[], torch.Tensor]) -> bool:
        """For a shape not in `self.kernel`: time both paths and remember the faster."""
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return True
        kernel(), sdpa()  # warm: compile / plan outside the timing
        t_kernel = min(self.timer(kernel) for _ in range(self.REPEATS))
        t_sdpa = min(self.timer(sdpa) for _ in range(self.REPEATS))
        self.kernel[key] = t_kernel <= t_sdpa
        log.info("attention for q %s, %s slots of %s: %s (Triton %.3f ms, SDPA over a copy %.3f ms)", key[0],
                 key[3][1], key[2][0], "Triton" if self.kernel[key] else "SDPA", 1e3 * t_kernel, 1e3 * t_sdpa)
        return self.kernel[key]


def _time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes on its device (CUDA events on the current stream; wall time elsewhere)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
    """`choose` (with backend triton; `auto` on CUDA): attend per shape by `AttendChoice`."""

    def __init__(self, backend: str = "torch", choose: bool = False, timer=None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}")
        self.backend = backend
        self.choice = AttendChoice(timer) if choose and backend == "triton" else None
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
            if self.choice is not None:
                key = AttendChoice.key(q, k_pool, batch)
                use_kernel = self.choice.kernel.get(key)
                if use_kernel is None:
                    use_kernel = self.choice.decide(
                        key, lambda: self._attend(q, k_pool, v_pool, batch.slot_table, batch.slot_count),
                        lambda: self._sdpa(q, k_pool, v_pool, batch))
                if not use_kernel:
                    return self._sdpa(q, k_pool, v_pool, batch)
            attend = self._attend_op if torch.compiler.is_compiling() else self._attend
            return attend(q, k_pool, v_pool, batch.slot_table, batch.slot_count)
        return self._sdpa(q, k_pool, v_pool, batch)

    @staticmethod
    def _sdpa(q, k_pool, v_pool, batch: AttnBatch) -> torch.Tensor:
        return sink_window_attention_ref(q, k_pool, v_pool, batch.slot_table, batch.slot_count, all_valid=batch.table_full)

    def cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, N, H, D], prompt k/v [B, L, H, D] -> [B, N, H, D]. No mask (Wan attends to the
        zero-padded text positions too)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2))
        return out.transpose(1, 2)
