"""Motion-aware noise: fast motion -> less noise, so the output keeps up with the input.

Owns: the per-stream noise-strength controller of StreamDiffusionV2 (DESIGN §2):
  d = max over the chunk's frames of RMS(frame - previous frame) / 0.2, clamped to [0, 1]
  s = 0.9 * (s0 - 0.1 d) + 0.1 * s_prev
with pixels in [-1, 1] and s0 the configured strength (0.8 by default). A stream's first chunk
is noised at s0 itself and s_prev starts at s0, as StreamDiffusionV2 does (it starts the
controller from the second chunk, whose distance counts from the first chunk's last frame).
Does not own: noising itself (noise_schedule.py).

The strength stays on the frames' device as a 0-dim float64 tensor (float64 so that the
arithmetic equals Python floats'): reading it on the host would stall a GPU step.
`strength` (a float) is for inspection only.
"""

from __future__ import annotations

import torch


def motion_distance(frames: torch.Tensor, previous_frame: torch.Tensor | None) -> torch.Tensor:
    """frames [B, 3, n, H, W] in [-1, 1]; previous_frame [B, 3, 1, H, W] or None -> d in [0, 1]
    (a 0-dim float64 tensor on the frames' device)."""
    seq = frames if previous_frame is None else torch.cat([previous_frame, frames], dim=2)  # [B, 3, n+1, H, W]
    if seq.shape[2] < 2:
        return torch.zeros((), dtype=torch.float64, device=frames.device)
    diff = (seq[:, :, 1:].float() - seq[:, :, :-1].float()) ** 2  # [B, 3, n, H, W]
    rms = diff.mean(dim=(0, 1, 3, 4)).sqrt()  # [n] one per frame
    return (rms.max() / 0.2).clamp(0.0, 1.0).double()


class MotionController:
    """Per-stream state: the previous strength and the last frame seen."""

    def __init__(self, base_strength: float = 0.8, enabled: bool = True):
        self.base_strength = base_strength
        self.enabled = enabled
        self._strength: float | torch.Tensor = base_strength
        self._last_frame: torch.Tensor | None = None

    @property
    def strength(self) -> float:
        """The last chunk's strength (reads the device: inspection only)."""
        return float(self._strength)

    def update(self, frames: torch.Tensor) -> float | torch.Tensor:
        """Feed a chunk's frames [B, 3, n, H, W]; returns the strength for this chunk (a float
        when motion is off, else a 0-dim float64 tensor on the frames' device)."""
        if self.enabled and self._last_frame is not None:
            d = motion_distance(frames, self._last_frame)
            self._strength = 0.9 * (self.base_strength - 0.1 * d) + 0.1 * self._strength
        else:  # off, or the stream's first chunk
            self._strength = self.base_strength
        self._last_frame = frames[:, :, -1:].detach().clone()
        return self._strength

    def reset(self) -> None:
        self._strength = self.base_strength
        self._last_frame = None
