"""Motion-aware noise: fast motion -> less noise, so the output keeps up with the input.

Owns: the per-stream noise-strength controller of StreamDiffusionV2 (DESIGN §2):
  d = max over the chunk's frames of RMS(frame - previous frame) / 0.2, clamped to [0, 1]
  s = 0.9 * (s0 - 0.1 d) + 0.1 * s_prev
with pixels in [-1, 1] and s0 the configured strength (0.8 by default).
Does not own: noising itself (noise_schedule.py).
"""

from __future__ import annotations

import torch


def motion_distance(frames: torch.Tensor, previous_frame: torch.Tensor | None) -> float:
    """frames [B, 3, n, H, W] in [-1, 1]; previous_frame [B, 3, 1, H, W] or None -> d in [0, 1]."""
    seq = frames if previous_frame is None else torch.cat([previous_frame, frames], dim=2)  # [B, 3, n+1, H, W]
    if seq.shape[2] < 2:
        return 0.0
    diff = (seq[:, :, 1:].float() - seq[:, :, :-1].float()) ** 2  # [B, 3, n, H, W]
    rms = diff.mean(dim=(0, 1, 3, 4)).sqrt()  # [n] one per frame
    return float((rms.max() / 0.2).clamp(0.0, 1.0))


class MotionController:
    """Per-stream state: the previous strength and the last frame seen."""

    def __init__(self, base_strength: float = 0.8, enabled: bool = True):
        self.base_strength = base_strength
        self.enabled = enabled
        self.strength = base_strength
        self._last_frame: torch.Tensor | None = None

    def update(self, frames: torch.Tensor) -> float:
        """Feed a chunk's frames [B, 3, n, H, W]; returns the strength for this chunk."""
        if self.enabled:
            d = motion_distance(frames, self._last_frame)
            self.strength = 0.9 * (self.base_strength - 0.1 * d) + 0.1 * self.strength
        else:
            self.strength = self.base_strength
        self._last_frame = frames[:, :, -1:].detach().clone()
        return self.strength

    def reset(self) -> None:
        self.strength = self.base_strength
        self._last_frame = None
