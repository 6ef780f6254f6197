"""StreamDiffusionV2's cache rules in plain Python, written from the rules as stated in the
issue (one layer of one lane), independent of streamdiff.cache. Tests drive it beside the
production code."""

from __future__ import annotations

from collections import deque


class Sdv2LayerRef:
    def __init__(self, window: int = 6, sinks: int = 3, threshold: float = 0.2):
        self.window, self.sinks, self.threshold = window, sinks, threshold
        self.queue: deque[int] = deque()
        self.filled = 0
        self.holds: list[int | None] = [None] * window  # stream frame held per window entry

    @property
    def full(self) -> bool:
        return self.filled == self.window

    def written(self, entry: int) -> bool:
        return self.holds[entry] is not None

    def chunk(self, frames: list[int], similarity: list[float] | None) -> list[int]:
        """One chunk of len(frames) latent frames; `similarity` per sink (taken before the write).
        Returns the window entries written, in frame order."""
        n = len(frames)
        # 2. adaptive sink refresh: the least similar sink goes to the front of Q
        if self.threshold > -1 and n == 1:
            worst = min(range(self.sinks), key=lambda s: (similarity[s], s))
            if similarity[worst] < self.threshold:
                self.queue.appendleft(worst)
        if self.full:
            # 3. pop the front; a ring entry goes back to the end
            target = self.queue.popleft()
            if target >= self.sinks:
                self.queue.append(target)
            targets = [target]
        else:
            # 4. filling: next free entries; queue e - 1 when it is a ring entry not already last
            targets = list(range(self.filled, self.filled + n))
            self.filled += n
            ahead = self.filled + n - 1
            if self.sinks <= ahead <= self.window - 1 and (not self.queue or self.queue[-1] != ahead):
                self.queue.append(ahead)
        for entry, frame in zip(targets, frames):
            self.holds[entry] = frame
        return targets


def rope_starts(sizes: list[int], window: int = 6, rebase_frame: int = 50) -> list[int]:
    """Temporal RoPE start of each chunk: stream frame index, restarting at window - 1 before a
    streamed chunk whose start reached rebase_frame."""
    starts, pos = [], 0
    for k, n in enumerate(sizes):
        if k > 0 and pos >= rebase_frame:
            pos = window - 1
        starts.append(pos)
        pos += n
    return starts
