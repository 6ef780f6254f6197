"""The streaming Wan VAE: encode and decode one stream chunk by chunk with causal-conv caches.

Owns: building a random-init diffusers `AutoencoderKLWan` from `VAEConfig`, the per-stream
feature caches of its causal 3D convolutions (`VAEStreamState`), latent normalization with
the module's `latents_mean` / `latents_std`, and the frame-count rules of the causal VAE.
Does not own: loading weights (model/loading.py), uint8 <-> tensor conversion
(pipeline/frames.py), batching several streams (engine), or the device/dtype the module lives on.

Why a wrapper: diffusers' public `encode` / `decode` call `clear_cache()` before and after, and
keep the cache on the module, so they can only process a whole clip. The encoder and decoder
themselves take a `feat_cache` list (one entry per `WanCausalConv3d`, filled in call order
through `feat_idx`) and carry the last frames of each causal convolution forward. We call
them directly with a cache that belongs to one `VAEStreamState`, which reproduces diffusers'
whole-clip `_encode` / `_decode` exactly, chunk by chunk:

- encode: frame 0 alone, then 4 frames at a time (temporal ratio 4): 1 + 4k frames -> 1 + k latents;
- decode: one latent frame at a time; the first latent of a stream gives 1 frame
  (`first_chunk=True`), every later latent gives 4 frames.

One state is one batch of streams of identical length: B > 1 in one call with one state works
because every cache tensor carries the batch dimension. Two streams need two states.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from streamdiff.config import VAEConfig
from streamdiff.model.dit_step import raise_recompile_limit


def vae_kwargs(cfg: VAEConfig) -> dict:
    """`AutoencoderKLWan` arguments of the architecture `cfg` describes (for a random build, and
    for an original Wan2.1_VAE.pth, which carries no config of its own)."""
    kwargs = dict(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                  num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample))
    if cfg.z_dim != 16:  # diffusers' default statistics have 16 entries
        kwargs.update(latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim)
    return kwargs


def build_vae(cfg: VAEConfig, *, seed: int | None = None) -> AutoencoderKLWan:
    """A randomly initialized `AutoencoderKLWan` with the architecture of `cfg` (fp32, CPU, eval).

    `seed` makes the init repeatable without touching the global RNG; None uses the global RNG.
    The latent statistics are diffusers' defaults (the real Wan2.1 values).
    """
    kwargs = vae_kwargs(cfg)
    if seed is None:
        vae = AutoencoderKLWan(**kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(**kwargs)
    return vae.eval()


# Graphs Dynamo may keep per compiled function before it gives up; with fullgraph=True it then
# raises instead of running eager. One VAE call holds a graph per cache state (a stream's first
# calls, then steady) and per batch class: the tiny Wan decoder kept 11 for batches 1-4
# with grouped calls (docs/architecture.md), over Dynamo's default of 8.
VAE_RECOMPILE_LIMIT = 64
# torch.compile's backend for the VAE calls (tests of Dynamo's part, graphs and breaks, may trace
# with "aot_eager" instead of paying inductor's C++ compile of every kernel on a CPU)
VAE_COMPILE_BACKEND = "inductor"


def compiled(fn):
    """torch.compile(fullgraph=True) with automatic dynamic shapes: a call's first shapes are
    compiled as constants; a dimension seen changing (the batch, when streams are grouped) is
    compiled again as a symbol, so most batch sizes share a graph. Raises Dynamo's per-function
    recompile limit to `VAE_RECOMPILE_LIMIT` (a process-wide setting; it only ever grows it)."""
    raise_recompile_limit(VAE_RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True, dynamic=None, backend=VAE_COMPILE_BACKEND)


def _count_causal_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class VAEStreamState:
    """The causal-conv feature caches and counters of one stream (or one batch of streams).

    `enc_cache` / `dec_cache` hold one entry per `WanCausalConv3d` of the encoder / decoder:
    None (not yet run), the string "Rep" (diffusers' marker for an upsample that skipped its
    time conv on the first latent) or a tensor with the last <= 2 frames of that layer's input.
    The shapes seen on the first call are remembered so that a later call with another batch
    size or frame size is refused instead of silently mixing caches. Dropping the state (or
    `reset()`) releases every cached tensor.
    """

    def __init__(self, num_encoder_convs: int, num_decoder_convs: int):
        self.num_encoder_convs = num_encoder_convs
        self.num_decoder_convs = num_decoder_convs
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next encode/decode call is a stream's first call again."""
        self.enc_cache: list = [None] * self.num_encoder_convs
        self.dec_cache: list = [None] * self.num_decoder_convs
        self.encoded_frames = 0  # video frames consumed by encode_chunk
        self.encoded_latents = 0  # latent frames produced by encode_chunk
        self.decoded_latents = 0  # latent frames consumed by decode_chunk
        self.decoded_frames = 0  # video frames produced by decode_chunk
        self.enc_shape: tuple[int, int, int] | None = None  # (B, H, W) of the frames
        self.dec_shape: tuple[int, int, int] | None = None  # (B, h, w) of the latents
        self.device: torch.device | None = None

    def cache_bytes(self) -> int:
        """Bytes held by the cached tensors (for memory accounting)."""
        return sum(
            t.numel() * t.element_size() for t in self.enc_cache + self.dec_cache if isinstance(t, torch.Tensor)
        )

    def __repr__(self) -> str:
        return (
            f"VAEStreamState(encoded_frames={self.encoded_frames}, encoded_latents={self.encoded_latents}, "
            f"decoded_latents={self.decoded_latents}, decoded_frames={self.decoded_frames}, "
            f"cache_bytes={self.cache_bytes()})"
        )


