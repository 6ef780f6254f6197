"""Streaming VAE calls for several streams at once: one encoder / decoder call per group.

Owns: grouping streams whose VAE caches are at the same point (same first-call status, same
frame / latent count, same cache layout) and running each group as ONE batched call, by
stacking the streams' causal-conv caches along the batch dimension into a scratch
`VAEStreamState` and splitting them back afterwards. Streams that match no other run alone.
Does not own: the VAE itself or the cache format (model/vae.py documents it: one entry per
causal conv — None, "Rep" or a tensor whose dim 0 is the batch; "one state is one batch of
streams of identical length"). This module relies only on that documented layout.

Why: on a CPU the tiny VAE costs about the same for 2 streams in one call as for 1, and on a
GPU a batch fills the device better. The numbers match per-stream calls up to float rounding.

Memory: the streams' own caches are released once stacked, and the stacked cache is split back
one entry at a time, so a group holds its caches about once, as one natively batched state
would (what `streamdiff plan` counts). Holding them twice cost the 1.3B at 512x512 about
1.8 GiB per extra stream on an H200 (its VAE caches are 1.84 GiB a stream).
"""

from __future__ import annotations

import torch

from streamdiff.model.vae import StreamingVAE, VAEStreamState


def _layout(cache: list) -> tuple:
    """What must match for caches to be stacked: per entry its marker or (shape sans batch, dtype)."""
    return tuple(
        (tuple(e.shape[1:]), e.dtype, e.device) if isinstance(e, torch.Tensor) else e for e in cache
    )


def _stack(caches: list[list]) -> list:
    return [torch.cat(entries) if isinstance(entries[0], torch.Tensor) else entries[0] for entries in zip(*caches)]


def _unstack(cache: list, count: int) -> list[list]:
    """Split a stacked cache back into `count` per-stream caches (own storage, no shared views).
    Empties `cache` entry by entry as it goes, so a stacked entry and its copies coexist one
    entry at a time, not the whole cache twice."""
    per_entry = []
    for k, e in enumerate(cache):
        per_entry.append([t.clone() for t in e.split(1)] if isinstance(e, torch.Tensor) else [e] * count)
        cache[k] = None
    return [list(entries) for entries in zip(*per_entry)]


def _groups(keys: list[tuple]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


_COUNTERS = ("encoded_frames", "encoded_latents", "decoded_latents", "decoded_frames")


def _run_grouped(vae: StreamingVAE, items: list[tuple[torch.Tensor, VAEStreamState]], cache_attr: str, call, is_first):
    """Run `call(x, state)` (encode_chunk or decode_chunk) for every (x, state), one call per
    group of streams at the same point, on a scratch state holding their stacked caches."""
    keys = [(is_first(s), tuple(x.shape), _layout(getattr(s, cache_attr))) for x, s in items]
    out: list[torch.Tensor | None] = [None] * len(items)
    for group in _groups(keys):
        if len(group) == 1:
            x, state = items[group[0]]
            out[group[0]] = call(x, state)
            continue
        # 1. A scratch state: the stacked caches, the counters of the group (they decide the
        #    first-call switches, equal within a group).
        states = [items[i][1] for i in group]
        scratch = vae.new_state()
        setattr(scratch, cache_attr, _stack([getattr(s, cache_attr) for s in states]))
        # The stacked copy stands in for the streams' own caches: not every cache twice during
        # the call. A failed call leaves them empty; a failed step closes or re-prepares every stream.
        for state in states:
            setattr(state, cache_attr, None)
        for name in _COUNTERS:
            setattr(scratch, name, getattr(states[0], name))
        before = {name: getattr(scratch, name) for name in _COUNTERS}
        # 2. One call for the group; 3. caches and counter advances back to each stream.
        result = call(torch.cat([items[i][0] for i in group]), scratch)  # [G, C, n, H, W]
        for state, cache in zip(states, _unstack(getattr(scratch, cache_attr), len(group))):
            setattr(state, cache_attr, cache)
            for name in _COUNTERS:
                setattr(state, name, getattr(state, name) + getattr(scratch, name) - before[name])
            state.device = result.device
        for i, part in zip(group, result.split(1)):
            out[i] = part
    return out


@torch.no_grad()
def encode_many(vae: StreamingVAE, items: list[tuple[torch.Tensor, VAEStreamState]]) -> list[torch.Tensor]:
    """frames [1, 3, n, H, W] per stream (with its state) -> normalized latents [1, z, F, h, w]
    per stream, in the same order; streams at the same point share one encoder call."""
    return _run_grouped(vae, items, "enc_cache", vae.encode_chunk, lambda s: s.encoded_frames == 0)


@torch.no_grad()
def decode_many(vae: StreamingVAE, items: list[tuple[torch.Tensor, VAEStreamState]]) -> list[torch.Tensor]:
    """normalized latents [1, z, m, h, w] per stream -> frames [1, 3, n, H, W] per stream, in
    the same order; streams at the same point share one decoder call per latent frame."""
    return _run_grouped(vae, items, "dec_cache", vae.decode_chunk, lambda s: s.decoded_latents == 0)


__all__ = ["decode_many", "encode_many"]
