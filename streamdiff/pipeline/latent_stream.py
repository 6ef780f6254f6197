"""LatentStream: one stream's DiT at the latent level, chunk by chunk (public API).

Owns: one lane of one stream — its KV pool and slot table, built lazily at the first chunk's
latent size — and nothing else: no VAE, no noise, no prompt encoder, no stream batch.
Does not own: the slot planning, the pool operations, the re-base or the model (it calls
exactly the code every production path calls: `SlotTable`, `KVPool`, `forward_plans`).

For checking the model against another implementation (recorded outputs of StreamDiffusionV2,
say) and for anyone who wants the streaming DiT without the video pipeline:

    stream = LatentStream(model, cfg.cache)          # or LatentStream.from_config(cfg): loads the DiT
    flow = stream.step(latents, timesteps, prompt_embeds)
        # latents [1, 16, F, h, w] (F = 2 for the first chunk, then 1 under `sdv2`),
        # timesteps: a number, or one per latent frame ([F] or [1, F]),
        # prompt_embeds: text encoder output [1, L, text_dim] (or [L, text_dim])
        # -> flow [1, 16, F, h, w] fp32 (the model's v = noise - x0 prediction)
    stream.held_frames()   # per layer: the stream frame each window slot holds (None: empty)
    stream.queue(layer)    # sdv2: that layer's slot queue, front first, as window entries
"""

from __future__ import annotations

import torch

from streamdiff.cache.kv_cache import KVPool
from streamdiff.cache.slots import SlotTable
from streamdiff.config import CacheConfig, Config
from streamdiff.model.causal_wan import CausalWanModel, CrossKV
from streamdiff.pipeline.stream_state import forward_plans

_STREAM = "latent-stream"


class LatentStream:
    def __init__(self, model: CausalWanModel, cache: CacheConfig | Config | None = None):
        if not (model.has_embed and model.has_head):
            raise ValueError("LatentStream needs the whole model (embeddings and head), not a pipeline stage")
        self.model = model
        self.cache = cache.cache if isinstance(cache, Config) else (cache or CacheConfig())
        if self.cache.policy == "sdv2" and not self.cache.window <= self.cache.rebase_frame < model.cfg.rope_max_seq_len:
            raise ValueError(f"cache.rebase_frame={self.cache.rebase_frame} must lie in [cache.window, "
                             f"model.rope_max_seq_len={model.cfg.rope_max_seq_len})")
        self.pool: KVPool | None = None
        self.slots: SlotTable | None = None
        self._latent_hw: tuple[int, int] | None = None
        self._prompt: tuple[torch.Tensor, CrossKV] | None = None
        self.chunks = 0

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device = "cpu") -> "LatentStream":
        """Build the DiT the config names (its loader: SDV2 `model.pt`, diffusers, Wan, random)
        and stream it under the config's cache settings."""
        from streamdiff.model.build import build_transformer

        return cls(build_transformer(cfg, torch.device(device)), cfg.cache)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        """Forget everything: the next step is a stream's first chunk again."""
        self.pool = self.slots = self._latent_hw = self._prompt = None
        self.chunks = 0

    # ------------------------------------------------------------------ one chunk

    @torch.no_grad()
    def step(self, latents: torch.Tensor, timesteps, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One chunk through the DiT: writes its K/V into the cache, returns the flow [1, 16, F, h, w]."""
        x = self._check_latents(latents)
        frames, h, w = x.shape[2:]
        timestep = self._timesteps(timesteps, frames)  # [1, F]
        if self.pool is None:
            self._build(h, w)
        plan = self.slots.lane(_STREAM, 0).plan(frames)
        flow = forward_plans(self.model, self.pool, [plan], x, timestep, self._cross_kv(prompt_embeds), self.cache)
        self.chunks += 1
        return flow

    def _build(self, h: int, w: int) -> None:
        cfg = self.model.cfg
        window = self.cache.window
        self.pool = KVPool(self.model.layer_ids, window, (h // 2) * (w // 2), cfg.num_heads, cfg.head_dim,
                           self.model.dtype, self.device, window, track_frames=True)
        self.slots = SlotTable.from_config(window, self.cache, cfg.rope_max_seq_len)
        self.slots.add_stream(_STREAM, 1)
        self._latent_hw = (h, w)

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[0] != 1:
            shape = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [1, {self.model.cfg.in_channels}, F, h, w], got {shape}")
        _, c, _, h, w = latents.shape
        if c != self.model.cfg.in_channels or h % 2 or w % 2:
            raise ValueError(f"latents must be [1, {self.model.cfg.in_channels}, F, h, w] with even h and w, "
                             f"got {list(latents.shape)}")
        if self._latent_hw is not None and (h, w) != self._latent_hw:
            raise ValueError(f"latent size {h}x{w} differs from this stream's {self._latent_hw[0]}x{self._latent_hw[1]}")
        return latents.to(self.device)

    def _timesteps(self, timesteps, frames: int) -> torch.Tensor:
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=self.device).flatten()
        if t.numel() == 1:
            t = t.expand(frames)
        if t.numel() != frames:
            raise ValueError(f"timesteps: one per latent frame ({frames}) or a single number, got {t.numel()}")
        return t.reshape(1, frames)

    def _cross_kv(self, prompt_embeds: torch.Tensor) -> CrossKV:
        emb = prompt_embeds if prompt_embeds.ndim == 3 else prompt_embeds[None]
        if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[-1] != self.model.cfg.text_dim:
            raise ValueError(f"prompt_embeds must be [1, L, {self.model.cfg.text_dim}], got {list(prompt_embeds.shape)}")
        # A copy is compared, not the caller's tensor: one changed in place between steps kept the
        # old prompt's K/V (a review).
        if self._prompt is None or not torch.equal(self._prompt[0], emb):
            self._prompt = (emb.detach().clone(), self.model.prompt_kv(emb.to(self.device)))
        return self._prompt[1]

    # ------------------------------------------------------------------ inspection

    def held_frames(self) -> dict[int, list[int | None]]:
        """Per layer: the stream frame index each of the lane's window slots holds, in window
        order (the first `sinks` are the sinks); None for a slot never written. Frame indices
        count latent frames from the stream's start (chunk 0 holds frames 0 and 1)."""
        if self.pool is None:
            return {layer: [None] * self.cache.window for layer in self.model.layer_ids}
        slots = self.slots.lane(_STREAM, 0).slots
        return {layer: self.pool.held_frames(layer, slots) for layer in self.model.layer_ids}

    def queue(self, layer: int) -> list[int]:
        """`sdv2`: the layer's slot queue Q, front first, as window entries (0 .. window-1)."""
        if self.cache.policy != "sdv2":
            raise ValueError("only cache.policy=sdv2 keeps slot queues")
        if self.pool is None:
            return []
        lane = self.slots.lane(_STREAM, 0)
        return self.pool.queue(layer, lane.lane, lane.ring_order)


__all__ = ["LatentStream"]