class StreamingVAE:
    """Chunk-by-chunk encode/decode of `AutoencoderKLWan` with per-stream caches.

    Latent scaling (`vae.normalize_latents`): decode always un-normalizes (`z * latents_std +
    latents_mean`); encode returns the raw posterior mean by default, as StreamDiffusionV2's
    streaming encoder does (`stream_encode(is_scale=False)`), or the normalized
    `(mu - latents_mean) / latents_std` with `normalize_latents=True` (its later
    `--normalize_latents`, both ways). Frames in and out are in [-1, 1]. Inputs of another floating dtype are cast to
    the module's dtype; outputs are in the module's dtype on the module's device.
    """

    def __init__(self, vae: AutoencoderKLWan, normalize_latents: bool = False):
        if getattr(vae.config, "patch_size", None) is not None:
            raise ValueError(
                f"AutoencoderKLWan with patch_size={vae.config.patch_size} (the Wan2.2 VAE) is not supported; "
                "StreamDiff uses the Wan2.1 VAE (patch_size None)"
            )
        self.vae = vae.eval()
        self.normalize_latents = normalize_latents
        self.z_dim = int(vae.config.z_dim)
        self.in_channels = int(vae.config.in_channels)
        self.latents_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)  # [z_dim]
        self.latents_std = torch.tensor(vae.config.latents_std, dtype=torch.float32)  # [z_dim]
        if self.latents_mean.numel() != self.z_dim or self.latents_std.numel() != self.z_dim:
            raise ValueError(
                f"latents_mean/latents_std have {self.latents_mean.numel()}/{self.latents_std.numel()} entries, "
                f"z_dim is {self.z_dim}"
            )
        self._num_encoder_convs = _count_causal_convs(vae.encoder)
        self._num_decoder_convs = _count_causal_convs(vae.decoder)
        self._temporal_ratio = 2 ** sum(bool(d) for d in vae.config.temperal_downsample)
        self._spatial_ratio = 2 ** (len(vae.config.dim_mult) - 1)
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._encoder, self._decoder = vae.encoder, vae.decoder  # compiled by `compile()`

    def compile(self) -> None:
        """`runtime.compile_vae`: run the encoder and decoder calls through
        torch.compile(fullgraph=True). The per-stream caches stay plain lists that the compiled
        call reads and refills, so a stream's state, the grouped calls (engine/vae_batch.py) and
        the results are those of eager (inductor reorders float sums: ~1e-6). Dynamo keys a graph on the call's
        shapes and on its cache's layout: a stream's first calls (cache empty, then partly
        filled) each get one, then every steady call reuses the last; batch sizes after the
        first share one graph with a symbolic batch (the engine calls a compiled VAE per
        stream, engine/model_runner.py, so that no new batch size compiles mid-serving).
        Measured on CPU (tests/model/test_vae_compile.py): no graph break, nothing compiled once
        streaming is steady."""
        self._encoder = compiled(self.vae.encoder)
        self._decoder = compiled(self.vae.decoder)

    # ------------------------------------------------------------------ properties

    @property
    def temporal_ratio(self) -> int:
        """Video frames per latent frame (after the first latent, which is 1 frame)."""
        return self._temporal_ratio

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent pixel along H and W."""
        return self._spatial_ratio

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def new_state(self) -> VAEStreamState:
        return VAEStreamState(self._num_encoder_convs, self._num_decoder_convs)

    def latent_frames_for(self, num_frames: int, first: bool) -> int:
        """Latent frames that `num_frames` video frames encode to (first call of a stream or not)."""
        return 1 + (num_frames - 1) // self.temporal_ratio if first else num_frames // self.temporal_ratio

    # ------------------------------------------------------------------ encode

    @torch.no_grad()
    def encode_chunk(self, frames: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """frames [B, 3, n, H, W] in [-1, 1] -> latents [B, z_dim, n_latent, H/8, W/8] (normalized
        only with `normalize_latents`).

        A stream's first call takes 1 + 4k frames (n_latent = 1 + k); later calls 4k frames
        (n_latent = k). Uses the posterior mean (no sampling).
        """
        # 1. Validate everything before touching the cache (a refused call leaves it intact).
        x = self._check_tensor(frames, "frames", self.in_channels, "3 (RGB)", state)
        tr = self.temporal_ratio
        first = state.encoded_frames == 0
        b, _, n, h, w = x.shape
        if h % self.spatial_ratio or w % self.spatial_ratio:
            raise ValueError(
                f"frames height and width must be multiples of {self.spatial_ratio}, got H={h}, W={w}"
            )
        if first and (n - 1) % tr:
            raise ValueError(
                f"the first encode_chunk call of a stream takes 1 + {tr}k frames (1, {1 + tr}, {1 + 2 * tr}, ...), "
                f"got {n}"
            )
        if not first and (n == 0 or n % tr):
            raise ValueError(
                f"encode_chunk after a stream's first call takes a multiple of {tr} frames ({tr}, {2 * tr}, ...), "
                f"got {n} (frames encoded so far: {state.encoded_frames})"
            )
        self._check_shape(state, "enc_shape", (b, h, w), "frames (B, H, W)")
        state.device = x.device

        # 2. Run the encoder on frame 0 alone (first call), then on groups of `tr` frames.
        groups = ([x[:, :, :1]] if first else []) + list(torch.split(x[:, :, 1 if first else 0 :], tr, dim=2))
        outs = []
        for group in groups:
            if group.shape[2] == 0:
                continue
            enc = self._encoder(group, feat_cache=state.enc_cache, feat_idx=[0])  # [B, 2z, 1, h, w]
            outs.append(self.vae.quant_conv(enc))  # [B, 2z, 1, h, w]  (1x1x1 conv, no temporal state)
        moments = torch.cat(outs, dim=2)  # [B, 2z, n_latent, h, w]

        # 3. Keep the posterior mean (normalized only when asked: see the class docstring).
        latents = moments[:, : self.z_dim]  # [B, z, n_latent, h, w]
        if self.normalize_latents:
            mean, std = self._latent_stats(latents.device, latents.dtype)
            latents = (latents - mean) / std
        state.encoded_frames += n
        state.encoded_latents += latents.shape[2]
        return latents

    # ------------------------------------------------------------------ decode

    def _check_decode(self, latents: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """Validate a decode call (before touching the cache); returns the latents to decode."""
        z = self._check_tensor(latents, "latents", self.z_dim, f"z_dim={self.z_dim}", state)
        b, _, m, h, w = z.shape
        if m == 0:
            raise ValueError("decode_chunk needs at least 1 latent frame, got 0")
        self._check_shape(state, "dec_shape", (b, h, w), "latents (B, h, w)")
        state.device = z.device
        return z

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """normalized latents [B, z_dim, m, h, w] -> frames [B, 3, n, 8h, 8w] in [-1, 1].

        Each latent frame is decoded on its own through the stream's cache: the stream's very
        first latent gives 1 frame, every other latent 4 frames.
        """
        # 1. Validate.
        z = self._check_decode(latents, state)
        m = z.shape[2]

        # 2. Un-normalize and decode latent by latent.
        mean, std = self._latent_stats(z.device, z.dtype)
        z = z * std + mean  # [B, z, m, h, w]
        outs = []
        for i in range(m):
            first = state.decoded_latents == 0
            zi = self.vae.post_quant_conv(z[:, :, i : i + 1])  # [B, z, 1, h, w]
            out = self._decoder(zi, feat_cache=state.dec_cache, feat_idx=[0], first_chunk=first)  # [B, 3, 1|4, H, W]
            outs.append(out)
            state.decoded_latents += 1
            state.decoded_frames += out.shape[2]
        frames = torch.cat(outs, dim=2)  # [B, 3, n, H, W]
        return frames.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ helpers

    def _latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._stats:
            mean = self.latents_mean.to(device=device, dtype=dtype).view(1, -1, 1, 1, 1)  # [1, z, 1, 1, 1]
            std = self.latents_std.to(device=device, dtype=dtype).view(1, -1, 1, 1, 1)  # [1, z, 1, 1, 1]
            self._stats[key] = (mean, std)
        return self._stats[key]

    def _check_tensor(
        self, t: torch.Tensor, name: str, channels: int, channels_text: str, state: VAEStreamState
    ) -> torch.Tensor:
        if not isinstance(state, VAEStreamState):
            raise ValueError(f"state must be a VAEStreamState (from StreamingVAE.new_state()), got {type(state).__name__}")
        if state.num_encoder_convs != self._num_encoder_convs or state.num_decoder_convs != self._num_decoder_convs:
            raise ValueError("state was made by a StreamingVAE with another architecture; use this VAE's new_state()")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 5:
            raise ValueError(f"{name} must be 5-D [B, C, T, H, W], got shape {list(t.shape)}")
        if t.shape[1] != channels:
            raise ValueError(f"{name} must have {channels_text} channels in dim 1, got shape {list(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} has batch size 0")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor in the model's range, got dtype {t.dtype}")
        device = self.device
        if t.device != device:
            raise ValueError(f"{name} are on {t.device} but the VAE is on {device}")
        if state.device is not None and state.device != device:
            raise ValueError(f"state caches are on {state.device} but the VAE is on {device}; reset() the state")
        return t.to(self.dtype)

    @staticmethod
    def _check_shape(state: VAEStreamState, attr: str, shape: tuple[int, int, int], what: str) -> None:
        seen = getattr(state, attr)
        if seen is None:
            setattr(state, attr, shape)
        elif seen != shape:
            raise ValueError(
                f"{what} = {shape} differ from this stream's earlier calls {seen}; "
                "one state serves one batch of streams of fixed size (reset() it or use new_state())"
            )


__all__ = ["StreamingVAE", "VAEStreamState", "build_vae", "compiled", "vae_kwargs"]
