"""uint8 <-> tensor conversion, resizing and the synthetic clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff.pipeline.frames import frames_to_tensor, resize_frame, synthetic_clip, tensor_to_frames


def _all_values_clip() -> np.ndarray:
    values = np.arange(256, dtype=np.uint8)
    frames = np.stack([np.roll(values, s).reshape(16, 16) for s in range(6)])  # [6, 16, 16]
    return np.stack([frames, 255 - frames, frames[::-1]], axis=-1)  # [6, 16, 16, 3]


def test_uint8_round_trip_is_exact_for_every_value():
    clip = _all_values_clip()
    x = frames_to_tensor(clip)
    assert x.shape == (1, 3, 6, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    back = tensor_to_frames(x)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, clip)
    np.testing.assert_array_equal(tensor_to_frames(x.to(torch.bfloat16)), tensor_to_frames(x.to(torch.bfloat16)[0]))


def test_the_mapping_is_the_one_a_cuda_kernel_computes():
    """CUDA divides a tensor by a scalar as a product with its float32 reciprocal; the CPU divides.
    The frames' mapping is written as that product, so both give the same bits: with a division the
    CPU's bf16 input differed from a GPU's at u = 127 (a review of the gpu test that compares them)."""
    u = torch.arange(256, dtype=torch.uint8)
    clip = u.view(1, 16, 16, 1).expand(1, 16, 16, 3).numpy()
    recip = (torch.tensor(1.0) / torch.tensor(127.5)).item()  # float32 1/127.5, as a CUDA kernel holds it
    cuda_like = u.view(16, 16).to(torch.float32) * torch.tensor(recip, dtype=torch.float32) - 1.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = frames_to_tensor(clip, dtype=dtype)[0, 0, 0]
        assert torch.equal(got, cuda_like.to(dtype)), dtype


def test_layout_and_value_mapping():
    clip = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    clip[1, 2, 3] = (255, 0, 51)
    x = frames_to_tensor(clip)
    assert x[0, :, 1, 2, 3].tolist() == pytest.approx([1.0, -1.0, 51 / 127.5 - 1])
    assert (x[0, :, 0] == -1).all()
    # A single frame and a list of frames give the same tensor as the stacked array.
    torch.testing.assert_close(frames_to_tensor(clip[1]), x[:, :, 1:2])
    torch.testing.assert_close(frames_to_tensor(list(clip)), x)


def test_tensor_to_frames_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6)
    out = tensor_to_frames(x)[0, 0, :, 0]
    assert out.tolist() == [0, 0, 128, 255, 255, 255]  # 127.5 rounds half to even -> 128


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(np.zeros((1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="\\[n, H, W, 3\\]"):
        frames_to_tensor(np.zeros((1, 4, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="same shape"):
        frames_to_tensor([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)])
    with pytest.raises(ValueError, match="batch 1"):
        tensor_to_frames(torch.zeros(2, 3, 1, 4, 4))


def test_synthetic_clip_is_deterministic_and_moves():
    clip = synthetic_clip(12, 64, 48, seed=0)
    assert clip.shape == (12, 48, 64, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, synthetic_clip(12, 64, 48, seed=0))
    assert not np.array_equal(clip, synthetic_clip(12, 64, 48, seed=1))
    # Every consecutive pair of frames differs noticeably (motion), and the frames are not flat.
    diffs = np.abs(np.diff(clip.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))  # [11]
    assert (diffs > 1.0).all()
    assert clip.reshape(12, -1, 3).std(axis=1).min() > 10
    # A longer clip starts with the same frames (frames depend only on their index).
    np.testing.assert_array_equal(synthetic_clip(20, 64, 48, seed=0)[:12], clip)


def test_resize_frame():
    frame = synthetic_clip(1, 64, 48)[0]
    assert resize_frame(frame, 64, 48) is frame
    # A constant frame stays constant at any size.
    flat = np.full((30, 50, 3), (10, 200, 77), dtype=np.uint8)
    for w, h in ((16, 16), (100, 60), (7, 33)):
        out = resize_frame(flat, w, h)
        assert out.shape == (h, w, 3) and out.dtype == np.uint8
        assert (out == np.array([10, 200, 77], np.uint8)).all()
    # keep_aspect crops the centre: a wide frame with red side bands becomes all green when squared.
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:64] = (0, 255, 0)
    wide[:, 64:] = (255, 0, 0)
    square = resize_frame(wide, 16, 16, keep_aspect=True)
    assert (square == np.array([0, 255, 0], np.uint8)).all()
    stretched = resize_frame(wide, 16, 16)
    assert (stretched[:, 0] == np.array([255, 0, 0], np.uint8)).all()
    # Downscaling a horizontal ramp keeps it monotonic and in range.
    ramp = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (8, 64, 3)).copy()
    small = resize_frame(ramp, 16, 4)[0, :, 0].astype(int)
    assert (np.diff(small) > 0).all() and small[0] < 20 and small[-1] > 235


def test_shrinking_averages_fine_detail_away():
    """A webcam frame shrunk to the model's size is antialiased ("bilinear with antialiasing when
    shrinking"): random texture shrunk 4x keeps a std of about 12, about 38 without antialiasing."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # [H, W, 3]
    small = resize_frame(frame, 16, 16)  # [16, 16, 3]
    assert small.shape == (16, 16, 3)
    assert small.astype(float).std() < 20.0


def test_keep_aspect_crops_a_tall_frame_around_its_centre():
    """A portrait frame (a phone held upright) squared with keep_aspect loses its top and its
    bottom alike, as a wide frame loses both sides: a green centre between red bands stays."""
    tall = np.zeros((96, 32, 3), dtype=np.uint8)
    tall[:32] = (255, 0, 0)
    tall[32:64] = (0, 255, 0)
    tall[64:] = (255, 0, 0)
    square = resize_frame(tall, 16, 16, keep_aspect=True)
    assert (square == np.array([0, 255, 0], np.uint8)).all()


def test_shrinking_only_one_side_is_antialiased_too():
    """A frame that shrinks along one side only (a 640x360 webcam into 512x512 grows its height)
    is antialiased along that side: random texture shrunk 4x one way keeps a std of 25-31,
    44-53 without antialiasing."""
    rng = np.random.default_rng(0)
    for h, w in ((16, 64), (64, 16), (8, 64)):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # [h, w, 3]
        small = resize_frame(frame, 16, 16)  # [16, 16, 3]
        assert small.astype(float).std() < 38.0, (h, w)
