"""ModelRunner: the model side of one engine step, for many streams over one shared KV pool.

Owns: the Components (DiT, streaming VAE, prompt encoder, noise schedule), ONE `KVPool` sized
for `cache.max_streams` streams x 4 lanes x `cache.window` slots, ONE `SlotTable`, a small
cache of prompt K/V shared by streams with the same prompt, and one `StreamState` per stream
(VAE caches, motion controller, lanes, chunk counter, prompt K/V, seed, steps).
Does not own: which streams run in a step (the scheduler's StepPlan says), input buffering,
output queues, timing (executor.py) or the per-chunk math (pipeline/stream_state.py, the same
code StreamPipeline runs for its single stream).

One `execute(plan, inputs)`:
  1. VAE-encode the planned chunks — streams whose causal-conv caches are at the same point in
     one batched call (vae_batch.py), the others alone — then noise each with its own
     motion-aware strength and seed;
  2. ONE DiT forward over every stream-batch row of every planned stream (rows = occupied
     lanes; streams differ in prompt, fill level, lanes and steps);
  3. first chunks (2 latent frames, so they cannot share a forward with 1-frame rows): their
     denoise steps one after another, the first chunks of all streams batched per step;
  4. VAE-decode the chunks that finished (batched the same way) to uint8 frames.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import time

import torch

from streamdiff.cache.slots import SlotTable
from streamdiff.engine.types import ChunkInput, StreamOutput, StreamParams, validate_changes
from streamdiff.engine.vae_batch import decode_many, encode_many
from streamdiff.model.build import Components
from streamdiff.model.causal_wan import CrossKV
from streamdiff.pipeline.frames import tensor_to_frames
from streamdiff.pipeline.stream_state import Row, StreamState, forward_rows, lane_stride, new_pool
from streamdiff.scheduler.types import StepPlan

MAX_LANES = 4  # denoise steps 1..4: a stream may switch to 4 live, so the pool reserves 4 lanes


class ModelRunner:
    def __init__(self, comps: Components, max_streams: int | None = None, profile: bool = False,
                 batch_vae: bool = True):
        cfg = comps.cfg
        self.comps = comps
        self.model = comps.model
        self.width, self.height = cfg.video.width, cfg.video.height
        self.tokens_per_frame = (self.height // 16) * (self.width // 16)
        self.max_streams = max_streams or cfg.cache.max_streams
        # 1. One pool and one slot table for every stream and lane of this process.
        num_slots = self.max_streams * MAX_LANES * cfg.cache.window
        self.pool = new_pool(self.model, num_slots, self.tokens_per_frame, cfg, comps.dtype, comps.device, comps.step)
        self.slots = SlotTable.from_config(num_slots, cfg.cache, cfg.model.rope_max_seq_len)
        # 2. Per-stream state and parameters; prompt K/V shared by prompt text (LRU).
        self.streams: dict[str, StreamState] = {}
        self.params: dict[str, StreamParams] = {}
        self._prompt_cache: OrderedDict[str, CrossKV] = OrderedDict()
        self._prompt_cache_size = self.max_streams + 4
        self.batch_vae = batch_vae  # one VAE call for streams whose caches are at the same point
        # 3. Optional per-phase timing of the last step (synchronizes the device between phases).
        self.profile = profile
        self.last_phase_ms: dict[str, float] = {}

    # ------------------------------------------------------------------ streams

    def add_stream(self, stream_id: str, params: StreamParams) -> None:
        if stream_id in self.streams:
            raise KeyError(f"stream {stream_id!r} already exists")
        self.streams[stream_id] = self._new_state(stream_id, params)
        self.params[stream_id] = params

    def remove_stream(self, stream_id: str) -> None:
        """Drop the stream: its lanes, VAE caches and prompt K/V; its pool slots are zeroed and
        returned to the slot table. Unknown ids are ignored."""
        state = self.streams.pop(stream_id, None)
        self.params.pop(stream_id, None)
        if state is not None:
            self.pool.clear_slots(state.release())

    def update_stream(self, stream_id: str, changes: Mapping[str, object]) -> None:
        """Apply live changes between steps. A new step count re-prepares the stream: its lanes
        (the chunks in flight), KV lanes, VAE caches and motion state are dropped and the next
        chunk is a first chunk again, exactly as for a new stream with the same prompt and seed."""
        changes = validate_changes(changes)
        state = self.streams[stream_id]
        params = self.params[stream_id].with_changes(changes)
        self.params[stream_id] = params
        if params.steps != state.steps:
            self.pool.clear_slots(state.release())
            self.streams[stream_id] = self._new_state(stream_id, params)
            return
        state.apply_live(params, "prompt" in changes)

    def _new_state(self, stream_id: str, params: StreamParams) -> StreamState:
        return StreamState(
            self.comps, stream_id, self.slots, params.prompt, params.steps, params.seed, self.width, self.height,
            params.noise_strength, params.motion_aware, prompt_kv=self._prompt_kv,
            stride=lane_stride(self.comps.cfg, params.lane_stride),
        )

    def _prompt_kv(self, prompt: str) -> CrossKV:
        kv = self._prompt_cache.get(prompt)
        if kv is None:
            kv = self.model.prompt_kv(self.comps.text.encode(prompt))
            self._prompt_cache[prompt] = kv
            while len(self._prompt_cache) > self._prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        else:
            self._prompt_cache.move_to_end(prompt)
        return kv

    def frames_needed(self, stream_id: str) -> int:
        return self.streams[stream_id].frames_needed

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def execute(self, plan: StepPlan, inputs: Mapping[str, ChunkInput]) -> tuple[dict[str, StreamOutput], int]:
        """Run the plan's chunks (see the module docstring). Returns the output frames of every
        stream whose chunk finished, and the number of DiT forwards run."""
        marks = [("start", self._mark())]
        finished: dict[str, tuple[torch.Tensor, tuple]] = {}  # stream -> (x0 of its finished chunk, metas)
        steady: list[Row] = []
        prepare: list[Row] = []
        # 1. VAE-encode the chunks (streams at the same point in one call), then noise each;
        #    it enters its stream's lanes, or is prepared if it is the stream's first chunk.
        planned: list[tuple[StreamState, ChunkInput, torch.Tensor]] = []
        for chunk in plan.chunks:
            state = self.streams.get(chunk.stream_id)
            if state is None:
                continue  # removed after planning
            given = inputs[chunk.stream_id]
            if len(given.frames) != state.frames_needed:
                raise ValueError(f"stream {chunk.stream_id!r}: chunk of {len(given.frames)} frames, "
                                 f"its next chunk takes {state.frames_needed}")
            planned.append((state, given, state.pixels(given.frames)))  # [1, 3, n, H, W]
        latents = self._encode([(pixels, state.vae_state) for state, _, pixels in planned])
        for (state, given, pixels), lat in zip(planned, latents):
            lane = state.start_chunk(pixels, lat, tag=given.metas)
            if lane.chunk == 0:
                prepare.append(state.start_sequential(lane))
            else:
                steady.extend(state.enter(lane))
        marks.append(("encode", self._mark()))

        def run(rows: list[Row]) -> None:
            for row, flow in zip(rows, forward_rows(self.model, self.pool, rows, self.comps.cfg.cache, self.comps.step)):
                x0 = row.state.apply_flow(row, flow)
                if x0 is not None:
                    if row.state.stream_id in finished:
                        raise RuntimeError(f"stream {row.state.stream_id!r} finished two chunks in one step")
                    finished[row.state.stream_id] = (x0, row.lane.tag)

        # 2. One forward over all stream-batch rows of all streams.
        forwards = 0
        if steady:
            run(steady)
            forwards += 1
        # 3. First chunks: denoise step k of every preparing stream in one forward.
        while prepare:
            run(prepare)
            forwards += 1
            prepare = [row.state.sequential for row in prepare if row.state.sequential is not None]
        marks.append(("dit", self._mark()))
        # 4. Decode what finished (one chunk per stream at most), streams batched where they can.
        done = [(stream_id, x0, tag) for stream_id, (x0, tag) in finished.items()]
        pixels = self._decode([(x0, self.streams[stream_id].vae_state) for stream_id, x0, _ in done])
        outputs: dict[str, StreamOutput] = {}
        for (stream_id, _, tag), px in zip(done, pixels):
            frames = tensor_to_frames(px)  # [m, H, W, 3] uint8
            if len(tag) != len(frames):
                raise RuntimeError(f"stream {stream_id!r}: {len(frames)} frames decoded for {len(tag)} input frames")
            outputs[stream_id] = StreamOutput(frames, tuple(tag))
        if self.comps.device.type == "cuda":
            torch.cuda.synchronize(self.comps.device)  # the step's time must include its kernels
        if self.profile:
            marks.append(("decode", self._mark()))
            self.last_phase_ms = {name: (t - marks[i][1]) * 1000.0 for i, (name, t) in enumerate(marks[1:])}
        return outputs, forwards

    def _encode(self, items: list[tuple[torch.Tensor, object]]) -> list[torch.Tensor]:
        if self.batch_vae:
            return encode_many(self.comps.vae, items)
        return [self.comps.vae.encode_chunk(x, state) for x, state in items]

    def _decode(self, items: list[tuple[torch.Tensor, object]]) -> list[torch.Tensor]:
        if self.batch_vae:
            return decode_many(self.comps.vae, items)
        return [self.comps.vae.decode_chunk(z, state) for z, state in items]

    def _mark(self) -> float:
        if self.profile and self.comps.device.type == "cuda":
            torch.cuda.synchronize(self.comps.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ accounting

    def resources(self) -> dict[str, int]:
        """Pool and bookkeeping sizes (leak checks, metrics)."""
        return {
            "streams": len(self.streams),
            "pool_slots": self.slots.allocator.num_slots,
            "free_slots": self.slots.free_slots,
            "slot_table_streams": len(self.slots.streams),
            "prompt_cache": len(self._prompt_cache),
            "pool_bytes": self.pool.nbytes(),
            "vae_cache_bytes": sum(s.vae_state.cache_bytes() for s in self.streams.values()),
        }


__all__ = ["MAX_LANES", "ModelRunner"]
