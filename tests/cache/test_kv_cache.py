"""KV pool tensor operations: re-base rotation, sink refresh, clearing."""

from __future__ import annotations

import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool, sink_similarity, swap_refresh_
from streamdiff.cache.slots import WritePlan
from streamdiff.kernels.cache_write import cache_write_ref
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed


def test_rebase_rotation_equals_writing_at_the_shifted_index():
    rope = WanRotaryPosEmbed(32, (1, 2, 2), 64)
    cos, sin = rope.freqs_cos.float(), rope.freqs_sin.float()
    split = (rope.t_dim, rope.h_dim, rope.w_dim)
    k = torch.randn(1, 12, 2, 32)
    v = torch.randn(1, 12, 2, 32)
    a = KVPool([0], 4, 12, 2, 32, torch.float32, "cpu", window=4)
    b = KVPool([0], 4, 12, 2, 32, torch.float32, "cpu", window=4)
    cache_write_ref(k, v, a.at(0).k, a.at(0).v, torch.tensor([[2]]), torch.tensor([[40]]), cos, sin, split, (3, 4))
    cache_write_ref(k, v, b.at(0).k, b.at(0).v, torch.tensor([[2]]), torch.tensor([[40 - 33]]), cos, sin, split, (3, 4))
    assert not torch.allclose(a.k, b.k)
    a.rebase_([2], 33, cos, sin, rope.t_dim)
    torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.v, b.v)


def test_rolling_refresh_swaps_so_each_frame_is_held_once():
    """rolling: the least similar sink below the threshold swaps places with the frame just
    written; nothing is held twice, and similar sinks leave the pool unchanged."""
    pool = KVPool([0], 6, 4, 1, 8, torch.float32, "cpu", window=6, track_frames=True)
    k, v = pool.at(0).k, pool.at(0).v
    base = torch.randn(8)
    for slot, sign in ((0, 1.0), (1, 1.0), (2, -1.0), (3, 0.5)):  # sink 2 points the other way
        k[slot] = sign * base + 0.01 * torch.randn(4, 1, 8)
        v[slot] = sign * base + 0.01 * torch.randn(4, 1, 8)
    k[4], v[4] = base, base
    pool.frames[0, :5] = torch.tensor([0, 1, 2, 3, 4])
    plan = WritePlan([4], [4], [0, 1, 2, 3, 4], lane=0, frames=[4], refresh=True, sink_slots=[0, 1, 2])
    batch = AttnBatch.from_plans([plan], "cpu", 6, 0.2, "rolling")
    old_sink = k[2].clone()
    swap_refresh_(pool.at(0), batch, batch.write_slots)
    torch.testing.assert_close(k[2], base.expand(4, 1, 8))
    torch.testing.assert_close(k[4], old_sink)  # the old sink frame lives on in the ring slot
    assert pool.held_frames(0, [0, 1, 2, 3, 4]) == [0, 1, 4, 3, 2]
    k[4], v[4] = base, base  # the next frame written there: every sink is similar now
    before = k.clone()
    swap_refresh_(pool.at(0), batch, batch.write_slots)
    assert torch.equal(k, before)


def test_sink_similarity_gives_zero_for_an_empty_sink():
    k_pool = torch.zeros(3, 4, 1, 8)
    v_pool = torch.zeros(3, 4, 1, 8)
    k_pool[0] = v_pool[0] = torch.ones(4, 1, 8)
    new = torch.ones(1, 4, 1, 8)
    sim = sink_similarity(k_pool, v_pool, torch.tensor([[0, 1]]), new, new)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 0.0]]))


def test_clear_slots_resets_the_lanes_queues_and_frames():
    pool = KVPool([0, 1], 12, 1, 1, 2, torch.float32, "cpu", window=6, track_frames=True)
    pool.q_len[:, 1] = 2
    pool.q_rot[:, 1] = 1
    pool.frames[:, 6:] = 5
    pool.clear_slots(list(range(6, 12)))
    assert pool.q_len.abs().sum() == 0 and pool.q_rot.abs().sum() == 0 and (pool.frames == -1).all()


def test_clear_slots_resets_the_queues_of_every_lane_it_is_given():
    """A leaving stream's lanes are cleared in one call (every denoise step's lane): a lane whose
    sdv2 queue kept a pending refresh or its rotation would make the next stream given that lane
    write other slots than a fresh stream does. Lanes not given keep their queues."""
    pool = KVPool([0, 1], 18, 1, 1, 2, torch.float32, "cpu", window=6)
    pool.q_stack[:] = 4
    pool.q_len[:] = 2
    pool.q_rot[:] = 1
    pool.clear_slots(list(range(6, 18)))  # lanes 1 and 2
    for name in ("q_stack", "q_len", "q_rot"):
        tensor = getattr(pool, name)
        assert tensor[:, 1:].abs().sum() == 0 and (tensor[:, 0] != 0).all(), name


