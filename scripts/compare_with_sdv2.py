"""Check that StreamDiff computes what StreamDiffusionV2's own code computes, part by part.

What it checks (`--parts`, all three by default):
- dit: StreamDiff's `StreamPipeline` (cache policy `sdv2`) against StreamDiffusionV2's
  `CausalStreamInferencePipeline` and `CausalWanModel`, denoised latent by denoised latent: the
  prepared first chunk, then `--calls` streamed chunks through every lane of the stream batch, the
  adaptive sink refresh at each `--thresholds` value and the RoPE restart at latent frame 50 included.
- vae: StreamDiff's `StreamingVAE` against its Wan VAE (`WanVAE_` through `WanVAEWrapper`'s
  `stream_encode` and the module's `stream_decode`, which `stream_decode_to_pixel` calls after a
  bf16 cast), a random VAE of its class saved as `Wan2.1_VAE.pth` and read by `load_vae`; 25
  frames in its call sizes (encode 5, 4, 4, ... frames; decode 2, 1, 1, ... latents); raw and
  normalised latents, and the pixels.
- text: `load_wan_t5` against its umT5 `T5Encoder`, a random one saved in bf16 as
  `models_t5_umt5-xxl-enc-bf16.pth`; the states of 341 real tokens of 512, padding zeroed as its
  `WanTextEncoder` does.

How: on CPU in fp32, a tiny random DiT (2 layers, 2 heads of 128) is built as the reference's
`CausalWanModel`, saved in the reference's `model.pt` format and loaded by StreamDiff's `sdv2`
loader. Both sides get the same prompt embeddings, the same clean latents (no VAE, no text
encoder) and the same noise: every random draw either side makes comes from one bank, keyed
(chunk, lane) for a chunk's noise (lane 0: its input noising, lane j: its re-noise into lane j)
and (None, call, lane) for the stand-ins ("fillers") the reference runs through the lanes the first
streamed chunk has not reached. The reference is driven as streamv2v/inference.py drives it.

Nothing of StreamDiffusionV2 is copied here: it is imported from the folder given as --sdv2 (a
checkout or an unpacked wheel: the folder holding its `models` and `streamv2v` packages). It needs
torch and diffusers, which StreamDiff needs too; ftfy, regex, einops and transformers, which its
modules import but this run never uses, get stand-ins where they are not installed, except
einops, which its VAE uses: `--parts vae` needs it installed (pip install einops).

Usage, from the StreamDiff repository root, with StreamDiff installed (pip install -e .):
    python scripts/compare_with_sdv2.py --sdv2 PATH [--parts dit vae text] [--steps 2 3 4]
        [--thresholds -1 0.2 0.85] [--calls 60] [--tol 1e-4] [--json OUT]

Result, vae and text: one line per quantity with its largest difference, OK or FAIL (--tol).
Result, dit: one line per (steps, threshold) with the largest |x0_reference - x0_streamdiff| over every
chunk and lane, and OK, or the first (call, lane) beyond --tol (call 0: the prepared chunk; call c:
the c-th streamed chunk entering lane 0, lane j then holding chunk c - j). Where StreamDiff does
what the reference does, the two agree to about 2e-5 (StreamDiff's fp32 RoPE and x0 against the
reference's fp64); beyond 1e-4 is a real difference in what StreamDiff computes, and the first
(call, lane) says where it starts. Exit status: 0 when every case is within --tol, 1 when one is
not, 2 on a usage error (PATH holding no StreamDiffusionV2, streamdiff not importable, einops
missing for the vae part). --json holds the dit part's differences.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import tempfile
import types
import warnings
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import torch

# Tiny geometry. head_dim 128: the reference's _initialize_kv_cache and _initialize_crossattn_cache
# hard-code it, so with it nothing of the reference needs patching.
HEADS, HEAD_DIM, FFN, LAYERS, TEXT_DIM, TEXT_LEN = 2, 128, 256, 2, 32, 512
LAT_H = LAT_W = 4  # latent 16 x 4 x 4 -> 2 x 2 = 4 tokens per latent frame
FRAME_TOKENS = (LAT_H // 2) * (LAT_W // 2)
WINDOW, SINKS = 6, 3
STRENGTH = 0.8
# streamv2v/configs/wan_causal_dmd_v2v.yaml's denoising_step_list; the reference's --step N keeps the first N.
STEP_LIST = [700, 500, 400, 200]
ROPE_RESTART_FRAME = 50  # streamv2v/inference.py: t_refresh


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdv2", type=Path, required=True, metavar="PATH",
                    help="the folder holding StreamDiffusionV2's models/ and streamv2v/")
    ap.add_argument("--parts", nargs="+", default=["dit", "vae", "text"], choices=["dit", "vae", "text"])
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4], choices=[1, 2, 3, 4])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[-1.0, 0.2, 0.85], help="sink refresh thresholds")
    ap.add_argument("--calls", type=int, default=60, help="streamed chunks after the prepared one")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--json", type=Path, metavar="OUT", help="write every difference here")
    return ap.parse_args()


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------- shared inputs

def bank_noise(key: tuple, frames: int) -> torch.Tensor:
    """The draw for `key`, [frames, 16, h, w]: the same numbers whichever side asks for it."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return torch.randn(frames, 16, LAT_H, LAT_W, generator=gen)


