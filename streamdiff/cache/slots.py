"""Slot bookkeeping for the rolling sink + ring KV cache (CPU, integers only, no torch).

Owns: which pool slot each latent frame of each stream-lane lives in, which slots a chunk
attends to, the RoPE frame index stored with each slot, and when to re-base frame indices.
Does not own: the K/V tensors (kv_cache.py) or the sink-refresh decision (made per layer on
tensors, it copies data between slots and never changes this table).

Words: a stream has `lanes` (one per denoise step); each lane has a window of `window` slots,
the first `sinks` of which are written once (the stream's first latent frames) and kept; the
other `window - sinks` form a ring overwritten in place, oldest first.

Frame indices: keys are stored with RoPE at their frame index. Indices grow with the stream;
before a write would leave the RoPE table (`rope_len` positions), the lane is re-based: every
stored index drops by the same delta (so the next frame lands at index `window`) and the
stored keys are rotated by -delta. Relative distances, and so attention scores, are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PoolFullError(RuntimeError):
    """No free slots left in the KV pool for another stream."""


class SlotAllocator:
    """A free list over pool slot indices 0..num_slots-1."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, count: int) -> list[int]:
        if count > len(self._free):
            raise PoolFullError(f"KV pool full: need {count} slots, {len(self._free)} of {self.num_slots} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))
        if len(self._free) > self.num_slots:
            raise RuntimeError("slot released twice")


@dataclass
class WritePlan:
    """Where one lane writes a chunk of `n` latent frames and what it then attends to."""

    write_slots: list[int]  # pool slot per chunk frame
    write_pos: list[int]  # RoPE frame index per chunk frame
    attend_slots: list[int]  # every valid slot after the write (sinks, ring, the chunk)
    rebase_delta: int = 0  # >0: rotate the lane's stored keys by -delta before writing
    rebase_slots: list[int] = field(default_factory=list)  # the slots that rebase touches
    refresh_sinks: list[int] = field(default_factory=list)  # sinks the adaptive refresh may replace


@dataclass
class LaneWindow:
    """One lane of one stream: `window` pool slots, `sinks` of them kept forever."""

    slots: list[int]
    sinks: int
    rope_len: int
    positions: list[int | None] = field(default_factory=list)  # frame index per window entry
    next_frame: int = 0  # frame index the next latent frame gets
    ring_next: int = 0  # ring entry to overwrite next (oldest)

    def __post_init__(self) -> None:
        if not self.positions:
            self.positions = [None] * len(self.slots)
        if len(self.slots) + 1 > self.rope_len:
            raise ValueError(f"RoPE table of {self.rope_len} frames is too short for a window of {len(self.slots)}")

    @property
    def window(self) -> int:
        return len(self.slots)

    @property
    def ring(self) -> int:
        return self.window - self.sinks

    @property
    def filled(self) -> int:
        return sum(p is not None for p in self.positions)

    def sink_slots(self) -> list[int]:
        return [s for s, p in zip(self.slots[: self.sinks], self.positions[: self.sinks]) if p is not None]

    def plan(self, n: int) -> WritePlan:
        """Plan the write of `n` latent frames and commit it to the bookkeeping."""
        # 1. Re-base when the chunk would run past the RoPE table.
        delta = 0
        touched: list[int] = []
        if self.next_frame + n > self.rope_len:
            delta = self.next_frame - self.window
            touched = [s for s, p in zip(self.slots, self.positions) if p is not None]
            self.positions = [None if p is None else p - delta for p in self.positions]
            self.next_frame -= delta
        # 2. Choose the window entries: empty sinks first, then the ring, oldest first. Only a
        #    chunk that goes to the ring (all sinks full) may refresh a sink.
        sinks_full = all(p is not None for p in self.positions[: self.sinks])
        refresh = list(self.slots[: self.sinks]) if sinks_full else []
        entries: list[int] = []
        for _ in range(n):
            empty_sink = next((i for i in range(self.sinks) if self.positions[i] is None and i not in entries), None)
            if empty_sink is not None:
                entries.append(empty_sink)
                continue
            if self.ring == 0:
                raise ValueError("a window made only of sinks has no room for new frames")
            entry = self.sinks + self.ring_next
            if entry in entries:
                raise ValueError(f"chunk of {n} latent frames does not fit a ring of {self.ring}")
            entries.append(entry)
            self.ring_next = (self.ring_next + 1) % self.ring
        # 3. Commit positions.
        write_pos = []
        for entry in entries:
            self.positions[entry] = self.next_frame
            write_pos.append(self.next_frame)
            self.next_frame += 1
        attend = [s for s, p in zip(self.slots, self.positions) if p is not None]
        return WritePlan([self.slots[e] for e in entries], write_pos, attend, delta, touched, refresh)


@dataclass
class StreamSlots:
    """All lanes of one stream."""

    lanes: list[LaneWindow]

    def all_slots(self) -> list[int]:
        return [s for lane in self.lanes for s in lane.slots]


class SlotTable:
    """Per-stream slot tables over one shared pool."""

    def __init__(self, num_slots: int, window: int, sinks: int, rope_len: int):
        self.allocator = SlotAllocator(num_slots)
        self.window = window
        self.sinks = sinks
        self.rope_len = rope_len
        self.streams: dict[object, StreamSlots] = {}

    def add_stream(self, stream_id: object, lanes: int) -> StreamSlots:
        if stream_id in self.streams:
            raise KeyError(f"stream {stream_id!r} already has slots")
        slots = self.allocator.alloc(lanes * self.window)
        windows = [
            LaneWindow(slots[i * self.window : (i + 1) * self.window], self.sinks, self.rope_len) for i in range(lanes)
        ]
        self.streams[stream_id] = StreamSlots(windows)
        return self.streams[stream_id]

    def remove_stream(self, stream_id: object) -> None:
        entry = self.streams.pop(stream_id, None)
        if entry is not None:
            self.allocator.release(entry.all_slots())

    def lane(self, stream_id: object, lane: int) -> LaneWindow:
        return self.streams[stream_id].lanes[lane]

    @property
    def free_slots(self) -> int:
        return self.allocator.free
