"""The block partitioner: how many DiT blocks each pipeline stage holds, from measured cost.

Owns: the balanced split (`balance`), block ranges from counts, the block moves that turn one
split into another (`moves`), and `Rebalancer`, which watches per-stage step times while
serving and proposes a new split when the imbalance persists. Plain Python, no torch or ray.
Does not own: measuring (each stage times itself, parallel/stage.py) or moving the blocks and
their K/V (the executor asks the stages to).

VAE stages (`parallel.vae_stages`) hold no blocks: they are not split, but their time is a floor
under any split's period, so the Rebalancer proposes a move only if it shortens the slowest
stage of the whole pipeline (a VAE stage slower than every DiT stage makes moving blocks moot).

Cost model: stage k spends `fixed_k` ms per step outside its blocks (the first stage: VAE
encode and the patch embedding; the last: the head and VAE decode; every stage: messages) and
`per_block_k` ms per block it holds (its device's speed: a slower or busier device has a larger
per-block cost). A split n_k (n_k >= 1, sum = blocks) takes max_k fixed_k + n_k per_block_k
per forward in steady state; `balance` minimises that. Handing blocks out one at a time to the
stage that would finish earliest with one more is optimal for this cost (identical jobs on
machines of different speeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def even_split(num_blocks: int, num_stages: int) -> list[int]:
    """Blocks per stage, as even as possible (earlier stages get the remainder)."""
    if not 1 <= num_stages <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {num_stages} stages")
    base, extra = divmod(num_blocks, num_stages)
    return [base + (1 if k < extra else 0) for k in range(num_stages)]


def initial_counts(partition: Sequence[int], num_blocks: int, num_stages: int) -> list[int]:
    """The split a pipeline starts from: `parallel.partition` when it names `num_stages` stages,
    else even."""
    return list(partition) if len(partition) == num_stages else even_split(num_blocks, num_stages)


def ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    """Blocks per stage -> [start, end) per stage."""
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


def stage_times(counts: Sequence[int], fixed_ms: Sequence[float], per_block_ms: Sequence[float]) -> list[float]:
    return [f + n * b for n, f, b in zip(counts, fixed_ms, per_block_ms)]


def balance(num_blocks: int, fixed_ms: Sequence[float], per_block_ms: Sequence[float]) -> list[int]:
    """Blocks per stage minimising the slowest stage's time (every stage keeps one block)."""
    stages = len(fixed_ms)
    if not 1 <= stages <= num_blocks or len(per_block_ms) != stages:
        raise ValueError(f"cannot balance {num_blocks} blocks over {stages} stages")
    counts = [1] * stages
    for _ in range(num_blocks - stages):
        # 1. The stage that would be done first with one more block takes it (ties: earlier).
        k = min(range(stages), key=lambda i: (fixed_ms[i] + (counts[i] + 1) * per_block_ms[i], i))
        counts[k] += 1
    return counts


def moves(current: Sequence[int], target: Sequence[int]) -> list[tuple[int, int, int]]:
    """Single-block moves (layer, from_stage, to_stage) between neighbours turning the split
    `current` into `target`, ordered so that no stage is ever left without a block."""
    if sum(current) != sum(target) or len(current) != len(target) or min(target) < 1:
        raise ValueError(f"cannot move from split {list(current)} to {list(target)}")
    counts = list(current)
    out = []
    while counts != list(target):
        progressed = False
        for k in range(len(counts) - 1):
            boundary = sum(counts[: k + 1])  # first block of stage k + 1
            goal = sum(target[: k + 1])
            if boundary > goal and counts[k] > 1:  # stage k hands its last block to k + 1
                out.append((boundary - 1, k, k + 1))
                counts[k] -= 1
                counts[k + 1] += 1
                progressed = True
            elif boundary < goal and counts[k + 1] > 1:  # stage k + 1 hands its first block to k
                out.append((boundary, k + 1, k))
                counts[k] += 1
                counts[k + 1] -= 1
                progressed = True
        if not progressed:  # pragma: no cover - cannot happen for valid splits
            raise RuntimeError(f"no move makes progress from {counts} to {list(target)}")
    return out


@dataclass
class StageSample:
    """One stage's share of one forward, as the stage measured it."""

    total_ms: float
    blocks_ms: float
    num_blocks: int


class Rebalancer:
    """Smooths per-stage times over forwards and proposes a better split when the slowest
    stage stays `threshold` times slower than the fastest for `after_steps` forwards in a row
    and the balanced split would shorten the slowest stage by at least (threshold - 1) / 2."""

    def __init__(self, counts: Sequence[int], threshold: float = 1.25, after_steps: int = 50, smoothing: float = 0.2):
        self.counts = list(counts)
        self.threshold = threshold
        self.after_steps = after_steps
        self.smoothing = smoothing
        self.fixed_ms: list[float | None] = [None] * len(counts)
        self.per_block_ms: list[float | None] = [None] * len(counts)
        self.imbalanced_steps = 0
        self.floor_ms = 0.0  # the slowest stage that holds no blocks (VAE stages)

    def reset(self, counts: Sequence[int]) -> None:
        """A new split is in place: forget the streak (the per-block costs stay valid)."""
        self.counts = list(counts)
        self.imbalanced_steps = 0

    def observe(self, samples: Sequence[StageSample], floor_ms: float = 0.0) -> None:
        """One forward's per-stage times of the stages that hold blocks; `floor_ms`: the
        slowest other stage (VAE stages), smoothed the same way."""
        a = self.smoothing
        self.floor_ms = floor_ms if self.floor_ms == 0.0 else (1 - a) * self.floor_ms + a * floor_ms
        for k, s in enumerate(samples):
            fixed = max(s.total_ms - s.blocks_ms, 0.0)
            per_block = s.blocks_ms / max(s.num_blocks, 1)
            self.fixed_ms[k] = fixed if self.fixed_ms[k] is None else (1 - a) * self.fixed_ms[k] + a * fixed
            self.per_block_ms[k] = per_block if self.per_block_ms[k] is None else (1 - a) * self.per_block_ms[k] + a * per_block
        times = self.predicted(self.counts)
        slow, fast = max(times), min(times)
        self.imbalanced_steps = self.imbalanced_steps + 1 if fast > 0 and slow / fast >= self.threshold else 0

    def predicted(self, counts: Sequence[int]) -> list[float]:
        if any(v is None for v in self.fixed_ms):
            return [0.0] * len(counts)
        return stage_times(counts, self.fixed_ms, self.per_block_ms)

    def proposal(self) -> list[int] | None:
        """A new split, or None (balanced enough, not for long enough, or no better split)."""
        if self.imbalanced_steps < self.after_steps or len(self.counts) < 2:
            return None
        target = balance(sum(self.counts), self.fixed_ms, self.per_block_ms)
        now = max(self.floor_ms, *self.predicted(self.counts))
        then = max(self.floor_ms, *self.predicted(target))
        if target == self.counts or then > now * (1 - (self.threshold - 1) / 2):
            self.imbalanced_steps = 0
            return None
        return target


__all__ = ["Rebalancer", "StageSample", "balance", "even_split", "initial_counts", "moves", "ranges", "stage_times"]
