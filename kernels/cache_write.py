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

from streamdiff.kernels import index_checks_enabled, load_triton

triton = tl = None  # bound by _kernel() on the first launch: importing this file never imports triton

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


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


# ---------------------------------------------------------------------------------- Triton kernel

def _cache_write_program(
    k_ptr, v_ptr, kp_ptr, vp_ptr, slots_ptr, pos_ptr, cos_ptr, sin_ptr,
    num_pool_slots,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kps, stride_kpt, stride_kph, stride_kpd,
    stride_vps, stride_vpt, stride_vph, stride_vpd,
    stride_sb, stride_sf, stride_pb, stride_pf,
    stride_cp, stride_cd, stride_snp, stride_snd,
    FRAMES: tl.constexpr, TOKENS: tl.constexpr, PPW: tl.constexpr, HEAD_DIM: tl.constexpr,
    T_DIM: tl.constexpr, H_DIM: tl.constexpr,  # RoPE column blocks: [0, T_DIM) time, then height, then width
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,  # tokens per program, pow2 >= HEAD_DIM / 2
):
    """Body of `_cache_write_kernel` (@triton.jit is applied in `_kernel()`).

    Grid (cdiv(T, BLOCK_T), B * F, H): one program = BLOCK_T tokens of one head of one latent
    frame (row b, frame f); heads are in the grid so that even one row fills the GPU.

    1. look up the frame's pool slot and RoPE frame index; 2. per token and rotation pair,
    the RoPE table row (time: frame index, height: token row, width: token column);
    3. rotate K's interleaved pairs in fp32 and store into the slot; copy V."""
    pid_t = tl.program_id(0)
    pid_bf = tl.program_id(1)
    head = tl.program_id(2)
    row = pid_bf // FRAMES
    frame = pid_bf % FRAMES

    # 1. where this frame goes, and its RoPE time index
    slot = tl.load(slots_ptr + row * stride_sb + frame * stride_sf).to(tl.int64)
    pos = tl.load(pos_ptr + row * stride_pb + frame * stride_pf).to(tl.int64)
    slot_ok = (slot >= 0) & (slot < num_pool_slots)
    n_valid = tl.where(slot_ok, TOKENS, 0)  # a bad slot writes nothing
    slot = tl.minimum(tl.maximum(slot, 0), num_pool_slots - 1)

    # 2. RoPE angles of each (token, pair): cos at the pair's even column, sin at its odd one
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] token index inside the frame
    offs_p = tl.arange(0, BLOCK_HALF)  # [BP] pair index
    col = 2 * offs_p  # even column of each pair
    mask = (offs_t < n_valid)[:, None] & (col < HEAD_DIM)[None, :]  # [BT, BP]
    tok_h = (offs_t // PPW)[:, None]
    tok_w = (offs_t % PPW)[:, None]
    table_row = tl.where(col[None, :] < T_DIM, pos, tl.where(col[None, :] < T_DIM + H_DIM, tok_h, tok_w))  # [BT, BP]
    cos = tl.load(cos_ptr + table_row * stride_cp + col[None, :] * stride_cd, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + table_row * stride_snp + (col[None, :] + 1) * stride_snd, mask=mask, other=0.0)

    # 3. rotate K, copy V (token n of frame f is row f * TOKENS + n of the chunk). Whole rows
    # of K are read and written (contiguous, so 16-byte accesses) and split into pairs in
    # registers, rather than read as two strided halves.
    offs_d = tl.arange(0, 2 * BLOCK_HALF)  # [BD]
    mask_d = (offs_t < n_valid)[:, None] & (offs_d < HEAD_DIM)[None, :]  # [BT, BD]
    n = frame * TOKENS + offs_t[:, None]  # [BT, 1]
    k_src = k_ptr + row.to(tl.int64) * stride_kb + head * stride_kh + n * stride_kn + offs_d[None, :] * stride_kd
    x = tl.load(k_src, mask=mask_d, other=0.0)  # [BT, BD]
    x1, x2 = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_T, BLOCK_HALF, 2]))  # [BT, BP] each
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    y = tl.reshape(tl.join(y1, y2), [BLOCK_T, 2 * BLOCK_HALF])  # [BT, BD], pairs interleaved again
    k_dst = (kp_ptr + slot * stride_kps + head * stride_kph
             + offs_t[:, None] * stride_kpt + offs_d[None, :] * stride_kpd)
    tl.store(k_dst, y.to(x.dtype).to(kp_ptr.dtype.element_ty), mask=mask_d)  # rounded like the ref

    v_src = v_ptr + row.to(tl.int64) * stride_vb + head * stride_vh + n * stride_vn + offs_d[None, :] * stride_vd
    v_dst = (vp_ptr + slot * stride_vps + head * stride_vph
             + offs_t[:, None] * stride_vpt + offs_d[None, :] * stride_vpd)
    tl.store(v_dst, tl.load(v_src, mask=mask_d, other=0.0).to(vp_ptr.dtype.element_ty), mask=mask_d)