def clean_latents(chunk: int) -> torch.Tensor:
    """The 'VAE latents' of a chunk, [F, 16, h, w] (2 frames for chunk 0, then 1), smooth in time."""
    gen = torch.Generator().manual_seed(777 + chunk)
    frames = 2 if chunk == 0 else 1
    return torch.randn(frames, 16, LAT_H, LAT_W, generator=gen) * 0.5 + 0.3 * math.sin(chunk / 3)


def prompt_embeds() -> torch.Tensor:
    """[1, 512, text_dim]: 11 tokens, then zeros, as the reference's T5 wrapper pads."""
    emb = torch.zeros(1, TEXT_LEN, TEXT_DIM)
    emb[0, :11] = torch.randn(11, TEXT_DIM, generator=torch.Generator().manual_seed(99))
    return emb


# ------------------------------------------------------------------------------- the reference

def import_reference(path: Path, parts: list[str]) -> types.SimpleNamespace:
    """StreamDiffusionV2's classes from `path`; exits with status 2 where they are not there."""
    if not (path / "models" / "wan" / "causal_stream_inference.py").is_file() or not (path / "streamv2v").is_dir():
        usage_error(f"--sdv2 {path}: no StreamDiffusionV2 there (models/wan/causal_stream_inference.py "
                    f"and streamv2v/ expected)")
    if "vae" in parts and importlib.util.find_spec("einops") is None:
        usage_error("--parts vae: StreamDiffusionV2's VAE uses einops, which is not installed (pip install einops)")
    import diffusers.models.modeling_utils  # noqa: F401  before the stand-ins: diffusers probes these packages
    import transformers  # noqa: F401  StreamDiff's text encoder needs the real one (a dependency of StreamDiff)
    for name in ("ftfy", "regex", "einops"):
        install_stand_in(name)
    sys.path.insert(0, str(path.resolve()))
    try:
        causal_model = importlib.import_module("models.wan.causal_model")
        stream_inference = importlib.import_module("models.wan.causal_stream_inference")
        flow_match = importlib.import_module("models.wan.flow_match")
        wan_wrapper = importlib.import_module("models.wan.wan_wrapper")
        wan_vae = importlib.import_module("models.wan.wan_base.modules.vae")
        wan_t5 = importlib.import_module("models.wan.wan_base.modules.t5")
    except Exception as e:  # whatever fails here, PATH is no usable reference
        usage_error(f"--sdv2 {path}: importing StreamDiffusionV2 failed: {type(e).__name__}: {e}")
    if not Path(causal_model.__file__).resolve().is_relative_to(path.resolve()):
        usage_error(f"--sdv2 {path}: `models` was imported from {causal_model.__file__} instead")
    return types.SimpleNamespace(
        CausalWanModel=causal_model.CausalWanModel,
        Pipeline=stream_inference.CausalStreamInferencePipeline,
        pipeline_module=stream_inference,
        FlowMatchScheduler=flow_match.FlowMatchScheduler,
        Wrapper=wan_wrapper.CausalWanDiffusionWrapper,
        VAEWrapper=wan_wrapper.WanVAEWrapper,
        WanVAE=wan_vae.WanVAE_,
        T5Encoder=wan_t5.T5Encoder,
    )


