"""cache_write (Triton) against cache_write_ref: RoPE fused into the K write, V copied.

The RoPE tables are diffusers' own (WanRotaryPosEmbed), as the model passes them. Interpreter
on CPU (fp32, tiny grids), `gpu`-marked bf16 / fp16 at model shapes, and ahead-of-time
compiles for sm_80 / sm_90 that need no GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run (the torch _ref ops still work)")

from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed  # noqa: E402

from streamdiff.kernels.cache_write import cache_write, cache_write_ref  # noqa: E402
from streamdiff.kernels.sink_window_attention import sink_window_attention, sink_window_attention_ref  # noqa: E402


def rope_tables(head_dim: int, device: str, max_len: int = 64):
    """fp32 [P, D] cos / sin tables and the (t, h, w) column split, as the model passes them."""
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_len)
    split = (rope.t_dim, rope.h_dim, rope.w_dim)
    return rope.freqs_cos.float().to(device).contiguous(), rope.freqs_sin.float().to(device).contiguous(), split


def run_both(k, v, num_slots, slots, frame_pos, head_dim, grid, pool_dtype=None, **kwargs):
    """Write with the kernel and with the ref into two copies of one random pool -> both pools."""
    device = k.device
    pool_dtype = pool_dtype or k.dtype
    freqs_cos, freqs_sin, split = rope_tables(head_dim, device)
    tokens = grid[0] * grid[1]
    k_pool = torch.randn(num_slots, tokens, k.shape[2], head_dim, device=device).to(pool_dtype)  # [S, T, H, D]
    v_pool = torch.randn(num_slots, tokens, k.shape[2], head_dim, device=device).to(pool_dtype)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    slots = torch.tensor(slots, dtype=torch.int32, device=device)  # [B, F]
    frame_pos = torch.tensor(frame_pos, dtype=torch.int64, device=device)  # [B, F]
    cache_write(k, v, k_pool, v_pool, slots, frame_pos, freqs_cos, freqs_sin, split, grid, **kwargs)
    cache_write_ref(k, v, k_ref, v_ref, slots, frame_pos, freqs_cos, freqs_sin, split, grid)
    return (k_pool, v_pool), (k_ref, v_ref)


def assert_pools_equal(ours, ref, tol: float = 1e-6):
    for name, a, b in zip(("k_pool", "v_pool"), ours, ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "grid,slots,frame_pos",
    [
        ((3, 4), [[5]], [[0]]),  # 12 tokens: less than one 16-token block
        ((3, 5), [[4, 1], [7, 0]], [[3, 4], [10, 11]]),  # two rows x two frames, unsorted slots
        ((4, 5), [[2], [6], [3]], [[7], [2], [40]]),  # 20 tokens: one full block + a partial one
        ((2, 8), [[8, 0]], [[1, 2]]),  # 16 tokens: exactly one block
    ],
)
def test_matches_ref(grid, slots, frame_pos, device):
    batch, frames = len(slots), len(slots[0])
    tokens = grid[0] * grid[1]
    k = torch.randn(batch, frames * tokens, 2, 32, device=device)  # [B, F*T, H, D]
    v = torch.randn(batch, frames * tokens, 2, 32, device=device)
    ours, ref = run_both(k, v, 9, slots, frame_pos, 32, grid)
    assert_pools_equal(ours, ref)


@pytest.mark.parametrize("head_dim", [64, 128])  # 64: split 24/20/20; 128: Wan's 44/42/42
def test_head_dims(head_dim, device):
    k = torch.randn(1, 2 * 15, 1, head_dim, device=device)  # [B, F*T, H, D]
    v = torch.randn(1, 2 * 15, 1, head_dim, device=device)
    ours, ref = run_both(k, v, 4, [[3, 1]], [[5, 6]], head_dim, (3, 5))
    assert_pools_equal(ours, ref)


def test_non_contiguous_inputs(device):
    grid, heads, head_dim = (3, 5), 2, 32
    qkv = torch.randn(2, 15, 3, heads, head_dim, device=device)  # [B, N, 3, H, D] fused projection
    k, v = qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, D] each, strided
    assert not k.is_contiguous()
    ours, ref = run_both(k, v, 5, [[0], [4]], [[2], [9]], head_dim, grid)
    assert_pools_equal(ours, ref)


def test_into_a_layer_of_a_multi_layer_pool(device):
    """The model passes pool[layer] views; other layers and slots stay untouched."""
    freqs_cos, freqs_sin, split = rope_tables(32, device)
    pool_k = torch.randn(3, 6, 12, 2, 32, device=device)  # [L, S, T, H, D]
    pool_v = torch.randn(3, 6, 12, 2, 32, device=device)
    ref_k, ref_v = pool_k.clone(), pool_v.clone()
    k = torch.randn(2, 12, 2, 32, device=device)  # [B, F*T, H, D]
    v = torch.randn(2, 12, 2, 32, device=device)
    slots = torch.tensor([[5], [2]], dtype=torch.int32, device=device)
    pos = torch.tensor([[8], [3]], device=device)
    cache_write(k, v, pool_k[1], pool_v[1], slots, pos, freqs_cos, freqs_sin, split, (3, 4))
    cache_write_ref(k, v, ref_k[1], ref_v[1], slots, pos, freqs_cos, freqs_sin, split, (3, 4))
    assert_pools_equal((pool_k, pool_v), (ref_k, ref_v))


def test_fp32_chunk_into_fp16_pool_rounds_like_the_ref(device):
    k = torch.randn(1, 12, 2, 32, device=device)  # [B, F*T, H, D]
    v = torch.randn(1, 12, 2, 32, device=device)
    ours, ref = run_both(k, v, 3, [[1]], [[4]], 32, (3, 4), pool_dtype=torch.float16)
    assert_pools_equal(ours, ref, tol=1e-3)


def test_write_then_attend_matches_the_torch_path(device):
    """The two kernels together, as one model layer uses them, against the two refs."""
    freqs_cos, freqs_sin, split = rope_tables(32, device)
    grid, tokens = (4, 5), 20
    pools = [torch.randn(8, tokens, 2, 32, device=device) for _ in range(2)]  # k, v [S, T, H, D]
    ref_pools = [p.clone() for p in pools]
    k = torch.randn(2, tokens, 2, 32, device=device)  # [B, F*T, H, D]
    v = torch.randn(2, tokens, 2, 32, device=device)
    q = torch.randn(2, tokens, 2, 32, device=device)
    slots = torch.tensor([[6], [7]], dtype=torch.int32, device=device)
    pos = torch.tensor([[9], [4]], device=device)
    table = torch.tensor([[0, 1, 2, 4, 5, 6], [3, 7, -1, -1, -1, -1]], dtype=torch.int32, device=device)
    count = torch.tensor([6, 2], dtype=torch.int32, device=device)
    cache_write(k, v, *pools, slots, pos, freqs_cos, freqs_sin, split, grid)
    out = sink_window_attention(q, *pools, table, count)
    cache_write_ref(k, v, *ref_pools, slots, pos, freqs_cos, freqs_sin, split, grid)
    ref = sink_window_attention_ref(q, *ref_pools, table, count)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _bad_calls(device):
    freqs_cos, freqs_sin, split = rope_tables(32, device)
    k = torch.randn(2, 12, 2, 32, device=device)
    v = torch.randn(2, 12, 2, 32, device=device)
    k_pool = torch.zeros(4, 12, 2, 32, device=device)
    v_pool = torch.zeros(4, 12, 2, 32, device=device)
    slots = torch.tensor([[0], [3]], dtype=torch.int32, device=device)
    pos = torch.tensor([[0], [1]], device=device)
    good = (k, v, k_pool, v_pool, slots, pos, freqs_cos, freqs_sin, split, (3, 4))

    def with_(**changes):
        names = ("k", "v", "k_pool", "v_pool", "slots", "frame_pos", "freqs_cos", "freqs_sin", "split", "grid")
        args = dict(zip(names, good))
        args.update(changes)
        return tuple(args[n] for n in names)

    i32 = dict(dtype=torch.int32, device=device)
    return {
        "integer_k": (with_(k=k.int(), v=v.int()), "dtype"),
        "k_v_dtypes_differ": (with_(v=v.half()), "dtype"),
        "fp16_tables": (with_(freqs_cos=freqs_cos.half(), freqs_sin=freqs_sin.half()), "float32"),
        "head_dim_mismatch": (with_(k=k[..., :16], v=v[..., :16]), "head dim mismatch"),
        "head_count_mismatch": (with_(k=k[:, :, :1], v=v[:, :, :1]), "head count mismatch"),
        "grid_not_tokens": (with_(grid=(3, 5)), "grid"),
        "tokens_not_frames": (with_(k=k[:, :10], v=v[:, :10]), "tokens per row"),
        "slots_1d": (with_(slots=slots[:, 0]), "slots and frame_pos"),
        "slots_rows_differ": (with_(slots=slots[:1], frame_pos=pos[:1]), "slots and frame_pos"),
        "float_slots": (with_(slots=slots.float()), "int32 or int64"),
        "slot_past_pool": (with_(slots=torch.tensor([[0], [4]], **i32)), "out of range"),
        "negative_slot": (with_(slots=torch.tensor([[-1], [3]], **i32)), "out of range"),
        "slot_written_twice": (with_(slots=torch.tensor([[2], [2]], **i32)), "twice"),
        "frame_pos_past_table": (with_(frame_pos=torch.tensor([[0], [64]], device=device)), "frame_pos"),
        "negative_frame_pos": (with_(frame_pos=torch.tensor([[-1], [0]], device=device)), "frame_pos"),
        "split_not_head_dim": (with_(split=(12, 10, 8)), "split"),
        "odd_split": (with_(split=(11, 11, 10)), "split"),
    }


@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
def test_bad_calls_raise_value_error(case, device, monkeypatch):
    monkeypatch.setenv("STREAMDIFF_KERNEL_CHECKS", "1")  # value checks are opt-in on GPU
    args, match = _bad_calls(device)[case]
    with pytest.raises(ValueError, match=match):
        cache_write(*args)


def test_bad_slot_with_checks_off_writes_nothing(device, monkeypatch):
    """Value checks off (as on GPU by default): a frame bound for a bad slot is dropped, the
    other frames are written, nothing outside the pool is touched."""
    monkeypatch.setenv("STREAMDIFF_KERNEL_CHECKS", "0")
    freqs_cos, freqs_sin, split = rope_tables(32, device)
    k = torch.randn(1, 24, 2, 32, device=device)  # [B, F*T, H, D], two frames
    v = torch.randn(1, 24, 2, 32, device=device)
    pools = [torch.zeros(5, 12, 2, 32, device=device) for _ in range(2)]
    inner = [p[1:4] for p in pools]  # a 3-slot pool inside a bigger buffer: slot 3 would overrun it
    slots = torch.tensor([[0, 3]], dtype=torch.int32, device=device)
    cache_write(k, v, *inner, slots, torch.tensor([[0, 1]], device=device), freqs_cos, freqs_sin, split, (3, 4))
    for pool in pools:
        assert pool[1].abs().sum() > 0  # slot 0 of the inner pool written
        assert pool[0].abs().sum() == 0 and pool[2:].abs().sum() == 0
    for pool in pools:
        pool.zero_()
    slots = torch.tensor([[-1, 2]], dtype=torch.int32, device=device)  # -1: the slot tables' padding
    cache_write(k, v, *inner, slots, torch.tensor([[0, 1]], device=device), freqs_cos, freqs_sin, split, (3, 4))
    for pool in pools:
        assert pool[3].abs().sum() > 0  # slot 2 of the inner pool written, slot 0 not
        assert pool[:3].abs().sum() == 0 and pool[4].abs().sum() == 0


# ------------------------------------------------------------------ compiled (GPU) and AOT


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [(32, 32), (30, 52)])  # 1024 and 1560 tokens per latent frame
def test_gpu_low_precision_wan_shapes(dtype, grid, compiled_gpu):
    tokens = grid[0] * grid[1]
    k = torch.randn(3, 2 * tokens, 12, 128, device="cuda", dtype=dtype)  # [B, F*T, H, D]
    v = torch.randn(3, 2 * tokens, 12, 128, device="cuda", dtype=dtype)
    ours, ref = run_both(k, v, 8, [[0, 5], [7, 1], [3, 2]], [[0, 1], [20, 21], [5, 6]], 128, grid)
    # fp32 math then one rounding in both: at most one ulp apart where an FMA changed the sum
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_compiles_with_16_byte_global_accesses_and_no_spills(aot_reports):
    """cache_write is memory-bound: on sm_80 and sm_90, at the Wan shapes, every byte of K and
    V is read and written in 16-byte accesses (as many LDG.128 as STG.128, and no narrower
    store), and nothing spills. The RoPE table reads are the only narrower loads."""
    reports = [r for r in aot_reports if r["kernel"] == "cache_write"]
    assert {r["capability"] for r in reports} == {80, 90}
    assert not [(r["case"], r["error"]) for r in reports if r["error"]]
    for r in reports:
        if "D=128" not in r["case"]:
            continue
        sass = r["sass"]
        assert sass["STG.128"] == sass["STG"] > 0, (r["case"], sass)
        assert sass["LDG.128"] == sass["STG.128"], (r["case"], sass)
        assert r["local"] == 0 and sass["LDL"] == sass["STL"] == 0, (r["case"], r["local"])
