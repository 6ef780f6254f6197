"""The configuration schema: frozen dataclasses, YAML loading, presets and `--set` overrides.

Owns: every tunable of the system, its type, its default and its allowed range.
Does not own: what the values do (each layer reads its own section) and never imports torch.

A config file is YAML with the same nesting as `Config`. It may start with `preset: NAME`
(one of `configs/*.yaml`); its own keys then override the preset's. `--set a.b=v` overrides
are parsed with YAML scalar rules and type-checked against the field they name. Unknown keys
and bad values raise `ConfigError` with the dotted path of the offending key.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

def _config_dir() -> Path:
    """Presets live in the project's configs/ folder, which an install (`pip install .`, not -e)
    carries inside the package as streamdiff/configs (pyproject.toml's package-dir); a folder of
    one's own: STREAMDIFF_CONFIG_DIR. An install probe: a plain `pip install` found no preset."""
    env = os.environ.get("STREAMDIFF_CONFIG_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


CONFIG_DIR = _config_dir()


def resolve_path(path: str | Path) -> Path:
    """A weights path as given, or — when relative and not found from the working directory —
    relative to the configs folder (the demo preset ships its weights in configs/demo/)."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and (CONFIG_DIR / p).exists():
        return CONFIG_DIR / p
    return p


MAX_SEED = 2**63 - 1  # seeds: sampling.seed, weights.seed and a stream's live seed
MAX_BLEND_CHUNKS = 64  # a stream's live prompt blend: chunks a prompt change fades in over


class ConfigError(ValueError):
    """A config key or value is wrong. The message names the dotted key."""


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The DiT architecture (diffusers `WanTransformer3DModel` config names in brackets)."""

    num_heads: int = 2  # [num_attention_heads]
    head_dim: int = 32  # [attention_head_dim]
    ffn_dim: int = 128
    num_layers: int = 2
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 32  # 4096 for umT5-XXL
    freq_dim: int = 256
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_backend: Literal["auto", "torch", "triton"] = "auto"  # no xformers: see docs/architecture.md

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKLWan`. The real Wan2.1 VAE has base_dim 96."""

    base_dim: int = 4
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 1
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    # False (StreamDiffusionV2's default): encode returns the raw posterior mean while decode
    # still un-normalizes (z * std + mean). True: encode normalizes too, (mu - mean) / std.
    normalize_latents: bool = False
    # TAEHV (model/taehv.py): `kind: taehv` encodes and decodes with it; `decoder: taehv` keeps
    # the Wan encoder and decodes with TAEHV. Widths (64, 64, 64) / (256, 128, 64, 64) are taew2_1.pth.
    kind: Literal["wan", "taehv"] = "wan"
    decoder: Literal["same", "taehv"] = "same"
    taehv_encoder_widths: tuple[int, ...] = (64, 64, 64)
    taehv_decoder_widths: tuple[int, ...] = (256, 128, 64, 64)
    taehv_blocks: int = 3  # MemBlocks per stage (3 in taew2_1.pth)
    # vae.kind=taehv: the DiT works on the TAEHV's latents times this (encode multiplies, decode
    # divides; diffusers' `scaling_factor`). 1 for taew2_1.pth, whose latents are the Wan DiT's
    # already; the demo's own code is small beside the noise, and 2 keeps its detail (docs/demo.md).
    latent_scale: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    """Prompt encoder. `umt5`: transformers UMT5EncoderModel + tokenizer from local folders.
    `tiny`: a small built-in hashing encoder for the tiny preset (random weights, no files)."""

    kind: Literal["tiny", "umt5", "styles"] = "tiny"  # styles: the demo's nine prompts (model/style_prompts.py)
    max_length: int = 512
    device: Literal["same", "cpu"] = "same"  # "cpu" keeps umT5 off the GPU (24 GB cards)
    offload_after_encode: bool = False  # move the encoder to CPU between prompts
    cache_size: int = 64  # prompts whose embeddings are kept


@dataclass(frozen=True)
class WeightsConfig:
    """Where weights come from. Paths are local; nothing is ever downloaded.

    format: `random` (seeded init, tests and benchmarks), `diffusers` (a folder with
    transformer/ vae/ text_encoder/ tokenizer/ or a transformer folder alone), `wan`
    (an original Wan single .safetensors/.pth file), `sdv2` (a StreamDiffusionV2 model.pt).
    """

    format: Literal["random", "diffusers", "wan", "sdv2"] = "random"
    transformer: str = ""
    vae: str = ""  # diffusers vae/ folder, an original Wan2.1_VAE.pth / .safetensors or the Wan2.1 folder holding it (vae.kind=taehv: taew2_1.pth)
    taehv: str = ""  # the TAEHV file (taew2_1.pth / .safetensors) when vae.decoder=taehv
    text_encoder: str = ""  # transformers UMT5EncoderModel folder, or an original Wan2.1 folder / its umT5 .pth
    tokenizer: str = ""  # transformers tokenizer folder (default: beside text_encoder, or google/umt5-xxl/)
    min_match: float = 0.99  # refuse a checkpoint matching fewer keys than this share
    seed: int = 0  # for format=random
    trust_pickle: bool = False  # allow full unpickling of a .pt that weights_only=True refuses (runs its code)


@dataclass(frozen=True)
class CacheConfig:
    """The sink + ring KV cache: `window` latent frames per lane, the first `sinks` of them sinks.

    `policy`: `sdv2` reproduces StreamDiffusionV2 (per-layer slot queues, RoPE restart at
    `rebase_frame`), `rolling` is our own (docs/architecture.md lists the differences).
    `refresh_threshold`: the adaptive sink refresh fires when a sink's mean K/V cosine
    similarity to the new chunk is below it; -1 turns the refresh off (as the reference)."""

    window: int = 6
    sinks: int = 3
    policy: Literal["sdv2", "rolling"] = "sdv2"
    refresh_threshold: float = 0.2
    rebase_frame: int = 50  # sdv2: a chunk starting at this RoPE index restarts at window - 1
    max_streams: int = 4  # streams served at once
    # KV pool lanes (a lane: window slots, one denoise step of one stream); the scheduler admits
    # a stream only if its `steps` lanes are free. 0 = 4 per stream (steps can always grow live).
    pool_lanes: int = 0


VAE_TIME_STRIDE = 4  # video frames per latent frame (the very first latent frame is 1 frame)


def frames_for_latents(latents: int, first: bool) -> int:
    """Video frames that make `latents` latent frames: 4 each, except the stream's very first
    latent frame, which is 1 frame (so a 2-latent first chunk needs 5 frames). One definition
    for the scheduler (torch-free) and the pipeline, which both import config."""
    if first:
        return 1 + VAE_TIME_STRIDE * (latents - 1)
    return VAE_TIME_STRIDE * latents


@dataclass(frozen=True)
class SamplingConfig:
    """Flow-matching sampler for video-to-video."""

    steps: int = 2  # denoise steps 1..4: lane j runs at timesteps[j] (lane 0 at the strength's)
    # The lanes' timesteps, the first `steps` used: StreamDiffusionV2's list, which its 1.3B/14B
    # were distilled at. The first entry is lane 0's nominal value (the noise strength sets it per
    # chunk, and the first chunk's with first_chunk_timestep: first_step); a preset trained at a
    # low strength lists lower ones (the demo: docs/demo.md, "More steps").
    timesteps: tuple[int, ...] = (700, 500, 400, 200)
    shift: float = 8.0
    num_train_timesteps: int = 1000
    noise_strength: float = 0.8  # s; the model is told t = 1000*s - 100
    # The timestep a stream's first chunk is denoised from. "first_step": the step list's first
    # (700), as StreamDiffusionV2's prepare does whatever s (the same as 1000*s - 100 at its
    # default 0.8); "strength": 1000*s - 100, like every later chunk (the demo: trained so).
    first_chunk_timestep: Literal["first_step", "strength"] = "first_step"
    motion_aware: bool = True
    seed: int = 0
    first_chunk_latents: int = 2  # latent frames in a stream's first chunk
    chunk_latents: int = 1  # latent frames per chunk after the first


@dataclass(frozen=True)
class VideoConfig:
    width: int = 256
    height: int = 256
    fps: float = 30.0


@dataclass(frozen=True)
class SLOConfig:
    """The service level a stream is admitted for, unless the server is told otherwise
    (`serve --target-fps/--deadline-ms`). Presets carry their device's own: a CPU preset asks
    for a few fps, a GPU preset for video.fps. target_fps 0 means video.fps."""

    target_fps: float = 2.0  # the defaults are the tiny preset's (a CPU); GPU presets set their own
    deadline_ms: float = 8000.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the DiT runs. `compile`: torch.compile(fullgraph) of one DiT block that
    every layer runs (regional: the compile time does not grow with the depth), one graph per
    row-count bucket (rows padded up to the next entry of `row_buckets`); `cuda_graphs`:
    capture that forward per bucket as CUDA graphs and replay them (CUDA only). `compile_vae`:
    torch.compile(fullgraph) of the VAE's streaming encoder and decoder calls, beside any DiT
    mode (model/vae.py `StreamingVAE.compile`)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    compile_vae: bool = False
    row_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # torch CPU threads for this process (0: torch's default, one per core). On a CPU shared with
    # other busy processes, 1 thread is several times faster than 2 (no barrier waits).
    threads: int = 0


def padded_rows(rows: int, buckets: tuple[int, ...]) -> int:
    """The rows a forward of `rows` rows runs at under `runtime.row_buckets`: the smallest bucket
    that holds them, or `rows` itself past the largest (one rule for the DiT step that pads and
    the engine's warm-up that builds each bucket's graph)."""
    return min((b for b in buckets if b >= rows), default=rows)


@dataclass(frozen=True)
class ParallelConfig:
    """Pipeline stages (streamdiff/parallel): Ray actors, or threads in this process. num_stages 1
    without vae_stages = the local executor."""

    num_stages: int = 1
    # ray: each stage an actor (its own process / GPU, on this machine or a cluster). threads: each
    # stage a thread here, a queue between them: on one machine's CPU cores, with one torch thread
    # each, VAE encode, DiT and VAE decode overlap with no OpenMP barrier between cores.
    backend: Literal["ray", "threads"] = "ray"
    ray_address: str = ""  # "" starts a local Ray instance; "auto" or "HOST:PORT" joins a cluster
    partition: tuple[int, ...] = ()  # blocks per stage; () = even, then rebalanced from measured cost
    rebalance: bool = True  # re-measure while serving and move blocks when stages drift apart
    rebalance_threshold: float = 1.25  # slowest / fastest stage time that counts as imbalance
    rebalance_after_steps: int = 50  # ... when it persists this many consecutive steps
    micro_batches: int = 0  # a plan's stream-batch rows in this many forwards; 0 = one if its streams overlap plans, else one per stage
    transport: Literal["auto", "nccl", "cpu"] = "auto"  # auto: NCCL between GPU actors
    step_timeout_s: float = 30.0  # a step not back by then counts as a failed stage
    # Lane stride D: lane j of a stream's p-th forward holds chunk p - j*D (same frames as D = 1,
    # (steps-1)(D-1) chunks later); up to D of a stream's plans are in flight. 0 = automatic, per
    # stream: the number of stages unless its SLO needs less latency (1 on one stage).
    lane_stride: int = 0
    # VAE encode and decode as pipeline stages of their own (own actors / GPUs), so the first and
    # last DiT stages carry only blocks; num_stages still counts the DiT stages.
    vae_stages: bool = False
    # Drills on CPU: every stage sleeps this long per block per forward (whatever the rows), so
    # a CPU machine can play GPU-bound stages. 0 = off.
    block_delay_ms: float = 0.0


@dataclass(frozen=True)
class Config:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------
# Validation of cross-field rules (types are checked while parsing)
# ---------------------------------------------------------------------------------------------

MAX_FRAME_SIDE = 8192  # pixels: the longest frame side any command takes (video.width/height, --size, --resolution)

_RANGES: dict[str, tuple[float, float]] = {
    "model.num_heads": (1, 256),
    "vae.taehv_blocks": (1, 8),
    "vae.latent_scale": (1e-3, 1e3),
    "runtime.threads": (0, 1024),
    "model.head_dim": (8, 256),
    "model.num_layers": (1, 256),
    "model.ffn_dim": (1, 1 << 20),
    "model.in_channels": (1, 1024),
    "model.out_channels": (1, 1024),
    "model.text_dim": (1, 1 << 16),
    "model.freq_dim": (2, 1 << 16),
    "model.eps": (1e-12, 0.1),
    "model.rope_max_seq_len": (2, 1 << 20),
    "vae.base_dim": (1, 1024),
    "vae.z_dim": (1, 1024),
    "vae.num_res_blocks": (1, 16),
    "text.max_length": (1, 1 << 16),
    "text.cache_size": (0, 1 << 20),
    "sampling.shift": (0.01, 1000.0),
    "sampling.num_train_timesteps": (5, 100_000),  # (a probe: 10^6 was an 8 TB table, 0 named timesteps)
    "cache.window": (1, 64),
    "cache.sinks": (0, 63),
    "cache.refresh_threshold": (-1.0, 1.0),
    "cache.rebase_frame": (2, 1_000_000),
    "cache.max_streams": (1, 1024),
    "cache.pool_lanes": (0, 4096),
    "sampling.steps": (1, 4),
    "sampling.seed": (0, MAX_SEED),
    "weights.seed": (0, MAX_SEED),
    "sampling.noise_strength": (0.1, 1.0),
    "sampling.first_chunk_latents": (1, 8),
    "sampling.chunk_latents": (1, 8),
    "video.width": (16, MAX_FRAME_SIDE),
    "video.height": (16, MAX_FRAME_SIDE),
    "video.fps": (1, 240),
    "slo.target_fps": (0, 240),
    "slo.deadline_ms": (1, 3_600_000),
    "weights.min_match": (0.0, 1.0),
    "parallel.num_stages": (1, 64),
    "parallel.micro_batches": (0, 64),
    "parallel.rebalance_threshold": (1.0, 100.0),
    "parallel.rebalance_after_steps": (1, 1_000_000),
    "parallel.step_timeout_s": (0.1, 3600.0),
    "parallel.lane_stride": (0, 16),
    "parallel.block_delay_ms": (0.0, 10000.0),
}


def validate(cfg: Config) -> None:
    for dotted, (lo, hi) in _RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if not lo <= value <= hi:
            raise ConfigError(f"{dotted}={value!r} is out of range [{lo}, {hi}]")
    if cfg.model.head_dim % 2:
        raise ConfigError(f"model.head_dim={cfg.model.head_dim} must be even (RoPE pairs)")
    if cfg.model.freq_dim % 2:
        raise ConfigError(f"model.freq_dim={cfg.model.freq_dim} must be even (sine and cosine pairs)")
    if not cfg.model.in_channels == cfg.model.out_channels == cfg.vae.z_dim:
        raise ConfigError(f"model.in_channels={cfg.model.in_channels} and model.out_channels={cfg.model.out_channels} "
                          f"must both be vae.z_dim={cfg.vae.z_dim} (the DiT denoises the VAE's latents)")
    if not cfg.vae.dim_mult or min(cfg.vae.dim_mult) < 1:
        raise ConfigError(f"vae.dim_mult={list(cfg.vae.dim_mult)} must list channel multipliers >= 1")
    if cfg.cache.sinks >= cfg.cache.window:
        raise ConfigError(f"cache.sinks={cfg.cache.sinks} must be smaller than cache.window={cfg.cache.window}")
    ring = cfg.cache.window - cfg.cache.sinks
    if cfg.sampling.chunk_latents > ring:
        raise ConfigError(
            f"sampling.chunk_latents={cfg.sampling.chunk_latents} must fit the ring "
            f"(cache.window - cache.sinks = {ring})"
        )
    if cfg.sampling.first_chunk_latents > cfg.cache.window:
        raise ConfigError(f"sampling.first_chunk_latents must be at most cache.window={cfg.cache.window}")
    rope = cfg.model.rope_max_seq_len  # RoPE positions in time and on each side of the patch grid
    if (side := max(cfg.video.width, cfg.video.height) // 16) > rope:
        raise ConfigError(f"model.rope_max_seq_len={rope} is shorter than the frame's {side} patches a side "
                          f"({cfg.video.width}x{cfg.video.height}, 16 pixels a patch)")
    if cfg.cache.policy == "rolling" and cfg.cache.window + 1 > rope:
        raise ConfigError(f"model.rope_max_seq_len={rope} must be more than cache.window={cfg.cache.window} "
                          "(cache.policy=rolling)")
    if cfg.cache.policy == "sdv2":
        if cfg.sampling.chunk_latents != 1:
            raise ConfigError("cache.policy=sdv2 streams one latent frame per chunk: set sampling.chunk_latents=1 "
                              "or cache.policy=rolling")
        if not cfg.cache.window <= cfg.cache.rebase_frame < cfg.model.rope_max_seq_len:
            raise ConfigError(f"cache.rebase_frame={cfg.cache.rebase_frame} must lie in [cache.window, "
                              f"model.rope_max_seq_len={cfg.model.rope_max_seq_len})")
        # While the window fills, the reference queues the ring entry one ahead of each chunk it
        # writes (cache/slots.py, Sdv2Lane.plan); a window with none to queue stopped every stream
        # at the chunk after it filled (a review).
        first, window, sinks = cfg.sampling.first_chunk_latents, cfg.cache.window, cfg.cache.sinks
        if not (sinks <= 2 * first - 1 < window or max(first + 1, sinks) <= window - 1):
            raise ConfigError(f"cache.policy=sdv2: cache.window={window} with cache.sinks={sinks} and a first chunk "
                              f"of {first} latent frames leaves no ring entry to overwrite once the window is "
                              "full: make the window larger or use cache.policy=rolling")
    if 0 < cfg.cache.pool_lanes < cfg.sampling.steps:
        raise ConfigError(f"cache.pool_lanes={cfg.cache.pool_lanes} cannot hold one stream of sampling.steps="
                          f"{cfg.sampling.steps} (a lane per denoise step); 0 = 4 per stream")
    for name in ("width", "height"):
        if getattr(cfg.video, name) % 16:
            raise ConfigError(f"video.{name}={getattr(cfg.video, name)} must be a multiple of 16 (VAE 8x, patch 2x)")
    enc_w, dec_w = cfg.vae.taehv_encoder_widths, cfg.vae.taehv_decoder_widths
    if len(enc_w) != 3 or len(dec_w) != 4 or min(enc_w + dec_w) < 1:
        raise ConfigError("vae.taehv_encoder_widths needs 3 and vae.taehv_decoder_widths 4 positive widths")
    if cfg.vae.kind == "taehv" and cfg.vae.decoder == "taehv":
        raise ConfigError("vae.decoder=taehv is for the Wan encoder; with vae.kind=taehv TAEHV already decodes")
    if cfg.vae.kind == "taehv" and cfg.vae.normalize_latents:  # a TAEHV probe: it was taken and ignored
        raise ConfigError("vae.normalize_latents is for the Wan encoder; TAEHV's latents are always the "
                          "normalised ones (vae.kind=taehv)")
    if cfg.vae.kind != "taehv" and cfg.vae.latent_scale != 1:
        raise ConfigError(f"vae.latent_scale={cfg.vae.latent_scale:g} is for vae.kind=taehv; the Wan VAE scales its "
                          "own latents (vae.normalize_latents)")
    if len(cfg.vae.temperal_downsample) != len(cfg.vae.dim_mult) - 1:
        raise ConfigError("vae.temperal_downsample needs one entry fewer than vae.dim_mult")
    # The streaming path is built on Wan 2.1's compression, 8x in space (a halving after every
    # stage but the last) and 4x in time (two of those halvings in time too): another passed here
    # and failed mid-render with a shape error.
    if len(cfg.vae.dim_mult) != 4 or sum(bool(t) for t in cfg.vae.temperal_downsample) != 2:
        raise ConfigError(f"vae.dim_mult={list(cfg.vae.dim_mult)} and vae.temperal_downsample="
                          f"{list(cfg.vae.temperal_downsample)} must compress 8x in space and 4x in time as "
                          "Wan 2.1's VAE does: 4 stages (dim_mult) and 2 of the 3 halvings in time too")
    if cfg.weights.format != "random" and not cfg.weights.transformer:
        raise ConfigError(f"weights.transformer must name a path when weights.format={cfg.weights.format!r}")
    par = cfg.parallel
    if par.num_stages > cfg.model.num_layers:
        raise ConfigError(f"parallel.num_stages={par.num_stages} exceeds model.num_layers={cfg.model.num_layers}")
    if par.partition and (len(par.partition) != par.num_stages or min(par.partition) < 1
                          or sum(par.partition) != cfg.model.num_layers):
        raise ConfigError(f"parallel.partition={list(par.partition)} must give each of the {par.num_stages} "
                          f"stages at least one block, {cfg.model.num_layers} blocks in all")
    if par.backend == "threads" and par.ray_address:
        raise ConfigError(f"parallel.backend=threads runs every stage in this process: parallel.ray_address="
                          f"{par.ray_address!r} is for parallel.backend=ray")
    if cfg.runtime.compile and cfg.runtime.cuda_graphs:
        raise ConfigError("runtime.compile and runtime.cuda_graphs are alternatives: set one")
    if not cfg.runtime.row_buckets or min(cfg.runtime.row_buckets) < 1:
        raise ConfigError(f"runtime.row_buckets={list(cfg.runtime.row_buckets)} must list row counts >= 1")
    ts = cfg.sampling.timesteps
    if len(ts) < 4 or not all(0 < t < cfg.sampling.num_train_timesteps for t in ts) or list(ts) != sorted(set(ts), reverse=True):
        raise ConfigError(f"sampling.timesteps={list(ts)} must list at least 4 timesteps (one a step, up to 4 steps), "
                          f"strictly descending, each between 1 and {cfg.sampling.num_train_timesteps - 1}")
    if cfg.text.kind == "umt5" and not cfg.weights.text_encoder:
        raise ConfigError("weights.text_encoder must name a folder (or the original Wan umT5 file) when "
                          "text.kind='umt5'")


# ---------------------------------------------------------------------------------------------
# Parsing: plain data (dicts from YAML, strings from --set) -> typed dataclasses
# ---------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}={value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}={value!r} has the wrong type (expected {tp})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):  # YAML read a name like 2024 as a number
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string (quote it)")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            section = f"{prefix}." if prefix else ""
            homes = [f"{section}{name}.{key}" for name in sorted(names)
                     if is_dataclass(hints[name]) and key in {f.name for f in fields(hints[name])}]
            if not homes:  # a typo of a key of its own section
                homes = [section + name
                         for name in difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.75)]
            hint = f"; did you mean {' or '.join(homes)}?" if homes else ""
            raise ConfigError(f"unknown config key {path!r} (known: {', '.join(sorted(names))}){hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Yaml(yaml.SafeLoader):
    """YAML for configs: a key given twice is an error (the last one silently won), and numbers
    are read as YAML 1.2 reads them: 0640 is 640 and 4:16 a string (YAML 1.1, PyYAML's
    default, made them octal 416 and base-60 256 without a word: a probe's --set video.width)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):  # (SafeLoader's own error says so)
                continue
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"{mark.name}: {key!r} is given twice (line {mark.line + 1}): say it once")
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        return int(text, 0) if text.lstrip("+-")[:2] in ("0x", "0o") else int(text, 10)


_Yaml.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?[0-9][0-9_]*|[-+]?0x[0-9a-fA-F_]+|[-+]?0o[0-7_]+)$"), list("-+0123456789"))
_Yaml.add_constructor("tag:yaml.org,2002:int", _Yaml.construct_yaml_int)


def _load_yaml(text: str, name: str) -> Any:
    """`text` read with `_Yaml`; `name` (the file, or the --set) is what its errors say."""
    loader = _Yaml(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder: give a YAML file or a preset name")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {getattr(exc, 'problem', None) or 'cannot parse'}{where}") from None
    if data is None:
        raise ConfigError(f"{path} is empty: a config sets `preset: NAME` (demo, tiny, ...) and what it changes")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _resolve(data: dict, seen: tuple[str, ...] = ()) -> dict:
    """Expand `preset: NAME` chains into one plain dict."""
    preset = data.pop("preset", None)
    if preset is None:
        return data
    if preset in seen:
        raise ConfigError(f"preset cycle: {' -> '.join(seen + (preset,))}")
    path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        if not known:  # say where it looked: an empty list said nothing
            raise ConfigError(f"unknown preset {preset!r}: no presets in {CONFIG_DIR} (set STREAMDIFF_CONFIG_DIR "
                              "to a folder of presets, or give a YAML file)")
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(known)})")
    return _merge(_resolve(_read_yaml(path), seen + (preset,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=v` -> (["a", "b"], v) with v parsed as a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = _load_yaml(raw, f"--set {text}") if raw.strip() else ""
    except yaml.YAMLError as exc:  # one line: YAML's message spans several, with a caret drawing
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: cannot parse the value as YAML ({problem}); quote it") from None
    return parts, value


def _weights_beside(data: dict, folder: Path) -> dict:
    """A YAML file's relative weights paths that are not found from the working directory but
    are beside the file are made absolute there, as a preset's are found in the configs folder
    (`resolve_path`): a config and its weights can move together."""
    weights = data.get("weights")
    if not isinstance(weights, dict):
        return data
    moved = {}
    for key, value in weights.items():
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            if not Path(value).expanduser().exists() and (folder / value).exists():
                moved[key] = str((folder / value).resolve())
    return {**data, "weights": {**weights, **moved}} if moved else data


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config from a preset name (`tiny`), a YAML path, or None (defaults = tiny).

    `overrides` are `section.key=value` strings applied last.
    """
    if source is None:
        data: dict = {}
    elif not str(source).strip():  # Path("") is the current folder
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"the config name is empty: give a preset ({', '.join(known)}) or a YAML file")
    else:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.exists():
            data = _weights_beside(_read_yaml(path), path.parent)
        else:
            data = {"preset": str(source)}
    data = _resolve(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            value = _merge(node[parts[-1]], value)  # a section's other keys stay (they fell to the defaults)
        node[parts[-1]] = value
    return _build(Config, data)


def with_overrides(cfg: Config, **sections: dict) -> Config:
    """Return a copy of `cfg` with some fields of some sections replaced (type-checked)."""
    data = to_dict(cfg)
    for section, values in sections.items():
        if section not in data or not isinstance(data[section], dict):
            raise ConfigError(f"unknown config section {section!r}")
        data[section] = _merge(data[section], values)
    return _build(Config, data)


def parse_size(text: str) -> tuple[int, int]:
    """A frame size "WxH" (as --size and --resolution take it) -> (width, height); ValueError
    (naming the text) otherwise. Here, not beside the frame code, so that the CLI can check its
    arguments before torch is imported."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} must look like 512x512 (width x height)") from None
    if width < 1 or height < 1:
        raise ValueError(f"{text!r}: width and height must be positive")
    if max(width, height) > MAX_FRAME_SIDE:
        raise ValueError(f"{text!r}: width and height must be at most {MAX_FRAME_SIDE}")
    return width, height


def to_dict(cfg: Any) -> dict:
    def conv(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


__all__ = [
    "CacheConfig",
    "Config",
    "ConfigError",
    "ModelConfig",
    "RuntimeConfig",
    "SLOConfig",
    "SamplingConfig",
    "TextConfig",
    "VAEConfig",
    "VideoConfig",
    "WeightsConfig",
    "MAX_FRAME_SIDE",
    "load_config",
    "parse_override",
    "parse_size",
    "to_dict",
    "with_overrides",
]
