"""Flow-matching noise schedule for streaming video-to-video.

Owns: the timestep lists for 1-4 denoise steps, the mapping timestep -> sigma on the shifted
training grid, noising (x_t = (1 - sigma) x0 + sigma eps) and the flow -> x0 conversion.
Does not own: which lane holds which chunk (pipeline) or the motion controller (motion.py).

The model predicts the flow v = eps - x0, so x0 = x_t - sigma * v. Sigmas live on the grid of
the shifted schedule used in training (shift 8, 1000 steps): sigma(t) is the grid sigma whose
timestep is nearest to t, i.e. sigma ~= t / 1000 (StreamDiffusionV2 does not warp the
denoising steps). The first lane's timestep follows the input's noise strength s:
t = int(1000 s) - 100; later lanes use the fixed list.
"""

from __future__ import annotations

import torch

from streamdiff.config import SamplingConfig

# StreamDiffusionV2's denoise-step timesteps (DESIGN §2), which its models were distilled at: the
# config's default (`sampling.timesteps`, where a preset may list its own). The first entry is the
# nominal first-lane timestep for the default strength 0.8; the noise strength replaces it per chunk.
DEFAULT_TIMESTEPS: tuple[int, ...] = SamplingConfig.timesteps
MAX_STEPS = 4


def timesteps_for(steps: int, timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS) -> tuple[int, ...]:
    """The lanes' timesteps for `steps` denoise steps: the first `steps` of `timesteps`."""
    if not 1 <= steps <= min(MAX_STEPS, len(timesteps)):
        raise ValueError(f"steps={steps} is not supported (allowed: 1-{MAX_STEPS})")
    return tuple(timesteps[:steps])


def strength_to_timestep(strength: float | torch.Tensor) -> int | torch.Tensor:
    """The timestep the model is told for an input noised with strength s: int(1000 s) - 100,
    never below 0. A tensor strength gives a 0-dim int64 tensor on its device (no host read).
    StreamDiffusionV2 has no floor: below s = 0.1, which motion-aware noise reaches from a
    strength of 0.2 or less when the camera moves, it told the model a negative timestep while
    the sigma it converts with stops at the grid's smallest (a review)."""
    if isinstance(strength, torch.Tensor):
        return ((1000 * strength).floor().long() - 100).clamp(min=0)
    return max(0, int(1000 * strength) - 100)


def renoised_above(steps: int, strength: float, timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS) -> int | None:
    """The first later-lane timestep above the first lane's (`strength_to_timestep`), or None.
    Below strength ~0.6 a second step of StreamDiffusionV2's list re-noises to more noise than
    the first step saw (the list is made for 0.7-0.8) and blurs the picture: worth a word to the user."""
    first = strength_to_timestep(strength)
    return next((t for t in timesteps_for(steps, timesteps)[1:] if t > first), None)


class FlowMatchSchedule:
    """The shifted flow-matching grid: sigma_i = shift*s / (1 + (shift-1)*s), s = 1 .. 1/N."""

    def __init__(self, shift: float = 8.0, num_train_timesteps: int = 1000):
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]  # [N]
        self.sigmas = shift * base / (1 + (shift - 1) * base)  # [N] descending, in (0, 1]
        self.timesteps = self.sigmas * num_train_timesteps  # [N]
        # sigma of the nearest grid timestep for every integer t in [0, N]: a lookup, not a search
        nearest = (self.timesteps[None, :] - torch.arange(num_train_timesteps + 1, dtype=torch.float64)[:, None])
        self.sigma_table = self.sigmas[nearest.abs().argmin(dim=1)]  # [N + 1] float64
        self._table_list = self.sigma_table.tolist()
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    def sigma(self, t: float | torch.Tensor) -> float | torch.Tensor:
        """Sigma of the grid timestep nearest to t. Integer t (every timestep the sampler uses)
        is a table lookup; a tensor t (the motion-aware first lane) is looked up on its device."""
        if isinstance(t, torch.Tensor):
            table = self._device_tables.get(t.device)
            if table is None:
                table = self._device_tables[t.device] = self.sigma_table.to(t.device)
            return table.take(t.long().clamp(0, self.num_train_timesteps))  # take: an index tensor, no host read
        if float(t).is_integer() and 0 <= t <= self.num_train_timesteps:
            return self._table_list[int(t)]
        index = int(torch.argmin((self.timesteps - float(t)).abs()))
        return float(self.sigmas[index])

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        return (1.0 - sigma) * x0 + sigma * noise

    @staticmethod
    def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma * v, computed in fp32 and returned in x_t's dtype."""
        return (x_t.float() - sigma * flow.float()).to(x_t.dtype)


def chunk_noise(shape: tuple[int, ...], seed: int, chunk_index: int, lane: int, device, dtype) -> torch.Tensor:
    """Gaussian noise that depends only on (seed, chunk, lane), so that batching order,
    other streams and the stream-batch lag never change a stream's result."""
    # torch's CPU generator keeps 32 bits of its seed: the seed's high half is folded into the low
    # one (seeds below 2**32 are unchanged), so that seeds 2**32 apart do not draw the same noise.
    folded = seed ^ (((seed >> 32) * 0x9E3779B1) & 0xFFFFFFFF)
    gen = torch.Generator(device="cpu").manual_seed((folded * 1_000_003 + chunk_index * 17 + lane) % (2**63))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if torch.device(device).type == "cuda":
        # drawn on the host (the same noise on every device), copied without the host waiting for
        # the work queued before it (a pageable copy does): it is drawn in the middle of a step
        noise = noise.pin_memory().to(device=device, non_blocking=True)
    return noise.to(device=device, dtype=dtype)
