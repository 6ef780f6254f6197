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
    """Split a stacked cache back into `count` per-stream caches (own storage, no shared views)."""
    per_entry = [
        [t.clone() for t in e.split(1)] if isinstance(e, torch.Tensor) else [e] * count for e in cache
    ]
    return [list(entries) for entries in zip(*per_entry)]


def _groups(keys: list[tuple]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@torch.no_grad()
def encode_many(vae: StreamingVAE, items: list[tuple[torch.Tensor, VAEStreamState]]) -> list[torch.Tensor]:
    """frames [1, 3, n, H, W] per stream (with its state) -> normalized latents [1, z, F, h, w]
    per stream, in the same order; streams at the same point share one encoder call."""
    keys = [(s.encoded_frames == 0, tuple(x.shape), _layout(s.enc_cache)) for x, s in items]
    out: list[torch.Tensor | None] = [None] * len(items)
    for group in _groups(keys):
        if len(group) == 1:
            x, state = items[group[0]]
            out[group[0]] = vae.encode_chunk(x, state)
            continue
        states = [items[i][1] for i in group]
        scratch = vae.new_state()
        scratch.enc_cache = _stack([s.enc_cache for s in states])
        scratch.encoded_frames = states[0].encoded_frames  # 0 or not: the first-call switch
        latents = vae.encode_chunk(torch.cat([items[i][0] for i in group]), scratch)  # [G, z, F, h, w]
        for state, cache, lat in zip(states, _unstack(scratch.enc_cache, len(group)), latents.split(1)):
            state.enc_cache = cache
            state.encoded_frames += items[group[0]][0].shape[2]
            state.encoded_latents += lat.shape[2]
            state.device = lat.device
        for i, lat in zip(group, latents.split(1)):
            out[i] = lat
    return out


@torch.no_grad()
def decode_many(vae: StreamingVAE, items: list[tuple[torch.Tensor, VAEStreamState]]) -> list[torch.Tensor]:
    """normalized latents [1, z, m, h, w] per stream -> frames [1, 3, n, H, W] per stream, in
    the same order; streams at the same point share one decoder call per latent frame."""
    keys = [(s.decoded_latents == 0, tuple(z.shape), _layout(s.dec_cache)) for z, s in items]
    out: list[torch.Tensor | None] = [None] * len(items)
    for group in _groups(keys):
        if len(group) == 1:
            z, state = items[group[0]]
            out[group[0]] = vae.decode_chunk(z, state)
            continue
        states = [items[i][1] for i in group]
        scratch = vae.new_state()
        scratch.dec_cache = _stack([s.dec_cache for s in states])
        scratch.decoded_latents = states[0].decoded_latents  # 0 or not: the first-latent switch
        frames = vae.decode_chunk(torch.cat([items[i][0] for i in group]), scratch)  # [G, 3, n, H, W]
        for state, cache in zip(states, _unstack(scratch.dec_cache, len(group))):
            state.dec_cache = cache
            state.decoded_latents += items[group[0]][0].shape[2]
            state.decoded_frames += frames.shape[2]
            state.device = frames.device
        for i, f in zip(group, frames.split(1)):
            out[i] = f
    return out


__all__ = ["decode_many", "encode_many"]
