"""Frames at the edge: uint8 RGB arrays <-> model tensors, resizing, and the built-in test clip.

Owns: the one conversion between decoded RGB frames (`np.ndarray [n, H, W, 3] uint8`) and the
VAE's pixel tensors (`torch [1, 3, n, H, W]` float in [-1, 1]), frame resizing (torch
interpolation; no cv2 / PIL / av here, DESIGN §3 keeps av in server/ and client/), and
`synthetic_clip`, a deterministic clip of moving shapes used by `make run` and the tests.
Does not own: video files or WebRTC tracks (server/, cli), or the VAE itself (model/vae.py).

Mapping: x = u * (1 / 127.5) - 1 (in float32, the same bits on every device) and back
u = round((x + 1) * 127.5) clamped to [0, 255], so uint8 -> tensor -> uint8 is exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from streamdiff.cache.kv_cache import STAGING


def _as_frame_stack(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """[n, H, W, 3] or [H, W, 3] uint8 array, or a list of [H, W, 3] -> contiguous [n, H, W, 3] uint8."""
    if isinstance(frames, np.ndarray):
        arr = frames[None] if frames.ndim == 3 else frames
    else:
        items = list(frames)
        if not items:
            raise ValueError("frames is an empty list")
        shapes = {np.shape(f) for f in items}
        if len(shapes) != 1:
            raise ValueError(f"all frames must have the same shape, got {sorted(shapes)}")
        arr = np.stack([np.asarray(f) for f in items])
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be [n, H, W, 3] (or [H, W, 3]) RGB, got shape {list(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    return np.ascontiguousarray(arr)


_INV_127_5 = float(np.float32(1.0 / 127.5))  # what a float32 kernel multiplies by


def frames_to_tensor(
    frames: np.ndarray | Sequence[np.ndarray],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 frames [n, H, W, 3] (or one [H, W, 3], or a list of them) -> [1, 3, n, H, W] in [-1, 1].
    To a CUDA device through pinned staging buffers, without a wait: a copy from pageable memory
    made the host wait for the work queued on the device, once a chunk (a review)."""
    arr = _as_frame_stack(frames)  # [n, H, W, 3] uint8
    host = torch.from_numpy(arr)
    x = STAGING.to_device(host, torch.device(device)) if device is not None else host  # [n, H, W, 3] uint8
    x = x.permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, n, H, W] uint8
    # times the float32 reciprocal, not a division: CUDA divides by a scalar that way, the CPU does
    # not, and the two differed by one bf16 step at u = 127 (a review); this is the same on both
    return (x.to(torch.float32) * _INV_127_5 - 1.0).to(dtype)  # [1, 3, n, H, W]


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """[1, 3, n, H, W] or [3, n, H, W] in [-1, 1] (any float dtype/device) -> uint8 [n, H, W, 3]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise ValueError(f"tensor_to_frames takes one stream (batch 1), got shape {list(x.shape)}")
        x = x[0]
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"expected [1, 3, n, H, W] or [3, n, H, W], got shape {list(x.shape)}")
    u = ((x.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255)  # [3, n, H, W]
    return u.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()  # [n, H, W, 3]


def resize_frame(frame: np.ndarray, width: int, height: int, *, keep_aspect: bool = False) -> np.ndarray:
    """Resize one uint8 frame [h, w, 3] to [height, width, 3].

    Bilinear with antialiasing when shrinking. `keep_aspect=True` first center-crops the frame to
    the target aspect ratio (no stretching), as a webcam feed into a square model expects.
    A frame already at the target size is returned unchanged (same object).
    """
    arr = _as_frame_stack(frame)
    if arr.shape[0] != 1:
        raise ValueError(f"resize_frame takes one frame [H, W, 3], got shape {list(np.shape(frame))}")
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    h, w = arr.shape[1:3]
    if (h, w) == (height, width):
        return frame
    if keep_aspect:
        # Crop the larger relative side so that w'/h' == width/height (integer pixels).
        if w * height > h * width:
            new_w = max(1, round(h * width / height))
            x0 = (w - new_w) // 2
            arr = arr[:, :, x0 : x0 + new_w]
        else:
            new_h = max(1, round(w * height / width))
            y0 = (h - new_h) // 2
            arr = arr[:, y0 : y0 + new_h]
        if arr.shape[1:3] == (height, width):
            return np.ascontiguousarray(arr[0])
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(torch.float32)  # [1, 3, h, w]
    antialias = height < arr.shape[1] or width < arr.shape[2]
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)  # [1, 3, H, W]
    return y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]


def _bounce(start: np.ndarray, speed: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions moving at `speed` px/frame and bouncing between lo and hi (triangle wave)."""
    span = np.maximum(hi - lo, 1e-6)
    p = np.mod(start - lo + speed * t, 2 * span)
    return lo + np.where(p < span, p, 2 * span - p)


