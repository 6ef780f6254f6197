"""Slot bookkeeping for the sink + ring KV cache (CPU, integers only, no torch).

Owns: which pool slots each lane of each stream owns, which slots a chunk writes and attends
to when that is known on the host, the RoPE frame index of each write, the stream frame index
of each write, and the two cache policies' host-side rules.
Does not own: the K/V tensors and the per-layer state that depends on them (kv_cache.py: the
sink-refresh decision and, under `sdv2`, each layer's slot queue), or the attention math.

Words: a stream has `lanes` (one per denoise step); a lane owns `window` contiguous pool slots
(lane g holds slots g*window .. g*window + window - 1); the first `sinks` entries of a window
are sinks, the others the ring. A window entry is a slot's position inside its lane (0..W-1).

Two policies (cache.policy):

* `sdv2` (default) — StreamDiffusionV2's rules. Every layer keeps its own queue Q of window
  entries. While the window fills, writes go to the next free entries and ring entries are
  queued by the reference's look-ahead rule; once every entry has been written, each chunk
  (one latent frame) takes the front of its layer's Q (a ring entry goes back to Q's end) or,
  when the adaptive refresh fires in that layer, the least similar sink. The host knows the
  filling writes and the queue's ring order; the per-layer choice happens on the device
  (kv_cache.choose_writes), so `WritePlan.write_slots` is -1 for those rows. RoPE: chunk
  starts count stream frames; a streamed chunk starting at `rebase_frame` or later restarts
  at `window - 1`. Keys are never re-rotated.
* `rolling` — our own rules: sinks are the first frames written, the ring is overwritten
  oldest first (the same slot in every layer), the refresh swaps a sink with the frame just
  written after attention, and keys are re-rotated when the RoPE table would run out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamdiff.config import CacheConfig

POLICIES = ("sdv2", "rolling")


class PoolFullError(RuntimeError):
    """No free lanes left in the KV pool for another stream."""


class LaneAllocator:
    """A free list over the pool's lanes (blocks of `window` contiguous slots)."""

    def __init__(self, num_slots: int, window: int):
        if num_slots % window:
            raise ValueError(f"a pool of {num_slots} slots does not split into lanes of {window}")
        self.num_slots = num_slots
        self.window = window
        self.num_lanes = num_slots // window
        self._free = list(range(self.num_lanes - 1, -1, -1))

    @property
    def free(self) -> int:
        """Free slots (whole lanes)."""
        return len(self._free) * self.window

    def alloc(self, lanes: int) -> list[int]:
        if lanes > len(self._free):
            raise PoolFullError(f"KV pool full: need {lanes * self.window} slots, {self.free} of "
                                f"{self.num_slots} free")
        return [self._free.pop() for _ in range(lanes)]

    def take(self, lanes: list[int]) -> list[int]:
        """Allocate exactly these lanes (the engine's scheduler chose them)."""
        taken = [g for g in lanes if g in self._free]
        if len(taken) != len(lanes) or len(set(lanes)) != len(lanes):
            raise PoolFullError(f"KV lanes {list(lanes)} are not all free in this pool of {self.num_lanes} lanes")
        for g in lanes:
            self._free.remove(g)
        return list(lanes)

    def release(self, lanes: list[int]) -> None:
        if set(lanes) & set(self._free) or len(self._free) + len(lanes) > self.num_lanes:
            raise RuntimeError("lane released twice")
        self._free.extend(reversed(lanes))


@dataclass
class WritePlan:
    """Where one lane writes a chunk of `n` latent frames and what it then attends to."""

    write_slots: list[int]  # pool slot per chunk frame; -1: each layer chooses on the device
    write_pos: list[int]  # RoPE frame index per chunk frame
    attend_slots: list[int]  # every slot the chunk attends to (written ones, the chunk's own included)
    lane: int = 0  # lane id: the lane's slots are lane*window ... lane*window + window - 1
    frames: list[int] = field(default_factory=list)  # stream frame index per chunk frame
    rebase_delta: int = 0  # rolling: >0 rotates the lane's stored keys by -delta before writing
    rebase_slots: list[int] = field(default_factory=list)  # rolling: the slots that rebase touches
    refresh: bool = False  # this row runs the adaptive sink-refresh test
    device_choice: bool = False  # sdv2, full window: each layer picks its write slot from its queue
    sink_slots: list[int] = field(default_factory=list)  # pool slots of the lane's sinks
    ring_order: list[int] = field(default_factory=list)  # sdv2: the ring part of Q (window entries)
    copy_lanes: tuple[int, list[int]] | None = None  # sdv2: (from, to) lanes copied before this forward


