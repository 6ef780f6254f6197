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

from streamdiff.kernels import index_checks_enabled, load_triton

triton = tl = None  # bound by _kernel() on the first launch: importing this file never imports triton

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def sink_window_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_table: torch.Tensor,
    slot_count: torch.Tensor,
    scale: float | None = None,
    all_valid: bool | None = None,
) -> torch.Tensor:
    """Torch oracle and CPU path: gather each row's slots, mask the padding, run SDPA.
    `all_valid`: the caller knows (on the host) whether every row fills the table, so no mask
    is needed; None looks at slot_count (a host read of a device value)."""
    batch, n_q, heads, head_dim = q.shape
    max_slots = slot_table.shape[1]
    tokens = k_pool.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    valid = torch.arange(max_slots, device=q.device)[None, :] < slot_count[:, None].to(q.device)  # [B, M]
    index = torch.where(valid, slot_table.long(), torch.zeros_like(slot_table, dtype=torch.long))
    k = k_pool[index].reshape(batch, max_slots * tokens, heads, head_dim)  # [B, M*T, H, D]
    v = v_pool[index].reshape(batch, max_slots * tokens, heads, head_dim)
    out_dtype = q.dtype
    if all_valid if all_valid is not None else bool(valid.all()):
        mask = None
    else:
        mask = valid[:, None, None, :].repeat_interleave(tokens, dim=-1)  # [B, 1, 1, M*T]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, H, N, D]
    return out.transpose(1, 2).to(out_dtype)


# ---------------------------------------------------------------------------------- Triton kernel


