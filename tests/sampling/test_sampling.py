"""Noise schedule and motion controller against the DESIGN formulas."""

from __future__ import annotations

import pytest
import torch

from streamdiff.sampling.motion import MotionController, motion_distance
from streamdiff.sampling.noise_schedule import (
    FlowMatchSchedule,
    chunk_noise,
    renoised_above,
    strength_to_timestep,
    timesteps_for,
)


def test_timestep_lists_and_strength_convention():
    assert [timesteps_for(n) for n in (1, 2, 3, 4)] == [(700,), (700, 500), (700, 500, 400), (700, 500, 400, 200)]
    with pytest.raises(ValueError, match="1-4"):
        timesteps_for(5)
    assert strength_to_timestep(0.8) == 700
    assert strength_to_timestep(0.75) == 650


def test_sigma_is_the_shifted_grid_value_nearest_t_over_1000():
    sched = FlowMatchSchedule(shift=8.0, num_train_timesteps=1000)
    # grid: sigma = 8 s / (1 + 7 s), s = 1 - i/1000
    s = 1 - torch.arange(1000, dtype=torch.float64) / 1000
    grid = 8 * s / (1 + 7 * s)
    for t in (700, 500, 400, 200, 650):
        expected = float(grid[torch.argmin((grid * 1000 - t).abs())])
        assert sched.sigma(t) == pytest.approx(expected, abs=1e-12)
        assert sched.sigma(t) == pytest.approx(t / 1000, abs=3e-3)  # the grid is fine near these t


def test_noising_and_flow_to_x0_invert_each_other():
    x0 = torch.randn(1, 16, 1, 4, 4)
    eps = torch.randn_like(x0)
    sigma = 0.63
    xt = FlowMatchSchedule.add_noise(x0, eps, sigma)
    torch.testing.assert_close(xt, 0.37 * x0 + 0.63 * eps)
    flow = eps - x0  # what a perfect model predicts
    torch.testing.assert_close(FlowMatchSchedule.flow_to_x0(xt, flow, sigma), x0, atol=1e-6, rtol=0)


def test_chunk_noise_depends_only_on_seed_chunk_and_lane():
    a = chunk_noise((2, 3), seed=5, chunk_index=7, lane=1, device="cpu", dtype=torch.float32)
    torch.randn(100)  # global RNG use must not matter
    b = chunk_noise((2, 3), seed=5, chunk_index=7, lane=1, device="cpu", dtype=torch.float32)
    c = chunk_noise((2, 3), seed=5, chunk_index=7, lane=2, device="cpu", dtype=torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunk_noise_on_cuda_is_the_hosts_noise_copied_without_a_wait():
    """On CUDA the noise goes through pinned memory with a non-blocking copy: the same values as
    the host's, in the dtype asked for, and nothing waits on the host meanwhile."""
    torch.cuda.set_sync_debug_mode("error")  # a pageable host-to-device copy would raise
    try:
        got = chunk_noise((16, 2, 8, 8), seed=5, chunk_index=7, lane=1, device="cuda", dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = chunk_noise((16, 2, 8, 8), seed=5, chunk_index=7, lane=1, device="cpu", dtype=torch.bfloat16)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), host)


def test_seeds_2_to_the_32_apart_draw_different_noise():
    """Seeds go up to 2**63 - 1, but torch's CPU generator keeps 32 bits of its seed: seeds 0 and
    2**32 (a probe found) drew the same noise, so the same picture."""
    def noise(seed):
        return chunk_noise((4, 4), seed=seed, chunk_index=3, lane=0, device="cpu", dtype=torch.float32)

    for low in (0, 1, 123456789):
        assert not torch.equal(noise(low), noise(low + 2**32)) and not torch.equal(noise(low), noise(low + 2**62))
    assert not torch.equal(noise(2**63 - 1), noise(2**31 - 1))


def test_motion_distance_formula():
    prev = torch.zeros(1, 3, 1, 4, 4)
    frames = torch.stack([torch.full((3, 4, 4), 0.05), torch.full((3, 4, 4), 0.15)], dim=1)[None]  # [1,3,2,4,4]
    # diffs: 0.05 then 0.10 -> RMS per frame 0.05, 0.10 -> max 0.10 / 0.2 = 0.5
    assert motion_distance(frames, prev) == pytest.approx(0.5)
    big = torch.stack([torch.full((3, 4, 4), 1.0)], dim=1)[None]
    assert motion_distance(big, prev) == 1.0  # clamped


