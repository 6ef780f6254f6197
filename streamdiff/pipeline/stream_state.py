"""One stream's state and the per-chunk math, shared by StreamPipeline and the engine.

Owns: everything one stream carries from chunk to chunk — its VAE caches, motion controller,
the lanes in flight (stream batch), the chunk counter, its prompt (cross-attention K/V, with an
optional linear blend over a few chunks), seed, denoise steps and its lanes in a `SlotTable` —
and the per-chunk steps, in order:
  1. `encode(frames)`: VAE-encode, motion-aware strength, noise -> the chunk's lane-0 `Lane`
     (split as `pixels` -> VAE -> `start_chunk` for callers that batch the VAE);
  2. rows: `enter(lane)` (stream batch: lanes shift, one `Row` per occupied lane; under `sdv2`
     the first streamed chunk brings StreamDiffusionV2's fillers into the lanes it has not
     reached, `filler_rows`) or
     `start_sequential(lane)` (a first chunk, or every chunk without stream batch: the denoise
     steps one after another, one `Row` at a time, next one in `state.sequential`);
  3. `forward_rows(model, pool, rows)`: one DiT forward over rows of ANY streams that write the
     same number of latent frames (plans their slots, re-bases, stacks prompt K/V);
  4. `apply_flow(row, flow)`: x0 = x - sigma v, then re-noise into the next lane, or finish;
  5. `decode(x0)` -> uint8 frames.
Does not own: the KV pool tensors and the slot table (the caller's: StreamPipeline has one for
its stream, the engine's ModelRunner one for all streams), batching policy, frame buffering.

StreamPipeline runs these steps for its single stream; the engine's ModelRunner runs them for
many streams at once, putting the rows of all streams into one forward. Keeping the math here
is what makes "engine with N streams == N pipelines" hold by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool
from streamdiff.cache.slots import SlotTable, WritePlan
from streamdiff.config import CacheConfig, Config, frames_for_latents
from streamdiff.model.build import Components
from streamdiff.model.causal_wan import CausalWanModel, CrossKV
from streamdiff.model.dit_step import DiTStep
from streamdiff.pipeline.frames import frames_to_tensor, tensor_to_frames
from streamdiff.sampling.motion import MotionController
from streamdiff.sampling.noise_schedule import chunk_noise, strength_to_timestep, timesteps_for


FILLER_CHUNK = -1  # the chunk index of StreamDiffusionV2's fillers (`StreamState.filler_rows`): their own noise


@dataclass
class Lane:
    """A chunk in flight: its latent at the noise level of timestep `t`. `tag` rides along
    untouched (the engine puts the chunk's input frame ids / pts there). The live parameters
    the chunk entered with stay attached to it until it leaves: its prompt (cross-attention
    K/V, and for pipeline stages the condition key and blend embedding) and its seed."""

    x: torch.Tensor  # [1, 16, F, h, w]
    t: int | torch.Tensor  # a motion-aware first lane keeps its timestep on the device (0-dim int64)
    chunk: int
    tag: object = None
    cross_kv: CrossKV | None = None
    cond_key: tuple = ()
    cond_emb: torch.Tensor | None = None
    seed: int = 0

    @property
    def filler(self) -> bool:
        """sdv2: a stand-in in a lane no chunk has reached yet (`filler_rows`); never shown."""
        return self.chunk == FILLER_CHUNK


@dataclass
class Row:
    """One batch row of a forward: stream `state`, lane index `j` (= denoise step), its chunk."""

    state: "StreamState"
    j: int
    lane: Lane
    sequential: bool = False  # True: the chunk runs its steps one after another (prepare)


class StreamState:
    """Per-stream state over a shared `SlotTable` (see the module docstring).

    The stream's lanes are allocated in `slots` under `stream_id` on construction and given
    back by `release()` (`kv_lanes`: exactly these lanes, as the engine's scheduler allocated
    them; None: the lowest free ones). `prompt_kv` turns a prompt into cross-attention K/V (default: encode
    with `comps.text` and project with the model); the engine passes a shared cache.
    """

    def __init__(
        self,
        comps: Components,
        stream_id: object,
        slots: SlotTable,
        prompt: str,
        steps: int | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        noise_strength: float | None = None,
        motion_aware: bool | None = None,
        prompt_kv: Callable[[str], CrossKV] | None = None,
        stride: int = 1,
        kv_lanes: tuple[int, ...] | None = None,
    ):
        cfg = comps.cfg
        self.comps = comps
        self.model: CausalWanModel = comps.model
        self.stream_id = stream_id
        self.slots = slots
        self.steps = steps or cfg.sampling.steps
        self.timesteps = timesteps_for(self.steps, cfg.sampling.timesteps)
        self.seed = cfg.sampling.seed if seed is None else seed
        self.width = width or cfg.video.width
        self.height = height or cfg.video.height
        if self.width % 16 or self.height % 16:
            raise ValueError(f"frame size {self.width}x{self.height} must be a multiple of 16 in both sides")
        self.first_latents = cfg.sampling.first_chunk_latents
        self.chunk_latents = cfg.sampling.chunk_latents
        self._prompt_kv = prompt_kv or self._encode_prompt_kv
        # 1. Prompt: current cross K/V, and the blend in progress (embeddings, chunks done/total).
        self.prompt = prompt
        self.cross_kv: CrossKV = self._prompt_kv(prompt)
        # What conditions the rows now, for pipeline stages that project their own prompt K/V:
        # ("prompt", text) for a plain prompt, ("blend", stream, n) with `cond_emb` for a mix.
        self.cond_key: tuple = ("prompt", prompt)
        self.cond_emb: torch.Tensor | None = None
        self._blend_serial = 0
        self._blend: tuple[torch.Tensor, torch.Tensor, int, int] | None = None  # (from, to, done, total)
        self._emb: torch.Tensor | None = None  # text embeddings of the current K/V when blending
        # 2. VAE caches, motion, lanes; last, the stream's lanes in the slot table (one window
        #    per denoise step), so that nothing is left allocated if an earlier step fails.
        self.vae_state = comps.vae.new_state() if comps.vae is not None else None  # None: a VAE stage holds it
        strength = cfg.sampling.noise_strength if noise_strength is None else noise_strength
        aware = cfg.sampling.motion_aware if motion_aware is None else motion_aware
        self.motion = MotionController(strength, aware)
        if stride < 1:
            raise ValueError(f"lane stride must be >= 1, got {stride}")
        self.stride = stride
        self.pipe: list[Lane | None] = [None] * ((self.steps - 1) * stride + 1)  # position i: entered i forwards ago
        self.sequential: Row | None = None  # the next row of a chunk denoised step by step
        self.chunk_index = 0
        self.copy_due = False  # sdv2: the prepare is done; the next forward copies its last lane (`plan_rows`)
        slots.add_stream(stream_id, self.steps, kv_lanes)

    # ------------------------------------------------------------------ controls

    def _encode_prompt_kv(self, prompt: str) -> CrossKV:
        return self.model.prompt_kv(self.comps.text.encode(prompt))

    def set_prompt(self, prompt: str, blend_chunks: int = 0) -> None:
        """Swap the cross-attention K/V now (blend_chunks=0), or blend the text embeddings
        linearly from the current ones to the new prompt's over the next `blend_chunks` chunks
        (chunk i of k uses (1 - i/k)·old + (i/k)·new). Caches and lanes carry on."""
        if blend_chunks <= 0:
            self.prompt, self._blend, self._emb = prompt, None, None
            self.cross_kv = self._prompt_kv(prompt)
            self.cond_key, self.cond_emb = ("prompt", prompt), None
            return
        text = self.comps.text
        # Blend from what conditions the stream now: a blend's current mix, its start if it has
        # not advanced yet, else the current prompt.
        if self._emb is not None:
            start = self._emb  # [1, L, D]
        elif self._blend is not None:
            start = self._blend[0]
        else:
            start = text.encode(self.prompt)
        self.prompt = prompt
        self._blend = (start, text.encode(prompt), 0, int(blend_chunks))

    def apply_live(self, params, prompt_changed: bool) -> None:
        """A stream's live parameters (prompt, prompt_blend_chunks, seed, noise_strength,
        motion_aware attributes) from its next chunk on; lanes and caches carry on."""
        if prompt_changed:
            self.set_prompt(params.prompt, params.prompt_blend_chunks)
        self.seed = params.seed
        self.motion.base_strength = params.noise_strength
        self.motion.enabled = params.motion_aware

    def _advance_blend(self) -> None:
        if self._blend is None:
            return
        start, target, done, total = self._blend
        done += 1
        if done >= total:
            self._blend, self._emb = None, None
            self.cross_kv = self._prompt_kv(self.prompt)
            self.cond_key, self.cond_emb = ("prompt", self.prompt), None
            return
        alpha = done / total
        self._emb = (1.0 - alpha) * start + alpha * target  # [1, L, D]
        self.cross_kv = self.model.prompt_kv(self._emb)
        self._blend_serial += 1
        self.cond_key, self.cond_emb = ("blend", self.stream_id, self._blend_serial), self._emb
        self._blend = (start, target, done, total)

    @property
    def frames_needed(self) -> int:
        """Video frames the next chunk takes: 1 + 4 (F-1) for the first chunk (5), then 4 F."""
        first = self.chunk_index == 0
        return frames_for_latents(self.first_latents if first else self.chunk_latents, first)

    @property
    def in_flight(self) -> bool:
        """True while a chunk sits in a lane (its output has not left yet)."""
        return bool(self.chunks_in_flight())

    def chunks_in_flight(self) -> list[Lane]:
        """Every chunk not finished yet: those in the stream batch, then a first chunk's."""
        lanes = [lane for lane in self.pipe if lane is not None and not lane.filler]
        return lanes + ([self.sequential.lane] if self.sequential is not None else [])

    def release(self) -> list[int]:
        """Give the stream's lanes back to the slot table and drop every cached tensor.
        Returns the pool slots it held (the owner of the pool may clear them)."""
        entry = self.slots.streams.get(self.stream_id)
        held = entry.all_slots() if entry is not None else []
        self.slots.remove_stream(self.stream_id)
        if self.vae_state is not None:
            self.vae_state.reset()
        self.motion.reset()
        self.pipe = [None] * len(self.pipe)
        self.sequential = None
        self.copy_due = False
        self._blend = self._emb = None
        return held

    # ------------------------------------------------------------------ per-chunk steps

    @torch.no_grad()
    def encode(self, frames: np.ndarray, tag: object = None) -> Lane:
        """Step 1: frames [n, H, W, 3] uint8 -> the chunk's noised latent at its first timestep.
        (= `pixels`, then the VAE, then `start_chunk`; the engine runs the VAE of several
        streams in one call between the two.)"""
        pixels = self.pixels(frames)  # [1, 3, n, H, W]
        return self.start_chunk(pixels, self.comps.vae.encode_chunk(pixels, self.vae_state), tag)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [n, H, W, 3] -> [1, 3, n, H, W] in [-1, 1] on the model's device/dtype."""
        return frames_to_tensor(frames, self.comps.device, self.comps.dtype)  # scaled on the device

    def start_chunk(self, pixels: torch.Tensor, latents: torch.Tensor, tag: object = None) -> Lane:
        """The chunk's VAE latents [1, 16, F, h, w] -> noised with the motion-aware strength."""
        comps = self.comps
        self._advance_blend()
        strength = self.motion.update(pixels.float())
        if self.chunk_index == 0 and self.comps.cfg.sampling.first_chunk_timestep == "first_step":
            t0 = self.timesteps[0]  # StreamDiffusionV2's prepare: the step list from its start
        else:
            t0 = strength_to_timestep(strength)
        noise = chunk_noise(tuple(latents.shape), self.seed, self.chunk_index, 0, comps.device, latents.dtype)
        x = comps.schedule.add_noise(latents, noise, strength)  # [1, 16, F, h, w]
        lane = Lane(x, t0, self.chunk_index, tag, self.cross_kv, self.cond_key, self.cond_emb, self.seed)
        self.chunk_index += 1
        return lane

    def start_sequential(self, lane: Lane) -> Row:
        """Step 2 (prepare): the chunk runs every denoise step in turn; this is its first row."""
        self.sequential = Row(self, 0, lane, sequential=True)
        return self.sequential

    def enter(self, incoming: Lane | None) -> list[Row]:
        """Step 2 (stream batch): `incoming` (or nothing, when draining) enters lane 0, every
        other chunk moves one position on; returns one row per lane whose position is occupied.

        Lane stride D: lane j of the p-th forward holds the chunk that entered j·D forwards
        earlier (position j·D of `self.pipe`); between its lanes a chunk waits D - 1 forwards
        (on pipeline stages: while its previous forward is still in flight). Every KV lane still
        sees its chunks in order, and each chunk keeps its own noise, prompt and seed, so the
        frames are those of stride 1, (steps - 1)(D - 1) chunks later."""
        self.pipe = [incoming] + self.pipe[:-1]
        if incoming is not None and incoming.chunk == 1:
            for row in self.filler_rows(incoming):
                self.pipe[row.j * self.stride] = row.lane
        return [Row(self, j, self.pipe[j * self.stride]) for j in range(self.steps)
                if self.pipe[j * self.stride] is not None]

    def filler_rows(self, first: Lane) -> list[Row]:
        """sdv2: StreamDiffusionV2's stream batch starts with zero latents in lanes 1.. (its row
        buffer), which the DiT runs like chunks until the first streamed chunk reaches them:
        each writes K/V where that chunk will (frame 2: the third sink, overwritten by it) and
        runs the sink-refresh test, which can queue a refresh; its output moves on to the next
        lane and is never shown (chunk index FILLER_CHUNK: noise of its own). One row per
        lane 1..steps-1, at that lane's timestep, beside the stream's first streamed chunk
        `first` (placed a stride D apart, they keep the frames of D = 1). None under `rolling`,
        or with one step."""
        if self.slots.policy != "sdv2" or self.steps == 1:
            return []
        zeros = torch.zeros_like(first.x)
        return [Row(self, j, replace(first, x=zeros, t=self.timesteps[j], chunk=FILLER_CHUNK, tag=None))
                for j in range(1, self.steps)]

    def next_filler(self, row: Row, flow: torch.Tensor) -> Row | None:
        """A filler row's output, re-noised, as the next lane's filler (None after the last lane)."""
        if row.j == self.steps - 1:
            return None
        return Row(self, row.j + 1, self._next_lane(row, flow))

    def _next_lane(self, row: Row, flow: torch.Tensor) -> Lane:
        """The row's chunk after its step: x0 re-noised to the next lane's timestep."""
        lane, schedule = row.lane, self.comps.schedule
        x0 = schedule.flow_to_x0(lane.x, flow, schedule.sigma(lane.t))
        t = self.timesteps[row.j + 1]
        return replace(lane, x=self._renoise(x0, lane.chunk, row.j + 1, t, lane.seed), t=t)

    def apply_flow(self, row: Row, flow: torch.Tensor) -> torch.Tensor | None:
        """Step 4: x0 from the row's flow. At the last step the chunk is done: returns x0 [1, 16,
        F, h, w]. Otherwise x0 is re-noised to the next timestep, kept in the next lane (or in
        `self.sequential`), and None is returned."""
        schedule = self.comps.schedule
        lane = row.lane
        last = row.j == self.steps - 1
        x0 = schedule.flow_to_x0(lane.x, flow, schedule.sigma(lane.t)) if last else None
        nxt = None if last else self._next_lane(row, flow)
        if row.sequential:
            self.sequential = None if last else Row(self, row.j + 1, nxt, sequential=True)
            if last and lane.chunk == 0 and self.steps > 1 and self.slots.policy == "sdv2":
                self.copy_due = True  # the prepare is done
        else:
            # The chunk sits at position j·D unless later forwards entered since (plans in
            # flight on pipeline stages): find it where it is now. A last lane may have left
            # the pipe already; nothing follows it.
            pos = next((i for i, held in enumerate(self.pipe) if held is lane), None)
            if pos is not None:
                self.pipe[pos] = nxt
            elif not last:
                raise RuntimeError(f"stream {self.stream_id!r}: chunk {lane.chunk} left lane {row.j} "
                                   f"before its flow came back (more than {self.stride} chunks in flight)")
        return x0 if last and not lane.filler else None

    def _renoise(self, x0: torch.Tensor, chunk: int, lane: int, t: int, seed: int) -> torch.Tensor:
        noise = chunk_noise(tuple(x0.shape), seed, chunk, lane, x0.device, x0.dtype)
        return self.comps.schedule.add_noise(x0, noise, self.comps.schedule.sigma(t))

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> np.ndarray:
        """Step 5: a finished chunk's x0 -> uint8 frames [n, H, W, 3]."""
        pixels = self.comps.vae.decode_chunk(x0, self.vae_state)  # [1, 3, n, H, W]
        return tensor_to_frames(pixels)