def _attend_block(
    acc, m_i, l_i, q, k_base, v_base, table_row, kb, total, num_pool_slots, qk_scale,
    stride_ks, stride_kt, stride_kd, stride_vs, stride_vt, stride_vd, stride_tm,
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One block of BLOCK_N keys of the row's window: scores, online-softmax update, P·V.

    The window is the row's slots laid end to end (slot_count · TOKENS keys); key i of it is
    token i % TOKENS of slot table[i // TOKENS]. When BLOCK_N divides TOKENS a block lies in one
    slot (one table entry, one base offset); otherwise each key looks up its own slot, so a
    block may span two slots and only the window's last block is partial (MASK_KEYS)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = kb * BLOCK_N + offs_n  # [BN] key index in the window
    if TOKENS % BLOCK_N == 0:
        slot = tl.load(table_row + (kb * BLOCK_N // TOKENS) * stride_tm).to(tl.int64)  # scalar
        token = (kb * BLOCK_N) % TOKENS + offs_n  # [BN]
    else:
        entry = table_row + (offs_k // TOKENS) * stride_tm  # [BN] each key's table entry
        if MASK_KEYS:
            slot = tl.load(entry, mask=offs_k < total, other=0).to(tl.int64)
        else:  # a full block lies inside the window
            slot = tl.load(entry).to(tl.int64)
        token = offs_k % TOKENS  # [BN]
    slot = tl.minimum(tl.maximum(slot, 0), num_pool_slots - 1)  # memory safety only
    k_rows = slot * stride_ks + token * stride_kt  # [BN] (or scalar + [BN])
    v_rows = slot * stride_vs + token * stride_vt
    k_ptrs = k_base + k_rows[None, :] + offs_d[:, None] * stride_kd  # K^T [BD, BN]
    v_ptrs = v_base + v_rows[:, None] + offs_d[None, :] * stride_vd  # [BN, BD]
    if MASK_KEYS or not EVEN_D:
        key_ok = offs_k < total
        d_ok = offs_d < HEAD_DIM
        k_t = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        k_t = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale  # [BM, BN] fp32, base-2 logits
    if MASK_KEYS:
        s = tl.where((offs_k < total)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated so far
    p = tl.exp2(s - m_new[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)  # [BM, BD]
    return acc, m_new, l_i


def _sink_window_attention_program(
    q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, count_ptr,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    n_q, num_pool_slots, max_slots,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_ks, stride_kt, stride_kh, stride_kd,
    stride_vs, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_tb, stride_tm, stride_cb,
    HEADS: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # HEAD_DIM == BLOCK_D
    INPUT_PRECISION: tl.constexpr,
):
    """Body of `_sink_window_attention_kernel` (@triton.jit is applied in `_kernel()`).

    Grid (cdiv(N, BLOCK_M), B * H): one program = BLOCK_M queries of one (row, head), against
    the row's whole window; the query blocks of one (row, head) run side by side and share its
    K/V through L2.

    1. load the query block once; 2. walk the window (the row's slots end to end, in table
    order, which does not change the result) in blocks of BLOCK_N keys: full blocks in one
    loop without masks, which the compiler software-pipelines, then the partial last block;
    3. normalise and store. K/V are read in place from the pool at the table's slots."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    row = pid_bh // HEADS
    head = pid_bh % HEADS

    # 1. the query block
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    mask_d = offs_d < HEAD_DIM
    q_ptrs = (q_ptr + row.to(tl.int64) * stride_qb + head * stride_qh
              + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=(offs_m < n_q)[:, None] & mask_d[None, :], other=0.0)  # [BM, BD]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running numerator

    # 2. the window: count slots of TOKENS keys
    count = tl.minimum(tl.maximum(tl.load(count_ptr + row * stride_cb), 0), max_slots)  # inside the table row
    total = count * TOKENS
    table_row = table_ptr + row * stride_tb
    k_base = k_ptr + head * stride_kh
    v_base = v_ptr + head * stride_vh
    for kb in range(0, total // BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, table_row, kb, total, num_pool_slots, qk_scale,
            stride_ks, stride_kt, stride_kd, stride_vs, stride_vt, stride_vd, stride_tm,
            TOKENS, HEAD_DIM, BLOCK_N, BLOCK_D, False, EVEN_D, INPUT_PRECISION)
    if total % BLOCK_N != 0:
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, table_row, total // BLOCK_N, total, num_pool_slots, qk_scale,
            stride_ks, stride_kt, stride_kd, stride_vs, stride_vt, stride_vd, stride_tm,
            TOKENS, HEAD_DIM, BLOCK_N, BLOCK_D, True, EVEN_D, INPUT_PRECISION)

    # 3. normalise (an empty row gives zeros, not NaN) and store
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs = (o_ptr + row.to(tl.int64) * stride_ob + head * stride_oh
              + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < n_q)[:, None] & mask_d[None, :])


def _kernel():
    """`_sink_window_attention_kernel`: @triton.jit applied on first use, so that importing this
    file (the model imports the `_ref` op) neither imports triton nor fixes TRITON_INTERPRET.
    The helper is jitted first: the kernel finds it among this module's globals when compiled."""
    global triton, tl, _attend_block, _sink_window_attention_kernel
    if "_sink_window_attention_kernel" not in globals():
        triton, tl = load_triton()
        _attend_block = triton.jit(_attend_block)
        _sink_window_attention_kernel = triton.jit(_sink_window_attention_program)
    return _sink_window_attention_kernel


def __getattr__(name: str):
    if name == "_sink_window_attention_kernel":  # `from ... import _sink_window_attention_kernel`
        return _kernel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------- launcher


def _interpreting(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _launch_configs(q: torch.Tensor, heads: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, best first.

    GPU: the usual flash-attention tile, 128 queries x 64 pool tokens, 8 warps (4 up to head
    dim 64), 3 stages of K/V prefetch. At head dim 128 in bf16 it takes 96 KiB of shared memory
    on sm_90 and 64 KiB on sm_80 (`python -m streamdiff.kernels.aot`), so consumer cards
    (99 KiB) still fit it; its registers allow one program per SM. 64-query tiles when
    128-query tiles would not fill the SMs once (few rows, short chunks). Later entries are smaller fallbacks, tried
    when a compile runs out of resources.
    Interpreter: 16 x 16, the smallest tile the compiled tl.dot accepts, so tiny test shapes
    still cross block and slot boundaries."""
    if q.device.type != "cuda":
        return [(16, 16, 4, 1)]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return gpu_configs(q.shape[3], triton.cdiv(q.shape[1], 128) * q.shape[0] * heads, sms)


def gpu_configs(head_dim: int, programs_at_128: int, sms: int) -> list[tuple[int, int, int, int]]:
    """The GPU candidates of `_launch_configs` (device-free, so tests can compile each one)."""
    configs = []
    if programs_at_128 >= sms:
        configs.append((128, 64, 8 if head_dim > 64 else 4, 3))
    configs += [(64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)]
    return configs


_CONFIG_CACHE: dict[tuple, tuple[int, int, int, int]] = {}


def _check_call(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor, slot_count: torch.Tensor
) -> None:
    """Shapes, dtypes and devices (always); slot values (see `index_checks_enabled`)."""
    if q.dim() != 4 or k_pool.dim() != 4 or v_pool.dim() != 4:
        raise ValueError(f"q must be [B, N, H, D] and pools [S, T, H, D]; got q {tuple(q.shape)}, "
                         f"k_pool {tuple(k_pool.shape)}, v_pool {tuple(v_pool.shape)}")
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ in shape")
    if q.shape[2] != k_pool.shape[2]:
        raise ValueError(f"head count mismatch: q has {q.shape[2]} heads, the pool {k_pool.shape[2]}")
    if q.shape[3] != k_pool.shape[3]:
        raise ValueError(f"head dim mismatch: q has head dim {q.shape[3]}, the pool {k_pool.shape[3]}")
    if not 1 <= q.shape[3] <= 256:
        raise ValueError(f"head dim {q.shape[3]} not supported (1..256)")
    if q.dtype not in DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported (float16, bfloat16, float32)")
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype} (must be equal)")
    batch = q.shape[0]
    if slot_table.dim() != 2 or slot_table.shape[0] != batch or slot_table.shape[1] < 1:
        raise ValueError(f"slot_table must be [B={batch}, M>=1]; got {tuple(slot_table.shape)}")
    if slot_count.dim() != 1 or slot_count.shape[0] != batch:
        raise ValueError(f"slot_count must be [B={batch}]; got {tuple(slot_count.shape)}")
    if slot_table.dtype not in INDEX_DTYPES or slot_count.dtype not in INDEX_DTYPES:
        raise ValueError(f"slot_table / slot_count must be int32 or int64; got {slot_table.dtype} / {slot_count.dtype}")
    devices = {t.device for t in (q, k_pool, v_pool, slot_table, slot_count)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(d) for d in devices)}")
    if not index_checks_enabled(q.device.type) or batch == 0:
        return
    num_slots, max_slots = k_pool.shape[0], slot_table.shape[1]
    count = slot_count.long()
    if bool((count < 1).any()) or bool((count > max_slots).any()):
        raise ValueError(f"slot_count must lie in [1, M={max_slots}]; got {slot_count.tolist()}")
    valid = torch.arange(max_slots, device=q.device)[None, :] < count[:, None]  # [B, M]
    used = slot_table[valid]
    if bool((used < 0).any()) or bool((used >= num_slots).any()):
        bad = used[(used < 0) | (used >= num_slots)].unique().tolist()
        raise ValueError(f"slot index out of range: pool has {num_slots} slots, slot_table uses {bad}")


def kernel_args(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_table: torch.Tensor,
    slot_count: torch.Tensor,
    out: torch.Tensor,
    scale: float | None = None,
) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and its constexprs other than the tile (BLOCK_M, BLOCK_N):
    what the launcher passes, and what `streamdiff.kernels.aot` compiles (from meta tensors)."""
    _, n_q, heads, head_dim = q.shape
    num_slots, tokens = k_pool.shape[:2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    block_d = max(16, 1 << (head_dim - 1).bit_length())  # next power of two
    args = (
        q, k_pool, v_pool, out, slot_table, slot_count,
        scale * LOG2E, n_q, num_slots, slot_table.shape[1],
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *out.stride(),
        *slot_table.stride(), slot_count.stride(0),
    )
    constexprs = dict(
        HEADS=heads, TOKENS=tokens, HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=head_dim == block_d,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
    )
    return args, constexprs


def sink_window_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_table: torch.Tensor,
    slot_count: torch.Tensor,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton path of `sink_window_attention_ref`: q [B, N, H, D] -> out [B, N, H, D] (q's dtype).

    q may have any strides; the pools are read in place (any strides). The keyword-only
    block_* / num_* arguments override the tile choice (tests, bench sweeps); block sizes must
    be powers of two >= 16. Raises ValueError on a malformed call."""
    _check_call(q, k_pool, v_pool, slot_table, slot_count)
    kernel = _kernel()
    if q.device.type != "cuda" and not _interpreting(kernel):
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1, set before triton is imported")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size is not None and (size < 16 or size & (size - 1)):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    batch, n_q, heads, head_dim = q.shape
    tokens = k_pool.shape[1]
    out = torch.empty((batch, n_q, heads, head_dim), dtype=q.dtype, device=q.device)  # [B, N, H, D]
    if out.numel() == 0:
        return out
    args, constexprs = kernel_args(q, k_pool, v_pool, slot_table, slot_count, out, scale)

    key = (q.device, q.dtype, heads, head_dim, tokens, triton.cdiv(n_q, 128) * batch)
    configs = [_CONFIG_CACHE[key]] if key in _CONFIG_CACHE else _launch_configs(q, heads)
    override = bool(block_m or block_n or num_warps or num_stages)
    if override:
        bm, bn, nw, ns = configs[0]
        configs = [(block_m or bm, block_n or bn, num_warps or nw, num_stages or ns)]
    for i, (bm, bn, nw, ns) in enumerate(configs):
        grid = (triton.cdiv(n_q, bm), batch * heads)
        try:
            kernel[grid](*args, **constexprs, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
        except triton.runtime.errors.OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        if not override:
            _CONFIG_CACHE[key] = (bm, bn, nw, ns)  # the first config that compiled
        return out
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- torch.compile


@torch.library.custom_op(
    "streamdiff::sink_window_attention", mutates_args=(),
    schema="(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slot_table, Tensor slot_count) -> Tensor")
def sink_window_attention_op(q, k_pool, v_pool, slot_table, slot_count) -> torch.Tensor:
    """`sink_window_attention` as one opaque op for torch.compile (see cache_write_op)."""
    return sink_window_attention(q, k_pool, v_pool, slot_table, slot_count)


@sink_window_attention_op.register_fake
def _sink_window_attention_fake(q, k_pool, v_pool, slot_table, slot_count) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous [B, N, H, D] in q's dtype, as the launcher returns
