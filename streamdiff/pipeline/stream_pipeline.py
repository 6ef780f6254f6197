"""StreamPipeline: one stream through the whole model path, no scheduler, no server.

Owns: the per-stream loop — buffer frames into chunks, VAE-encode, noise with the
motion-aware strength, denoise through the stream-batch lanes over the rolling KV cache,
VAE-decode — for a single stream, with its own KV pool and slot table.
Does not own: the per-stream state and per-chunk math (stream_state.py, shared with the
engine's ModelRunner), the network (model/), the cache layout (cache/) or the formulas (sampling/).
It is the readable reference and the oracle the engine and the Ray stages are tested against.

Chunks: the first chunk is 5 frames (2 latent frames) and is denoised at once through every
step ("prepare"); then every 4 frames (1 latent frame) make a chunk. With `stream_batch` (the
default) one forward per chunk carries one row per denoise step, each row a lane holding an
older chunk at its own timestep with its own KV lane, so output lags `steps - 1` chunks; with
`stream_batch=False` every chunk runs its steps one after another (same numbers, no lag).
"""

from __future__ import annotations

import numpy as np
import torch

from streamdiff.cache.slots import SlotTable
from streamdiff.model.build import Components
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.pipeline.stream_state import Lane, Row, StreamState, forward_rows, lane_stride, new_pool

__all__ = ["Lane", "StreamPipeline"]


class StreamPipeline:
    def __init__(
        self,
        comps: Components,
        prompt: str,
        steps: int | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        stream_batch: bool = True,
        stride: int | None = None,
    ):
        cfg = comps.cfg
        self.comps = comps
        self.model: CausalWanModel = comps.model
        self.stream_batch = stream_batch
        width, height = width or cfg.video.width, height or cfg.video.height  # StreamState checks them
        steps = steps or cfg.sampling.steps

        # 1. This stream's own KV pool (one window per lane) and slot table; then its state.
        num_slots = steps * cfg.cache.window
        self.pool = new_pool(self.model, num_slots, (height // 16) * (width // 16), cfg, comps.dtype, comps.device,
                             comps.step)
        self.slots = SlotTable.from_config(num_slots, cfg.cache, cfg.model.rope_max_seq_len)
        stride = lane_stride(cfg) if stride is None else stride
        self.state = StreamState(comps, 0, self.slots, prompt, steps, seed, width, height, stride=stride)
        self._pending: list[np.ndarray] = []

    # ------------------------------------------------------------------ controls

    def set_prompt(self, prompt: str) -> None:
        """Swap the cross-attention K/V; the stream and its caches carry on."""
        self.state.set_prompt(prompt)

    @property
    def lag_chunks(self) -> int:
        return (self.steps - 1) * self.state.stride if self.stream_batch else 0

    # The stream's state, read through.
    steps = property(lambda self: self.state.steps)
    width = property(lambda self: self.state.width)
    height = property(lambda self: self.state.height)
    prompt = property(lambda self: self.state.prompt)
    motion = property(lambda self: self.state.motion)

    # ------------------------------------------------------------------ frames in, frames out

    def push(self, frames: np.ndarray) -> np.ndarray:
        """Feed frames [n, H, W, 3] uint8; returns the output frames ready so far [m, H, W, 3]."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [n, {self.height}, {self.width}, 3], got {frames.dtype} {list(frames.shape)}"
            )
        self._pending.extend(frames)
        out: list[np.ndarray] = []
        while len(self._pending) >= self.state.frames_needed:
            need = self.state.frames_needed
            chunk, self._pending = self._pending[:need], self._pending[need:]
            out.extend(self._run_chunk(np.stack(chunk)))
        return self._stack(out)

    def flush(self) -> np.ndarray:
        """End of input: pad the trailing frames with the last one to fill a chunk, drain the
        lanes, and drop the padded frames' outputs. Returns the remaining output frames."""
        out: list[np.ndarray] = []
        pad = 0  # padded frames to drop from the final chunk's output (this flush's only)
        if self._pending:
            pad = self.state.frames_needed - len(self._pending)
            chunk = np.stack(self._pending + [self._pending[-1]] * pad)
            self._pending = []
            out.extend(self._run_chunk(chunk))
        while self.state.in_flight:
            out.extend(self._step(None))
        if pad and out:
            out = out[: len(out) - pad]
        return self._stack(out)

    def _stack(self, frames: list[np.ndarray]) -> np.ndarray:
        if not frames:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.stack(frames)

    # ------------------------------------------------------------------ one chunk

    @torch.no_grad()
    def _run_chunk(self, frames: np.ndarray) -> list[np.ndarray]:
        # 1. Encode the frames to latents and noise them with the motion-aware strength.
        lane = self.state.encode(frames)
        # 2. The first chunk is prepared through every step at once (no lag). Without stream
        #    batch, the stand-ins the stream batch runs through lanes 1.. before chunk 1 reaches
        #    them run first, so that every lane sees what it sees in the stream batch.
        if lane.chunk == 1 and not self.stream_batch:
            fillers = self.state.filler_rows(lane)
            while fillers:
                nxt = (self.state.next_filler(row, flow) for row, flow in zip(fillers, self._forward(fillers)))
                fillers = [row for row in nxt if row is not None]
        if lane.chunk == 0 or not self.stream_batch:
            row = self.state.start_sequential(lane)
            while True:
                x0 = self.state.apply_flow(row, self._forward([row])[0])
                if x0 is not None:
                    return list(self.state.decode(x0))
                row = self.state.sequential
        # 3. Later chunks enter lane 0 of the stream batch.
        return self._step(lane)

    def _step(self, incoming: Lane | None) -> list[np.ndarray]:
        """One stream-batch forward: every occupied lane advances one denoise step."""
        rows = self.state.enter(incoming)
        if not rows:
            return []
        out: list[np.ndarray] = []
        for row, flow in zip(rows, self._forward(rows)):
            x0 = self.state.apply_flow(row, flow)
            if x0 is not None:
                out.extend(self.state.decode(x0))
        return out

    def _forward(self, rows: list[Row]) -> list[torch.Tensor]:
        """One DiT forward over this stream's rows -> flow per row."""
        return forward_rows(self.model, self.pool, rows, self.comps.cfg.cache, self.comps.step)