class _Lane:
    """What both policies share: the lane's slots and its frame counter."""

    def __init__(self, lane: int, slots: list[int], sinks: int, rope_len: int, refresh: bool):
        if not 0 <= sinks < len(slots):
            raise ValueError(f"{sinks} sinks do not fit a window of {len(slots)}")
        self.lane = lane
        self.slots = list(slots)
        self.sinks = sinks
        self.rope_len = rope_len
        self.refresh = refresh
        self.frame = 0  # stream frame index of the next latent frame
        self.chunks = 0  # chunks planned so far

    @property
    def window(self) -> int:
        return len(self.slots)

    @property
    def ring(self) -> int:
        return self.window - self.sinks

    def _frames(self, n: int) -> list[int]:
        frames = list(range(self.frame, self.frame + n))
        self.frame += n
        self.chunks += 1
        return frames


class Sdv2Lane(_Lane):
    """StreamDiffusionV2's host-side rules for one lane (see the module docstring)."""

    def __init__(self, lane: int, slots: list[int], sinks: int, rope_len: int, refresh: bool = True,
                 rebase_frame: int = 50):
        super().__init__(lane, slots, sinks, rope_len, refresh)
        if not self.window <= rebase_frame <= rope_len - 1:
            raise ValueError(f"cache.rebase_frame={rebase_frame} must lie in [window={self.window}, "
                             f"RoPE table length - 1 = {rope_len - 1}]")
        self.rebase_frame = rebase_frame
        self.filled = 0  # window entries written at least once
        self.next_pos = 0  # RoPE index of the next latent frame
        self.ring_order: list[int] = []  # the ring entries of Q, in queue order (before any rotation)

    @property
    def full(self) -> bool:
        return self.filled == self.window

    def peek(self, n: int) -> WritePlan:
        """The plan the next chunk of `n` latent frames will get, without committing it: a
        stand-in row that writes where that chunk will write (StreamDiffusionV2's stream batch
        runs zero latents through lanes no chunk has reached yet; stream_state.py)."""
        saved = (self.filled, self.next_pos, list(self.ring_order), self.frame, self.chunks)
        try:
            return self.plan(n)
        finally:
            self.filled, self.next_pos, self.ring_order, self.frame, self.chunks = saved

    def plan(self, n: int) -> WritePlan:
        """Plan a chunk of `n` latent frames and commit it to the bookkeeping."""
        # 1. RoPE start: a streamed chunk that starts at rebase_frame or later restarts at W - 1.
        if self.chunks > 0 and self.next_pos >= self.rebase_frame:
            self.next_pos = self.window - 1
        if self.next_pos + n > self.rope_len:
            raise ValueError(f"a chunk of {n} latent frames at RoPE index {self.next_pos} leaves the table "
                             f"of {self.rope_len}")
        write_pos = list(range(self.next_pos, self.next_pos + n))
        self.next_pos += n
        refresh = self.refresh and n == 1
        sink_slots = self.slots[: self.sinks]
        # 2. Filling: the next free entries; queue the look-ahead ring entry e - 1.
        if not self.full:
            if self.filled + n > self.window:
                raise ValueError(f"a chunk of {n} latent frames does not fit the {self.window - self.filled} "
                                 f"free entries of the window")
            entries = list(range(self.filled, self.filled + n))
            self.filled += n
            ahead = self.filled + n - 1  # e - 1, e = one past the last entry written + n
            if self.sinks <= ahead < self.window and (not self.ring_order or self.ring_order[-1] != ahead):
                self.ring_order.append(ahead)
            return WritePlan([self.slots[e] for e in entries], write_pos, self.slots[: self.filled], self.lane,
                             self._frames(n), refresh=refresh, sink_slots=sink_slots,
                             ring_order=list(self.ring_order))
        # 3. Full: each layer takes the front of its queue (or a refreshed sink) on the device.
        if n != 1:
            raise ValueError(f"cache.policy=sdv2 writes one latent frame per chunk once the window is full, got {n}")
        if not self.ring_order:
            raise ValueError("cache.policy=sdv2: no ring entry was queued while the window filled "
                             "(window, sinks and first chunk size leave the queue empty)")
        return WritePlan([-1], write_pos, list(self.slots), self.lane, self._frames(n), refresh=refresh,
                         device_choice=True, sink_slots=sink_slots, ring_order=list(self.ring_order))


