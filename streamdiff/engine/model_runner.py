"""ModelRunner: the ONE model runner. It holds a stage spec; the local executor is its one-stage case.

Owns, according to its `StageSpec` (stage_io.py: block range, first / last, VAE role):
- its blocks of the DiT and a KV pool for exactly their layers (every stage with blocks);
- first: the streams' `StreamState`s (slot table, lanes, motion, prompt and blend: the same
  code StreamPipeline runs), the prompt encoder and a prompt K/V cache shared by prompt text;
- last: the head (rows' hidden states -> flows -> x0 of finished chunks);
- VAE role encode / decode / both: that half of the streaming VAE and one cache per stream;
- applying the stream commands of a plan (new / finished / restarted / updated streams, on
  the KV lanes the scheduler allocated): every runner of a pipeline applies the same commands.
Does not own: deciding anything about streams (the engine core decides, the scheduler
allocates KV lanes), timing of a whole step (executors), moving blocks between stages or
transport (parallel/), the per-chunk math (pipeline/stream_state.py).

Two drivers, one set of parts:
* `execute(plan, inputs)` — one stage holding everything (the local executor):
  1. commands; 2. VAE-encode the planned chunks (streams at the same point in one call),
  noise each, into its lanes (or prepare: a first chunk); 3. ONE full-model forward over every
  stream-batch row of every stream (compiled / graphed `DiTStep` when configured), then the
  denoise steps of first chunks, batched per step; 4. VAE-decode what finished.
* `run(msg)` — one stage's share of one forward in a pipeline, messages in the manner of vLLM's
  pipeline-parallel runner (first rank embeds, intermediate tensors travel, last rank samples):
  StageInput --[encode]--> --first--> Hop --middle...--> Hop --last--> StepOut --[decode]-->
  first: apply the flows of earlier forwards (x0, re-noise, next lane), start the new chunks,
  build this forward's rows, commit their slot plans, embed, run its blocks; later stages
  apply the plans' re-bases, project prompt K/V of new conditions, run their blocks; last:
  head -> flows (back to the first stage with a later message) and x0 of finished chunks,
  decoded here or by a decode stage.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

import torch

from streamdiff.cache.slots import SlotTable
from streamdiff.config import Config
from streamdiff.engine.conditions import CondLRU, ConditionKV
from streamdiff.engine.stage_io import MAX_LANES, Hop, RowMeta, StageInput, StageSpec, StepOut, split_rows
from streamdiff.engine.types import ChunkInput, StreamOutput, StreamParams
from streamdiff.engine.vae_batch import decode_many, encode_many
from streamdiff.model.build import (
    DTYPES,
    Components,
    build_streaming_vae,
    build_text_encoder,
    build_transformer,
    resolve_device,
)
from streamdiff.model.causal_wan import CrossKV
from streamdiff.pipeline.frames import frames_to_tensor, tensor_to_frames
from streamdiff.pipeline.stream_state import (
    Row,
    StreamState,
    apply_plan_ops,
    attn_batch,
    forward_rows,
    lane_stride,
    new_pool,
    plan_rows,
    row_timesteps,
)
from streamdiff.sampling.noise_schedule import FlowMatchSchedule
from streamdiff.scheduler.types import StepPlan


def stage_components(cfg: Config, spec: StageSpec, device: torch.device) -> Components:
    """What a stage builds: only its blocks (with the embedding if first, the head if last),
    its VAE half, and the prompt encoder on the first stage."""
    dtype = DTYPES[cfg.model.dtype]
    model = (build_transformer(cfg, device, spec.block_range, has_embed=spec.first, has_head=spec.last)
             if spec.has_blocks else None)
    vae = build_streaming_vae(cfg, device, dtype) if spec.vae != "none" else None
    text = build_text_encoder(cfg, device, dtype) if spec.first else None
    schedule = FlowMatchSchedule(cfg.sampling.shift, cfg.sampling.num_train_timesteps)
    return Components(cfg, device, dtype, model, vae, text, schedule, None)


class ModelRunner:
    def __init__(self, comps: Components, max_streams: int | None = None, profile: bool = False,
                 batch_vae: bool = True, spec: StageSpec | None = None):
        cfg = comps.cfg
        self.cfg, self.comps = cfg, comps
        self.spec = spec or StageSpec.whole(cfg.model.num_layers)
        self.model = comps.model
        self.device, self.dtype = comps.device, comps.dtype
        self.width, self.height = cfg.video.width, cfg.video.height
        self.tokens_per_frame = (self.height // 16) * (self.width // 16)
        self.max_streams = max_streams or cfg.cache.max_streams
        # 1. A pool for this runner's layers; the first stage's slot table hands out its lanes.
        # MAX_LANES lanes a stream (steps can grow live) unless cache.pool_lanes says
        self.num_slots = (cfg.cache.pool_lanes or MAX_LANES * self.max_streams) * cfg.cache.window
        self.pool = (new_pool(self.model, self.num_slots, self.tokens_per_frame, cfg, self.dtype, self.device,
                              comps.step) if self.spec.has_blocks else None)
        self.slots = SlotTable.from_config(self.num_slots, cfg.cache, cfg.model.rope_max_seq_len)
        # 2. Streams: parameters and KV lanes everywhere; StreamStates on the first stage; VAE
        #    caches where a VAE half runs without the StreamState.
        self.params: dict[str, StreamParams] = {}
        self.kv_lanes: dict[str, tuple[int, ...]] = {}
        self.streams: dict[str, StreamState] = {}
        self._vae_states: dict[str, object] = {}
        self._prompt_cache: OrderedDict[str, tuple[CrossKV, torch.Tensor | None]] = OrderedDict()
        self._prompt_cache_size = self.max_streams + 4
        self.conditions = ConditionKV()  # later stages: prompt K/V by condition key
        self._sent: dict[str, CondLRU] = {}  # first stage: the condition keys later stages hold
        # first stage: the blend embeddings of those keys (a block move to a later stage must be
        # able to project every condition it holds, finished blends included: `sent_embeddings`)
        self._sent_blends: dict[tuple, torch.Tensor] = {}
        self._open: dict[tuple[int, int], list[Row]] = {}  # first stage: forwards whose flows are out
        self._steady: list[Row] = []  # rows of the chunks started, not yet in a forward
        self._groups: list[list[Row]] = []  # a step's steady rows in micro-batches
        self._preparing: list[StreamState] = []  # streams whose first chunk runs step by step
        # One VAE call for streams whose caches are at the same point; not with a compiled VAE:
        # a group of a new size would compile its graphs mid-serving and stall every stream, while
        # calls of one stream each meet only the first-call and steady graphs the warm-up compiled.
        self.batch_vae = batch_vae and not cfg.runtime.compile_vae
        # 3. Optional per-phase timing of the last step; a drill slowdown per block.
        self.profile = profile
        self.last_phase_ms: dict[str, float] = {}
        self.extra_ms_per_block = 0.0

    @classmethod
    def for_stage(cls, cfg: Config, spec: StageSpec, device: str | None = None,
                  max_streams: int | None = None) -> "ModelRunner":
        dev = resolve_device(cfg.runtime.device) if device is None else torch.device(device)
        return cls(stage_components(cfg, spec, dev), max_streams, spec=spec)

    # ------------------------------------------------------------------ stream commands

    def apply(self, plan: StepPlan | None) -> None:
        """The plan's stream commands, in the order StepPlan documents: releases first, so the
        lanes the scheduler handed out again are free when they are taken."""
        if plan is None:
            return
        for stream_id in plan.finished_streams:
            self.remove_stream(stream_id)
        for start in plan.restarted_streams:
            self.remove_stream(start.stream_id)
        for start in (*plan.restarted_streams, *plan.new_streams):
            self.add_stream(start.stream_id, start.params, start.kv_lanes)
        for update in plan.updated_streams:
            self._update(update.stream_id, update.params, update.changed)

    def add_stream(self, stream_id: str, params: StreamParams, kv_lanes: tuple[int, ...] | None = None) -> None:
        """Create the stream's state on this runner, on `kv_lanes` (None: the slot table picks)."""
        if stream_id in self.params:
            raise KeyError(f"stream {stream_id!r} already exists")
        if kv_lanes is not None and len(kv_lanes) != params.steps:
            raise ValueError(f"stream {stream_id!r}: {len(kv_lanes)} KV lanes for {params.steps} steps")
        if self.spec.first:
            state = StreamState(
                self.comps, stream_id, self.slots, params.prompt, params.steps, params.seed, self.width,
                self.height, params.noise_strength, params.motion_aware, prompt_kv=self._prompt_kv,
                stride=lane_stride(self.cfg, params.lane_stride), kv_lanes=kv_lanes,
            )
            self.streams[stream_id] = state
            kv_lanes = tuple(lane.lane for lane in self.slots.streams[stream_id].lanes)
        elif self.spec.has_blocks and kv_lanes is None:
            raise ValueError(f"stage {self.spec.index}: stream {stream_id!r} needs its KV lanes")
        if self.comps.vae is not None and (stream_id not in self.streams or self.streams[stream_id].vae_state is None):
            self._vae_states[stream_id] = self.comps.vae.new_state()
        self.params[stream_id] = params
        self.kv_lanes[stream_id] = tuple(kv_lanes or ())

    def remove_stream(self, stream_id: str) -> None:
        """Drop the stream: lanes (its pool slots zeroed), VAE caches, prompt K/V. Unknown ids
        are ignored."""
        self.params.pop(stream_id, None)
        lanes = self.kv_lanes.pop(stream_id, ())
        state = self.streams.pop(stream_id, None)
        if state is not None:
            state.release()
        self._vae_states.pop(stream_id, None)
        self._sent.pop(stream_id, None)
        for key in [k for k in self._sent_blends if k[1] == stream_id]:
            del self._sent_blends[key]
        self.conditions.release(stream_id)
        self._preparing = [s for s in self._preparing if s.stream_id != stream_id]
        self._steady = [r for r in self._steady if r.state.stream_id != stream_id]
        if self.pool is not None and lanes:
            window = self.cfg.cache.window
            self.pool.clear_slots([lane * window + i for lane in lanes for i in range(window)])

    def _update(self, stream_id: str, params: StreamParams, changed) -> None:
        if stream_id not in self.params:
            return
        self.params[stream_id] = params
        if stream_id in self.streams:
            self.streams[stream_id].apply_live(params, "prompt" in changed)

    def clear_all(self) -> None:
        """After a failed step: every stream and every forward in flight is forgotten."""
        for stream_id in list(self.params):
            self.remove_stream(stream_id)
        if self.pool is not None:
            self.pool.clear()
        self._open.clear()
        self._sent.clear()
        self._sent_blends.clear()
        self.conditions.clear()

    def _prompt_kv(self, prompt: str) -> CrossKV:
        return self._prompt_entry(prompt)[0]

    def _prompt_entry(self, prompt: str) -> tuple[CrossKV, torch.Tensor | None]:
        """Prompt K/V of this runner's layers (and the text embedding, for later stages)."""
        entry = self._prompt_cache.get(prompt)
        if entry is None:
            emb = self.comps.text.encode(prompt)  # [1, L, text_dim]
            entry = (self.model.prompt_kv(emb), None if self.spec.last else emb)
            self._prompt_cache[prompt] = entry
            while len(self._prompt_cache) > self._prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        else:
            self._prompt_cache.move_to_end(prompt)
        return entry

    def sent_embeddings(self) -> dict[tuple, torch.Tensor]:
        """First stage: the text embedding of every condition later stages hold (a finished
        blend or a prompt this stage's prompt cache dropped included), so a stage that takes
        blocks can project their prompt K/V."""
        keys = dict.fromkeys(k for lru in self._sent.values() for k in lru.keys)
        return {k: self._sent_blends[k] if k[0] == "blend" else self._prompt_entry(k[1])[1] for k in keys}

    def frames_needed(self, stream_id: str) -> int:
        return self.streams[stream_id].frames_needed

    def _vae_state(self, stream_id: str):
        state = self.streams.get(stream_id)
        return state.vae_state if state is not None and state.vae_state is not None else self._vae_states[stream_id]

    # ------------------------------------------------------------------ shared parts

    def _encode(self, chunks: Mapping[str, ChunkInput],
                pixels: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """VAE-encode chunks (streams at the same point in one call) -> latents per stream; the
        frames as the VAE took them go into `pixels` when given. Frames go to the device as uint8
        and are scaled there (a quarter of the bytes of float32 over PCIe)."""
        items = [(sid, frames_to_tensor(c.frames, self.device, self.dtype)) for sid, c in chunks.items()]
        pairs = [(px, self._vae_state(sid)) for sid, px in items]  # [1, 3, n, H, W]
        vae = self.comps.vae
        latents = encode_many(vae, pairs) if self.batch_vae else [vae.encode_chunk(x, s) for x, s in pairs]
        if pixels is not None:
            pixels.update(items)
        return {sid: lat for (sid, _), lat in zip(items, latents)}

    def _decode(self, done: list[tuple[str, torch.Tensor, object]]) -> dict[str, StreamOutput]:
        """x0 of finished chunks -> uint8 frames per stream (streams batched where they can)."""
        pairs = [(x0, self._vae_state(sid)) for sid, x0, _ in done]
        vae = self.comps.vae
        pixels = decode_many(vae, pairs) if self.batch_vae else [vae.decode_chunk(z, s) for z, s in pairs]
        outputs: dict[str, StreamOutput] = {}
        for (stream_id, _, tag), px in zip(done, pixels):
            frames = tensor_to_frames(px)  # [m, H, W, 3] uint8
            if len(tag) != len(frames):
                raise RuntimeError(f"stream {stream_id!r}: {len(frames)} frames decoded for {len(tag)} input frames")
            outputs[stream_id] = StreamOutput(frames, tuple(tag))
        return outputs

    def _start_chunks(self, chunks: Mapping[str, ChunkInput], latents: Mapping[str, torch.Tensor]) -> None:
        """New chunks (first stage): encoded here unless an encode stage did it, noised with
        their motion-aware strength, into their stream's lanes (or prepared step by step)."""
        chunks = {sid: c for sid, c in chunks.items() if sid in self.streams}
        for stream_id, given in chunks.items():
            need = self.streams[stream_id].frames_needed
            if len(given.frames) != need:
                raise ValueError(f"stream {stream_id!r}: chunk of {len(given.frames)} frames, "
                                 f"its next chunk takes {need}")
        missing = {sid: c for sid, c in chunks.items() if sid not in latents}
        pixels: dict[str, torch.Tensor] = {}  # the frames encoded here, on the device once
        latents = {**latents, **(self._encode(missing, pixels) if missing else {})}
        for stream_id, given in chunks.items():
            state = self.streams[stream_id]
            px = pixels[stream_id] if stream_id in pixels else state.pixels(given.frames)
            lane = state.start_chunk(px, latents[stream_id].to(self.device), tag=given.metas)
            if lane.chunk == 0:
                state.start_sequential(lane)
                self._preparing.append(state)
            else:
                self._steady.extend(state.enter(lane))

    # ------------------------------------------------------------------ one stage: a whole step

    @torch.no_grad()
    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> tuple[dict[str, StreamOutput], int]:
        """Run the plan on a runner that holds everything (see the module docstring). Returns
        the output frames of every stream whose chunk finished, and the DiT forwards run."""
        if not (self.spec.first and self.spec.last and self.spec.vae == "both"):
            raise RuntimeError(f"stage {self.spec.index} holds part of the model: drive it with run()")
        self.apply(plan)
        marks = [("start", self._mark())]
        self._start_chunks({c.stream_id: inputs[c.stream_id] for c in plan.chunks}, {})
        marks.append(("encode", self._mark()))
        finished: dict[str, tuple[torch.Tensor, tuple]] = {}  # stream -> (x0 of its finished chunk, tag)

        def run(rows: list[Row]) -> None:
            flows = forward_rows(self.model, self.pool, rows, self.cfg.cache, self.comps.step)
            self._drill_delay()
            for row, flow in zip(rows, flows):
                x0 = row.state.apply_flow(row, flow)
                if x0 is not None:
                    if row.state.stream_id in finished:
                        raise RuntimeError(f"stream {row.state.stream_id!r} finished two chunks in one step")
                    finished[row.state.stream_id] = (x0, row.lane.tag)

        forwards = 0
        steady, self._steady = self._steady, []
        if steady:  # one forward over all stream-batch rows of all streams
            run(steady)
            forwards += 1
        prepare = [s.sequential for s in self._preparing]
        self._preparing = []
        while prepare:  # first chunks: denoise step k of every preparing stream in one forward
            run(prepare)
            forwards += 1
            prepare = [row.state.sequential for row in prepare if row.state.sequential is not None]
        marks.append(("dit", self._mark()))
        outputs = self._decode([(sid, x0, tag) for sid, (x0, tag) in finished.items()])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's time must include its kernels
        if self.profile:
            marks.append(("decode", self._mark()))
            self.last_phase_ms = {name: (t - marks[i][1]) * 1000.0 for i, (name, t) in enumerate(marks[1:])}
        return outputs, forwards

    def _mark(self) -> float:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ one stage of a pipeline

    @torch.no_grad()
    def run(self, msg: StageInput | Hop | StepOut) -> StageInput | Hop | StepOut:
        """This stage's share of one forward (see the module docstring)."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        self.apply(msg.plan)
        if not self.spec.has_blocks:  # a VAE stage
            if self.spec.encodes:
                latents = self._encode({s: c for s, c in msg.chunks.items() if s in self.params})
                # Own copies, on the host: a latent is a view into the encoder's larger output
                # (4-8x its size), and a view pickles with all of its storage.
                msg.encoded.update({s: lat.to("cpu", copy=True) for s, lat in latents.items()})
            else:
                done = [d for d in msg.decode if d[0] in self.params]
                msg.finished.update(self._decode([(s, x0.to(self.device), tag) for s, x0, tag in done]))
                msg.decode = []
            total_ms = (time.perf_counter() - t0) * 1000.0
            msg.stage_ms.append({"total": total_ms, "blocks": 0.0, "fixed": total_ms, "head": total_ms,
                                 "tail": 0.0, "num_blocks": 0, "cpu": (time.thread_time() - cpu0) * 1000.0})
            return msg
        hop, cross = self._first(msg) if self.spec.first else self._middle(msg)
        head_ms = (time.perf_counter() - t0) * 1000.0
        t_blocks = time.perf_counter()
        if hop.hidden is not None:
            hop.hidden = self._run_blocks(hop, cross)
        self._sync()
        if hop.hidden is not None:
            self._drill_delay()
        blocks_ms = (time.perf_counter() - t_blocks) * 1000.0
        t_tail = time.perf_counter()
        out: Hop | StepOut = self._last(hop) if self.spec.last else hop
        self._sync()
        tail_ms = (time.perf_counter() - t_tail) * 1000.0
        total_ms = (time.perf_counter() - t0) * 1000.0
        out.stage_ms.append({"total": total_ms, "blocks": blocks_ms, "fixed": total_ms - blocks_ms,
                             "head": head_ms, "tail": tail_ms, "num_blocks": len(self.pool.layers),
                             "cpu": (time.thread_time() - cpu0) * 1000.0})
        return out

    def _first(self, msg: StageInput) -> tuple[Hop, CrossKV | None]:
        # 1. Flows of earlier forwards: x0, re-noise into the next lane (or done).
        for key, flows in msg.flows:
            rows = self._open.pop(key, [])
            for row, flow in zip(rows, flows.split(1)):
                if self.streams.get(row.state.stream_id) is row.state:  # not removed / restarted meanwhile
                    row.state.apply_flow(row, flow.to(self.device))
        # 2. New chunks into their lanes; 3. this forward's rows.
        self._start_chunks(msg.chunks, msg.encoded)
        if msg.kind == "steady":
            if msg.group == 0:
                self._groups, self._steady = split_rows(self._steady, msg.groups), []
            rows = self._groups[msg.group] if msg.group < len(self._groups) else []
        else:
            self._preparing = [s for s in self._preparing if s.sequential is not None]
            rows = [s.sequential for s in self._preparing]
        key = (msg.step_id, msg.part)
        if not rows:
            return Hop(key, [], None, None, (0, 0, 0), [], {}, msg.stage_ms, msg.plan), None
        self._open[key] = rows
        # 4. Slot plans (and re-bases) for the rows; conditions later stages do not have yet.
        plans = plan_rows(rows)
        apply_plan_ops(self.model, self.pool, plans)
        metas, embs = [], {}
        for row in rows:
            state, lane = row.state, row.lane
            finishes = row.j == state.steps - 1 and not lane.filler
            metas.append(RowMeta(state.stream_id, row.j, lane.t, finishes, lane.cond_key,
                                 lane.tag if finishes else None))
            # Later stages keep each stream's recent conditions (CondLRU, same rule on every
            # stage, fed rows in the same order): send an embedding only when they lack it.
            sent = self._sent.setdefault(state.stream_id, CondLRU())
            if not self.spec.last and not sent.use(lane.cond_key):
                embs[lane.cond_key] = (lane.cond_emb if lane.cond_emb is not None
                                       else self._prompt_entry(lane.cond_key[1])[1])
                if lane.cond_emb is not None:
                    self._sent_blends[lane.cond_key] = lane.cond_emb
                for old in sent.evicted:
                    self._sent_blends.pop(old, None)
        x = torch.cat([row.lane.x for row in rows])  # [B, 16, F, h, w]
        hidden = self.model.embed(x)  # [B, F*T, dim]
        hop = Hop(key, metas, hidden, x, tuple(x.shape[2:]), plans, embs, msg.stage_ms, msg.plan)
        return hop, self.model.stack_prompt_kv([row.lane.cross_kv for row in rows])

    def _middle(self, hop: Hop) -> tuple[Hop, CrossKV | None]:
        if hop.hidden is None:
            return hop, None
        apply_plan_ops(self.model, self.pool, hop.plans)
        cross = [self.conditions.get(self.model, m.stream_id, m.cond, hop.embs, self.device, self.spec.index)
                 for m in hop.rows]
        hop.hidden = hop.hidden.to(self.device)
        return hop, self.model.stack_prompt_kv(cross)

    def _run_blocks(self, hop: Hop, cross: CrossKV) -> torch.Tensor:
        frames, h, w = hop.latent_shape
        timestep = row_timesteps([m.t for m in hop.rows], frames, self.device)  # [B, F]
        _, tproj = self.model.time_embedding(timestep)
        batch = attn_batch(hop.plans, self.pool, self.cfg.cache)
        return self.model.run_blocks(hop.hidden, tproj, cross, batch, self.pool, (h // 2, w // 2))

    def _last(self, hop: Hop) -> StepOut:
        if hop.hidden is None:
            return StepOut(hop.key, [], None, {}, hop.stage_ms, plan=hop.plan)
        frames, h, w = hop.latent_shape
        timestep = row_timesteps([m.t for m in hop.rows], frames, self.device)  # [B, F]
        temb, _ = self.model.time_embedding(timestep)
        flow = self.model.head(hop.hidden, temb, hop.latent_shape).float()  # [B, 16, F, h, w]
        x = hop.x.to(self.device)
        # Finished chunks: x0 exactly as StreamState.apply_flow computes it, then decode (here,
        # or on a decode stage).
        schedule = self.comps.schedule
        done = [(m.stream_id, schedule.flow_to_x0(x[i : i + 1], flow[i : i + 1], schedule.sigma(m.t)), m.tag)
                for i, m in enumerate(hop.rows) if m.finishes and m.stream_id in self.params]
        rows = [RowMeta(m.stream_id, m.j, m.t, m.finishes, m.cond) for m in hop.rows]
        if self.spec.decodes:
            return StepOut(hop.key, rows, flow.cpu(), self._decode(done), hop.stage_ms, plan=hop.plan)
        done = [(sid, x0.cpu(), tag) for sid, x0, tag in done]  # latent-sized; host hop to the decode stage
        return StepOut(hop.key, rows, flow.cpu(), {}, hop.stage_ms, decode=done, plan=hop.plan)

    def _drill_delay(self) -> None:
        """Drills: a slower device. Sleep `extra_ms_per_block` (a stage's slowdown) plus
        `parallel.block_delay_ms` per block of this runner, once per forward whatever its rows."""
        delay_ms = self.extra_ms_per_block + self.cfg.parallel.block_delay_ms
        if delay_ms > 0 and self.pool is not None:
            time.sleep(delay_ms * len(self.pool.layers) / 1000.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ accounting

    def resources(self) -> dict[str, int]:
        """Pool and bookkeeping sizes (leak checks, metrics)."""
        vae = [s.vae_state for s in self.streams.values() if s.vae_state is not None] + list(self._vae_states.values())
        return {
            "streams": len(self.params),
            "pool_slots": self.slots.allocator.num_slots,
            "free_slots": self.slots.free_slots,
            "slot_table_streams": len(self.slots.streams),
            "prompt_cache": len(self._prompt_cache),
            "pool_bytes": self.pool.nbytes() if self.pool is not None else 0,
            "vae_cache_bytes": sum(v.cache_bytes() for v in vae),
        }


__all__ = ["MAX_LANES", "ModelRunner", "stage_components"]
