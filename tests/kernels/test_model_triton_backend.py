"""The tiny model with attention backend `triton` (interpreted on CPU) equals backend `torch`
over a 12-chunk stream that rolls the window, with two lanes batched per forward.
Tolerance: 1e-4 absolute on the flow (fp32; online softmax vs SDPA summation order)."""

from __future__ import annotations

import pytest
import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool
from streamdiff.cache.slots import SlotTable
from streamdiff.config import ModelConfig
from streamdiff.kernels import triton_available
from streamdiff.model.attention import Attention, resolve_backend
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.model.loading import random_init_

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

GRID = (3, 5)
TOKENS = GRID[0] * GRID[1]


def stream(model: CausalWanModel, chunks: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
    cfg = model.cfg
    table = SlotTable(12, 6, 3, 1024)
    table.add_stream("s", 2)
    pool = KVPool(model.layer_ids, 12, TOKENS, cfg.num_heads, cfg.head_dim, torch.float32, "cpu", 6)
    cross = model.stack_prompt_kv([model.prompt_kv(text)] * 2)
    outs = []
    for i, x in enumerate(chunks):
        plans = [table.lane("s", lane).plan(x.shape[2]) for lane in (0, 1)]
        batch = AttnBatch.from_plans(plans, "cpu", 6)
        t = torch.tensor([[700.0 - 10 * i] * x.shape[2], [500.0] * x.shape[2]])
        outs.append(model(torch.cat([x, x.flip(-1)]), t, cross, batch, pool))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def test_triton_backend_equals_torch_backend_over_a_rolling_stream():
    assert resolve_backend("triton", "cpu") == "triton"
    cfg = ModelConfig()
    torch_model = random_init_(CausalWanModel(cfg, attention=Attention("torch")), seed=3).eval()
    triton_model = CausalWanModel(cfg, attention=Attention("triton")).eval()
    triton_model.load_state_dict(torch_model.state_dict())
    chunks = [torch.randn(1, 16, 2, 6, 10)] + [torch.randn(1, 16, 1, 6, 10) for _ in range(11)]
    text = torch.randn(1, 10, cfg.text_dim)
    expected = stream(torch_model, chunks, text)
    got = stream(triton_model, chunks, text)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_auto_takes_the_fastest_backend_that_runs(monkeypatch):
    import streamdiff.model.attention as attention

    monkeypatch.setattr(attention, "triton_available", lambda: True)
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("auto", "cpu") == "torch"  # Triton's interpreter is a test tool, not fast
    assert resolve_backend("torch", "cuda") == "torch"  # asked for by name: kept, even where Triton runs
    monkeypatch.setattr(attention, "triton_available", lambda: False)
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="attention_backend=triton needs Triton"):  # not a silent fallback
        resolve_backend("triton", "cuda")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", "cuda")
    with pytest.raises(ValueError, match="unknown attention backend"):
        Attention("xformers")


@torch.no_grad()
def test_auto_attends_per_shape_with_the_path_that_timed_faster():
    """`auto` on CUDA: the Triton write, and per call shape the faster of the Triton attention
    and SDPA over a gathered copy, timed once on the shape's first call. Here a scripted timer
    makes every other new shape faster on SDPA: the stream's frames still equal the torch
    backend's, each shape is timed once (not per layer or per call), and a shape decided for
    SDPA never launches the kernel again."""
    from streamdiff.model.attention import AttendChoice

    cfg = ModelConfig()
    torch_model = random_init_(CausalWanModel(cfg, attention=Attention("torch")), seed=3).eval()
    att = Attention("triton", choose=True)
    model = CausalWanModel(cfg, attention=att).eval()
    model.load_state_dict(torch_model.state_dict())
    launches, timing = [], [False]
    launch = att._attend

    def counted(q, k_pool, v_pool, table, count):
        if not timing[0]:
            launches.append((tuple(q.shape), tuple(table.shape)))
        return launch(q, k_pool, v_pool, table, count)

    att._attend = counted
    timed = []

    def timer(fn):  # the shape being decided is number len(att.choice.kernel); odd ones favour SDPA
        timing[0] = True
        before = len(launches)
        real = att._attend
        used = []
        att._attend = lambda *a: used.append(1) or launch(*a)
        try:
            fn()
        finally:
            att._attend, timing[0] = real, False
        assert len(launches) == before
        timed.append(bool(used))
        kernel_wins = len(att.choice.kernel) % 2 == 0
        return 1.0 if bool(used) == kernel_wins else 2.0

    att.choice.timer = timer
    chunks = [torch.randn(1, 16, 2, 6, 10)] + [torch.randn(1, 16, 1, 6, 10) for _ in range(11)]
    text = torch.randn(1, 10, cfg.text_dim)
    torch.testing.assert_close(stream(model, chunks, text), stream(torch_model, chunks, text), atol=1e-4, rtol=0)
    decided = att.choice.kernel
    assert len(decided) >= 3 and set(decided.values()) == {True, False}  # the window's fill gives new shapes
    assert len(timed) == 2 * AttendChoice.REPEATS * len(decided)  # once per shape, both paths
    by_shape = {(key[0], key[3]): use for key, use in decided.items()}
    for shape, use in by_shape.items():  # outside the timer: the one warm-up call, then only if chosen
        n = launches.count(shape)
        assert n > 2 if use else n == 1, (shape, use, n)


def test_a_shape_met_first_while_compiling_or_capturing_takes_the_kernel_untimed(monkeypatch):
    from streamdiff.model.attention import AttendChoice

    choice = AttendChoice(timer=lambda fn: pytest.fail("timed while tracing"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choice.decide(("shape",), lambda: None, lambda: None) is True
    assert choice.kernel == {}  # not remembered: an eager call of that shape still times it


def test_a_shape_takes_the_path_of_the_fastest_of_its_timed_calls():
    """Each path is timed REPEATS times and its fastest call counts, so one slow call (a GC
    pause, another process on the GPU) does not send a shape to the slower path for the rest
    of the server's life."""
    from streamdiff.model.attention import AttendChoice

    def kernel():
        return None

    def sdpa():
        return None

    times = {kernel: iter([1.0, 9.0, 1.0]), sdpa: iter([2.0, 2.0, 2.0])}  # the kernel's second call stalled
    choice = AttendChoice(timer=lambda fn: next(times[fn]))
    key = ((1, 30, 2, 8), torch.float32, (15, 2, 8), (1, 6), True)  # q, dtype, a K pool slot, slot table, full
    assert choice.decide(key, kernel, sdpa) is True
    assert choice.kernel == {key: True}