def test_motion_controller_recurrence_and_off_switch():
    ctl = MotionController(base_strength=0.8, enabled=True)
    still = torch.zeros(1, 3, 4, 4, 4)
    assert ctl.update(still) == pytest.approx(0.9 * 0.8 + 0.1 * 0.8)
    moving = torch.ones(1, 3, 4, 4, 4)  # jump from 0 to 1 -> d = 1 (clamped)
    s = ctl.update(moving)
    assert s == pytest.approx(0.9 * (0.8 - 0.1) + 0.1 * 0.8)
    assert ctl.update(moving) == pytest.approx(0.9 * 0.8 + 0.1 * s)  # no motion inside or across
    off = MotionController(0.6, enabled=False)
    assert off.update(moving) == 0.6


def test_a_streams_first_chunk_is_noised_at_the_configured_strength():
    """A reviewer read StreamDiffusionV2: its first chunk is noised at s0 and the controller starts
    at the second chunk, from the first chunk's last frame with s_prev = s0. Ours moved the first
    chunk too (a moving clip: 0.737 instead of 0.8), and the gap carried on through s_prev."""
    ctl = MotionController(base_strength=0.8, enabled=True)
    ramp = torch.linspace(-1, 1, 5).reshape(1, 1, 5, 1, 1).expand(1, 3, 5, 4, 4)  # fast motion inside the chunk
    assert ctl.update(ramp) == 0.8
    later = torch.full((1, 3, 4, 4, 4), 0.9)  # 0.1 from the first chunk's last frame: d = 0.5
    assert ctl.update(later) == pytest.approx(0.9 * (0.8 - 0.05) + 0.1 * 0.8)
    ctl.reset()  # a restarted stream starts again at s0
    assert ctl.update(ramp) == 0.8


def test_a_weak_strength_the_camera_moves_is_told_timestep_0_not_below():
    """Noise 0.1 (the page's least) with motion-aware noise on and a moving camera: the controller
    goes under 0.1 and the model was told timesteps down to -100 (a review). Float and tensor
    strengths (the device path) agree, at and above the floor too."""
    ctl = MotionController(base_strength=0.1, enabled=True)
    strengths = [ctl.update(torch.full((1, 3, 4, 4, 4), float(i % 2))) for i in range(6)]
    assert min(strengths) < 0.05
    for s in strengths + [0.1, 0.15, 0.8]:
        told = strength_to_timestep(s)
        assert told == max(0, int(1000 * s) - 100) and told >= 0
        assert int(strength_to_timestep(torch.as_tensor(float(s), dtype=torch.float64))) == told


def test_a_motion_aware_strength_is_told_the_timestep_a_float_strength_is():
    """Motion-aware noise keeps the strength on the device (a float64 tensor); the timestep the
    model is told must still be StreamDiffusionV2's int(1000 s) - 100, truncated as the float path
    truncates, never rounded up (0.7999 is told 699, not 700)."""
    for s in (0.7386, 0.7999, 0.1234):
        told = strength_to_timestep(torch.tensor(s, dtype=torch.float64))
        assert int(told) == strength_to_timestep(s) == int(1000 * s) - 100, s


def test_only_a_later_step_above_the_first_is_said_to_renoise():
    """`streamdiff render` warns when a later step re-noises to MORE noise than the first step
    saw; a later step at the first step's own timestep (noise 0.6, 2 steps: 500 and 500) does not
    blur and is not worth the warning."""
    assert renoised_above(2, 0.6) is None
    assert renoised_above(3, 0.5) == 500  # the first is told 400: 500 is above it
    assert renoised_above(3, 0.6, (700, 500, 450)) is None


def test_the_grid_runs_from_sigma_1_to_its_smallest_step_never_to_0():
    """The training grid is s = 1, 1 - 1/N, .. 1/N (linspace(1, 0, N + 1) without its 0): a first
    lane told t = 0 (noise 0.1 or less under motion) still converts its flow with the grid's
    smallest sigma, 8 s / (1 + 7 s) at s = 1/1000, not with 0 (which throws the model's output
    away), and t = 1000 is pure noise."""
    sched = FlowMatchSchedule(shift=8.0, num_train_timesteps=1000)
    smallest = 8 * 0.001 / (1 + 7 * 0.001)
    assert sched.sigma(1000) == pytest.approx(1.0, abs=1e-12)
    assert sched.sigma(0) == pytest.approx(smallest, abs=1e-12)
    assert float(sched.sigma(torch.tensor(0))) == pytest.approx(smallest, abs=1e-12)