def install_stand_in(name: str) -> None:
    """A module for `name` where it is not installed: importing names from it works, calling them raises."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def fail(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr}: {name} is not installed (a stand-in)")
        return fail

    module.__getattr__ = missing
    sys.modules[name] = module


def build_reference_model(ref) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ref.CausalWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=16,
                               dim=HEADS * HEAD_DIM, ffn_dim=FFN, freq_dim=256, text_dim=TEXT_DIM, out_dim=16,
                               num_heads=HEADS, num_layers=LAYERS, qk_norm=True, cross_attn_norm=True, eps=1e-6)
    # init_weights zeroes the head and every bias: every parameter random instead, so that the
    # output depends on all of them, the KV cache included.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "modulation" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.float().eval().requires_grad_(False)


def reference_wrapper(ref, model) -> torch.nn.Module:
    """CausalWanDiffusionWrapper around `model`, without its __init__ (which loads Wan weights):
    the attributes its __init__ sets, set the same way."""
    wrapper = ref.Wrapper.__new__(ref.Wrapper)
    torch.nn.Module.__init__(wrapper)
    wrapper.model = model
    wrapper.uniform_timestep = False
    wrapper.scheduler = ref.FlowMatchScheduler(shift=8.0, sigma_min=0.0, extra_one_step=True)
    wrapper.scheduler.set_timesteps(1000, training=True)
    wrapper.seq_len = 32760
    wrapper.post_init()
    return wrapper


def save_reference_checkpoint(ref, model, folder: Path) -> Path:
    """The reference's model.pt: {'generator': the wrapper's state dict}, as its load_model reads it."""
    path = folder / "model.pt"
    torch.save({"generator": reference_wrapper(ref, model).state_dict()}, path)
    return path


def reference_pipeline(ref, model, steps: int, threshold: float, emb: torch.Tensor):
    """CausalStreamInferencePipeline without its __init__ (its wrappers load weights): the
    attributes __init__ and _init_denoising_step_list set, for this geometry."""
    pipe = ref.Pipeline.__new__(ref.Pipeline)
    torch.nn.Module.__init__(pipe)
    pipe.device = "cpu"
    pipe.generator = reference_wrapper(ref, model)
    pipe.text_encoder = lambda text_prompts: {"prompt_embeds": emb.clone()}
    pipe.denoising_step_list = torch.tensor(STEP_LIST[:steps], dtype=torch.long)  # v2v drops the final 0
    pipe.scheduler = pipe.generator.get_scheduler()
    pipe.num_transformer_blocks, pipe.num_heads = LAYERS, HEADS
    pipe.frame_seq_length = FRAME_TOKENS
    pipe.num_kv_cache = WINDOW
    pipe.kv_cache_length = FRAME_TOKENS * WINDOW
    pipe.num_sink_tokens = SINKS
    pipe.adapt_sink_threshold = threshold
    pipe.conditional_dict = pipe.kv_cache1 = pipe.kv_cache2 = pipe.hidden_states = pipe.block_x = None
    pipe.num_frame_per_block = 1
    return pipe


class ReferenceRun:
    """Drives the reference pipeline as streamv2v/inference.py does, serves its torch.randn_like
    from the bank and records each generator output (x0) by (chunk, lane)."""

    def __init__(self, ref, model, steps: int, threshold: float, emb: torch.Tensor):
        for module in model.modules():  # the sink queues (evict_idx) live on the attention modules and outlast a run
            if hasattr(module, "evict_idx"):
                module.evict_idx = None
        self.ref, self.steps = ref, steps
        self.pipe = reference_pipeline(ref, model, steps, threshold, emb)
        self.pipe.generator.register_forward_hook(self._record)
        self.x0: dict[tuple[int, int], torch.Tensor] = {}
        self._rows: list[list] = []  # per generator call to come: each batch row's (chunk, lane), None: a filler
        self._draws: list[tuple] = []  # bank keys of the randn_like calls to come

    def _record(self, module, args, out):
        for key, x0 in zip(self._rows.pop(0), out):
            if key is not None:
                self.x0[key] = x0.clone()

    def _randn_like(self, t, *args, **kwargs):
        key = self._draws.pop(0)
        return bank_noise(key, t.numel() // (16 * LAT_H * LAT_W)).reshape(t.shape).to(t.dtype)

    def _call(self, rows, draws, fn):
        self._rows, self._draws = rows, draws
        with mock.patch.object(self.ref.pipeline_module.torch, "randn_like", self._randn_like):
            fn()
        assert not self._rows and not self._draws, (self._rows, self._draws)

    @torch.no_grad()
    def run(self, calls: int) -> dict[tuple[int, int], torch.Tensor]:
        pipe, steps = self.pipe, self.steps
        noisy = bank_noise((0, 0), 2) * STRENGTH + clean_latents(0) * (1 - STRENGTH)
        self._call([[(0, j)] for j in range(steps)], [(0, j + 1) for j in range(steps - 1)],
                   lambda: pipe.prepare(text_prompts=["p"], device=torch.device("cpu"), dtype=torch.float32,
                                        noise=noisy[None], current_start=0, current_end=2 * FRAME_TOKENS))
        start = 2 * FRAME_TOKENS
        current_step = int(1000 * STRENGTH) - 100
        for c in range(1, calls + 1):
            # run_stream_batch's session: at the restart its start goes back to the window's last
            # frame and counts on from there.
            if start // FRAME_TOKENS >= ROPE_RESTART_FRAME:
                start = pipe.kv_cache_length - FRAME_TOKENS
            noisy = bank_noise((c, 0), 1) * STRENGTH + clean_latents(c) * (1 - STRENGTH)
            rows = [(c - j, j) if c - j >= 1 else None for j in range(steps)]
            draws = [(c - j, j + 1) if c - j >= 1 else (None, c, j) for j in range(steps - 1)]
            self._call([rows], draws, lambda: pipe.inference_stream(
                noise=noisy[None], current_start=start, current_end=start + FRAME_TOKENS, current_step=current_step))
            start += FRAME_TOKENS
        return self.x0


# ------------------------------------------------------------------------------- StreamDiff

class BankVAE:
    """encode_chunk -> the chunk's clean latents; decode_chunk -> one grey frame (x0 is taken in apply_flow)."""

    def __init__(self):
        self.chunk = 0

    def new_state(self):
        return types.SimpleNamespace(reset=lambda: None)

    def encode_chunk(self, pixels, state):
        latents = clean_latents(self.chunk)
        self.chunk += 1
        return latents.permute(1, 0, 2, 3)[None].contiguous()  # [1, 16, F, h, w]

    def decode_chunk(self, x0, state):
        return torch.zeros(1, 3, 1, LAT_H * 8, LAT_W * 8)


