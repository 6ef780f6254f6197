"""One pipeline stage: a contiguous block range of the DiT, its KV pool, and its share of a step.

Owns (every stage): the blocks [i, j) and nothing else of the DiT's blocks, the timestep and
prompt projections every stage needs, a KV pool for exactly its layers, each stream's prompt
K/V for its layers, per-stage timing, and handing blocks (with their K/V) to a neighbour.
The first stage also owns the streams' `StreamState`s (slot table, lanes, motion, prompt and
its blend: the same code StreamPipeline and ModelRunner run), the prompt encoder and VAE
encode; the last stage owns the head and VAE decode (one decode cache per stream).
Does not own: Ray (parallel/ray_executor.py wraps this class in an actor), which streams run
(the engine's StepPlan) or when the partition changes (partition.py, the executor).
No ray import here: tests chain StageWorkers in one process as well as in actors.

One forward of a step passes every stage in order, as messages:
  StageInput --first--> Hop --middle...--> Hop --last--> StepOut (back to the executor)
  1. first: apply the flows of earlier forwards (x0, re-noise, next lane: StreamState.
     apply_flow), encode the new chunks (streams batched, as ModelRunner), build the rows
     (`kind` "steady": stream-batch rows of the new chunks; "prepare": the next denoise step
     of every first chunk), commit their slot plans, embed, run its blocks;
  2. every later stage: apply the plans' re-bases to its pool, project prompt K/V of new
     conditions, run its blocks;
  3. last: head -> flow; rows whose chunk finishes: x0 -> VAE decode -> uint8 frames.
The flows go back to the first stage with the next StageInput (the executor carries them),
so a stream's next forward always sees its lanes advanced exactly as in ModelRunner.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from streamdiff.cache.slots import SlotTable
from streamdiff.config import Config
from streamdiff.engine.model_runner import MAX_LANES
from streamdiff.engine.types import StreamOutput, StreamParams
from streamdiff.engine.vae_batch import decode_many, encode_many
from streamdiff.model.build import DTYPES, build_streaming_vae, build_text_encoder, build_transformer, resolve_device
from streamdiff.model.causal_wan import CausalWanModel, CrossKV
from streamdiff.model.vae import StreamingVAE
from streamdiff.parallel.messages import Hop, RowMeta, StageInput, StageSpec, StepOut, split_rows
from streamdiff.pipeline.frames import tensor_to_frames
from streamdiff.pipeline.stream_state import (
    Row,
    StreamState,
    apply_rebases,
    attn_batch,
    new_pool,
    plan_rows,
    lane_stride,
    row_timesteps,
)
from streamdiff.sampling.noise_schedule import FlowMatchSchedule

# ---------------------------------------------------------------------------------- the stage


class CondLRU:
    """The condition keys a later stage holds for one stream, most recent last. The first stage
    keeps a mirror fed the same rows in the same order, so it knows without asking which keys
    still need their text embedding sent downstream."""

    CAPACITY = 8  # > the chunks of one stream in flight (lanes x stride) for any sane setting

    def __init__(self):
        self.keys: list[tuple] = []
        self.evicted: list[tuple] = []

    def use(self, key: tuple) -> bool:
        """Mark `key` used; True if it was held already. Keys pushed out land in `evicted`."""
        self.evicted = []
        if key in self.keys:
            self.keys.remove(key)
            self.keys.append(key)
            return True
        self.keys.append(key)
        while len(self.keys) > self.CAPACITY:
            self.evicted.append(self.keys.pop(0))
        return False


def build_stage_model(cfg: Config, spec: StageSpec, device: torch.device) -> CausalWanModel:
    return build_transformer(cfg, device, spec.block_range, has_embed=spec.first, has_head=spec.last)


class StageWorker:
    def __init__(self, cfg: Config, spec: StageSpec, device: str | None = None, max_streams: int | None = None):
        self.cfg = cfg
        self.spec = spec
        self.device = resolve_device(cfg.runtime.device) if device is None else torch.device(device)
        self.dtype = DTYPES[cfg.model.dtype]
        self.width, self.height = cfg.video.width, cfg.video.height
        self.tokens_per_frame = (self.height // 16) * (self.width // 16)
        self.max_streams = max_streams or cfg.cache.max_streams
        self.num_slots = self.max_streams * MAX_LANES * cfg.cache.window
        # 1. This stage's part of the DiT and a pool for exactly its layers.
        self.model = build_stage_model(cfg, spec, self.device)
        self.pool = new_pool(self.model, self.num_slots, self.tokens_per_frame, cfg, self.dtype, self.device)
        self.schedule = FlowMatchSchedule(cfg.sampling.shift, cfg.sampling.num_train_timesteps)
        # 2. Prompt K/V of this stage's layers: per stream (key, kv), shared between streams by key.
        self._cond: dict[str, CondLRU] = {}  # later stages: each stream's recent condition keys
        self._kv_by_key: dict[tuple, tuple[CrossKV, int]] = {}
        # 3. First stage: streams, slot table, prompt encoder, VAE encode. Last: VAE decode.
        self.vae = self._build_vae() if (spec.first or spec.last) else None
        if spec.first:
            self.text = build_text_encoder(cfg, self.device, self.dtype)
            self.slots = SlotTable.from_config(self.num_slots, cfg.cache, cfg.model.rope_max_seq_len)
            self.streams: dict[str, StreamState] = {}
            self._prompts: OrderedDict[str, tuple[CrossKV, torch.Tensor]] = OrderedDict()
            self._sent: dict[str, CondLRU] = {}  # stream -> the condition keys later stages hold
            self._open: dict[tuple[int, int], list[Row]] = {}  # forwards whose flows are out
            self._steady: list[Row] = []
            self._groups: list[list[Row]] = []  # the step's steady rows split into micro-batches
            self._preparing: list[StreamState] = []
        if spec.last:
            self._decode_states: dict = {}
        self.extra_ms_per_block = 0.0  # > 0: each block of this stage takes that much longer (drills, tests)

    # -------------------------------------------------------------- set-up

    def _build_vae(self) -> StreamingVAE:
        return build_streaming_vae(self.cfg, self.device, self.dtype)

    def info(self) -> dict:
        """What this stage holds (tests count parameters; the executor logs it)."""
        blocks = sum(p.numel() for n, p in self.model.named_parameters() if n.startswith("blocks."))
        return {
            "index": self.spec.index,
            "block_range": self.model.block_range,
            "block_params": blocks,
            "dit_params": sum(p.numel() for p in self.model.parameters()),
            "param_names": sorted(n for n, _ in self.model.named_parameters()),
            "pool_layers": list(self.pool.layers),
            "pool_bytes": self.pool.nbytes(),
            "has_vae": self.vae is not None,
            "has_text": self.spec.first,
            "streams": len(self.streams) if self.spec.first else len(self._cond),
            "cond_keys": len(self._kv_by_key),
        }

    # -------------------------------------------------------------- streams

    def add_stream(self, stream_id: str, params: StreamParams) -> None:
        if self.spec.first:
            if stream_id in self.streams:
                raise KeyError(f"stream {stream_id!r} already exists")
            self.streams[stream_id] = self._new_state(stream_id, params)
        if self.spec.last:
            self._decode_states[stream_id] = self.vae.new_state()

    def remove_stream(self, stream_id: str) -> list[int]:
        """Forget the stream on this stage. The first stage returns the pool slots it held (all
        stages use the slot numbers its table hands out; the executor zeroes them on the others
        with `clear_slots`)."""
        held: list[int] = []
        if self.spec.first:
            state = self.streams.pop(stream_id, None)
            self._sent.pop(stream_id, None)
            self._preparing = [s for s in self._preparing if s.stream_id != stream_id]
            self._steady = [r for r in self._steady if r.state.stream_id != stream_id]
            if state is not None:
                held = state.release()
                self.pool.clear_slots(held)
        if self.spec.last:
            self._decode_states.pop(stream_id, None)
        self._release_cond(stream_id)
        return held

    def clear_slots(self, slots: list[int]) -> None:
        self.pool.clear_slots(slots)

    def clear_all(self) -> None:
        """After a failed step: zero the pool and forget forwards in flight (streams are gone)."""
        self.pool.clear()
        if self.spec.first:
            self._open.clear()
            self._steady, self._preparing = [], []
            self._sent.clear()

    def free_slots(self) -> int:
        return self.slots.free_slots

    def set_slowdown(self, extra_ms_per_block: float) -> None:
        """Make this stage's device look slower: every block takes `extra_ms_per_block` more."""
        self.extra_ms_per_block = float(extra_ms_per_block)

    def ping(self) -> int:
        return self.spec.index

    def restart_stream(self, stream_id: str, params: StreamParams) -> list[int]:
        """A new step count: fresh lanes, caches and VAE state (see ModelRunner.update_stream).
        Returns the slots the old lanes held (the executor zeroes them on every stage)."""
        held: list[int] = []
        if self.spec.first:
            state = self.streams.pop(stream_id)
            held = state.release()
            self.pool.clear_slots(held)
            self._preparing = [s for s in self._preparing if s.stream_id != stream_id]
            self._steady = [r for r in self._steady if r.state.stream_id != stream_id]
            self.streams[stream_id] = self._new_state(stream_id, params)
        if self.spec.last:
            self._decode_states[stream_id] = self.vae.new_state()
        return held

    def update_stream(self, stream_id: str, params: StreamParams, changes: dict) -> None:
        if not self.spec.first:
            return
        self.streams[stream_id].apply_live(params, "prompt" in changes)

    def _new_state(self, stream_id: str, params: StreamParams) -> StreamState:
        return StreamState(self, stream_id, self.slots, params.prompt, params.steps, params.seed, self.width,
                           self.height, params.noise_strength, params.motion_aware, prompt_kv=self._prompt_kv,
                           stride=lane_stride(self.cfg, params.lane_stride))

    def _prompt_kv(self, prompt: str) -> CrossKV:
        return self._prompt_entry(prompt)[0]

    def _prompt_entry(self, prompt: str) -> tuple[CrossKV, torch.Tensor]:
        entry = self._prompts.get(prompt)
        if entry is None:
            emb = self.text.encode(prompt)  # [1, L, text_dim]
            entry = (self.model.prompt_kv(emb), emb)
            self._prompts[prompt] = entry
            while len(self._prompts) > self.max_streams + 4:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(prompt)
        return entry

    def _release_cond(self, stream_id: str) -> None:
        lru = self._cond.pop(stream_id, None)
        if lru is not None and not self.spec.first:
            for key in lru.keys:
                self._unref(key)

    def _unref(self, key: tuple) -> None:
        kv, refs = self._kv_by_key[key]
        if refs <= 1:
            del self._kv_by_key[key]
        else:
            self._kv_by_key[key] = (kv, refs - 1)

    def _cond_kv(self, stream_id: str, key: tuple, embs: dict[tuple, torch.Tensor]) -> CrossKV:
        """A later stage's prompt K/V for a row's condition `key` (projected once per key; each
        stream keeps its few most recent conditions, since rows of one stream carry the
        condition their chunk entered with)."""
        lru = self._cond.setdefault(stream_id, CondLRU())
        if lru.use(key):
            return self._kv_by_key[key][0]
        for old in lru.evicted:
            self._unref(old)
        entry = self._kv_by_key.get(key)
        if entry is None:
            if key not in embs:
                raise RuntimeError(f"stage {self.spec.index}: no text embedding for condition {key!r} "
                                   f"of stream {stream_id!r}")
            entry = (self.model.prompt_kv(embs[key].to(self.device)), 0)
        self._kv_by_key[key] = (entry[0], entry[1] + 1)
        return entry[0]

    # -------------------------------------------------------------- one forward

    @torch.no_grad()
    def run(self, msg: StageInput | Hop) -> Hop | StepOut:
        t0 = time.perf_counter()
        if self.spec.first:
            hop, cross = self._first(msg)
        else:
            hop, cross = self._middle(msg)
        head_ms = (time.perf_counter() - t0) * 1000.0
        t_blocks = time.perf_counter()
        if hop.hidden is not None:
            hop.hidden = self._run_blocks(hop, cross)
        self._sync()
        delay_ms = self.extra_ms_per_block + self.cfg.parallel.block_delay_ms  # drills: a slower device
        if delay_ms > 0 and hop.hidden is not None:
            time.sleep(delay_ms * len(self.pool.layers) / 1000.0)
        blocks_ms = (time.perf_counter() - t_blocks) * 1000.0
        out: Hop | StepOut = hop
        t_tail = time.perf_counter()
        if self.spec.last:
            out = self._last(hop)
        self._sync()
        tail_ms = (time.perf_counter() - t_tail) * 1000.0
        total_ms = (time.perf_counter() - t0) * 1000.0
        out.stage_ms.append({"total": total_ms, "blocks": blocks_ms, "fixed": total_ms - blocks_ms,
                             "head": head_ms, "tail": tail_ms, "num_blocks": len(self.pool.layers)})
        return out

    def _first(self, msg: StageInput) -> tuple[Hop, CrossKV | None]:
        # 1. Flows of earlier forwards: x0, re-noise into the next lane (or done).
        for key, flows in msg.flows:
            rows = self._open.pop(key, [])
            for row, flow in zip(rows, flows.split(1)):
                if self.streams.get(row.state.stream_id) is row.state:  # not removed / restarted meanwhile
                    row.state.apply_flow(row, flow.to(self.device))
        for stream_id, params, prompt_changed in msg.updates:  # live changes, from this chunk on
            if stream_id in self.streams:
                self.streams[stream_id].apply_live(params, prompt_changed)
        # 2. New chunks: VAE encode (streams at the same point batched), noise, into lanes.
        planned = []
        for stream_id, given in msg.chunks.items():
            state = self.streams.get(stream_id)
            if state is None:
                continue
            if len(given.frames) != state.frames_needed:
                raise ValueError(f"stream {stream_id!r}: chunk of {len(given.frames)} frames, "
                                 f"its next chunk takes {state.frames_needed}")
            planned.append((state, given, state.pixels(given.frames)))  # [1, 3, n, H, W]
        latents = encode_many(self.vae, [(pixels, state.vae_state) for state, _, pixels in planned])
        for (state, given, pixels), lat in zip(planned, latents):
            lane = state.start_chunk(pixels, lat, tag=given.metas)
            if lane.chunk == 0:
                state.start_sequential(lane)
                self._preparing.append(state)
            else:
                self._steady.extend(state.enter(lane))
        # 3. This forward's rows.
        if msg.kind == "steady":
            if msg.group == 0:
                self._groups, self._steady = split_rows(self._steady, msg.groups), []
            rows = self._groups[msg.group] if msg.group < len(self._groups) else []
        else:
            self._preparing = [s for s in self._preparing if s.sequential is not None]
            rows = [s.sequential for s in self._preparing]
        key = (msg.step_id, msg.part)
        if not rows:
            return Hop(key, [], None, None, (0, 0, 0), [], {}, []), None
        self._open[key] = rows
        # 4. Slot plans (and re-bases) for the rows; conditions later stages do not have yet.
        plans = plan_rows(rows)
        apply_rebases(self.model, self.pool, plans)
        metas, embs = [], {}
        for row in rows:
            state, lane = row.state, row.lane
            finishes = row.j == state.steps - 1
            metas.append(RowMeta(state.stream_id, row.j, lane.t, finishes, lane.cond_key,
                                 lane.tag if finishes else None))
            # Later stages keep each stream's recent conditions (CondLRU, same rule on every
            # stage, fed rows in the same order): send an embedding only when they lack it.
            if not self._sent.setdefault(state.stream_id, CondLRU()).use(lane.cond_key):
                embs[lane.cond_key] = (lane.cond_emb if lane.cond_emb is not None
                                       else self._prompt_entry(lane.cond_key[1])[1])
        x = torch.cat([row.lane.x for row in rows])  # [B, 16, F, h, w]
        hidden = self.model.embed(x)  # [B, F*T, dim]
        hop = Hop(key, metas, hidden, x, tuple(x.shape[2:]), plans, embs, [])
        return hop, self.model.stack_prompt_kv([row.lane.cross_kv for row in rows])

    def _middle(self, hop: Hop) -> tuple[Hop, CrossKV | None]:
        if hop.hidden is None:
            return hop, None
        apply_rebases(self.model, self.pool, hop.plans)
        cross = [self._cond_kv(m.stream_id, m.cond, hop.embs) for m in hop.rows]
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
            return StepOut(hop.key, [], None, {}, hop.stage_ms)
        frames, h, w = hop.latent_shape
        timestep = row_timesteps([m.t for m in hop.rows], frames, self.device)  # [B, F]
        temb, _ = self.model.time_embedding(timestep)
        flow = self.model.head(hop.hidden, temb, hop.latent_shape).float()  # [B, 16, F, h, w]
        x = hop.x.to(self.device)
        # Finished chunks: x0 exactly as StreamState.apply_flow computes it, then decode.
        done = []
        for i, meta in enumerate(hop.rows):
            if meta.finishes and meta.stream_id in self._decode_states:
                sigma = self.schedule.sigma(meta.t)
                done.append((meta, self.schedule.flow_to_x0(x[i : i + 1], flow[i : i + 1], sigma)))
        pixels = decode_many(self.vae, [(x0, self._decode_states[m.stream_id]) for m, x0 in done])
        finished = {}
        for (meta, _), px in zip(done, pixels):
            out = tensor_to_frames(px)  # [m, H, W, 3] uint8
            if len(meta.tag) != len(out):
                raise RuntimeError(f"stream {meta.stream_id!r}: {len(out)} frames decoded for {len(meta.tag)} input frames")
            finished[meta.stream_id] = StreamOutput(out, tuple(meta.tag))
        rows = [RowMeta(m.stream_id, m.j, m.t, m.finishes, m.cond) for m in hop.rows]
        return StepOut(hop.key, rows, flow.cpu(), finished, hop.stage_ms)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -------------------------------------------------------------- moving blocks

    def give_blocks(self, layers: list[int]) -> dict:
        """Hand `layers` (at one end of this stage's range) to a neighbour: weights, K/V and
        every condition's prompt K/V of those layers. They leave this stage."""
        start, end = self.model.block_range
        layers = sorted(layers)
        if not layers or not (layers[0] == start or layers[-1] == end - 1) or len(layers) >= end - start:
            raise ValueError(f"stage {self.spec.index} holds [{start}, {end}): cannot give {layers}")
        state = {f"blocks.{i}.{k}": v.cpu() for i in layers for k, v in self.model.blocks[str(i)].state_dict().items()}
        pool_state = {name: t.cpu() for name, t in self.pool.remove_layers(layers).items()}
        cond: dict[tuple, dict[int, tuple]] = {}
        for key, kv in self._cross_kvs():
            cond[key] = {i: (kv[i][0].cpu(), kv[i][1].cpu()) for i in layers}
            for i in layers:
                kv.pop(i, None)
        for i in layers:
            del self.model.blocks[str(i)]
        self.model.block_range = (layers[-1] + 1, end) if layers[0] == start else (start, layers[0])
        return {"layers": layers, "state": state, "pool": pool_state, "cond": cond}

    def take_blocks(self, package: dict) -> None:
        """Receive blocks from a neighbour (the other half of `give_blocks`)."""
        layers = package["layers"]
        start, end = self.model.block_range
        if not (layers[-1] + 1 == start or layers[0] == end):
            raise ValueError(f"stage {self.spec.index} holds [{start}, {end}): blocks {layers} are not adjacent")
        donor = CausalWanModel(self.cfg.model, (layers[0], layers[-1] + 1), has_embed=False, has_head=False)
        donor.blocks.load_state_dict({k.split(".", 1)[1]: v for k, v in package["state"].items()}, strict=True)
        donor.cast_(self.dtype).to(self.device).eval().requires_grad_(False)
        merged = {**{name: blk for name, blk in self.model.blocks.items()}, **dict(donor.blocks.items())}
        self.model.blocks = torch.nn.ModuleDict({str(i): merged[str(i)] for i in sorted(int(n) for n in merged)})
        self.model.block_range = (min(start, layers[0]), max(end, layers[-1] + 1))
        self.pool.add_layers(layers, package["pool"])
        for key, kv in self._cross_kvs():
            moved = package["cond"].get(key)
            if moved is None:  # a condition no row has carried downstream yet: project it here
                fresh = self.model.prompt_kv(self._emb_for(key))
                moved = {i: fresh[i] for i in layers}
            for i in layers:
                k, v = moved[i]
                kv[i] = (k.to(self.device), v.to(self.device))

    def _emb_for(self, key: tuple) -> torch.Tensor:
        """The first stage's text embedding of a condition key."""
        if key[0] == "prompt":
            return self._prompt_entry(key[1])[1]
        for state in self.streams.values():
            lanes = state.chunks_in_flight()
            for cond_key, emb in [(state.cond_key, state.cond_emb)] + [(l.cond_key, l.cond_emb) for l in lanes]:
                if cond_key == key:
                    return emb
        raise KeyError(f"no embedding for condition {key!r}")

    def _cross_kvs(self):
        """(condition key, the CrossKV dict this stage uses for it), each dict once."""
        seen: dict[int, tuple] = {}
        if self.spec.first:
            for state in self.streams.values():
                seen.setdefault(id(state.cross_kv), (state.cond_key, state.cross_kv))
                for lane in state.chunks_in_flight():  # chunks keep the condition they entered with
                    seen.setdefault(id(lane.cross_kv), (lane.cond_key, lane.cross_kv))
            for prompt, (kv, _) in self._prompts.items():
                seen.setdefault(id(kv), (("prompt", prompt), kv))
        for key, (kv, _) in self._kv_by_key.items():
            seen.setdefault(id(kv), (key, kv))
        return list(seen.values())


__all__ = ["Hop", "RowMeta", "StageInput", "StageSpec", "StageWorker", "StepOut", "build_stage_model"]
