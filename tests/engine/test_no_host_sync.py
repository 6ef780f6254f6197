"""A steady-state engine step reads nothing back from the device: run it under a dispatch mode
that fails on `aten._local_scalar_dense` (what `.item()`, `float()`, `int()` and `bool()` of a
tensor call). On CPU every tensor counts, so this is stricter than a GPU run would be."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine_helpers import FakeClock, Feeder, RELAXED, model_core, params
from streamdiff.pipeline.frames import synthetic_clip


class NoScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
            raise AssertionError("a device value was read on the host (aten._local_scalar_dense) in a steady step")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("threshold", [0.85])
def test_steady_engine_steps_make_no_host_reads(comps, cfg, threshold):
    from streamdiff.config import with_overrides

    cfg2 = with_overrides(cfg, cache={"refresh_threshold": threshold})
    comps2 = type(comps)(**{**comps.__dict__, "cfg": cfg2})
    clock = FakeClock()
    core = model_core(comps2, clock)
    clips = {sid: synthetic_clip(61, 64, 48, seed=i) for i, sid in enumerate(("a", "b", "c"))}
    for sid, steps in (("a", 2), ("b", 1), ("c", 3)):
        assert core.add_stream(sid, params(cfg2, sid, steps=steps), RELAXED)
    feeder = Feeder(core, clock, clips)
    with NoScalarReads():  # streams starting too: prepares, the sdv2 lane copy and fillers
        for _ in range(8):  # prepares, filling windows, the first full-window refreshes
            feeder.round()
    steady = len(feeder.reports)
    with NoScalarReads():
        for _ in range(4):
            feeder.round()
    assert len(feeder.reports) > steady  # steps really ran inside the mode
    got = {sid: len(feeder.frames(sid)) for sid in clips}
    assert all(n > 0 for n in got.values())


def test_each_chunks_frames_go_to_the_device_once_as_uint8(comps, cfg, monkeypatch):
    """A probe of the GPU hot path: every chunk's frames were scaled to float32 on the host (four
    times the bytes over PCIe) and uploaded twice, once for the VAE and once for the motion
    estimate. They go once, as uint8, and are scaled on the device."""
    import streamdiff.engine.model_runner as model_runner
    import streamdiff.pipeline.stream_state as stream_state

    calls: list[object] = []
    real = model_runner.frames_to_tensor

    def counted(frames, device=None, dtype=torch.float32):
        calls.append(device)
        return real(frames, device, dtype)

    monkeypatch.setattr(model_runner, "frames_to_tensor", counted)
    monkeypatch.setattr(stream_state, "frames_to_tensor", counted)
    clock = FakeClock()
    core = model_core(comps, clock)
    clips = {sid: synthetic_clip(29, 64, 48, seed=i) for i, sid in enumerate(("a", "b"))}
    for sid, steps in (("a", 2), ("b", 1)):
        assert core.add_stream(sid, params(cfg, sid, steps=steps), RELAXED)
    feeder = Feeder(core, clock, clips)
    for _ in range(5):
        feeder.round()
    chunks = sum(len(report.plan.chunks) for report in feeder.reports)
    assert chunks >= 8 and len(calls) == chunks, (chunks, len(calls))
    assert all(device is not None for device in calls), calls  # scaled where the model runs


def test_a_steady_forwards_row_timesteps_are_not_made_again():
    """Each forward built its [B, F] timesteps with torch.tensor: a host-to-device copy in the
    middle of a step (a probe of the GPU hot path). A pattern of integer timesteps is made once."""
    from streamdiff.pipeline.stream_state import row_timesteps

    first = row_timesteps([700, 500, 700], 2, "cpu")
    assert first.tolist() == [[700.0, 700.0], [500.0, 500.0], [700.0, 700.0]]
    assert row_timesteps([700, 500, 700], 2, "cpu") is first
    assert row_timesteps([700, 500], 2, "cpu").tolist() == [[700.0, 700.0], [500.0, 500.0]]
    assert row_timesteps([700, 500, 700], 1, "cpu").shape == (3, 1)
    lane = torch.tensor(612.0)  # a motion-aware first lane's timestep stays a device tensor
    assert row_timesteps([lane, 500], 2, "cpu").tolist() == [[612.0, 612.0], [500.0, 500.0]]


def test_a_motion_aware_lane_beside_integer_lanes_copies_nothing_from_the_host_per_forward(monkeypatch):
    """Steps 2 with motion-aware noise (the 1.3B preset's defaults): the first lane's timestep is a
    device tensor, the second an integer, and every forward made that integer's tensor anew from
    the host (on CUDA a blocking copy: the host waits for the queued work; a review)."""
    from streamdiff.pipeline.stream_state import row_timesteps

    first_lane = torch.tensor(650, dtype=torch.int64)
    want = torch.tensor([[650.0, 650.0], [500.0, 500.0]])
    assert torch.equal(row_timesteps([first_lane, 500], 2, "cpu"), want)  # the integer's tensor made once
    made = []
    for name in ("tensor", "as_tensor", "full", "scalar_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    lanes = [first_lane + 10 * i for i in range(3)]  # (device arithmetic: no host value)
    outs = [row_timesteps([lane, 500], 2, "cpu") for lane in lanes]
    assert made == [], made
    assert [o[:, 0].tolist() for o in outs] == [[650.0 + 10 * i, 500.0] for i in range(3)]


def test_frames_go_to_a_cuda_device_through_the_pinned_staging(monkeypatch):
    """A review: each chunk's frames were copied to the GPU from pageable memory, a copy after
    which the host waits for the work queued on the device. They go through the pinned staging
    buffers without a wait (`HostStaging`), as uint8; here a stand-in records what is staged."""
    import numpy as np

    import streamdiff.pipeline.frames as frames

    staged = []

    class Staging:
        def to_device(self, host, device):
            staged.append((host.dtype, tuple(host.shape), device.type))
            return host  # (no CUDA here: the host tensor stands for the device copy)

    monkeypatch.setattr(frames, "STAGING", Staging())
    clip = np.full((5, 16, 16, 3), 255, np.uint8)
    x = frames.frames_to_tensor(clip, "cuda", torch.float32)
    assert staged == [(torch.uint8, (5, 16, 16, 3), "cuda")]
    assert x.shape == (1, 3, 5, 16, 16) and float(x.min()) == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_frames_and_mixed_timesteps_reach_cuda_without_a_wait():
    """The two host-to-device copies a review found on the hot path, on the device: a chunk's
    frames and a motion-aware lane's timesteps beside integer lanes; the same values as on the host."""
    import numpy as np

    from streamdiff.pipeline.frames import frames_to_tensor
    from streamdiff.pipeline.stream_state import row_timesteps

    clip = np.random.default_rng(3).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    lane = torch.tensor(640, dtype=torch.int64, device="cuda")
    row_timesteps([lane, 500], 2, "cuda")  # the integer's tensor is made once, before
    torch.cuda.set_sync_debug_mode("error")  # a pageable host-to-device copy would raise
    try:
        x = frames_to_tensor(clip, "cuda", torch.bfloat16)
        t = row_timesteps([lane + 10, 500], 2, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(x.cpu(), frames_to_tensor(clip, "cpu", torch.bfloat16))
    assert t.tolist() == [[650.0, 650.0], [500.0, 500.0]]
