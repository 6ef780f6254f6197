"""A model runner's place in a pipeline (`StageSpec`) and what travels between runners.

Owns: the stage spec (block range, first / last flags, VAE role), the chain of specs for a
split (`stage_specs`, with or without VAE stages of their own), and the messages of one forward:
executor -> first runner (`StageInput`), runner -> runner (`Hop`: the intermediate tensors),
last runner -> executor (`StepOut`), per-row metadata (`RowMeta`), how a step's rows split
into micro-batches, and an upper bound of a message's size for a config (`message_bytes`).
Plain data (tensors, numpy arrays, slot plans): Ray pickles them between CPU actors and sends
their tensors over NCCL between GPU actors.
Does not own: producing or consuming them (model_runner.py; parallel/ drives the chain).

The local executor is the one-stage case: `StageSpec.whole(num_blocks)` (first and last, both
VAE halves). With `vae_stages`, encode and decode are stages of their own with no blocks:
  [encode] -> [first DiT blocks] -> ... -> [last DiT blocks] -> [decode]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from streamdiff.cache.slots import WritePlan
from streamdiff.config import Config, frames_for_latents
from streamdiff.engine.types import ChunkInput, StreamOutput
from streamdiff.model.flops import PATCH_VOLUME, tokens_per_frame
from streamdiff.scheduler.types import StepPlan

MAX_LANES = 4  # denoise steps 1..4, one lane (a row of a forward) each; steps may grow live
MESSAGE_SLACK = 1 << 16  # a message's pickled rest: plans, frame metas, timings, framing

VAE_ROLES = ("both", "encode", "decode", "none")


@dataclass(frozen=True)
class StageSpec:
    """One runner's share of the model.

    block_range: DiT blocks [i, j) it holds (empty for a VAE stage).
    first: it holds the patch embedding and the streams' `StreamState`s (slot table, lanes,
        motion, prompt): it turns chunks into rows. last: it holds the head and turns the rows'
        hidden states into flows. None: derived from the index (no VAE stages).
    vae: which VAE half it runs: "both", "encode", "decode" or "none"; "auto" derives it from
        first / last (the first DiT stage encodes, the last decodes).
    """

    index: int
    num_stages: int
    block_range: tuple[int, int]
    first: bool | None = None
    last: bool | None = None
    vae: str = "auto"

    def __post_init__(self) -> None:
        if self.first is None:
            object.__setattr__(self, "first", self.index == 0)
        if self.last is None:
            object.__setattr__(self, "last", self.index == self.num_stages - 1)
        if self.vae == "auto":
            role = {(True, True): "both", (True, False): "encode", (False, True): "decode"}.get((self.first, self.last))
            object.__setattr__(self, "vae", role or "none")
        if self.vae not in VAE_ROLES:
            raise ValueError(f"stage vae role must be one of {', '.join(VAE_ROLES)}, got {self.vae!r}")
        if (self.first or self.last) and not self.has_blocks:
            raise ValueError(f"stage {self.index}: first / last stages need blocks, got {self.block_range}")

    @staticmethod
    def whole(num_blocks: int) -> "StageSpec":
        """The local executor: every block, first and last, both VAE halves."""
        return StageSpec(0, 1, (0, num_blocks), True, True, "both")

    @property
    def has_blocks(self) -> bool:
        return self.block_range[1] > self.block_range[0]

    @property
    def encodes(self) -> bool:
        return self.vae in ("both", "encode")

    @property
    def decodes(self) -> bool:
        return self.vae in ("both", "decode")

    @property
    def num_blocks(self) -> int:
        return self.block_range[1] - self.block_range[0]


def stage_specs(ranges: Sequence[tuple[int, int]], vae_stages: bool = False) -> list[StageSpec]:
    """The chain of specs for DiT block `ranges` (one per DiT stage); with `vae_stages`, an encode
    stage before them and a decode stage after them, so the DiT stages carry only blocks."""
    n = len(ranges)
    if not vae_stages:
        return [StageSpec(k, n, r) for k, r in enumerate(ranges)]
    total = n + 2
    start, end = ranges[0][0], ranges[-1][1]
    specs = [StageSpec(0, total, (start, start), False, False, "encode")]
    specs += [StageSpec(k + 1, total, r, k == 0, k == n - 1, "none") for k, r in enumerate(ranges)]
    specs.append(StageSpec(total - 1, total, (end, end), False, False, "decode"))
    return specs


@dataclass
class RowMeta:
    """What later stages need of a row: its stream, lane (= denoise step), timestep, whether
    its chunk finishes in this forward, its condition key, and (finishing rows) the input frames."""

    stream_id: str
    j: int
    t: int
    finishes: bool
    cond: tuple
    tag: object = None


@dataclass
class StageInput:
    """Executor -> first stage: one forward of a step. `plan` (the first forward of a step
    only) carries the core's stream commands (new / finished / restarted / updated streams);
    every stage applies them before the forward. `encoded`: filled by an encode stage, the
    chunks' latents [1, 16, F, h, w] per stream (the first DiT stage still reads the frames:
    the motion controller measures pixels)."""

    step_id: int
    part: int  # 0: the step's stream-batch forward; 1, 2, ...: prepare denoise steps
    kind: str  # "steady" | "prepare"
    chunks: dict[str, ChunkInput] = field(default_factory=dict)
    flows: list[tuple[tuple[int, int], torch.Tensor]] = field(default_factory=list)  # ((step, part), [B,...])
    group: int = 0  # steady forwards: this micro-batch of the step's rows ...
    groups: int = 1  # ... out of this many (contiguous, near-equal shares)
    plan: StepPlan | None = None
    encoded: dict[str, torch.Tensor] = field(default_factory=dict)
    stage_ms: list[dict[str, float]] = field(default_factory=list)  # encode stage's timing


@dataclass
class Hop:
    """Stage k -> stage k+1: the rows' hidden states (the intermediate tensors) and what the
    blocks need besides."""

    key: tuple[int, int]  # (step_id, part)
    rows: list[RowMeta]
    hidden: torch.Tensor | None  # [B, F*T, dim]; None when the forward has no rows
    x: torch.Tensor | None  # [B, 16, F, h, w] the rows' latents (the last stage needs them)
    latent_shape: tuple[int, int, int]
    plans: list[WritePlan]
    embs: dict[tuple, torch.Tensor]  # text embeddings [1, L, text_dim] of conditions new downstream
    stage_ms: list[dict[str, float]]
    plan: StepPlan | None = None  # the stream commands, for the stages after this one


@dataclass
class StepOut:
    """Last stage -> executor: flows of every row (for the first stage) and finished frames.
    `decode`: finished chunks' x0 [1, 16, F, h, w] with their stream and tag, while a decode
    stage still has to turn them into `finished` frames."""

    key: tuple[int, int]
    rows: list[RowMeta]
    flows: torch.Tensor | None  # [B, 16, F, h, w] fp32, CPU
    finished: dict[str, StreamOutput]
    stage_ms: list[dict[str, float]]
    decode: list[tuple[str, torch.Tensor, object]] = field(default_factory=list)
    plan: StepPlan | None = None


def split_rows(rows: list, groups: int) -> list[list]:
    """`rows` in `groups` contiguous parts whose sizes differ by at most one."""
    base, extra = divmod(len(rows), groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(rows[start : start + size])
        start += size
    return out


def message_bytes(cfg: Config, hop_tensors: bool = True) -> int:
    """An upper bound of one message's pickled size (`StageInput`, `Hop` or `StepOut`) under
    `cfg`: every stream `cache.max_streams` allows in one forward at four denoise steps, a
    stream's first chunk (the longest) for each, 4 bytes an element whatever the dtype, a new
    prompt embedding per stream. `hop_tensors=False`: a hop's device tensors travel another way
    (NCCL between GPU stages) and do not count; its prompt embeddings still do (host tensors
    with `text.device: cpu`, and Ray sends host tensors with the message). A transport that
    must size its buffers up front (Ray's channels) sizes them with it."""
    s, v, m = cfg.sampling, cfg.video, cfg.model
    latent_frames = max(s.first_chunk_latents, s.chunk_latents)
    frames = max(frames_for_latents(s.first_chunk_latents, True), frames_for_latents(s.chunk_latents, False))
    streams = cfg.cache.max_streams
    rows = streams * MAX_LANES
    tokens = latent_frames * tokens_per_frame(v.width, v.height)  # one row's
    pixels = streams * frames * v.height * v.width * 3  # uint8 frames in (chunks) or out (finished)
    latent = 4 * m.in_channels * tokens * PATCH_VOLUME  # one stream's or one row's latents
    hidden = 4 * tokens * m.dim
    prompt = 4 * cfg.text.max_length * m.text_dim
    stage_input = pixels + streams * latent + rows * latent  # frames, encoded latents, last flows
    hop = (rows * (hidden + latent) if hop_tensors else 0) + streams * prompt
    step_out = pixels + rows * latent + streams * latent  # finished frames, flows, x0 to decode
    return max(stage_input, hop, step_out) + MESSAGE_SLACK


__all__ = ["MAX_LANES", "Hop", "RowMeta", "StageInput", "StageSpec", "StepOut", "VAE_ROLES", "message_bytes", "split_rows",
           "stage_specs"]
