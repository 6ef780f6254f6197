"""Build the model components a pipeline, engine or stage needs, from a Config.

Owns: device / dtype resolution, building the DiT (whole or a block range), the streaming VAE
and the prompt encoder, and loading their weights (or seeded random init for `format: random`).
Does not own: the formats themselves (loading.py), or any per-stream state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from streamdiff.config import Config, ConfigError
from streamdiff.model.attention import Attention, resolve_backend
from streamdiff.model.dit_step import DiTStep
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.model.loading import (
    WeightsMismatchError,
    check_fit,
    copy_into,
    load_taehv,
    load_vae,
    random_init_,
    read_transformer_state_dict,
    resolve_path,
    transformer_config_disagreements,
)
from streamdiff.model.style_prompts import PROMPT_NAMES, StylePromptEncoder
from streamdiff.model.taehv import TAEHV, HybridVAE, StreamingTAEHV
from streamdiff.model.text import PromptEncoder, build_prompt_encoder
from streamdiff.model.vae import StreamingVAE, build_vae, vae_kwargs
from streamdiff.sampling.noise_schedule import FlowMatchSchedule

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but no CUDA device is available (use --set runtime.device=cpu)")
    return torch.device(name)


def available_bytes(device: str, total: bool = False) -> int | None:
    """Memory free for a run on `device` (`total`: all of it): the kernel's MemAvailable
    (MemTotal) on CPU, the free (total) device memory on CUDA; None where it cannot be read."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[int(total)] if torch.cuda.is_available() else None
    field = "MemTotal:" if total else "MemAvailable:"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith(field))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        return None


def check_room(shape: torch.nn.Module, bytes_per_param: int, device: torch.device, what: str) -> None:
    """ConfigError when `shape` (a model on the meta device) at `bytes_per_param` cannot fit in
    all of `device`'s memory: such a model grew for minutes and was then killed without a word
    (a probe: model.num_heads=64, head_dim=256 on a 24 GB machine, exit 137)."""
    params = sum(p.numel() for p in shape.parameters())
    need, whole = params * bytes_per_param, available_bytes(device.type, total=True)
    if whole is not None and need > whole:
        raise ConfigError(f"{what}: {params / 1e9:.2f} B parameters need {need / 2**30:.1f} GiB and this "
                          f"{'machine' if device.type == 'cpu' else 'device'} has {whole / 2**30:.1f} GiB in all "
                          f"(model.* settings; streamdiff plan)")


def build_transformer(
    cfg: Config,
    device: torch.device,
    block_range: tuple[int, int] | None = None,
    has_embed: bool = True,
    has_head: bool = True,
) -> CausalWanModel:
    """The DiT (or the part of it a stage holds) with its weights, on `device`, in eval mode."""
    backend = resolve_backend(cfg.model.attention_backend, device)
    choose = cfg.model.attention_backend == "auto" and backend == "triton"  # per shape, timed (model/attention.py)
    dtype = DTYPES[cfg.model.dtype]

    def new_model() -> CausalWanModel:
        return CausalWanModel(cfg.model, block_range, has_embed, has_head, Attention(backend, choose))

    with torch.device("meta"):
        shape = new_model()
    if cfg.weights.format == "random":  # made in fp32 on the host, then cast and moved
        check_room(shape, 4, torch.device("cpu"), "the DiT")
        check_room(shape, dtype.itemsize, device, "the DiT")
        model = random_init_(new_model(), cfg.weights.seed).cast_(dtype).to(device)
        return model.eval().requires_grad_(False)
    check_room(shape, dtype.itemsize, device, "the DiT")
    # The file is read and checked against a model on the meta device before any storage is made:
    # a wrong file is refused at once (the 14B in fp32 is 56 GB of host memory), and the model is
    # made in its own dtype on its device, filled from the file one tensor at a time.
    state = read_transformer_state_dict(cfg.weights.format, cfg.weights.transformer,
                                        trust_pickle=cfg.weights.trust_pickle)
    if said := transformer_config_disagreements(state.config, cfg.model):
        raise WeightsMismatchError(f"transformer: the config.json of {state.source} is another architecture than "
                                   f"the config's model: {'; '.join(said)}")
    model = shape
    report = check_fit(model, state, min_match=cfg.weights.min_match, what="transformer")
    model.cast_(dtype).materialize_(device)
    copy_into(model, state, report)
    if report.missing_keys:  # within min_match: seeded values, not what the storage held
        random_init_(model, cfg.weights.seed, only=set(report.missing_keys))
    log.info("%s", report)
    return model.eval().requires_grad_(False)


@dataclass
class Components:
    cfg: Config
    device: torch.device
    dtype: torch.dtype
    model: CausalWanModel
    vae: StreamingVAE
    text: PromptEncoder
    schedule: FlowMatchSchedule
    step: DiTStep | None = None  # how full-model forwards run (runtime.compile / cuda_graphs); None: eager


def _taehv(cfg: Config, path: str, device: torch.device, dtype: torch.dtype) -> StreamingTAEHV:
    if cfg.weights.format == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.weights.seed)
            net = TAEHV.from_config(cfg.vae)
    else:
        net = load_taehv(path, cfg.vae, cfg.weights.min_match)
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StreamingTAEHV(net.channels_last_() if device.type == "cpu" else net, cfg.vae.latent_scale)