class BankNoise:
    """StreamDiff's chunk_noise, served from the bank. Its fillers' draws (chunk index -1,
    re-noised into lane j + 1) are the reference's (None, call, j)."""

    def __init__(self):
        self.call = 0

    def __call__(self, shape, seed, chunk_index, lane, device, dtype):
        key = (None, self.call, lane - 1) if chunk_index == -1 else (chunk_index, lane)
        noise = bank_noise(key, shape[2]).permute(1, 0, 2, 3)[None]  # [1, 16, F, h, w]
        return noise.reshape(shape).to(device=device, dtype=dtype)


def run_streamdiff(checkpoint: Path, steps: int, threshold: float, emb: torch.Tensor,
                   calls: int) -> dict[tuple[int, int], torch.Tensor]:
    """StreamDiff's StreamPipeline on the reference's weights; x0 [F, 16, h, w] by (chunk, lane)."""
    from streamdiff.config import load_config
    from streamdiff.model.build import Components, build_transformer
    from streamdiff.pipeline.stream_pipeline import StreamPipeline
    from streamdiff.sampling.noise_schedule import FlowMatchSchedule

    cfg = load_config("tiny", [
        "runtime.device=cpu", "model.dtype=float32", "model.attention_backend=torch",
        f"model.num_heads={HEADS}", f"model.head_dim={HEAD_DIM}", f"model.ffn_dim={FFN}",
        f"model.num_layers={LAYERS}", f"model.text_dim={TEXT_DIM}",
        "weights.format=sdv2", f"weights.transformer={checkpoint}",
        f"cache.window={WINDOW}", f"cache.sinks={SINKS}", "cache.policy=sdv2", f"cache.refresh_threshold={threshold}",
        f"sampling.steps={steps}", f"sampling.noise_strength={STRENGTH}", "sampling.motion_aware=false",
        "sampling.first_chunk_timestep=first_step", f"video.width={LAT_W * 8}", f"video.height={LAT_H * 8}",
    ])
    cpu = torch.device("cpu")
    text = types.SimpleNamespace(encode=lambda prompt: emb.clone())
    comps = Components(cfg, cpu, torch.float32, build_transformer(cfg, cpu), BankVAE(), text,
                       FlowMatchSchedule(cfg.sampling.shift, cfg.sampling.num_train_timesteps))
    noise = BankNoise()
    with mock.patch("streamdiff.pipeline.stream_state.chunk_noise", noise), torch.no_grad():
        pipe = StreamPipeline(comps, "p", steps=steps)
        x0s = record_x0(pipe)
        grey = np.zeros((5, LAT_H * 8, LAT_W * 8, 3), np.uint8)
        pipe.push(grey)  # the first chunk: 5 frames -> 2 latent frames, prepared at once
        for call in range(1, calls + 1):
            noise.call = call
            pipe.push(grey[:4])
    return x0s


