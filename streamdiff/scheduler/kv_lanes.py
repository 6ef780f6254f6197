"""KV-pool capacity as the scheduler sees it: which pool lanes each admitted stream holds.

Owns: a free list over the pool's lanes (a lane is `cache.window` KV slots: one denoise step of
one stream) and each stream's lanes. The scheduler admits a stream only if `steps` lanes are
free and hands the lane ids to the executors in the plan (`StreamStart.kv_lanes`); each
executor's slot table then takes exactly those lanes. A 2-step stream holds 2 lanes, not 4.
Does not own: the K/V tensors or the slot bookkeeping inside a lane (cache/). No torch.
"""

from __future__ import annotations


class KVLanes:
    def __init__(self, num_lanes: int):
        if num_lanes < 1:
            raise ValueError(f"the KV pool needs at least one lane, got {num_lanes}")
        self.num_lanes = num_lanes
        self._free = list(range(num_lanes - 1, -1, -1))  # popped from the end: lowest first
        self.held: dict[str, tuple[int, ...]] = {}
        self._released: tuple[str, tuple[int, ...]] = ("", ())  # the last stream released, its lanes

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, stream_id: str, lanes: int) -> tuple[int, ...]:
        if stream_id in self.held:
            raise KeyError(f"stream {stream_id!r} already holds KV lanes")
        if lanes > len(self._free):
            raise ValueError(f"KV pool full: need {lanes} lanes, {len(self._free)} of {self.num_lanes} free")
        # A stream re-admitted right after its release (a steps change, or a refused one put
        # back) keeps the lanes it held, so executors need not move it.
        prefer = [g for g in self._released[1] if g in self._free][:lanes] if self._released[0] == stream_id else []
        for g in prefer:
            self._free.remove(g)
        got = prefer + [self._free.pop() for _ in range(lanes - len(prefer))]
        self.held[stream_id] = tuple(got)
        return self.held[stream_id]

    def release(self, stream_id: str) -> None:
        lanes = self.held.pop(stream_id, ())
        self._released = (stream_id, lanes)
        self._free.extend(sorted(lanes, reverse=True))
        self._free.sort(reverse=True)


__all__ = ["KVLanes"]
