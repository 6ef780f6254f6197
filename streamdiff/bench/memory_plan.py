"""Memory plan of a config on one device: what `streamdiff plan` prints, from a meta-device build.

Owns: the byte counts of everything a serving process holds on the device, how many
streams fit a given device memory, and the one-line warning `render` gives when one stream at
its frame size cannot fit the memory free now, or the machine's at all (`memory_verdict`). Every count comes from
building the real modules (or running the real code) on the `meta` device, so nothing is
allocated and no weights are read:
- weights: the DiT (whole, and per pipeline stage), the VAE the config serves with (Wan, TAEHV,
  or the Wan encoder with a TAEHV decoder), the prompt encoder (umT5 from its folder's
  config.json, or umT5-XXL's architecture when the folder is absent; the tiny and styles tables);
- KV pool: one lane = every layer's K and V for `cache.window` slots of T tokens; a stream
  holds MAX_LANES lanes in ModelRunner's pool (the lanes its steps use, in `kv_needed`);
- prompt K/V: cross-attention K/V of one prompt (ModelRunner keeps streams + 4 of them);
- text embeddings: the prompt encoder's cache (`text.cache_size` prompts);
- VAE caches: a stream's causal-conv caches after its first and a steady chunk (real
  StreamingVAE calls on meta tensors);
- activations: the peak of live tensors while one steady DiT forward (rows = streams x steps)
  and one VAE encode + decode run on meta tensors, measured with a dispatch-mode tracker, as an
  affine law in rows (two runs). The attention op is replaced by its memory on the device:
  the Triton kernels read the pool in place (an output only); the torch path gathers
  each row's window (a copy). SDPA itself (self and cross) is a fused kernel on CUDA and CPU
  (an output, no score matrix).
- reserve: CUDA context and allocator slack (default 1 GiB), not a tensor.
Does not own: the allocations themselves (ModelRunner, KVPool, StreamingVAE) or admission.

Fit: device = reserve + weights on the device (an offloaded prompt encoder counts: it must fit
while it encodes) + text embeddings + streams x (KV pool of a
stream + VAE caches + prompt K/V) + 4 spare prompt K/V + activations(streams). `max_streams`
uses the pool as ModelRunner allocates it (MAX_LANES lanes a stream); `max_streams_steps_lanes`
the pool if it held only `steps` lanes.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from streamdiff.config import Config, with_overrides
from streamdiff.model.build import available_bytes

GiB = 2**30
DEFAULT_RESERVE_BYTES = GiB
SPARE_PROMPTS = 4  # ModelRunner keeps max_streams + 4 prompts' K/V
# umT5-XXL encoder (Wan's text encoder), used when weights.text_encoder has no config.json.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive now minus at entry (`current`) and its maximum (`peak`).
    Storages made inside the mode count when made; `existing` (tensors made before: weights,
    pool, caches, inputs) count only when freed (a replaced cache), and an in-place op or a
    view returning their storage is not new memory."""

    def __init__(self, existing=()):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        for t in existing:
            st = t.untyped_storage()
            if st not in self._seen:
                self._seen[st] = True
                weakref.finalize(st, self._free, st.nbytes())
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    self._seen[st] = True
                    nbytes = st.nbytes()
                    self.current += nbytes
                    weakref.finalize(st, self._free, nbytes)
        self.peak = max(self.peak, self.current)
        return out


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass
class MemoryPlan:
    config: str
    device_type: str
    resolution: str
    steps: int
    dtype: str
    attention_backend: str
    tokens_per_frame: int
    dit_weights: int
    stage_weights: list[int]  # per pipeline stage: its blocks + the parts it holds
    stage_blocks: list[int]
    vae_weights: int
    text_weights: int
    text_placement: str  # "device", "cpu" or "offloaded" (on the device only while encoding)
    kv_lane: int
    kv_stream: int  # MAX_LANES lanes, as ModelRunner allocates
    kv_needed: int  # `steps` lanes
    prompt_kv: int
    text_cache: int
    vae_cache_stream: int
    vae_dec_cache_stream: int  # the decoder's share of vae_cache_stream (a VAE decode stage holds it)
    act_dit_fixed: int
    act_dit_row: int
    act_vae_fixed: int
    act_vae_stream: int
    reserve: int = DEFAULT_RESERVE_BYTES
    vae_stages: bool = False  # parallel.vae_stages: VAE encode and decode on stages of their own
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- derived
    @property
    def weights_on_device(self) -> int:
        text = self.text_weights if self.text_placement != "cpu" else 0
        return self.dit_weights + self.vae_weights + text

    def activations(self, streams: int) -> int:
        dit = self.act_dit_fixed + self.act_dit_row * streams * self.steps
        vae = self.act_vae_fixed + self.act_vae_stream * streams
        return max(dit, vae)  # the phases run one after another

    def per_stream(self, lanes_needed_only: bool = False) -> int:
        kv = self.kv_needed if lanes_needed_only else self.kv_stream
        return kv + self.vae_cache_stream + self.prompt_kv

    def total(self, streams: int, lanes_needed_only: bool = False) -> int:
        return (self.reserve + self.weights_on_device + self.text_cache + SPARE_PROMPTS * self.prompt_kv
                + streams * self.per_stream(lanes_needed_only) + self.activations(streams))

    def max_streams(self, device_bytes: int, lanes_needed_only: bool = False) -> int:
        """The most streams whose total fits `device_bytes` (total grows with streams)."""
        return _largest(lambda n: self.total(n, lanes_needed_only) <= device_bytes)

    # ---------------------------------------------------------------- one device a stage
    @property
    def split(self) -> bool:
        """Stages on devices of their own (parallel.num_stages > 1 or VAE stages)."""
        return len(self.stage_blocks) > 1 or self.vae_stages

    def devices(self) -> list[str]:
        """The names of the devices a split model runs on, in order (`device_total`'s keys)."""
        dit = [f"stage {k}" for k in range(len(self.stage_blocks))]
        return ["VAE encode", *dit, "VAE decode"] if self.vae_stages else dit

    def device_total(self, device: str, streams: int, lanes_needed_only: bool = False) -> int:
        """What one device of a split model holds with `streams` streams (model_runner's
        stage_components): a DiT stage its blocks' weights, KV and prompt K/V; the first also the
        prompt encoder and its cache; the VAE (all of it, and the caches of its half) on the first
        and last DiT stages, or on VAE stages of their own. Activations: a block's forward peaks
        alike on every stage (the DiT phase), the VAE's phase where the VAE runs."""
        enc_cache = self.vae_cache_stream - self.vae_dec_cache_stream
        dit_act = self.act_dit_fixed + self.act_dit_row * streams * self.steps
        vae_act = self.act_vae_fixed + self.act_vae_stream * streams
        if device.startswith("VAE"):
            cache = enc_cache if device == "VAE encode" else self.vae_dec_cache_stream
            return self.reserve + self.vae_weights + streams * cache + vae_act
        k = int(device.split()[1])
        share = self.stage_blocks[k] / sum(self.stage_blocks)
        first, last = k == 0, k == len(self.stage_blocks) - 1
        kv = self.kv_needed if lanes_needed_only else self.kv_stream
        total = self.reserve + self.stage_weights[k] + round(share * (SPARE_PROMPTS + streams) * self.prompt_kv)
        total += streams * round(share * kv)
        if first:
            total += (self.text_weights if self.text_placement != "cpu" else 0) + self.text_cache
        holds_vae = not self.vae_stages and (first or last)
        if holds_vae:
            total += self.vae_weights + streams * ((enc_cache if first else 0) + (self.vae_dec_cache_stream if last else 0))
        return total + (max(dit_act, vae_act) if holds_vae else dit_act)

    def max_streams_split(self, device_bytes: int, lanes_needed_only: bool = False) -> tuple[int, str]:
        """The most streams every device of a split model (each of `device_bytes`) holds, and the
        device that limits it (the one fullest at one stream more)."""
        def fits(n: int) -> bool:
            return all(self.device_total(d, n, lanes_needed_only) <= device_bytes for d in self.devices())

        n = _largest(fits)
        tightest = max(self.devices(), key=lambda d: self.device_total(d, n + 1, lanes_needed_only))
        return n, tightest

    def to_dict(self, device_bytes: int | None = None) -> dict:
        out = asdict(self)
        out.update(weights_on_device=self.weights_on_device, per_stream=self.per_stream(),
                   activations_1=self.activations(1))
        if device_bytes is not None:
            out.update(device_bytes=device_bytes, max_streams=self.max_streams(device_bytes),
                       max_streams_steps_lanes=self.max_streams(device_bytes, True))
            if self.split:  # one device a stage, each of device_bytes
                n, tightest = self.max_streams_split(device_bytes)
                out.update(max_streams_split=n, max_streams_split_steps_lanes=self.max_streams_split(device_bytes, True)[0],
                           split_limited_by=tightest,
                           device_totals_1={d: self.device_total(d, 1) for d in self.devices()})
        return out