def build_streaming_vae(cfg: Config, device: torch.device, dtype: torch.dtype) -> StreamingVAE:
    """The VAE the config asks for: Wan (`vae.kind: wan`), TAEHV both ways (`kind: taehv`,
    weights.vae = the TAEHV file) or the Wan encoder with TAEHV decoding (`decoder: taehv`,
    weights.taehv = the TAEHV file); its calls compiled with `runtime.compile_vae`."""
    vae = _streaming_vae(cfg, device, dtype)
    if vae.z_dim != cfg.model.in_channels or vae.z_dim != cfg.model.out_channels:
        raise ConfigError(f"the VAE ({cfg.weights.vae or cfg.vae.kind}) has {vae.z_dim} latent channels but the DiT "
                          f"takes model.in_channels={cfg.model.in_channels}, out_channels={cfg.model.out_channels}: "
                          f"a VAE of another model?")
    if cfg.runtime.compile_vae:
        vae.compile()
    return vae


def _streaming_vae(cfg: Config, device: torch.device, dtype: torch.dtype) -> StreamingVAE:
    if cfg.vae.kind == "taehv":
        return _taehv(cfg, cfg.weights.vae, device, dtype)
    if cfg.weights.format == "random":  # the configured architectures, random weights (tests, bench)
        vae_module = build_vae(cfg.vae, seed=cfg.weights.seed)
    elif cfg.weights.vae:
        vae_module = load_vae(cfg.weights.vae, config=vae_kwargs(cfg.vae))  # an original .pth's architecture
    else:
        raise ConfigError(f"weights.vae must name the Wan VAE (a diffusers vae/ folder, Wan2.1_VAE.pth or the "
                          f"Wan2.1 folder holding it) when weights.format={cfg.weights.format}: --set weights.vae=PATH")
    if next(vae_module.parameters()).dtype != dtype:  # diffusers warns on every dtype cast, even a no-op
        vae_module = _cast(vae_module, dtype)
    wan = StreamingVAE(vae_module.to(device=device).eval().requires_grad_(False), cfg.vae.normalize_latents)
    if cfg.vae.decoder == "taehv":
        if cfg.weights.format != "random" and not cfg.weights.taehv:
            raise ConfigError("vae.decoder=taehv needs weights.taehv (taew2_1.pth): --set weights.taehv=PATH")
        return HybridVAE(wan, _taehv(cfg, cfg.weights.taehv, device, dtype))
    return wan


def build_text_encoder(cfg: Config, device: torch.device, dtype: torch.dtype) -> PromptEncoder:
    """The prompt encoder; `text.kind: styles` reads the demo's prompt table (random: seeded)."""
    if cfg.text.kind != "styles":
        return build_prompt_encoder(cfg.text, cfg.weights, cfg.model.text_dim, device, dtype)
    kwargs = dict(device=device, dtype=dtype, cache_size=cfg.text.cache_size)
    if cfg.weights.format != "random" and not cfg.weights.text_encoder:  # a random table: random styles
        raise ConfigError("text.kind=styles needs weights.text_encoder, the prompt table (the demo's: "
                          "demo/prompts.safetensors)")
    if cfg.weights.format == "random":
        gen = torch.Generator().manual_seed(cfg.weights.seed)
        table = torch.randn(len(PROMPT_NAMES), cfg.text.max_length, cfg.model.text_dim, generator=gen)
        return StylePromptEncoder(table, **kwargs)
    enc = StylePromptEncoder.from_file(resolve_path(cfg.weights.text_encoder), cfg.model.text_dim, **kwargs)
    if enc.max_length != cfg.text.max_length:
        raise ConfigError(f"text.max_length={cfg.text.max_length}, but the prompt table "
                          f"{cfg.weights.text_encoder} has {enc.max_length} tokens a prompt: leave text.max_length "
                          f"at {enc.max_length}")
    return enc


def apply_threads(cfg: Config) -> None:
    """`runtime.threads` (0: torch's default) for this process: whatever builds the model in this
    process applies it first, one engine's components or every in-process pipeline stage's."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)


def build_components(cfg: Config, device: torch.device | str | None = None) -> Components:
    device = resolve_device(cfg.runtime.device) if device is None else torch.device(device)
    apply_threads(cfg)
    dtype = DTYPES[cfg.model.dtype]
    model = build_transformer(cfg, device)
    vae = build_streaming_vae(cfg, device, dtype)
    text = build_text_encoder(cfg, device, dtype)
    schedule = FlowMatchSchedule(cfg.sampling.shift, cfg.sampling.num_train_timesteps)
    return Components(cfg, device, dtype, model, vae, text, schedule, dit_step(cfg, model))


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) without diffusers' warning about modules to keep in float32 when the
    model names none (AutoencoderKLWan: "... should be kept in float32: []" on every build)."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(dtype=dtype)
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def dit_step(cfg: Config, model: CausalWanModel) -> DiTStep:
    """The DiT step mode the runtime config asks for."""
    mode = "compiled" if cfg.runtime.compile else "graphs" if cfg.runtime.cuda_graphs else "eager"
    return DiTStep(model, mode, cfg.runtime.row_buckets)