def _kernel():
    """`_cache_write_kernel`: @triton.jit applied on first use, so that importing this file
    (the model imports the `_ref` ops) neither imports triton nor fixes TRITON_INTERPRET."""
    global triton, tl, _cache_write_kernel
    if "_cache_write_kernel" not in globals():
        triton, tl = load_triton()
        _cache_write_kernel = triton.jit(_cache_write_program)
    return _cache_write_kernel


def __getattr__(name: str):
    if name == "_cache_write_kernel":  # `from ... import _cache_write_kernel`
        return _kernel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------- launcher


def _check_call(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, split, grid) -> None:
    """Shapes, dtypes and devices (always); slot / position values (see `index_checks_enabled`)."""
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B, F*T, H, D]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [S, T, H, D]; got {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    if k.shape[2] != k_pool.shape[2]:
        raise ValueError(f"head count mismatch: k has {k.shape[2]} heads, the pool {k_pool.shape[2]}")
    if k.shape[3] != k_pool.shape[3]:
        raise ValueError(f"head dim mismatch: k has head dim {k.shape[3]}, the pool {k_pool.shape[3]}")
    head_dim = k.shape[3]
    if head_dim % 2 or not 2 <= head_dim <= 256:
        raise ValueError(f"head dim {head_dim} not supported (even, 2..256)")
    if k.dtype not in DTYPES or v.dtype != k.dtype:
        raise ValueError(f"k / v dtype must be one float16 / bfloat16 / float32; got {k.dtype} / {v.dtype}")
    if k_pool.dtype not in DTYPES or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"pool dtype must be one float16 / bfloat16 / float32; got {k_pool.dtype} / {v_pool.dtype}")
    if len(grid) != 2 or grid[0] < 1 or grid[1] < 1 or grid[0] * grid[1] != k_pool.shape[1]:
        raise ValueError(f"grid {tuple(grid)} must multiply to the pool's tokens per slot T={k_pool.shape[1]}")
    if slots.dim() != 2 or slots.shape[0] != k.shape[0] or frame_pos.shape != slots.shape:
        raise ValueError(f"slots and frame_pos must both be [B={k.shape[0]}, F]; got {tuple(slots.shape)}, {tuple(frame_pos.shape)}")
    if slots.dtype not in INDEX_DTYPES or frame_pos.dtype not in INDEX_DTYPES:
        raise ValueError(f"slots / frame_pos must be int32 or int64; got {slots.dtype} / {frame_pos.dtype}")
    if k.shape[1] != slots.shape[1] * k_pool.shape[1]:
        raise ValueError(f"k has {k.shape[1]} tokens per row; F={slots.shape[1]} frames of T={k_pool.shape[1]} make "
                         f"{slots.shape[1] * k_pool.shape[1]}")
    if freqs_cos.dim() != 2 or freqs_sin.shape != freqs_cos.shape or freqs_cos.shape[1] != head_dim:
        raise ValueError(f"freqs_cos / freqs_sin must both be [P, D={head_dim}]; got "
                         f"{tuple(freqs_cos.shape)}, {tuple(freqs_sin.shape)}")
    if freqs_cos.dtype != torch.float32 or freqs_sin.dtype != torch.float32:
        raise ValueError(f"freqs_cos / freqs_sin must be float32; got {freqs_cos.dtype} / {freqs_sin.dtype}")
    if len(split) != 3 or sum(split) != head_dim or any(s < 0 or s % 2 for s in split):
        raise ValueError(f"split {tuple(split)} must be three even sizes summing to the head dim {head_dim}")
    table_len = freqs_cos.shape[0]
    if max(grid) > table_len:
        raise ValueError(f"grid {tuple(grid)} exceeds the RoPE table length {table_len}")
    devices = {t.device for t in (k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(d) for d in devices)}")
    if not index_checks_enabled(k.device.type) or slots.numel() == 0:
        return
    num_slots = k_pool.shape[0]
    if bool((slots < 0).any()) or bool((slots >= num_slots).any()):
        raise ValueError(f"slot index out of range: pool has {num_slots} slots, slots are {slots.tolist()}")
    if slots.unique().numel() != slots.numel():
        raise ValueError(f"slots written twice in one call: {slots.tolist()}")
    if bool((frame_pos < 0).any()) or bool((frame_pos >= table_len).any()):
        raise ValueError(f"frame_pos out of range of the RoPE table (length {table_len}): {frame_pos.tolist()}")