@torch.no_grad()
def forward_rows(model: CausalWanModel, pool: KVPool, rows: list[Row], cache: CacheConfig,
                 step: DiTStep | None = None) -> list[torch.Tensor]:
    """Step 3: one DiT forward over `rows` (any streams, any lanes; all write the same number of
    latent frames) -> one flow [1, 16, F, h, w] per row. Commits the rows' slot plans."""
    num_frames = rows[0].lane.x.shape[2]
    plans = plan_rows(rows)
    x = torch.cat([row.lane.x for row in rows])  # [B, 16, F, h, w]
    timestep = row_timesteps([row.lane.t for row in rows], num_frames, pool.k.device)  # [B, F]
    cross = model.stack_prompt_kv([row.lane.cross_kv for row in rows])
    return list(forward_plans(model, pool, plans, x, timestep, cross, cache, step).split(1))


def forward_plans(model: CausalWanModel, pool: KVPool, plans: list[WritePlan], x: torch.Tensor,
                  timestep: torch.Tensor, cross: CrossKV, cache: CacheConfig,
                  step: DiTStep | None = None) -> torch.Tensor:
    """One full-model forward over committed slot plans: re-bases, attention metadata, the DiT.
    x [B, 16, F, h, w], timestep [B, F] -> flow [B, 16, F, h, w] (fp32).

    With a compiled / graphed `step`, the rows are padded to the step's bucket with rows of the
    pool's scratch lane (zeros in, output dropped), so every row count up to a bucket runs the
    same graph."""
    apply_plan_ops(model, pool, plans)
    if step is None or not step.pads:
        return model(x, timestep, cross, attn_batch(plans, pool, cache), pool)
    if pool.scratch_lane is None:
        raise ValueError("a compiled or graphed DiT step needs a KV pool with a scratch lane (new_pool does this)")
    rows, pad = len(plans), step.bucket(len(plans)) - len(plans)
    plans = plans + [pool.scratch_plan(x.shape[2], cache.sinks)] * pad
    x = _pad_rows(x, pad)  # [bucket, 16, F, h, w]
    timestep = _pad_rows(timestep, pad)  # [bucket, F]
    cross = {layer: (_pad_rows(k, pad), _pad_rows(v, pad)) for layer, (k, v) in cross.items()}
    return step(x, timestep, cross, attn_batch(plans, pool, cache, static=True), pool)[:rows]


