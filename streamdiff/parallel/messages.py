"""The messages of one forward through the pipeline stages, and the stage spec.

Owns: what travels executor -> first stage (`StageInput`), stage -> stage (`Hop`) and last
stage -> executor (`StepOut`), per-row metadata (`RowMeta`), a stage's place (`StageSpec`) and
how a step's rows split into micro-batches. Plain data (tensors, numpy arrays, slot plans):
Ray pickles them between CPU actors and sends their tensors over NCCL between GPU actors.
Does not own: producing or consuming them (stage.py, executor.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamdiff.cache.slots import WritePlan
from streamdiff.engine.types import ChunkInput, StreamOutput


@dataclass(frozen=True)
class StageSpec:
    index: int
    num_stages: int
    block_range: tuple[int, int]

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


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
    """Executor -> first stage: one forward of a step."""

    step_id: int
    part: int  # 0: the step's stream-batch forward; 1, 2, ...: prepare denoise steps
    kind: str  # "steady" | "prepare"
    chunks: dict[str, ChunkInput] = field(default_factory=dict)
    flows: list[tuple[tuple[int, int], torch.Tensor]] = field(default_factory=list)  # ((step, part), [B,...])
    group: int = 0  # steady forwards: this micro-batch of the step's rows ...
    groups: int = 1  # ... out of this many (contiguous, near-equal shares)
    # Live changes (stream, its new params, whether the prompt changed), applied by the first
    # stage before this forward's chunks start: they ride with the plan, never racing one in flight.
    updates: list[tuple[str, object, bool]] = field(default_factory=list)


@dataclass
class Hop:
    """Stage k -> stage k+1: the rows' hidden states and what the blocks need besides."""

    key: tuple[int, int]  # (step_id, part)
    rows: list[RowMeta]
    hidden: torch.Tensor | None  # [B, F*T, dim]; None when the forward has no rows
    x: torch.Tensor | None  # [B, 16, F, h, w] the rows' latents (the last stage needs them)
    latent_shape: tuple[int, int, int]
    plans: list[WritePlan]
    embs: dict[tuple, torch.Tensor]  # text embeddings [1, L, text_dim] of conditions new downstream
    stage_ms: list[dict[str, float]]


@dataclass
class StepOut:
    """Last stage -> executor: flows of every row (for the first stage) and finished frames."""

    key: tuple[int, int]
    rows: list[RowMeta]
    flows: torch.Tensor | None  # [B, 16, F, h, w] fp32, CPU
    finished: dict[str, StreamOutput]
    stage_ms: list[dict[str, float]]


def split_rows(rows: list, groups: int) -> list[list]:
    """`rows` in `groups` contiguous parts whose sizes differ by at most one."""
    base, extra = divmod(len(rows), groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(rows[start : start + size])
        start += size
    return out


__all__ = ["Hop", "RowMeta", "StageInput", "StageSpec", "StepOut", "split_rows"]