def record_x0(pipe) -> dict[tuple[int, int], torch.Tensor]:
    """Wraps the pipeline's apply_flow to record each chunk's x0 by (chunk, lane); fillers are no chunk."""
    x0s = {}
    apply_flow, schedule = pipe.state.apply_flow, pipe.comps.schedule

    def recording(row, flow):
        lane = row.lane
        if not lane.filler:
            x0 = schedule.flow_to_x0(lane.x, flow, schedule.sigma(lane.t))
            x0s[(lane.chunk, row.j)] = x0[0].permute(1, 0, 2, 3).clone()
        return apply_flow(row, flow)

    pipe.state.apply_flow = recording
    return x0s


# ------------------------------------------------------------------------------- the VAE and the text encoder

VAE_DIM, VAE_FRAMES, VAE_H, VAE_W = 16, 25, 64, 96
T5_DIMS = dict(vocab=500, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=3, num_buckets=32)


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Norm scales away from 1 and biases away from 0, so that a mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def test_video() -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1] on the uint8 grid, as StreamPipeline hands frames to the VAE: moving waves and noise."""
    from streamdiff.pipeline.frames import frames_to_tensor

    gen = torch.Generator().manual_seed(5)
    t = torch.arange(VAE_FRAMES, dtype=torch.float32).view(-1, 1, 1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, VAE_H), torch.linspace(0, 1, VAE_W), indexing="ij")
    waves = [0.7 * torch.sin(6.28 * (xx * (1.5 + c) - 0.04 * t) + 3 * yy + c) * torch.cos(6.28 * (yy + 0.03 * t))
             for c in range(3)]
    video = torch.stack(waves, -1) + 0.15 * torch.randn(VAE_FRAMES, VAE_H, VAE_W, 3, generator=gen)  # [T, H, W, 3]
    return frames_to_tensor(((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())


@torch.no_grad()
def compare_vae(ref, folder: Path) -> list[tuple[str, float]]:
    from streamdiff.model.loading import load_vae
    from streamdiff.model.vae import StreamingVAE

    torch.manual_seed(0)
    model = ref.WanVAE(dim=VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0).eval().requires_grad_(False)
    randomise_(model, 3)
    torch.save(model.state_dict(), folder / "Wan2.1_VAE.pth")
    # WanVAEWrapper without its __init__ (which reads a fixed path): its module, mean and std.
    wrapper = ref.VAEWrapper.__new__(ref.VAEWrapper)
    torch.nn.Module.__init__(wrapper)
    ours_module = load_vae(folder / "Wan2.1_VAE.pth", config=dict(base_dim=VAE_DIM, num_res_blocks=2))
    wrapper.model = model
    wrapper.mean = torch.tensor(ours_module.config.latents_mean)  # diffusers' numbers: the wrapper hard-codes the same
    wrapper.std = torch.tensor(ours_module.config.latents_std)
    video = test_video()
    encode_sizes = [5] + [4] * ((VAE_FRAMES - 5) // 4)
    bounds = np.cumsum([0] + encode_sizes)
    lines, raw = [], None
    for scaled in (False, True):
        model.first_encode, model.first_decode = True, True  # a new stream, as streamv2v/inference.py starts one
        ours = StreamingVAE(ours_module, normalize_latents=scaled)
        state = ours.new_state()
        theirs, mine = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            theirs.append(wrapper.stream_encode(video[:, :, a:b], is_scale=scaled))
            mine.append(ours.encode_chunk(video[:, :, a:b], state))
        theirs, mine = torch.cat(theirs, 2), torch.cat(mine, 2)
        lines.append((f"vae encode, is_scale={scaled} against normalize_latents: {str(scaled).lower()}",
                      (theirs - mine).abs().max().item()))
        # decode its latents: the first call 2 latents, then 1 a call (its stream_decode_to_pixel without the bf16 cast)
        decode_sizes = [2] + [1] * (theirs.shape[2] - 2)
        ends = np.cumsum([0] + decode_sizes)
        scale = [wrapper.mean, 1.0 / wrapper.std]
        state = ours.new_state()
        pix_theirs = torch.cat([model.stream_decode(theirs[:, :, a:b], scale).float().clamp(-1, 1)
                                for a, b in zip(ends[:-1], ends[1:])], 2)
        pix_mine = torch.cat([ours.decode_chunk(theirs[:, :, a:b], state) for a, b in zip(ends[:-1], ends[1:])], 2)
        frames = f"{pix_theirs.shape[2]} frames against {pix_mine.shape[2]}"
        diff = (pix_theirs - pix_mine).abs().max().item() if pix_theirs.shape == pix_mine.shape else math.inf
        lines.append((f"vae decode of those latents, pixels ({frames})", diff))
    return lines


@torch.no_grad()
def compare_text(ref, folder: Path) -> list[tuple[str, float]]:
    from streamdiff.model.loading import load_wan_t5

    torch.manual_seed(0)
    theirs = ref.T5Encoder(**T5_DIMS, shared_pos=False, dropout=0.1).eval()
    state = {k: v.to(torch.bfloat16) for k, v in theirs.state_dict().items()}
    torch.save(state, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    theirs.load_state_dict(state)  # the bf16 file into its fp32 model, as its WanTextEncoder loads it
    mine = load_wan_t5(folder, torch.float32)
    ids = torch.randint(2, T5_DIMS["vocab"], (1, TEXT_LEN), generator=torch.Generator().manual_seed(8))
    real = 341
    mask = (torch.arange(TEXT_LEN) < real).long()[None]
    ids[0, real:] = 0
    a, b = theirs(ids, mask), mine(ids, mask).last_hidden_state
    a[:, real:] = 0  # WanTextEncoder zeroes the padding; so does UMT5PromptEncoder
    b[:, real:] = 0
    return [("text encoder states, umT5 from the original Wan file", (a - b).abs().max().item())]


def part_line(name: str, diff: float, tol: float) -> str:
    return f"{name}: largest difference {diff:.2e}  {'OK' if diff <= tol else 'FAIL'}"


# ------------------------------------------------------------------------------- comparison

def compare(ref_x0: dict, sd_x0: dict, tol: float) -> dict:
    """Max |difference| per (call, lane); the largest, and the first (call, lane) beyond tol."""
    diffs = {}
    for (chunk, lane), x0 in ref_x0.items():
        call = 0 if chunk == 0 else chunk + lane
        other = sd_x0.get((chunk, lane))
        diffs[(call, lane)] = math.inf if other is None else (other - x0).abs().max().item()
    beyond = sorted(key for key, d in diffs.items() if not d <= tol)  # a NaN counts as beyond
    return {"largest": max(diffs.values()), "first_beyond_tol": beyond[0] if beyond else None, "diffs": diffs}


def summary_line(steps: int, threshold: float, result: dict) -> str:
    line = f"steps {steps}, threshold {threshold:g}: largest difference {result['largest']:.2e}"
    if result["first_beyond_tol"] is None:
        return line + "  OK"
    call, lane = result["first_beyond_tol"]
    return line + f"  FAIL from call {call}, lane {lane} ({result['diffs'][(call, lane)]:.2e})"


def as_json(cases: list[tuple[int, float, dict]], args: argparse.Namespace) -> dict:
    return {"calls": args.calls, "tol": args.tol, "cases": [
        {"steps": steps, "threshold": threshold, "largest": result["largest"],
         "first_beyond_tol": result["first_beyond_tol"],
         "diffs": [{"call": call, "lane": lane, "diff": d} for (call, lane), d in sorted(result["diffs"].items())]}
        for steps, threshold, result in cases]}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="flash_attn is not installed")
    try:
        import streamdiff  # before the reference's stand-ins are installed
    except ImportError as e:
        usage_error(f"streamdiff is not importable ({e}): install it (pip install -e .) or run in its environment")
    ref = import_reference(args.sdv2, args.parts)
    dist_info = next(args.sdv2.glob("streamdiffusionv2-*.dist-info"), None)
    version = f" {dist_info.name.removesuffix('.dist-info').split('-')[1]}" if dist_info else ""
    print(f"streamdiff {Path(streamdiff.__file__).parent} vs StreamDiffusionV2{version} {args.sdv2}; "
          f"parts {' '.join(args.parts)}, tol {args.tol:g}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for part, fn in (("vae", compare_vae), ("text", compare_text)):
            if part in args.parts:
                for name, diff in fn(ref, Path(tmp)):
                    print(part_line(name, diff, args.tol), flush=True)
                    ok &= diff <= args.tol
        if "dit" in args.parts:
            model, emb = build_reference_model(ref), prompt_embeds()
            checkpoint = save_reference_checkpoint(ref, model, Path(tmp))
            cases = []
            for steps in args.steps:
                for threshold in args.thresholds:
                    ref_x0 = ReferenceRun(ref, model, steps, threshold, emb).run(args.calls)
                    sd_x0 = run_streamdiff(checkpoint, steps, threshold, emb, args.calls)
                    result = compare(ref_x0, sd_x0, args.tol)
                    print(summary_line(steps, threshold, result), flush=True)
                    cases.append((steps, threshold, result))
                    ok &= result["first_beyond_tol"] is None
            if args.json:
                args.json.write_text(json.dumps(as_json(cases, args), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