def _largest(fits) -> int:
    """The largest n >= 0 with fits(n), for a `fits` true up to some n and false after it."""
    lo, hi = 0, 1
    while fits(hi) and hi < 2**30:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo) (or lo == 0), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------- building


def plan_memory(cfg: Config, device_type: str = "cuda", width: int | None = None, height: int | None = None,
                steps: int | None = None, reserve: int = DEFAULT_RESERVE_BYTES) -> MemoryPlan:
    """The plan of `cfg` at width x height and `steps` on a `device_type` device (no allocation)."""
    from streamdiff.engine.model_runner import MAX_LANES
    from streamdiff.model.build import DTYPES
    from streamdiff.model.causal_wan import CausalWanModel

    width, height = width or cfg.video.width, height or cfg.video.height
    steps = steps or cfg.sampling.steps
    cfg = with_overrides(cfg, video={"width": width, "height": height}, sampling={"steps": steps})
    dtype = DTYPES[cfg.model.dtype]
    m = cfg.model
    tokens = (height // 16) * (width // 16)
    backend = _planned_backend(cfg, device_type)
    notes = []

    # 1. Weights (meta builds), per stage too.
    with torch.device("meta"):
        model = CausalWanModel(m, None, True, True, _PlanAttention(backend, device_type)).cast_(dtype).eval()
    dit = module_bytes(model)
    stage_blocks, stage_weights = _stages(cfg, model)
    vae = _meta_vae(cfg, dtype)
    text_weights, text_note = _text_weights(cfg, dtype)
    if text_note:
        notes.append(text_note)
    # a CLI probe: the demo "fits 526 streams" while the preset serves 4, and nothing said so
    notes.append(f"the config serves at most {cfg.cache.max_streams} stream{'s' if cfg.cache.max_streams != 1 else ''} "
                 f"(cache.max_streams, `--set cache.max_streams=N` to change): the fits above are what this memory "
                 f"would hold")
    if cfg.runtime.cuda_graphs:
        notes.append("runtime.cuda_graphs: captured graphs keep one memory pool, not counted here: about the "
                     "intermediates of the largest (a serving warm-up captures every rows bucket the KV pool "
                     "allows); with a pool per graph, a 1.3B stream's graphs took +6.7 GiB at 512x512 on an H200, "
                     "+10 GiB at 832x480")
    placement = "cpu" if cfg.text.device == "cpu" or cfg.text.kind in ("tiny", "styles") else (
        "offloaded" if cfg.text.offload_after_encode else "device")  # the tiny and styles tables stay on the CPU

    # 2. KV pool, prompt K/V, text cache.
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_lane = 2 * m.num_layers * cfg.cache.window * tokens * m.num_heads * m.head_dim * itemsize
    text_states = torch.zeros(1, cfg.text.max_length, m.text_dim, dtype=dtype, device="meta")
    with torch.no_grad():
        cross = model.prompt_kv(text_states)
    prompt_kv = sum(k.nbytes + v.nbytes for k, v in cross.values())
    text_cache = cfg.text.cache_size * cfg.text.max_length * m.text_dim * itemsize

    # 3. Activations: one steady DiT forward at 1 and 2 rows; VAE at 1 and 2 streams.
    d1, d2 = (_dit_peak(cfg, model, cross, rows, tokens, dtype) for rows in (1, 2))
    (v1, cache1, dec1), (v2, _, _) = (_vae_peak(vae, cfg, b, width, height) for b in (1, 2))
    return MemoryPlan(
        config=cfg.name, device_type=device_type, resolution=f"{width}x{height}", steps=steps, dtype=cfg.model.dtype,
        attention_backend=backend, tokens_per_frame=tokens, dit_weights=dit, stage_weights=stage_weights,
        stage_blocks=stage_blocks, vae_weights=sum(module_bytes(m) for m in _vae_modules(vae)), text_weights=text_weights,
        text_placement=placement, kv_lane=kv_lane, kv_stream=MAX_LANES * kv_lane, kv_needed=steps * kv_lane,
        prompt_kv=prompt_kv, text_cache=text_cache, vae_cache_stream=cache1, vae_dec_cache_stream=dec1,
        vae_stages=cfg.parallel.vae_stages,
        act_dit_fixed=max(2 * d1 - d2, 0), act_dit_row=d2 - d1, act_vae_fixed=max(2 * v1 - v2, 0),
        act_vae_stream=v2 - v1, reserve=reserve, notes=notes)


def _planned_backend(cfg: Config, device_type: str) -> str:
    """torch | triton | auto (CUDA: the Triton write, and attention by Triton or SDPA over a
    gathered copy per shape, model/attention.py; planned with the copy, the larger)."""
    requested = cfg.model.attention_backend
    if requested == "auto":
        return "auto" if device_type == "cuda" else "torch"
    return requested


class _PlanAttention:
    """The attention calls of the model with their device memory, runnable on meta tensors."""

    def __init__(self, backend: str, device_type: str):
        from streamdiff.kernels.cache_write import cache_write_ref

        self.backend, self.device_type, self._write = backend, device_type, cache_write_ref

    def write(self, k, v, k_pool, v_pool, write_slots, write_pos, freqs_cos, freqs_sin, split, grid) -> None:
        self._write(k, v, k_pool, v_pool, write_slots, write_pos, freqs_cos, freqs_sin, split, grid)

    def attend(self, q, k_pool, v_pool, batch):
        if self.backend == "triton":
            return torch.empty_like(q)  # the kernels read the pool in place  # [B, N, H, D]
        b, _, heads, head_dim = q.shape
        index = batch.slot_table.long()  # steady state: every slot valid
        k = k_pool[index].reshape(b, -1, heads, head_dim)  # [B, M*T, H, D]
        v = v_pool[index].reshape(b, -1, heads, head_dim)
        return self._sdpa(q, k, v)

    def cross(self, q, k, v):
        return self._sdpa(q, k.to(q.dtype), v.to(q.dtype))

    def _sdpa(self, q, k, v):
        # SDPA without a mask runs a fused kernel on CUDA and on CPU (flash): no score matrix,
        # an output only. (On meta it would run the math decomposition instead.)
        return torch.empty_like(q)  # [B, N, H, D]


def _stages(cfg: Config, model) -> tuple[list[int], list[int]]:
    from streamdiff.parallel.partition import balance

    layers, n = cfg.model.num_layers, max(cfg.parallel.num_stages, 1)
    counts = list(cfg.parallel.partition) or balance(layers, [0.0] * n, [1.0] * n)
    per_block = module_bytes(model.blocks["0"])
    shared = module_bytes(model.condition_embedder) + module_bytes(model.rope)
    embed = module_bytes(model.patch_embedding)
    head = module_bytes(model) - module_bytes(model.blocks) - shared - embed
    weights = [c * per_block + shared + (embed if k == 0 else 0) + (head if k == len(counts) - 1 else 0)
               for k, c in enumerate(counts)]
    return counts, weights


def _meta_vae(cfg: Config, dtype: torch.dtype):
    """The streaming VAE the config serves with (model/build.py `build_streaming_vae`'s three
    cases: Wan, TAEHV both ways, Wan encoder + TAEHV decoder), on the meta device."""
    from streamdiff.model.taehv import TAEHV, HybridVAE, StreamingTAEHV
    from streamdiff.model.vae import StreamingVAE, build_vae

    def cast(module):
        for t in [*module.parameters(), *module.buffers()]:  # (module.to(dtype) makes diffusers warn)
            t.data = t.data.to(dtype)
        return module

    with torch.device("meta"):
        if cfg.vae.kind == "taehv":
            return StreamingTAEHV(cast(TAEHV.from_config(cfg.vae)))
        wan = StreamingVAE(cast(build_vae(cfg.vae)), cfg.vae.normalize_latents)
        if cfg.vae.decoder == "taehv":
            return HybridVAE(wan, StreamingTAEHV(cast(TAEHV.from_config(cfg.vae))))
        return wan


def _vae_modules(vae) -> list[torch.nn.Module]:
    """Every module a streaming VAE keeps resident (the hybrid: the Wan VAE and the TAEHV)."""
    from streamdiff.model.taehv import HybridVAE

    return [vae.wan.vae, vae.taehv.net] if isinstance(vae, HybridVAE) else [vae.vae]


def _text_weights(cfg: Config, dtype: torch.dtype) -> tuple[int, str]:
    if cfg.text.kind == "tiny":
        from streamdiff.model.text import TinyPromptEncoder

        enc = TinyPromptEncoder(cfg.model.text_dim, max_length=cfg.text.max_length, seed=cfg.weights.seed)
        return sum(t.nbytes for t in vars(enc).values() if isinstance(t, torch.Tensor)), ""
    if cfg.text.kind == "styles":  # the demo's prompt table: one [max_length, text_dim] row per prompt (fp32)
        from streamdiff.model.style_prompts import PROMPT_NAMES

        return len(PROMPT_NAMES) * cfg.text.max_length * cfg.model.text_dim * 4, ""
    from transformers import UMT5Config, UMT5EncoderModel

    from streamdiff.model.loading import wan_t5_config, wan_t5_file
    from streamdiff.model.text import find_text_encoder

    try:
        source = find_text_encoder(cfg.weights.text_encoder)
    except FileNotFoundError:
        source = None
    if source is not None and source.is_file():  # the original Wan file: the architecture from its shapes
        conf, note = UMT5Config(**wan_t5_config(wan_t5_file(source))), ""
    elif source is not None:
        conf, note = UMT5Config.from_pretrained(source), ""
    else:
        conf, note = UMT5Config(**UMT5_XXL), "text encoder: umT5-XXL architecture assumed (no config.json found)"
    with torch.device("meta"):
        enc = UMT5EncoderModel(conf)
    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # fp16 requests run umT5 in bf16
    return sum(p.numel() for p in enc.parameters()) * torch.empty((), dtype=text_dtype).element_size(), note


def _dit_peak(cfg: Config, model, cross, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """Peak live bytes of one steady forward of `rows` rows (full windows), outputs included."""
    from streamdiff.cache.kv_cache import AttnBatch, KVPool
    from streamdiff.cache.slots import SlotTable

    m, window, frames = cfg.model, cfg.cache.window, cfg.sampling.chunk_latents
    slots = SlotTable.from_config(rows * window, cfg.cache, m.rope_max_seq_len)
    for r in range(rows):
        slots.add_stream(r, 1)
        slots.lane(r, 0).plan(cfg.sampling.first_chunk_latents)
        while not slots.lane(r, 0).filled == window:  # the measured forward attends to a full window
            slots.lane(r, 0).plan(frames)
    plans = [slots.lane(r, 0).plan(frames) for r in range(rows)]
    pool = KVPool(model.layer_ids, rows * window, tokens, m.num_heads, m.head_dim, dtype, "meta", window)
    h, w = cfg.video.height // 8, cfg.video.width // 8
    x = torch.zeros(rows, m.in_channels, frames, h, w, dtype=dtype, device="meta")  # [B, 16, F, h, w]
    timestep = torch.zeros(rows, frames, device="meta")  # [B, F]
    batch = AttnBatch.from_plans(plans, "meta", window, cfg.cache.refresh_threshold, cfg.cache.policy)
    stacked = model.stack_prompt_kv([cross] * rows)
    existing = [*model.parameters(), *model.buffers(), *model.rope_tables(), *(getattr(pool, n) for n in pool.STATE), x, timestep,
                *[t for kv in stacked.values() for t in kv], *[t for t in vars(batch).values() if isinstance(t, torch.Tensor)]]
    with torch.no_grad(), LiveBytes(existing) as live:
        out = model(x, timestep, stacked, batch, pool)
        del out
    return live.peak


def _vae_peak(vae, cfg: Config, streams: int, width: int, height: int) -> tuple[int, int, int]:
    """(peak live bytes of a steady encode + decode of `streams` streams, cache bytes of one
    stream, the decoder's share of them)."""
    state = vae.new_state()
    dtype = vae.dtype
    first = torch.zeros(streams, 3, 5, height, width, dtype=dtype, device="meta")
    with torch.no_grad():
        lat = vae.encode_chunk(first, state)
        vae.decode_chunk(lat, state)
        chunk = torch.zeros(streams, 3, 4, height, width, dtype=dtype, device="meta")

        def existing(*inputs):
            cached = [t for t in state.enc_cache + state.dec_cache if isinstance(t, torch.Tensor)]
            return [t for m in _vae_modules(vae) for t in (*m.parameters(), *m.buffers())] + [*cached, *inputs]

        with LiveBytes(existing(chunk)) as live:
            lat = vae.encode_chunk(chunk, state)
            enc_peak = live.peak
        with LiveBytes(existing(lat)) as live:
            out = vae.decode_chunk(lat, state)
            dec_peak = live.peak
            del out
    dec_cache = sum(t.nbytes for t in state.dec_cache if isinstance(t, torch.Tensor))
    return max(enc_peak, dec_peak), state.cache_bytes() // streams, dec_cache // streams


# ---------------------------------------------------------------------------------- printing


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB' (taken as GiB, as cards are sold), '80G', '1TiB', '16384MiB', '1e9' -> bytes;
    a device's memory only (64 MiB to 16 TiB): '24' (24 bytes, a unit forgotten), '0' or '1e30GiB'
    planned "no stream" or a billion streams before."""
    t = text.strip().lower().replace(" ", "")
    units = {"tib": 2**40, "tb": 2**40, "t": 2**40, "gib": GiB, "gb": GiB, "g": GiB,
             "mib": 2**20, "mb": 2**20, "m": 2**20, "b": 1}
    scale, number = 1, t
    for suffix, unit in units.items():
        if t.endswith(suffix):
            scale, number = unit, t[: -len(suffix)]
            break
    try:
        n = int(float(number) * scale)
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GiB, 16384MiB)") from None
    if not 64 * 2**20 <= n <= 2**44:
        raise ValueError(f"{text!r} is not a device's memory: 64 MiB to 16 TiB, with a unit (e.g. 24GiB, 80GB)")
    return n


def format_plan(plan: MemoryPlan, device_bytes: int) -> str:
    def g(n: int) -> str:
        return f"{n / GiB:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"

    lines = [f"memory plan: {plan.config} at {plan.resolution}, {plan.steps} step(s), {plan.dtype}, "
             f"attention {plan.attention_backend}, {plan.tokens_per_frame} tokens per latent frame, "
             f"device {device_bytes / GiB:.1f} GiB ({plan.device_type})",
             f"  weights: DiT {g(plan.dit_weights)}  VAE {g(plan.vae_weights)}  "
             f"prompt encoder {g(plan.text_weights)} ({plan.text_placement})"]
    if len(plan.stage_blocks) > 1:
        for k, (n, b) in enumerate(zip(plan.stage_blocks, plan.stage_weights)):
            lines.append(f"    stage {k}: {n} block{'s' if n != 1 else ''}, {g(b)} of DiT weights, KV {g(plan.kv_stream * n // sum(plan.stage_blocks))} per stream")
    if plan.vae_stages:
        enc_cache = plan.vae_cache_stream - plan.vae_dec_cache_stream
        lines.append(f"    VAE stages: encode and decode each hold the VAE ({g(plan.vae_weights)}); VAE caches "
                     f"{g(enc_cache)} per stream on the encode stage, {g(plan.vae_dec_cache_stream)} on the decode stage")
    lines += [
        f"  KV pool: {g(plan.kv_lane)} per lane; {g(plan.kv_stream)} per stream (4 lanes allocated), "
        f"{g(plan.kv_needed)} for {plan.steps} lane(s)",
        f"  per stream: VAE caches {g(plan.vae_cache_stream)}, prompt K/V {g(plan.prompt_kv)}",
        f"  activations: {g(plan.activations(1))} at 1 stream; each stream more adds {g(plan.act_dit_row * plan.steps)} "
        f"to the DiT's phase and {g(plan.act_vae_stream)} to the VAE's (the phases run in turn: the larger counts)",
        f"  fixed: reserve {g(plan.reserve)}, text embedding cache {g(plan.text_cache)}, "
        f"{SPARE_PROMPTS} spare prompt K/V {g(SPARE_PROMPTS * plan.prompt_kv)}",
    ]
    if plan.split:  # the answer a user with one device a stage asks for
        n, tightest = plan.max_streams_split(device_bytes)
        n_steps = plan.max_streams_split(device_bytes, True)[0]
        used = ", ".join(f"{d} {g(plan.device_total(d, max(n, 1)))}" for d in plan.devices())
        if n:
            lines.append(f"  fits, one {device_bytes / GiB:.1f} GiB device a stage: {n} stream(s) ({used}); {tightest} "
                         f"is the fullest; {n_steps} if the pool held only {plan.steps} lane(s) a stream")
        else:
            lines.append(f"  fits, one {device_bytes / GiB:.1f} GiB device a stage: no stream (1 stream needs {used}); "
                         f"{n_steps} with {plan.steps}-lane pools")
    n, n_steps = plan.max_streams(device_bytes), plan.max_streams(device_bytes, True)
    whole = "  the whole model on one device: " if plan.split else "  fits: "
    if n:
        lines.append(f"{whole}{n} stream(s) ({g(plan.total(n))} used); {n_steps} if the pool held only "
                     f"{plan.steps} lane(s) a stream")
    else:
        lines.append(f"{whole}no stream (1 stream needs {g(plan.total(1))}; {n_steps} with {plan.steps}-lane pools)")
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def write_plan_json(plan: MemoryPlan, device_bytes: int | list[int], path: str | Path) -> Path:
    """The plan and its fit on the first device size; with several sizes (`--gpu-mem 16GB,80GB`)
    every size's fit too, under `fits` (a probe: the file held the first size's only)."""
    sizes = device_bytes if isinstance(device_bytes, list) else [device_bytes]
    out = plan.to_dict(sizes[0])
    if len(sizes) > 1:
        keys = ("device_bytes", "max_streams", "max_streams_steps_lanes", "max_streams_split",
                "max_streams_split_steps_lanes", "split_limited_by")
        out["fits"] = [{k: v for k, v in plan.to_dict(size).items() if k in keys} for size in sizes]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return path


def memory_verdict(cfg: Config, width: int, height: int, available: int | None = None,
                   total: int | None = None) -> tuple[bool, str] | None:
    """(fatal, one line) when one stream of `cfg` at width x height needs more memory than is
    free (`streamdiff plan`'s count, the lanes its steps need only), else None. Fatal when it
    needs more than the machine (or device) has at all: such a CPU run grows for minutes and is
    then killed without a word (a probe: 7680x4320 needed 26.2 GiB on a 24 GB machine)."""
    device = cfg.runtime.device
    if device == "auto":  # as the run will resolve it
        device = "cuda" if torch.cuda.is_available() else "cpu"
    have = available if available is not None else available_bytes(device)
    need = plan_memory(cfg, device, width, height).total(1, lanes_needed_only=True)
    if have is None or need <= have:
        return None
    whole = total if total is not None else available_bytes(device, total=True)
    fatal = whole is not None and need > whole
    said = (f"{have / GiB:.1f} GiB is free" if not fatal else
            f"this {'machine' if device == 'cpu' else 'device'} has {whole / GiB:.1f} GiB in all")
    return fatal, (f"{width}x{height} needs about {need / GiB:.1f} GiB ({device}; streamdiff plan --resolution "
                   f"{width}x{height}) and {said}: this run {'cannot fit' if fatal else 'will likely run out of memory'}; "
                   f"a smaller --size (the preset's is {cfg.video.width}x{cfg.video.height}) fits")


__all__ = ["LiveBytes", "MemoryPlan", "available_bytes", "format_plan", "memory_verdict", "module_bytes", "parse_bytes",
           "plan_memory", "write_plan_json"]
