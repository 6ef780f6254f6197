"""KV pool tensor operations: re-base rotation, sink refresh, clearing."""

from __future__ import annotations

import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool, refresh_sinks_
from streamdiff.cache.slots import WritePlan
from streamdiff.kernels.cache_write import cache_write_ref
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed


def test_rebase_rotation_equals_writing_at_the_shifted_index():
    rope = WanRotaryPosEmbed(32, (1, 2, 2), 64)
    cos, sin = rope.freqs_cos.float(), rope.freqs_sin.float()
    split = (rope.t_dim, rope.h_dim, rope.w_dim)
    k = torch.randn(1, 12, 2, 32)
    v = torch.randn(1, 12, 2, 32)
    a = KVPool([0], 4, 12, 2, 32, torch.float32, "cpu")
    b = KVPool([0], 4, 12, 2, 32, torch.float32, "cpu")
    cache_write_ref(k, v, *a.layer(0), torch.tensor([[2]]), torch.tensor([[40]]), cos, sin, split, (3, 4))
    cache_write_ref(k, v, *b.layer(0), torch.tensor([[2]]), torch.tensor([[40 - 33]]), cos, sin, split, (3, 4))
    assert not torch.allclose(a.k, b.k)
    a.rebase_([2], 33, cos, sin, rope.t_dim)
    torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.v, b.v)


def _batch(write_slots, sinks):
    plan = WritePlan(
        write_slots=write_slots, write_pos=list(range(len(write_slots))), attend_slots=write_slots + sinks,
        refresh_sinks=sinks,
    )
    return AttnBatch.from_plans([plan], "cpu")


def test_sink_refresh_replaces_the_least_similar_sink_below_threshold():
    k = torch.zeros(5, 4, 1, 8)
    v = torch.zeros(5, 4, 1, 8)
    base = torch.randn(8)
    for slot, sign in ((0, 1.0), (1, 1.0), (2, -1.0)):  # sink 2 points the other way
        k[slot] = sign * base + 0.01 * torch.randn(4, 1, 8)
        v[slot] = sign * base + 0.01 * torch.randn(4, 1, 8)
    k[4] = base
    v[4] = base
    batch = _batch([4], [0, 1, 2])
    assert refresh_sinks_(k, v, batch, threshold=0.2) == [2]
    torch.testing.assert_close(k[2], k[4])
    # now every sink is similar: nothing changes
    before = k.clone()
    assert refresh_sinks_(k, v, batch, threshold=0.2) == [-1]
    assert torch.equal(k, before)


def test_clear_slots_zeroes_only_those_slots():
    pool = KVPool([3, 4], 6, 2, 1, 4, torch.float32, "cpu")
    pool.k.normal_()
    pool.v.normal_()
    pool.clear_slots([1, 4])
    assert pool.k[:, [1, 4]].abs().sum() == 0 and pool.v[:, [1, 4]].abs().sum() == 0
    assert (pool.k[:, [0, 2, 3, 5]] != 0).all() and (pool.v[:, [0, 2, 3, 5]] != 0).all()
