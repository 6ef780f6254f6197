"""Benchmark of the KV-cache kernels at Wan 1.3B shapes: `python -m streamdiff.bench.kernels`.

Owns: timing sink_window_attention against the ways one would do it without the kernel, and
cache_write against its torch ref. Does not own: correctness (tests/kernels) or the end-to-end
step timing (`streamdiff bench`). Needs a CUDA GPU; elsewhere it says so and exits 0.

Shapes: 12 heads x 128, one latent frame per chunk (1024 or 1560 tokens), a window of 6 slots
(3 sinks, 2 ring, the chunk's own), rows = lanes x streams, each row with its own 6 slots.
Attention is timed four ways:
  sdpa+copy   the torch path (sink_window_attention_ref): gather the row's slots into a
              contiguous K/V copy, then torch SDPA; the copy is part of the time
  flash+copy  flash-attn (or xformers) over the same gathered copy, copy included
  flash       the same without the copy (a lower bound no in-place path can avoid paying for)
  triton      sink_window_attention, reading the pool in place
TFLOP/s counts 4·N·L·D per (row, head) with L = slots·T keys; GB/s counts the bytes that must
move at least once (q, out, the row's K/V); speed-up is over sdpa+copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> float:
    """Median wall time of fn on the GPU in ms (CUDA events around each call, after warmup)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in times)[len(times) // 2]


def _other_attention():
    """(name, fn(q, k, v) over [B, L, H, D] tensors) for flash-attn, else xformers, else None."""
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func

        return "flash", flash_attn_func
    if importlib.util.find_spec("xformers") is not None:
        import xformers.ops as xops

        return "xformers", xops.memory_efficient_attention
    return None


def bench_attention(tokens: int, rows: int, dtype: torch.dtype, slots: int, heads: int, head_dim: int,
                    reps: int, sweep: bool, dev: str = "cuda") -> list[dict]:
    from streamdiff.kernels.sink_window_attention import gpu_configs, sink_window_attention, sink_window_attention_ref

    k_pool = torch.randn(rows * slots, tokens, heads, head_dim, device=dev, dtype=dtype)  # [S, T, H, D]
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(rows, tokens, heads, head_dim, device=dev, dtype=dtype)  # [B, N, H, D]
    # each row owns `slots` slots, listed in a shuffled order as a wrapped ring lists them
    gen = torch.Generator().manual_seed(0)
    table = torch.stack([r * slots + torch.randperm(slots, generator=gen) for r in range(rows)])
    table = table.to(device=dev, dtype=torch.int32)  # [B, M]
    count = torch.full((rows,), slots, dtype=torch.int32, device=dev)  # [B]
    keys = slots * tokens
    flops = 4 * rows * heads * tokens * keys * head_dim
    nbytes = (2 * q.numel() + 2 * rows * keys * heads * head_dim) * q.element_size()

    def gather():
        index = table.long()
        k = k_pool[index].reshape(rows, keys, heads, head_dim)  # [B, L, H, D] copy
        v = v_pool[index].reshape(rows, keys, heads, head_dim)
        return k, v

    impls: dict[str, Callable[[], object]] = {
        "sdpa+copy": lambda: sink_window_attention_ref(q, k_pool, v_pool, table, count),
    }
    other = _other_attention()
    if other is not None:
        name, fn = other
        impls[f"{name}+copy"] = lambda: fn(q, *gather())
        k_flat, v_flat = gather()
        impls[name] = lambda: fn(q, k_flat, v_flat)
    impls["triton"] = lambda: sink_window_attention(q, k_pool, v_pool, table, count)
    if sweep:
        for bm, bn, nw, ns in gpu_configs(head_dim, 10**9, 1) + [(128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3)]:
            impls[f"triton {bm}x{bn} w{nw} s{ns}"] = (
                lambda bm=bm, bn=bn, nw=nw, ns=ns: sink_window_attention(
                    q, k_pool, v_pool, table, count, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns))

    ref = sink_window_attention_ref(q.float(), k_pool.float(), v_pool.float(), table, count)
    out = sink_window_attention(q, k_pool, v_pool, table, count)
    err = (out.float() - ref).abs().max().item()
    results = []
    base = None
    for name, fn in impls.items():
        try:
            ms = time_ms(fn, reps=reps)
        except Exception as exc:  # a sweep config that does not compile here
            print(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        base = ms if base is None else base
        results.append(dict(name=name, ms=ms, tflops=flops / ms / 1e9, gbs=nbytes / ms / 1e6, speedup=base / ms))
    print(f"\nattention  tokens={tokens} rows={rows} slots={slots} heads={heads}x{head_dim} {dtype}  "
          f"(triton max |err| vs fp32 = {err:.2e})")
    _table(results)
    return results


def bench_cache_write(tokens: int, grid: tuple[int, int], rows: int, dtype: torch.dtype, heads: int, head_dim: int,
                      reps: int, dev: str = "cuda") -> list[dict]:
    from streamdiff.kernels.cache_write import cache_write, cache_write_ref

    hw_dim = 2 * (head_dim // 6)  # diffusers WanRotaryPosEmbed: 44 / 42 / 42 at head dim 128
    split = (head_dim - 2 * hw_dim, hw_dim, hw_dim)
    positions = 1024
    angles = torch.rand(positions, head_dim // 2, device=dev) * 6.28
    freqs_cos = angles.cos().repeat_interleave(2, dim=1).contiguous()  # [P, D] fp32
    freqs_sin = angles.sin().repeat_interleave(2, dim=1).contiguous()
    k = torch.randn(rows, tokens, heads, head_dim, device=dev, dtype=dtype)  # [B, F*T, H, D], F = 1
    v = torch.randn_like(k)
    k_pool = torch.zeros(rows * 6, tokens, heads, head_dim, device=dev, dtype=dtype)  # [S, T, H, D]
    v_pool = torch.zeros_like(k_pool)
    slots = (torch.arange(rows, device=dev, dtype=torch.int32) * 6 + 5)[:, None]  # [B, 1]
    pos = torch.full((rows, 1), 17, device=dev, dtype=torch.int64)
    args = (k, v, k_pool, v_pool, slots, pos, freqs_cos, freqs_sin, split, grid)
    nbytes = 4 * k.numel() * k.element_size()  # read k, v; write them into the pool
    results, base = [], None
    for name, fn in (("torch ref", lambda: cache_write_ref(*args)), ("triton", lambda: cache_write(*args))):
        ms = time_ms(fn, reps=reps)
        base = ms if base is None else base
        results.append(dict(name=name, ms=ms, tflops=float("nan"), gbs=nbytes / ms / 1e6, speedup=base / ms))
    print(f"\ncache_write  tokens={tokens} rows={rows} heads={heads}x{head_dim} {dtype}")
    _table(results)
    return results


def _table(results: list[dict]) -> None:
    print(f"  {'impl':<28}{'ms':>9}{'TFLOP/s':>10}{'GB/s':>9}{'speed-up':>10}")
    for r in results:
        tflops = "" if r["tflops"] != r["tflops"] else f"{r['tflops']:.1f}"
        print(f"  {r['name']:<28}{r['ms']:>9.3f}{tflops:>10}{r['gbs']:>9.0f}{r['speedup']:>9.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 1560], help="tokens per latent frame")
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--slots", type=int, default=6, help="slots per row, the chunk's own included")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time each Triton tile config")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("streamdiff.bench.kernels times CUDA kernels and needs a CUDA GPU; none here, nothing to time.")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would run in the interpreter; unset it to benchmark.")
        return 0
    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: nothing to benchmark (pip install triton).")
        return 0
    grids = {1024: (32, 32), 1560: (30, 52)}
    dtype = DTYPES[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for tokens in args.tokens:
        for lanes in args.lanes:
            for streams in args.streams:
                bench_attention(tokens, lanes * streams, dtype, args.slots, args.heads, args.head_dim, args.reps,
                                args.sweep)
    for tokens in args.tokens:
        grid = grids.get(tokens, (1, tokens))
        for rows in sorted({lanes * streams for lanes in args.lanes for streams in args.streams}):
            bench_cache_write(tokens, grid, rows, dtype, args.heads, args.head_dim, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
