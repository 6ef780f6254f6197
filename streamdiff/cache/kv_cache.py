"""The KV pool: preallocated K/V tensors for a range of DiT layers, addressed by slot.

Owns: the tensors ([S, T, H, D] per layer, one slot = one latent frame of T tokens), the
per-forward attention metadata built from slot plans (`AttnBatch`), the re-base rotation and
the adaptive sink refresh. Does not own: slot bookkeeping (slots.py) or the attention math
(kernels / model.attention).

A pipeline stage holding layers [i, j) creates a pool for exactly those layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamdiff.cache.slots import WritePlan


class KVPool:
    def __init__(
        self,
        layers: range | list[int],
        num_slots: int,
        tokens_per_slot: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.layers = list(layers)
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self.num_slots = num_slots
        self.tokens_per_slot = tokens_per_slot
        shape = (len(self.layers), num_slots, tokens_per_slot, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, T, H, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, T, H, D]

    def remove_layers(self, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Take layers out of the pool (a pipeline stage handing blocks to a neighbour):
        returns their K and V [n, S, T, H, D] in the order given."""
        index = [self._index[layer] for layer in layers]
        keep = [i for i, layer in enumerate(self.layers) if layer not in set(layers)]
        k, v = self.k[index].clone(), self.v[index].clone()
        self.k, self.v = self.k[keep].contiguous(), self.v[keep].contiguous()
        self._set_layers([self.layers[i] for i in keep])
        return k, v

    def add_layers(self, layers: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Put layers into the pool (from a neighbour stage), K and V [n, S, T, H, D]."""
        if set(layers) & set(self.layers) or k.shape[1:] != self.k.shape[1:]:
            raise ValueError(f"cannot add layers {layers} of shape {tuple(k.shape)} to a pool of layers "
                             f"{self.layers} with slots {tuple(self.k.shape[1:])}")
        order = sorted(self.layers + list(layers))
        src = {layer: (self.k, i) for i, layer in enumerate(self.layers)}
        src.update({layer: (k, i) for i, layer in enumerate(layers)})
        src_v = {layer: (self.v, i) for i, layer in enumerate(self.layers)}
        src_v.update({layer: (v, i) for i, layer in enumerate(layers)})
        dev, dtype = self.k.device, self.k.dtype
        self.k = torch.stack([src[layer][0][src[layer][1]].to(dev, dtype) for layer in order])
        self.v = torch.stack([src_v[layer][0][src_v[layer][1]].to(dev, dtype) for layer in order])
        self._set_layers(order)

    def _set_layers(self, layers: list[int]) -> None:
        self.layers = list(layers)
        self._index = {layer: i for i, layer in enumerate(self.layers)}

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[layer]
        return self.k[i], self.v[i]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def clear_slots(self, slots: list[int]) -> None:
        """Zero slots (a stream leaving), so stale K/V can never leak into another stream."""
        if slots:
            index = torch.tensor(slots, device=self.k.device)
            self.k[:, index] = 0
            self.v[:, index] = 0

    @torch.no_grad()
    def rebase_(self, slots: list[int], delta: int, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, t_dim: int) -> None:
        """Rotate the stored keys of `slots` by -delta frames along the time axis of RoPE.

        RoPE rotations compose, R(p - delta) = R(-delta) R(p), so this is exactly what writing
        them at index p - delta would have stored."""
        if not slots or delta == 0:
            return
        index = torch.tensor(slots, device=self.k.device)
        cos = freqs_cos[delta, :t_dim:2].float()  # [t/2] cos(delta * w)
        sin = -freqs_sin[delta, 1:t_dim:2].float()  # [t/2] sin(-delta * w)
        k = self.k[:, index, :, :, :t_dim].float()  # [L, n, T, H, t]
        x1, x2 = k[..., 0::2], k[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        self.k[:, index, :, :, :t_dim] = rotated.to(self.k.dtype)


@dataclass
class AttnBatch:
    """Everything the attention of one batched forward needs, shared by all layers.

    Rows are (stream, lane) pairs; every row writes F latent frames."""

    write_slots: torch.Tensor  # [B, F] int32
    write_pos: torch.Tensor  # [B, F] int64
    slot_table: torch.Tensor  # [B, M] int32, -1 past slot_count
    slot_count: torch.Tensor  # [B] int32
    refresh_sinks: list[list[int]]  # per row: sinks the adaptive refresh may replace
    num_frames: int

    @staticmethod
    def from_plans(plans: list[WritePlan], device: torch.device | str) -> "AttnBatch":
        num_frames = len(plans[0].write_slots)
        if any(len(p.write_slots) != num_frames for p in plans):
            raise ValueError("all rows of one forward must write the same number of latent frames")
        width = max(len(p.attend_slots) for p in plans)
        table = [p.attend_slots + [-1] * (width - len(p.attend_slots)) for p in plans]
        return AttnBatch(
            write_slots=torch.tensor([p.write_slots for p in plans], dtype=torch.int32, device=device),
            write_pos=torch.tensor([p.write_pos for p in plans], dtype=torch.int64, device=device),
            slot_table=torch.tensor(table, dtype=torch.int32, device=device),
            slot_count=torch.tensor([len(p.attend_slots) for p in plans], dtype=torch.int32, device=device),
            refresh_sinks=[p.refresh_sinks for p in plans],
            num_frames=num_frames,
        )


@torch.no_grad()
def refresh_sinks_(
    k_pool: torch.Tensor, v_pool: torch.Tensor, batch: AttnBatch, threshold: float
) -> list[int]:
    """Adaptive sink refresh for one layer.

    For each row: cosine similarity between the mean K and mean V of the chunk just written
    and of each sink, averaged over K and V. If the lowest similarity is below `threshold`,
    the least similar sink takes the chunk's last latent frame (K already carries its RoPE).
    Returns, per row, the replaced sink slot or -1."""
    replaced = []
    for row, sinks in enumerate(batch.refresh_sinks):
        if not sinks:
            replaced.append(-1)
            continue
        chunk = batch.write_slots[row].long()
        sink_index = torch.tensor(sinks, device=k_pool.device)
        k_new = k_pool[chunk].float().mean(dim=(0, 1)).flatten()  # [H*D]
        v_new = v_pool[chunk].float().mean(dim=(0, 1)).flatten()
        k_sink = k_pool[sink_index].float().mean(dim=1).flatten(1)  # [n_sinks, H*D]
        v_sink = v_pool[sink_index].float().mean(dim=1).flatten(1)
        sim = 0.5 * (F.cosine_similarity(k_sink, k_new[None], dim=-1) + F.cosine_similarity(v_sink, v_new[None], dim=-1))
        worst = int(torch.argmin(sim))
        if float(sim[worst]) < threshold:
            k_pool[sinks[worst]] = k_pool[chunk[-1]]
            v_pool[sinks[worst]] = v_pool[chunk[-1]]
            replaced.append(sinks[worst])
        else:
            replaced.append(-1)
    return replaced