def synthetic_clip(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic clip [num_frames, height, width, 3] uint8 of moving shapes.

    A diagonal colour gradient that drifts slowly, with two circles and two rectangles of
    different colours and sizes bouncing around at different speeds (each at least 1 px per
    frame, so consecutive frames always differ). Same arguments -> same pixels.
    """
    frames = synthetic_frames(num_frames, width, height, seed)  # checks the arguments
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)  # [n, H, W, 3]
    for i, frame in enumerate(frames):
        out[i] = frame
    return out


def synthetic_frames(num_frames: int, width: int, height: int, seed: int = 0) -> Iterator[np.ndarray]:
    """`synthetic_clip`'s frames [H, W, 3] uint8 one at a time (a long clip never sits in memory);
    bad arguments raise here, not at the first frame."""
    if num_frames < 0 or width < 1 or height < 1:
        raise ValueError(f"synthetic_clip needs num_frames >= 0 and a positive size, got {num_frames}, {width}x{height}")
    return _paint(num_frames, width, height, seed)


def _paint(num_frames: int, width: int, height: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = min(width, height)
    t = np.arange(num_frames, dtype=np.float64)  # [n]
    yy, xx = np.meshgrid(
        np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
    )  # [H, W] each

    # 1. Background: two colours mixed along the diagonal, the mix drifting with time.
    base_a = rng.uniform(40, 120, size=3).astype(np.float32)
    base_b = rng.uniform(120, 220, size=3).astype(np.float32)
    diagonal = (xx / width + yy / height) / 2  # [H, W]

    # 2. Shapes: (kind, size) with a random colour, start and velocity (px/frame), bouncing.
    shapes = []
    for kind, rel in (("circle", 0.16), ("rect", 0.22), ("circle", 0.10), ("rect", 0.12)):
        size = max(2.0, rel * scale)
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        speed = rng.uniform(1.0, 2.5, size=2) * max(1.0, scale / 64) * rng.choice([-1.0, 1.0], size=2)
        lo = np.zeros(2)
        hi = np.array([max(width - size, 0.0), max(height - size, 0.0)])
        start = rng.uniform(lo, np.maximum(hi, 1e-6))
        pos = _bounce(start[None], speed[None], t[:, None], lo[None], hi[None])  # [n, 2] top-left (x, y)
        shapes.append((kind, size, color, pos))

    # 3. Paint frame by frame (memory stays one frame of float32 whatever the clip length).
    for i in range(num_frames):
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * (diagonal + 0.02 * i))  # [H, W]
        frame = base_a + (base_b - base_a) * mix[..., None]  # [H, W, 3]
        for kind, size, color, pos in shapes:
            x0, y0 = pos[i]
            if kind == "circle":
                r = size / 2
                mask = (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r  # [H, W]
            else:
                mask = (xx >= x0) & (xx < x0 + size) & (yy >= y0) & (yy < y0 + 0.7 * size)  # [H, W]
            frame[mask] = color
        yield np.clip(np.round(frame), 0, 255).astype(np.uint8)


__all__ = ["frames_to_tensor", "resize_frame", "synthetic_clip", "synthetic_frames", "tensor_to_frames"]