class RollingLane(_Lane):
    """Our own rules for one lane: sinks written once, ring overwritten oldest first."""

    def __init__(self, lane: int, slots: list[int], sinks: int, rope_len: int, refresh: bool = False):
        super().__init__(lane, slots, sinks, rope_len, refresh)
        if self.window + 1 > rope_len:
            raise ValueError(f"RoPE table of {rope_len} frames is too short for a window of {self.window}")
        self.positions: list[int | None] = [None] * self.window  # RoPE index stored per entry
        self.next_pos = 0
        self.ring_next = 0  # ring entry to overwrite next (oldest)

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
        if self.next_pos + n > self.rope_len:
            delta = self.next_pos - self.window
            touched = [s for s, p in zip(self.slots, self.positions) if p is not None]
            self.positions = [None if p is None else p - delta for p in self.positions]
            self.next_pos -= delta
        # 2. Choose the window entries: empty sinks first, then the ring, oldest first. Only a
        #    chunk that goes to the ring (all sinks full) may refresh a sink.
        sinks_full = all(p is not None for p in self.positions[: self.sinks])
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
            self.positions[entry] = self.next_pos
            write_pos.append(self.next_pos)
            self.next_pos += 1
        attend = [s for s, p in zip(self.slots, self.positions) if p is not None]
        refresh = self.refresh and sinks_full and self.sinks > 0
        return WritePlan([self.slots[e] for e in entries], write_pos, attend, self.lane, self._frames(n),
                         delta, touched, refresh=refresh, sink_slots=self.slots[: self.sinks])


Lane = Sdv2Lane | RollingLane


@dataclass
class StreamSlots:
    """All lanes of one stream."""

    lanes: list[Lane]

    def all_slots(self) -> list[int]:
        return [s for lane in self.lanes for s in lane.slots]


class SlotTable:
    """Per-stream lanes over one shared pool, under one cache policy."""

    def __init__(self, num_slots: int, window: int, sinks: int, rope_len: int, policy: str = "sdv2",
                 refresh: bool = True, rebase_frame: int = 50):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r} (known: {', '.join(POLICIES)})")
        self.allocator = LaneAllocator(num_slots, window)
        self.window = window
        self.sinks = sinks
        self.rope_len = rope_len
        self.policy = policy
        self.refresh = refresh
        self.rebase_frame = rebase_frame
        self.streams: dict[object, StreamSlots] = {}

    @classmethod
    def from_config(cls, num_slots: int, cache: CacheConfig, rope_len: int) -> "SlotTable":
        return cls(num_slots, cache.window, cache.sinks, rope_len, cache.policy, cache.refresh_threshold > -1,
                   cache.rebase_frame)

    def _new_lane(self, lane: int) -> Lane:
        slots = list(range(lane * self.window, (lane + 1) * self.window))
        if self.policy == "sdv2":
            return Sdv2Lane(lane, slots, self.sinks, self.rope_len, self.refresh, self.rebase_frame)
        return RollingLane(lane, slots, self.sinks, self.rope_len, self.refresh)

    def add_stream(self, stream_id: object, lanes: int, lane_ids: list[int] | tuple[int, ...] | None = None) -> StreamSlots:
        """Give the stream `lanes` lanes: the lowest free ones, or exactly `lane_ids`."""
        if stream_id in self.streams:
            raise KeyError(f"stream {stream_id!r} already has slots")
        if lane_ids is not None and len(lane_ids) != lanes:
            raise ValueError(f"stream {stream_id!r}: {len(lane_ids)} lane ids for {lanes} lanes")
        got = self.allocator.alloc(lanes) if lane_ids is None else self.allocator.take(list(lane_ids))
        self.streams[stream_id] = StreamSlots([self._new_lane(g) for g in got])
        return self.streams[stream_id]

    def remove_stream(self, stream_id: object) -> None:
        entry = self.streams.pop(stream_id, None)
        if entry is not None:
            self.allocator.release([lane.lane for lane in entry.lanes])

    def lane(self, stream_id: object, lane: int) -> Lane:
        return self.streams[stream_id].lanes[lane]

    @property
    def free_slots(self) -> int:
        return self.allocator.free
