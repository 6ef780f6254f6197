"""sink_window_attention (Triton) against sink_window_attention_ref.

Interpreter (CPU, fp32, tiny shapes: H <= 2, T = 12..20 tokens per slot against 16-token
blocks) for every cache state the model produces; `gpu`-marked tests for bf16 / fp16 compiled
kernels at model shapes; ahead-of-time compiles for sm_80 / sm_90 that need no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run (the torch _ref ops still work)")

from streamdiff.kernels import index_checks_enabled, triton_available  # noqa: E402
from streamdiff.kernels.sink_window_attention import (  # noqa: E402
    gpu_configs,
    sink_window_attention,
    sink_window_attention_ref,
)


def make_pool(num_slots: int, tokens: int, heads: int = 2, head_dim: int = 32, device: str = "cpu", dtype=torch.float32):
    k_pool = torch.randn(num_slots, tokens, heads, head_dim, device=device, dtype=dtype)  # [S, T, H, D]
    v_pool = torch.randn(num_slots, tokens, heads, head_dim, device=device, dtype=dtype)  # [S, T, H, D]
    return k_pool, v_pool


def make_table(rows: list[list[int]], device: str, width: int | None = None, dtype=torch.int32):
    """Per-row slot lists -> (slot_table [B, M] padded with -1, slot_count [B])."""
    width = width or max(len(r) for r in rows)
    table = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=dtype, device=device)  # [B, M]
    count = torch.tensor([len(r) for r in rows], dtype=dtype, device=device)  # [B]
    return table, count


def check(q, k_pool, v_pool, table, count, **kwargs) -> torch.Tensor:
    out = sink_window_attention(q, k_pool, v_pool, table, count, **kwargs)
    ref = sink_window_attention_ref(q, k_pool, v_pool, table, count, scale=kwargs.get("scale"))
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 1e-5 if q.device.type == "cpu" else 1e-4
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    return out


# Each row lists sinks, then ring slots (in pool order, which need not be sorted), then the
# chunk's own slot(s) last; the kernel must not care about the order.
CACHE_STATES = {
    "own_chunk_only": [[4], [7]],
    "own_chunk_only_two_frames": [[3, 8], [0, 1]],
    "partly_filled": [[0, 1, 2, 9], [5, 6, 7]],
    "full": [[0, 1, 2, 3, 4, 5]],
    "wrapped_ring": [[0, 1, 2, 7, 5, 6], [9, 10, 11, 3, 4, 8]],
    "eight_slots": [[11, 3, 0, 9, 4, 7, 1, 2]],
    "streams_and_lanes": [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 12]],
}


@pytest.mark.parametrize("tokens", [12, 20])  # below one 16-token block; one full + one partial
@pytest.mark.parametrize("state", list(CACHE_STATES))
def test_matches_ref_for_cache_states(state, tokens, device):
    rows = CACHE_STATES[state]
    frames = 2 if state == "own_chunk_only_two_frames" else 1
    k_pool, v_pool = make_pool(16, tokens, device=device)
    q = torch.randn(len(rows), frames * tokens, 2, 32, device=device)  # [B, N, H, D]
    check(q, k_pool, v_pool, *make_table(rows, device))


@pytest.mark.parametrize("tokens", [16, 32])  # a slot of one 16-key block; of two (Wan: 1024 tokens, 64-key blocks)
def test_block_multiple_tokens_take_the_unmasked_path(tokens, device):
    k_pool, v_pool = make_pool(6, tokens, device=device)
    q = torch.randn(2, 32, 2, 32, device=device)  # [B, N, H, D]
    check(q, k_pool, v_pool, *make_table([[0, 1, 2, 5], [3, 4]], device))


def test_sink_refresh_reads_the_new_sink_content(device):
    k_pool, v_pool = make_pool(8, 20, device=device)
    q = torch.randn(1, 20, 2, 32, device=device)  # [B, N, H, D]
    table, count = make_table([[0, 1, 2, 6, 4, 5, 7]], device)
    before = check(q, k_pool, v_pool, table, count)
    # the adaptive refresh replaces sink 1 with the chunk's latent frame (slot 7) in place
    k_pool[1] = k_pool[7]
    v_pool[1] = v_pool[7]
    after = check(q, k_pool, v_pool, table, count)
    assert not torch.allclose(before, after)


def test_table_padding_is_never_read(device):
    """Entries past slot_count may hold anything (here: slots the row must not see)."""
    k_pool, v_pool = make_pool(6, 12, device=device)
    q = torch.randn(2, 12, 2, 32, device=device)  # [B, N, H, D]
    table = torch.tensor([[0, 1, 5, 4], [2, 3, 0, 1]], dtype=torch.int32, device=device)  # [B, M]
    count = torch.tensor([2, 3], dtype=torch.int32, device=device)
    out = check(q, k_pool, v_pool, table, count)
    narrow = sink_window_attention(q, k_pool, v_pool, table[:, :3].contiguous(), count)
    torch.testing.assert_close(out, narrow, atol=0, rtol=0)


@pytest.mark.parametrize("head_dim", [32, 48, 64, 128])  # 48: padded to a 64-wide tile, masked
def test_head_dims(head_dim, device):
    k_pool, v_pool = make_pool(5, 12, heads=1, head_dim=head_dim, device=device)
    q = torch.randn(2, 12, 1, head_dim, device=device)  # [B, N, H, D]
    check(q, k_pool, v_pool, *make_table([[0, 1, 4], [2, 3]], device))


def test_the_tile_columns_past_the_head_dim_are_never_read(device):
    """Head dim 48 runs in a 64-wide tile: the pools here are views of a wider buffer whose
    columns past the head dim hold NaN, which a read would spread to the output."""
    buffer = torch.full((2, 5, 12, 1, 64), float("nan"), device=device)  # [K/V, S, T, H, 64]
    buffer[..., :48] = torch.randn(2, 5, 12, 1, 48, device=device)
    q = torch.randn(2, 12, 1, 48, device=device)  # [B, N, H, D]
    check(q, buffer[0, ..., :48], buffer[1, ..., :48], *make_table([[0, 1, 4], [2, 3]], device))


def test_gpu_tiles_are_128_queries_when_they_fill_every_sm_once():
    """The tile rule of `_launch_configs` (device-free): 128-query tiles when they give every SM
    a program (8 warps above head dim 64), else 64-query tiles first."""
    assert gpu_configs(128, 132, 132)[0] == (128, 64, 8, 3)
    assert gpu_configs(64, 132, 132)[0] == (128, 64, 4, 3)
    assert gpu_configs(128, 131, 132)[0] == (64, 64, 4, 3)


def test_non_contiguous_q_and_pools(device):
    tokens, heads, head_dim = 20, 2, 32
    qkv = torch.randn(2, tokens, 3, heads, head_dim, device=device)  # [B, N, 3, H, D] fused projection
    q = qkv[:, :, 0]  # [B, N, H, D], strided
    kv = torch.randn(7, tokens, 2, heads, head_dim, device=device)  # [S, T, 2, H, D] one tensor for K and V
    k_pool, v_pool = kv[:, :, 0], kv[:, :, 1]
    assert not q.is_contiguous() and not k_pool.is_contiguous()
    check(q, k_pool, v_pool, *make_table([[0, 1, 2, 6], [3, 4, 5]], device))
    q_t = torch.randn(2, heads, tokens, head_dim, device=device).transpose(1, 2)  # [B, N, H, D] head-major storage
    check(q_t, k_pool, v_pool, *make_table([[6, 0], [5, 4, 3, 2, 1]], device))


def test_int64_tables_scale_and_query_count(device):
    k_pool, v_pool = make_pool(6, 12, device=device)
    q = torch.randn(2, 7, 2, 32, device=device)  # [B, N, H, D]: 7 queries, not a slot's worth
    table, count = make_table([[5, 0, 1], [2]], device, dtype=torch.int64)
    check(q, k_pool, v_pool, table, count, scale=0.3)


def test_block_size_override(device):
    k_pool, v_pool = make_pool(6, 20, device=device)
    q = torch.randn(2, 40, 2, 32, device=device)  # [B, N, H, D]
    check(q, k_pool, v_pool, *make_table([[0, 1, 2, 3], [4, 5]], device), block_m=32, block_n=32)


def test_fp16(device):
    k_pool, v_pool = make_pool(5, 20, device=device, dtype=torch.float16)
    q = torch.randn(2, 20, 2, 32, device=device, dtype=torch.float16)  # [B, N, H, D]
    table, count = make_table([[0, 1, 4], [2, 3]], device)
    out = sink_window_attention(q, k_pool, v_pool, table, count)
    ref = sink_window_attention_ref(q.float(), k_pool.float(), v_pool.float(), table, count)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_empty_batch(device):
    k_pool, v_pool = make_pool(3, 12, device=device)
    q = torch.randn(0, 12, 2, 32, device=device)
    table = torch.zeros(0, 2, dtype=torch.int32, device=device)
    out = sink_window_attention(q, k_pool, v_pool, table, torch.zeros(0, dtype=torch.int32, device=device))
    assert out.shape == (0, 12, 2, 32)


def _bad_calls(device):
    k_pool, v_pool = make_pool(6, 12, device=device)
    q = torch.randn(2, 12, 2, 32, device=device)
    table, count = make_table([[0, 1, 2], [3, 4]], device)
    i32 = dict(dtype=torch.int32, device=device)
    return {
        "q_dtype_differs": ((q.half(), k_pool, v_pool, table, count), {}, "dtype mismatch"),
        "integer_q": ((q.int(), k_pool.int(), v_pool.int(), table, count), {}, "dtype"),
        "head_dim_mismatch": ((q[..., :16], k_pool, v_pool, table, count), {}, "head dim mismatch"),
        "head_count_mismatch": ((q[:, :, :1], k_pool, v_pool, table, count), {}, "head count mismatch"),
        "q_not_4d": ((q[0], k_pool, v_pool, table, count), {}, r"\[B, N, H, D\]"),
        "pool_shapes_differ": ((q, k_pool, v_pool[:5], table, count), {}, "differ in shape"),
        "slot_past_pool": ((q, k_pool, v_pool, torch.tensor([[0, 6, 1], [3, 4, -1]], **i32), count), {}, "out of range"),
        "negative_slot_in_use": ((q, k_pool, v_pool, torch.tensor([[0, -1, 1], [3, 4, -1]], **i32), count), {}, "out of range"),
        "table_1d": ((q, k_pool, v_pool, table[0], count), {}, "slot_table must be"),
        "table_rows_differ": ((q, k_pool, v_pool, table[:1], count), {}, "slot_table must be"),
        "count_shape": ((q, k_pool, v_pool, table, count[:1]), {}, "slot_count must be"),
        "count_zero": ((q, k_pool, v_pool, table, torch.tensor([3, 0], **i32)), {}, "slot_count must lie"),
        "count_past_table": ((q, k_pool, v_pool, table, torch.tensor([3, 4], **i32)), {}, "slot_count must lie"),
        "float_table": ((q, k_pool, v_pool, table.float(), count), {}, "int32 or int64"),
        "block_not_power_of_two": ((q, k_pool, v_pool, table, count), {"block_n": 24}, "power of two"),
    }


@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
def test_bad_calls_raise_value_error(case, device, monkeypatch):
    monkeypatch.setenv("STREAMDIFF_KERNEL_CHECKS", "1")  # value checks are opt-in on GPU
    args, kwargs, match = _bad_calls(device)[case]
    with pytest.raises(ValueError, match=match):
        sink_window_attention(*args, **kwargs)


def test_bad_slot_with_checks_off_stays_inside_the_pool(device, monkeypatch):
    """Value checks off (as on GPU by default): a bad index is clamped, never read out of bounds."""
    monkeypatch.setenv("STREAMDIFF_KERNEL_CHECKS", "0")
    k_pool, v_pool = make_pool(4, 12, device=device)
    q = torch.randn(1, 12, 2, 32, device=device)
    table = torch.tensor([[0, 1000]], dtype=torch.int32, device=device)
    out = sink_window_attention(q, k_pool, v_pool, table, torch.tensor([2], dtype=torch.int32, device=device))
    assert torch.isfinite(out).all()
    # a count past the table's width reads only the row's own entries
    out = sink_window_attention(q, k_pool, v_pool, table[:, :1], torch.tensor([5], dtype=torch.int32, device=device))
    ref = sink_window_attention_ref(q, k_pool, v_pool, table[:, :1], torch.tensor([1], dtype=torch.int32, device=device))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a count of zero or below attends to nothing: zeros, not NaN
    for bad in (0, -1):
        out = sink_window_attention(q, k_pool, v_pool, table, torch.tensor([bad], dtype=torch.int32, device=device))
        assert torch.equal(out, torch.zeros_like(out)), bad


# ------------------------------------------------------------------ compiled (GPU) and AOT


def _low_precision_case(dtype, heads, head_dim, tokens, rows, frames=1):
    torch.manual_seed(1)
    k_pool, v_pool = make_pool(max(max(r) for r in rows) + 1, tokens, heads, head_dim, "cuda", torch.float32)
    q = torch.randn(len(rows), frames * tokens, heads, head_dim, device="cuda")  # [B, N, H, D]
    table, count = make_table(rows, "cuda")
    ref = sink_window_attention_ref(q, k_pool, v_pool, table, count)  # fp32 truth
    low = [t.to(dtype) for t in (q, k_pool, v_pool)]
    sdpa = sink_window_attention_ref(*low, table, count)  # torch SDPA in the same low precision
    return low, table, count, ref, sdpa


def _assert_within_sdpa_error(out, ref, sdpa):
    """flash-attention's rule: error vs fp32 at most 2x SDPA's own error, plus a small atol."""
    atol = 2 * (ref + 0.3 - 0.3 - ref).abs().max().item()
    err = (out.float() - ref).abs().max().item()
    err_sdpa = (sdpa.float() - ref).abs().max().item()
    assert err <= 2 * err_sdpa + atol, f"kernel error {err:.3g} vs SDPA error {err_sdpa:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_low_precision_within_sdpa_error(dtype, head_dim, compiled_gpu):
    rows = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 11]]
    (q, k_pool, v_pool), table, count, ref, sdpa = _low_precision_case(dtype, 12, head_dim, 260, rows)
    out = sink_window_attention(q, k_pool, v_pool, table, count)
    _assert_within_sdpa_error(out, ref, sdpa)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1024, 1560])
def test_gpu_wan_shape_every_config(tokens, compiled_gpu):
    rows = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 11, 9, 10]]
    (q, k_pool, v_pool), table, count, ref, sdpa = _low_precision_case(torch.bfloat16, 12, 128, tokens, rows)
    for bm, bn, nw, ns in gpu_configs(128, 10**9, 1):
        out = sink_window_attention(q, k_pool, v_pool, table, count, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        _assert_within_sdpa_error(out, ref, sdpa)


def _attention(reports: list[dict], capability: int) -> list[dict]:
    return [r for r in reports if r["kernel"] == "sink_window_attention" and r["capability"] == capability]


def test_every_tile_compiles_for_sm80_and_sm90(aot_reports):
    """The interpreter does not check what the compiler does (tile shapes, dot operand types,
    loop-carried types, shared memory): each GPU tile candidate is compiled for real."""
    reports = _attention(aot_reports, 90) + _attention(aot_reports, 80)
    assert reports and not [(r["case"], r["config"], r["error"]) for r in reports if r["error"]]


def test_hopper_build_uses_wgmma_and_a_pipelined_kv_loop_without_spills(aot_reports):
    """At the Wan shapes in 16-bit, every tile of >= 64 queries with >= 2 stages compiles on
    sm_90 to warpgroup MMA (HGMMA), asynchronous K/V copies (LDGSTS: the window loop is
    software-pipelined, across slot boundaries too) and no spills, inside an H100's shared
    memory. The 1560-token frame (not a multiple of any block) must get all of it as well."""
    from streamdiff.kernels.aot import SHARED_LIMIT

    checked = [r for r in _attention(aot_reports, 90)
               if "fp32" not in r["case"] and r["config"]["num_stages"] > 1 and r["config"]["constexprs"]["BLOCK_M"] >= 64]
    assert {r["case"].split()[0] for r in checked} == {"T=1024", "T=1560"}
    for r in checked:
        where = (r["case"], r["config"])
        assert r["sass"]["HGMMA"] > 0 and r["sass"]["HMMA"] == 0, where
        assert r["sass"]["LDGSTS"] > 0, where
        assert r["local"] == 0 and r["sass"]["LDL"] == 0 and r["sass"]["STL"] == 0, where
        assert r["shared"] <= SHARED_LIMIT[90], where


def test_each_gpu_has_a_tile_that_fits_its_shared_memory(aot_reports):
    """The launcher falls back along gpu_configs when a tile runs out of resources: an A100
    fits the first candidate, and consumer cards (99 KiB per block) fit some candidate."""
    from streamdiff.kernels.aot import SHARED_LIMIT

    for case in {r["case"] for r in _attention(aot_reports, 80)}:
        tiles = [r for r in _attention(aot_reports, 80) if r["case"] == case]
        assert tiles[0]["shared"] <= SHARED_LIMIT[80], case
        assert min(r["shared"] for r in tiles) <= SHARED_LIMIT[86], case


# ------------------------------------------------------------------ the package around the kernels


def test_importing_the_ref_ops_does_not_import_triton():
    """CPU machines without triton use the _ref ops: importing them must not need triton."""
    code = ("import sys, streamdiff.kernels, streamdiff.kernels.cache_write, streamdiff.kernels.sink_window_attention, "
            "streamdiff.bench.kernels, streamdiff.kernels.aot; assert 'triton' not in sys.modules, 'triton was imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_value_checks_default_on_for_cpu_opt_in_for_gpu(monkeypatch):
    monkeypatch.delenv("STREAMDIFF_KERNEL_CHECKS", raising=False)
    assert index_checks_enabled("cpu") and not index_checks_enabled("cuda")
    monkeypatch.setenv("STREAMDIFF_KERNEL_CHECKS", "1")
    assert index_checks_enabled("cuda")
    monkeypatch.setenv("STREAMDIFF_KERNEL_CHECKS", "0")
    assert not index_checks_enabled("cpu")


def test_triton_available_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available()
