"""The KV pool: preallocated K/V tensors for a range of DiT layers, addressed by slot, and the
per-layer cache state that depends on their contents.

Owns: the tensors ([S, T, H, D] per layer, one slot = one latent frame of T tokens); per layer
and lane, the `sdv2` slot queue (a stack of pending sink refreshes at its front, a rotation of
the lane's ring order behind them); per layer and slot, the stream frame index it holds; the
per-forward attention metadata built from slot plans (`AttnBatch`); the re-base rotation; the
adaptive sink refresh of both policies. Everything here that depends on tensor values is
decided with tensor ops on the tensors' device: no value ever travels to the host in a step.
Does not own: host-side slot bookkeeping (slots.py) or the attention math (kernels /
model.attention).

A pipeline stage holding layers [i, j) creates a pool for exactly those layers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamdiff.cache.slots import WritePlan


@dataclass(frozen=True)
class PoolLayer:
    """One layer of a KVPool: views of its tensors, updated in place by the block that runs the
    layer. Passing these (and not the pool and a layer index) keeps a compiled block free of the
    index: Dynamo would guard on the int and compile the block once per layer."""

    k: torch.Tensor  # [S, T, H, D]
    v: torch.Tensor  # [S, T, H, D]
    q_stack: torch.Tensor  # [G, W + QUEUE_ROOM] sdv2 pending sink refreshes per lane
    q_len: torch.Tensor  # [G]
    q_rot: torch.Tensor  # [G]
    frames: torch.Tensor | None  # [S] stream frame held per slot (track_frames), else None
    window: int

    def record_frames(self, slots: torch.Tensor, frames: torch.Tensor) -> None:
        """Remember which stream frame each written slot now holds (slots, frames [B, F])."""
        if self.frames is not None:
            self.frames[slots.flatten()] = frames.flatten()


class KVPool:
    # Pending sink refreshes a lane's queue can hold beyond its window: refreshes queue up only
    # while the window fills, at most one per one-frame chunk written then (window) and one per
    # filler row (steps - 1 <= 3: stream_state.py); once full, a refresh is pushed and popped
    # in the same chunk. (A threshold near 1 fires on every one: 4 steps at 0.85 overflowed.)
    QUEUE_ROOM = 4

    def __init__(
        self,
        layers: range | list[int],
        num_slots: int,
        tokens_per_slot: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        window: int = 6,
        scratch: bool = False,
        track_frames: bool = False,
    ):
        """`scratch`: one more lane after the `num_slots` ones, which no stream ever holds: the
        padding rows of a bucketed (compiled / graphed) forward write and read there.
        `track_frames`: remember which stream frame each slot holds, per layer (`held_frames`;
        LatentStream and tests). Serving leaves it off: it is a scatter per layer per forward."""
        if num_slots % window:
            raise ValueError(f"a pool of {num_slots} slots does not split into lanes of {window}")
        self.scratch_lane = num_slots // window if scratch else None
        num_slots += window if scratch else 0
        self._set_layers(layers)
        self.num_slots = num_slots
        self.window = window
        self.track_frames = track_frames
        self.tokens_per_slot = tokens_per_slot
        n, lanes = len(self.layers), num_slots // window
        shape = (n, num_slots, tokens_per_slot, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, T, H, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, T, H, D]
        # sdv2 queues: Q = reversed(q_stack[:q_len]) + ring_order rotated by q_rot.
        self.q_stack = torch.zeros(n, lanes, window + self.QUEUE_ROOM, dtype=torch.int64, device=device)  # [L, G, W+4] entries
        self.q_len = torch.zeros(n, lanes, dtype=torch.int64, device=device)  # [L, G]
        self.q_rot = torch.zeros(n, lanes, dtype=torch.int64, device=device)  # [L, G]
        self.frames = torch.full((n, num_slots), -1, dtype=torch.int64, device=device)  # [L, S] frame held

    STATE = ("k", "v", "q_stack", "q_len", "q_rot", "frames")

    def remove_layers(self, layers: list[int]) -> dict[str, torch.Tensor]:
        """Take layers out of the pool (a pipeline stage handing blocks to a neighbour):
        returns their per-layer tensors (K and V [n, S, T, H, D], queues, frames) in the order given."""
        index = [self._index[layer] for layer in layers]
        keep = [i for i, layer in enumerate(self.layers) if layer not in set(layers)]
        taken = {}
        for name in self.STATE:
            tensor = getattr(self, name)
            taken[name] = tensor[index].clone()
            setattr(self, name, tensor[keep].contiguous())
        self._set_layers([self.layers[i] for i in keep])
        return taken

    def add_layers(self, layers: list[int], state: dict[str, torch.Tensor]) -> None:
        """Put layers into the pool (from a neighbour stage's `remove_layers`)."""
        if set(layers) & set(self.layers) or state["k"].shape[1:] != self.k.shape[1:]:
            raise ValueError(f"cannot add layers {layers} of shape {tuple(state['k'].shape)} to a pool of layers "
                             f"{self.layers} with slots {tuple(self.k.shape[1:])}")
        order = sorted(self.layers + list(layers))
        for name in self.STATE:
            mine = getattr(self, name)
            src = {layer: (mine, i) for i, layer in enumerate(self.layers)}
            src.update({layer: (state[name], i) for i, layer in enumerate(layers)})
            setattr(self, name, torch.stack([src[layer][0][src[layer][1]].to(mine.device, mine.dtype)
                                             for layer in order]))
        self._set_layers(order)

    def _set_layers(self, layers: list[int]) -> None:
        self.layers = list(layers)
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self._views: dict[int, PoolLayer] = {}  # layer -> its views, made on first use (the tensors move only with layers)

    def scratch_plan(self, n: int, sinks: int) -> WritePlan:
        """A padding row: writes `n` frames into the scratch lane, attends to it, never refreshes."""
        base = self.scratch_lane * self.window
        return WritePlan(list(range(base, base + n)), list(range(n)), [base], self.scratch_lane, [-1] * n,
                         sink_slots=[base + i for i in range(sinks)])

    def at(self, layer: int) -> PoolLayer:
        """`layer`'s views (the same object every call until layers move between stages)."""
        view = self._views.get(layer)
        if view is None:
            i = self._index[layer]
            view = self._views[layer] = PoolLayer(self.k[i], self.v[i], self.q_stack[i], self.q_len[i], self.q_rot[i],
                                                  self.frames[i] if self.track_frames else None, self.window)
        return view

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def clear_slots(self, slots: list[int]) -> None:
        """Zero slots (a stream leaving) and reset the queues of their lanes, so nothing of a
        stream can leak into the next one that gets these lanes."""
        if slots:
            index = torch.tensor(slots, device=self.k.device)
            self.k[:, index] = 0
            self.v[:, index] = 0
            self.frames[:, index] = -1
            lanes = torch.tensor(sorted({s // self.window for s in slots}), device=self.k.device)
            self.q_stack[:, lanes] = 0
            self.q_len[:, lanes] = 0
            self.q_rot[:, lanes] = 0

    def clear(self) -> None:
        """Everything back to the empty state (after a failed step)."""
        for name in self.STATE:
            getattr(self, name).zero_()
        self.frames.fill_(-1)

    def held_frames(self, layer: int, slots: list[int]) -> list[int | None]:
        """The stream frame index each of `slots` holds in `layer` (None: never written). Reads
        the device: for tests and inspection, never in a step."""
        if not self.track_frames:
            raise ValueError("this KV pool does not track frames (KVPool(..., track_frames=True))")
        held = self.frames[self._index[layer], torch.tensor(slots, device=self.k.device)].tolist()
        return [None if f < 0 else f for f in held]

    def queue(self, layer: int, lane: int, ring_order: list[int]) -> list[int]:
        """The sdv2 queue of `lane` in `layer`, front first, as window entries (inspection only)."""
        i = self._index[layer]
        pending = self.q_stack[i, lane, : int(self.q_len[i, lane])].tolist()
        rot = int(self.q_rot[i, lane]) % max(len(ring_order), 1)
        return pending[::-1] + ring_order[rot:] + ring_order[:rot]

    @torch.no_grad()
    def copy_lane_(self, src: int, dst: list[int]) -> None:
        """Lanes `dst` become copies of lane `src` in every layer of this pool: K/V, queues and
        frames held (sdv2: a stream's first chunk, prepared step by step, leaves the last step's
        K/V in every lane of the stream, as StreamDiffusionV2's prepare does). In place: a
        captured CUDA graph keeps reading the same memory; indices go up through pinned staging,
        so the host never waits for the device."""
        if not dst:
            return
        w, n = self.window, len(dst) * self.window
        # one upload for the four index lists: four took four of a staging ring's buffers, and
        # the attention batch's upload in the same step then waited for the forward before (a review)
        idx = STAGING.to_device(torch.tensor([g * w + i for g in dst for i in range(w)]
                                             + [src * w + i for _ in dst for i in range(w)]
                                             + dst + [src] * len(dst)), self.k.device)
        to, frm, lanes, one = idx[:n], idx[n:2 * n], idx[2 * n:2 * n + len(dst)], idx[2 * n + len(dst):]
        for name in ("k", "v", "frames"):
            tensor = getattr(self, name)
            tensor[:, to] = tensor[:, frm]
        for name in ("q_stack", "q_len", "q_rot"):
            tensor = getattr(self, name)
            tensor[:, lanes] = tensor[:, one]

    @torch.no_grad()
    def rebase_(self, slots: list[int], delta: int, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, t_dim: int) -> None:
        """Rotate the stored keys of `slots` by -delta frames along the time axis of RoPE.

        RoPE rotations compose, R(p - delta) = R(-delta) R(p), so this is exactly what writing
        them at index p - delta would have stored."""
        if not slots or delta == 0:
            return
        index = STAGING.to_device(torch.tensor(slots), self.k.device)
        cos = freqs_cos[delta, :t_dim:2].float()  # [t/2] cos(delta * w)
        sin = -freqs_sin[delta, 1:t_dim:2].float()  # [t/2] sin(-delta * w)
        k = self.k[:, index, :, :, :t_dim].float()  # [L, n, T, H, t]
        x1, x2 = k[..., 0::2], k[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        self.k[:, index, :, :, :t_dim] = rotated.to(self.k.dtype)


@dataclass
class AttnBatch:
    """Everything the attention of one batched forward needs, shared by all layers.

    Rows are (stream, lane) pairs; every row writes F latent frames. Under `sdv2`, rows whose
    window is full get their write slot per layer on the device (`choose_writes`)."""

    write_slots: torch.Tensor  # [B, F] int64, -1 where each layer chooses on the device
    write_pos: torch.Tensor  # [B, F] int64 RoPE index
    slot_table: torch.Tensor  # [B, M] int32, -1 past slot_count
    slot_count: torch.Tensor  # [B] int32
    num_frames: int
    frames: torch.Tensor  # [B, F] int64 stream frame index of each written frame
    lane: torch.Tensor  # [B] int64 lane id
    sink_slots: torch.Tensor  # [B, sinks] int64 pool slots of the row's sinks
    refresh: torch.Tensor  # [B] bool: the row runs the sink-refresh test
    device_choice: torch.Tensor  # [B] bool: sdv2, full window
    ring_order: torch.Tensor  # [B, W] int64 window entries (padded with 0)
    ring_len: torch.Tensor  # [B] int64
    threshold: float = -1.0
    # What each layer does, decided on the host so no layer reads the device to skip work:
    test_before: bool = False  # sdv2: run the sink-refresh test before the write
    choose: bool = False  # sdv2: pick the write slots per layer (choose_writes)
    swap_after: bool = False  # rolling: the refresh swaps a sink with the new frame after attention
    table_full: bool = False  # every row attends to all M table entries (no padding)

    @staticmethod
    def from_plans(plans: list[WritePlan], device: torch.device | str, window: int, threshold: float = -1.0,
                   policy: str = "sdv2", static: bool = False) -> "AttnBatch":
        """Pack the rows' plans into one int64 table on the host, copy it to the device in one
        transfer (through a reused pinned buffer on CUDA), and slice the fields out there.
        `static` (compiled / graphed forwards): the slot table is always `window` wide and the
        per-layer branches always run (masked per row), so one graph serves every fill level."""
        num_frames = len(plans[0].write_slots)
        if any(len(p.write_slots) != num_frames for p in plans):
            raise ValueError("all rows of one forward must write the same number of latent frames")
        width = window if static else max(len(p.attend_slots) for p in plans)
        sinks = max(max(len(p.sink_slots) for p in plans), 1)
        refresh = [p.refresh and threshold > -1 and len(p.sink_slots) == sinks for p in plans]
        sdv2 = policy == "sdv2"
        tests = (threshold > -1) if static else any(refresh)  # some row runs the refresh test
        # 1. One row of integers per plan: the fields side by side, padded to fixed widths.
        widths = {"write_slots": num_frames, "write_pos": num_frames, "slot_table": width, "slot_count": 1,
                  "frames": num_frames, "lane": 1, "sink_slots": sinks, "refresh": 1, "device_choice": 1,
                  "ring_order": window, "ring_len": 1}
        rows = []
        for p, fires in zip(plans, refresh):
            sink_row = p.sink_slots + [p.sink_slots[0] if p.sink_slots else 0] * (sinks - len(p.sink_slots))
            rows.append(p.write_slots + p.write_pos + p.attend_slots + [-1] * (width - len(p.attend_slots))
                        + [len(p.attend_slots)] + (p.frames or [-1] * num_frames) + [p.lane] + sink_row
                        + [int(fires), int(p.device_choice)] + p.ring_order + [0] * (window - len(p.ring_order))
                        + [max(len(p.ring_order), 1)])
        table = STAGING.to_device(torch.tensor(rows, dtype=torch.int64), torch.device(device))  # [B, K]
        # 2. The fields as contiguous device tensors (device-side slicing: no host involvement).
        fields, at = {}, 0
        for name, n in widths.items():
            fields[name] = table[:, at : at + n].contiguous()
            at += n
        return AttnBatch(
            write_slots=fields["write_slots"],
            write_pos=fields["write_pos"],
            slot_table=fields["slot_table"].to(torch.int32),
            slot_count=fields["slot_count"][:, 0].to(torch.int32),
            num_frames=num_frames,
            frames=fields["frames"],
            lane=fields["lane"][:, 0],
            sink_slots=fields["sink_slots"],
            refresh=fields["refresh"][:, 0].bool(),
            device_choice=fields["device_choice"][:, 0].bool(),
            ring_order=fields["ring_order"],
            ring_len=fields["ring_len"][:, 0],
            threshold=threshold,
            test_before=sdv2 and tests,
            choose=sdv2 and (static or tests or any(p.device_choice for p in plans)),
            swap_after=not sdv2 and tests,
            table_full=False if static else all(len(p.attend_slots) == width for p in plans),
        )


class HostStaging:
    """Small host -> device copies through pinned buffers that are reused round-robin (CUDA);
    on a CPU device the host tensor is used as it is. Before a buffer is refilled, the copy that
    last read it must be done: an event wait that never blocks in practice (4 buffers of a
    dtype; a forward stages at most three index copies: its attention batch, a restart's
    re-base, sdv2's lane copy) and reads nothing back from the device. Each thread has a ring
    of its own: pipeline stages on threads of one process build their attention batches at
    once, and a shared ring handed one buffer to two of them (a review; the copies are
    asynchronous, so one stage's indices could reach the device as the other's)."""

    def __init__(self, buffers: int = 4):
        self.buffers = buffers
        self._local = threading.local()

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return host.to(device)
        staged, done = self._staged(host)
        out = staged.to(device, non_blocking=True)
        done.record()
        return out

    def _staged(self, host: torch.Tensor) -> tuple[torch.Tensor, object]:
        """`host` copied into this thread's next buffer of its dtype (index tensors and uint8
        frames keep rings of their own), once the copy that last read it is done."""
        rings = self._local.__dict__.setdefault("rings", {})
        ring, i = rings.get(host.dtype, ([None] * self.buffers, 0))
        rings[host.dtype] = (ring, (i + 1) % self.buffers)
        entry = ring[i]
        if entry is None or entry[0].numel() < host.numel():
            entry = ring[i] = self._new_buffer(max(host.numel(), 4096), host.dtype)
        buf, done = entry
        done.synchronize()
        staged = buf[: host.numel()].view(host.shape)
        staged.copy_(host)
        return staged, done

    @staticmethod
    def _new_buffer(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, object]:
        return torch.empty(numel, dtype=dtype, pin_memory=True), torch.cuda.Event()


STAGING = HostStaging()


def sink_similarity(k_pool: torch.Tensor, v_pool: torch.Tensor, sink_slots: torch.Tensor, k_new: torch.Tensor,
                    v_new: torch.Tensor) -> torch.Tensor:
    """a_s = (cos(mean K of sink s, mean k_new) + cos(mean V of sink s, mean v_new)) / 2 per row.

    Means are over a slot's tokens (k_new, v_new [B, N, H, D]: over the chunk's tokens); the
    cosine is over the flattened heads x head dim. A never-written sink is all zeros and gets 0
    (torch's cosine_similarity clamps the norms). -> [B, sinks] fp32."""
    k_sink = k_pool[sink_slots].float().mean(dim=2).flatten(2)  # [B, s, H*D]
    v_sink = v_pool[sink_slots].float().mean(dim=2).flatten(2)  # [B, s, H*D]
    k_mean = k_new.float().mean(dim=1).flatten(1)[:, None]  # [B, 1, H*D]
    v_mean = v_new.float().mean(dim=1).flatten(1)[:, None]  # [B, 1, H*D]
    return 0.5 * (F.cosine_similarity(k_sink, k_mean, dim=-1) + F.cosine_similarity(v_sink, v_mean, dim=-1))


def refresh_decision(batch: AttnBatch, sim: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fires [B] bool, least similar sink [B] as a window entry) for the rows' refresh test."""
    if sim is None:
        zeros = torch.zeros_like(batch.lane)
        return zeros.bool(), zeros
    low, worst = sim.min(dim=-1)  # [B], [B] (first minimum, as torch.argmin)
    return batch.refresh & (low < batch.threshold), worst


@torch.no_grad()
def choose_writes(pool: PoolLayer, batch: AttnBatch, sim: torch.Tensor | None) -> torch.Tensor:
    """sdv2, one layer: the write slots [B, F] of this chunk, and the layer's queues updated.

    Per row (StreamDiffusionV2's order): if the refresh fires, the least similar sink goes to
    the front of Q; a full window then pops Q's front as its target (a ring entry goes back to
    Q's end, a sink does not). A refresh pushed and popped in the same chunk leaves Q as it was;
    one pushed while the window fills waits at Q's front. All on the device (torch.where)."""
    stack, qlen, rot = pool.q_stack, pool.q_len, pool.q_rot  # [G, W + QUEUE_ROOM], [G], [G]
    g = batch.lane  # [B]
    fires, worst = refresh_decision(batch, sim)
    plen, r = qlen[g], rot[g]  # [B]
    choice = batch.device_choice
    # 1. Filling rows: a refresh only queues the sink at Q's front.
    push = fires & ~choice
    at = plen.clamp(max=stack.shape[1] - 1)
    stack[g, at] = torch.where(push, worst, stack[g, at])
    new_len = plen + push.long()
    # 2. Full rows: the refreshed sink, else the front of Q (pending sinks, then the ring).
    top = stack[g, (plen - 1).clamp(min=0)]
    ring_front = batch.ring_order.gather(1, (r % batch.ring_len)[:, None])[:, 0]
    target = torch.where(fires, worst, torch.where(plen > 0, top, ring_front))  # [B] window entry
    popped = choice & ~fires
    new_len = torch.where(popped & (plen > 0), plen - 1, new_len)
    qlen[g] = new_len
    rot[g] = torch.where(popped & (plen == 0), (r + 1) % batch.ring_len, r)
    chosen = (g * pool.window + target)[:, None]  # [B, 1]
    return torch.where(choice[:, None], chosen, batch.write_slots)


@torch.no_grad()
def swap_refresh_(pool: PoolLayer, batch: AttnBatch, written: torch.Tensor) -> None:
    """rolling, one layer, after attention: where a row's least similar sink is below the
    threshold, that sink and the chunk's last frame (slot written[:, -1]) swap places, so the
    new frame becomes a sink and the old sink frame lives on in the ring until it is evicted.
    Each frame stays in exactly one slot."""
    k_pool, v_pool = pool.k, pool.v
    chunk = written.long()  # [B, F]
    sim = sink_similarity(k_pool, v_pool, batch.sink_slots, k_pool[chunk].flatten(1, 2), v_pool[chunk].flatten(1, 2))
    fires, worst = refresh_decision(batch, sim)
    sink = batch.sink_slots.gather(1, worst[:, None])[:, 0]  # [B]
    last = chunk[:, -1]  # [B]
    dst = torch.cat([sink, last])  # [2B]
    src = torch.cat([torch.where(fires, last, sink), torch.where(fires, sink, last)])  # [2B]
    for tensor in (k_pool, v_pool) + ((pool.frames,) if pool.frames is not None else ()):
        tensor[dst] = tensor[src]