def test_clear_slots_zeroes_only_those_slots():
    pool = KVPool([3, 4], 6, 2, 1, 4, torch.float32, "cpu", window=6)
    pool.k.normal_()
    pool.v.normal_()
    pool.clear_slots([1, 4])
    assert pool.k[:, [1, 4]].abs().sum() == 0 and pool.v[:, [1, 4]].abs().sum() == 0
    assert (pool.k[:, [0, 2, 3, 5]] != 0).all() and (pool.v[:, [0, 2, 3, 5]] != 0).all()


def test_host_staging_never_hands_one_buffer_to_two_threads():
    """Pipeline stages on threads of one process stage their index copies at once; a ring shared
    by them handed one pinned buffer to two threads (a review). The staged path with plain host
    buffers and a no-op event (a CPU has neither pinned memory nor CUDA events)."""
    import threading

    from streamdiff.cache.kv_cache import HostStaging

    class Event:
        def synchronize(self):
            pass

    class CpuStaging(HostStaging):
        @staticmethod
        def _new_buffer(numel, dtype):
            return torch.empty(numel, dtype=dtype), Event()

    staging = CpuStaging()
    used: dict[int, set[int]] = {0: set(), 1: set()}
    start = threading.Barrier(2)

    def stage(who: int) -> None:
        start.wait()
        for i in range(200):
            host = torch.full((3 + i % 5,), 1000 * who + i)
            staged, _ = staging._staged(host)
            assert torch.equal(staged, host)
            used[who].add(staged.untyped_storage().data_ptr())

    threads = [threading.Thread(target=stage, args=(who,)) for who in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(used[0]) == len(used[1]) == staging.buffers and not used[0] & used[1]
    floats = staging._staged(torch.tensor([0.5, 1.5]))[0]  # a buffer is never reused for another dtype
    assert floats.dtype == torch.float32 and floats.tolist() == [0.5, 1.5]


def test_copy_lane_copies_every_state_of_the_lane_in_one_upload(monkeypatch):
    """sdv2's prepare leaves the last step's K/V in every lane of a new stream (`copy_lane_`).
    Its index lists go up in one staged upload: four took four of a staging ring's four buffers,
    and the attention batch's upload in the same step then waited on the forward before (a review)."""
    import streamdiff.cache.kv_cache as kv_cache

    uploads = []

    class Counting:
        def to_device(self, host, device):
            uploads.append(host.clone())
            return host.to(device)

    monkeypatch.setattr(kv_cache, "STAGING", Counting())
    pool = KVPool([3, 5], 12, 2, 1, 4, torch.float32, "cpu", window=3)  # lanes of 3 slots: 0..3
    for name in KVPool.STATE:
        tensor = getattr(pool, name)
        tensor.copy_(torch.randint(0, 50, tensor.shape).to(tensor.dtype))
    before = {name: getattr(pool, name).clone() for name in KVPool.STATE}
    pool.copy_lane_(2, [0, 3])
    assert len(uploads) == 1
    lane = {0: slice(0, 3), 2: slice(6, 9), 3: slice(9, 12)}
    for name in ("k", "v", "frames"):
        t, b = getattr(pool, name), before[name]
        for dst in (0, 3):
            assert torch.equal(t[:, lane[dst]], b[:, lane[2]]), name
        assert torch.equal(t[:, lane[2]], b[:, lane[2]]) and torch.equal(t[:, 3:6], b[:, 3:6]), name
    for name in ("q_stack", "q_len", "q_rot"):
        t, b = getattr(pool, name), before[name]
        assert torch.equal(t[:, [0, 3]], b[:, [2, 2]]) and torch.equal(t[:, [1, 2]], b[:, [1, 2]]), name


def test_nbytes_counts_the_keys_and_the_values():
    """The engine's `pool_bytes` (metrics, leak checks): the K and the V tensors, every layer and slot."""
    pool = KVPool([0, 1], 12, 4, 2, 8, torch.bfloat16, "cpu", window=6)
    assert pool.nbytes() == pool.k.nbytes + pool.v.nbytes == 2 * (2 * 12 * 4 * 2 * 8) * 2