def kernel_args(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, split, grid) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and its constexprs other than the tile (BLOCK_T): what the
    launcher passes, and what `streamdiff.kernels.aot` compiles (from meta tensors)."""
    num_frames = slots.shape[1]
    tokens, head_dim = k_pool.shape[1], k_pool.shape[3]
    args = (
        k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin,
        k_pool.shape[0],
        *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(),
        *slots.stride(), *frame_pos.stride(), *freqs_cos.stride(), *freqs_sin.stride(),
    )
    constexprs = dict(
        FRAMES=num_frames, TOKENS=tokens, PPW=grid[1], HEAD_DIM=head_dim, T_DIM=split[0], H_DIM=split[1],
        BLOCK_HALF=1 << (head_dim // 2 - 1).bit_length(),  # next power of two >= D/2
    )
    return args, constexprs


def cache_write(
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
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Triton path of `cache_write_ref` (same arguments and result), in place on the pools.

    k, v, the pools and the tables may have any strides. block_t (tokens per program, a power
    of two) and num_warps override the defaults. Raises ValueError on a malformed call."""
    _check_call(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, split, grid)
    kernel = _kernel()
    if k.device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1, set before triton is imported")
    if block_t is not None and (block_t < 1 or block_t & (block_t - 1)):
        raise ValueError(f"block_t={block_t} must be a power of two")
    batch, num_frames = slots.shape
    _, tokens, heads, head_dim = k_pool.shape
    if batch * num_frames == 0:
        return
    # GPU: 64 tokens x one head (16 KiB of bf16 K+V at D=128) per program, heads in the grid so
    # even one row fills the SMs. Interpreter: 16 tokens, so tiny frames span several programs.
    block_t = block_t or (64 if k.device.type == "cuda" else 16)
    launch = (triton.cdiv(tokens, block_t), batch * num_frames, heads)
    args, constexprs = kernel_args(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, split, grid)
    kernel[launch](*args, **constexprs, BLOCK_T=block_t, num_warps=num_warps or 4)


# ---------------------------------------------------------------------------------- torch.compile


@torch.library.custom_op(
    "streamdiff::cache_write", mutates_args=("k_pool", "v_pool"),
    schema="(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots, Tensor frame_pos, "
           "Tensor freqs_cos, Tensor freqs_sin, int[] split, int[] grid) -> ()")
def cache_write_op(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, split, grid) -> None:
    """`cache_write` as one opaque op for torch.compile: Dynamo does not trace the launcher (its
    lazy @triton.jit, value checks and launch arithmetic), and inductor calls it in place of a
    graph node. The attention backend calls it while compiling, the launcher directly otherwise
    (an op call costs ~11 us of host time)."""
    cache_write(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, tuple(split), tuple(grid))


@cache_write_op.register_fake
def _cache_write_fake(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, split, grid) -> None:
    return None