def _pad_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Append `pad` rows (copies of row 0; contiguous, so strides never differ between calls)."""
    return torch.cat([t] + [t[:1]] * pad).contiguous() if pad else t.contiguous()


def attn_batch(plans: list[WritePlan], pool: KVPool, cache: CacheConfig, static: bool = False) -> AttnBatch:
    """The per-forward attention metadata of `plans` under the configured cache policy."""
    return AttnBatch.from_plans(plans, pool.k.device, pool.window, cache.refresh_threshold, cache.policy, static)


def plan_rows(rows: list[Row]) -> list[WritePlan]:
    """Commit each row's slot plan for its chunk (one plan per row, in row order).

    sdv2: the first plan of a stream after its prepare also asks for the last denoise step's
    lane to be copied into the other lanes first. StreamDiffusionV2 prepares the first chunk
    step by step in one cache, each step overwriting the last, and then repeats that cache for
    every lane, so every lane starts from the last step's K/V of frames 0-1 (its sinks for as
    long as they are not refreshed). A filler row writes where its lane's next chunk will,
    without taking that place (`Sdv2Lane.peek`)."""
    plans = []
    for row in rows:
        state = row.state
        lane = state.slots.lane(state.stream_id, row.j)
        n = row.lane.x.shape[2]
        plan = lane.peek(n) if row.lane.filler else lane.plan(n)
        if state.copy_due:
            state.copy_due = False
            last = state.slots.lane(state.stream_id, state.steps - 1).lane
            plan.copy_lanes = (last, [state.slots.lane(state.stream_id, j).lane for j in range(state.steps - 1)])
        plans.append(plan)
    return plans


def apply_plan_ops(model: CausalWanModel, pool: KVPool, plans: list[WritePlan]) -> None:
    """What the plans ask of the pool before their forward, on this pool's layers (every
    pipeline stage runs it for its own): lane copies (sdv2, `plan_rows`), then the re-bases
    that rotate a lane's stored keys (rolling)."""
    for plan in plans:
        if plan.copy_lanes is not None:
            pool.copy_lane_(*plan.copy_lanes)
    for plan in plans:
        if plan.rebase_delta:
            freqs_cos, freqs_sin = model.rope_tables()
            pool.rebase_(plan.rebase_slots, plan.rebase_delta, freqs_cos, freqs_sin, model.rope.t_dim)


# Integer row timesteps -> their [B, F] tensor on the device, made once: the rows of steady
# forwards repeat a few patterns, and each new tensor was a host-to-device copy in the middle of
# the step (on CUDA the host then waits for the work queued before it). Readers never write it.
_TIMESTEP_TENSORS: dict[tuple, torch.Tensor] = {}
_TIMESTEP_TENSORS_MAX = 256


def row_timesteps(timesteps: list, num_frames: int, device) -> torch.Tensor:
    """Per-row timesteps (ints, or 0-dim tensors for motion-aware first lanes, which stay on the
    device) -> [B, F] float32 (every frame of a row at its lane's timestep). Not to be written:
    an all-int pattern's tensor is shared by every forward with that pattern."""
    if all(not isinstance(t, torch.Tensor) for t in timesteps):
        key = (tuple(timesteps), num_frames, torch.device(device))
        if (known := _TIMESTEP_TENSORS.get(key)) is None:
            if len(_TIMESTEP_TENSORS) >= _TIMESTEP_TENSORS_MAX:
                _TIMESTEP_TENSORS.clear()
            known = _TIMESTEP_TENSORS[key] = torch.tensor([[t] * num_frames for t in timesteps], device=device,
                                                          dtype=torch.float32)
        return known
    # a motion-aware first lane beside integer lanes (steps >= 2): the integers' values come from
    # the same made-once tensors (a review: each was a new host-to-device copy every forward)
    column = torch.stack([t.to(device=device, dtype=torch.float32).reshape(()) if isinstance(t, torch.Tensor)
                          else row_timesteps([t], 1, device).reshape(()) for t in timesteps])
    return column[:, None].expand(-1, num_frames).contiguous()  # [B, F]


def lane_stride(cfg: Config, chosen: int = 0) -> int:
    """The lane stride D of a stream: `chosen` (the engine picks it per stream at admission),
    else `parallel.lane_stride`, else 1 (one plan in flight at a time: a larger D then only
    adds latency)."""
    return chosen or cfg.parallel.lane_stride or 1


def new_pool(model: CausalWanModel, num_slots: int, tokens_per_slot: int, cfg: Config, dtype, device,
             step: DiTStep | None = None) -> KVPool:
    """A KV pool for the model's layers, in lanes of `cache.window` slots (plus the scratch lane
    padded rows use, when `step` compiles or graphs the DiT forward)."""
    scratch = step is not None and step.pads
    return KVPool(model.layer_ids, num_slots, tokens_per_slot, cfg.model.num_heads, cfg.model.head_dim, dtype,
                  device, cfg.cache.window, scratch)


__all__ = ["Lane", "Row", "StreamState", "apply_plan_ops", "attn_batch", "lane_stride", "forward_plans", "forward_rows", "new_pool",
           "plan_rows", "row_timesteps"]
