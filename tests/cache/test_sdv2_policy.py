"""The production sdv2 bookkeeping (Sdv2Lane on the host, choose_writes per layer on tensors)
against the plain-Python rules, with scripted similarities: identical slot choices, queues,
held frames and RoPE starts per layer, over 60 chunks and several lanes in one forward."""

from __future__ import annotations

import random

import pytest
import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool, choose_writes
from streamdiff.cache.slots import Sdv2Lane, SlotTable

from sdv2_reference import Sdv2LayerRef, rope_starts

W, S, LAYERS = 6, 3, [0, 1, 2]


def scripted(rng: random.Random, ref: Sdv2LayerRef) -> list[float]:
    """Similarities for the sinks: mostly high, sometimes low, zero for never-written sinks."""
    sims = [rng.uniform(0.5, 1.0) if rng.random() > 0.3 else rng.uniform(-0.5, 0.9) for _ in range(S)]
    return [0.0 if not ref.written(s) else a for s, a in enumerate(sims)]


@pytest.mark.parametrize("threshold", [-1.0, 0.2, 0.85])
def test_sdv2_bookkeeping_matches_the_rules(threshold):
    rng = random.Random(int(threshold * 100) + 7)
    table = SlotTable(4 * W, W, S, 1024, policy="sdv2", refresh=threshold > -1, rebase_frame=50)
    pool = KVPool(LAYERS, 4 * W, 1, 1, 2, torch.float32, "cpu", W, track_frames=True)
    table.add_stream("a", 2)  # two lanes of one stream
    table.add_stream("b", 1)  # another stream, joining later
    rows_all = [("a", 0), ("a", 1), ("b", 0)]
    refs = {(row, layer): Sdv2LayerRef(W, S, threshold) for row in rows_all for layer in LAYERS}
    sizes = {row: [] for row in rows_all}
    refreshes = 0
    for step in range(64):
        # "b" starts 4 steps late; a first chunk (2 latent frames) runs in its own forward.
        groups = [[("a", 0), ("a", 1)]] if step < 4 else [[("a", 0), ("a", 1), ("b", 0)]]
        if step == 4:
            groups = [[("b", 0)], [("a", 0), ("a", 1)]]
        if step > 60:
            break
        for rows in groups:
            n = 2 if not sizes[rows[0]] else 1
            plans = [table.lane(sid, j).plan(n) for sid, j in rows]
            for row, plan in zip(rows, plans):
                sizes[row].append(n)
                assert plan.write_pos[0] == rope_starts(sizes[row])[-1]
            batch = AttnBatch.from_plans(plans, "cpu", W, threshold, "sdv2")
            for layer in LAYERS:
                sims = [scripted(rng, refs[row, layer]) for row in rows]
                frames = [plan.frames for plan in plans]
                expected = [refs[row, layer].chunk(f, s) for row, f, s in zip(rows, frames, sims)]
                sim = torch.tensor(sims) if batch.test_before else None
                got = choose_writes(pool.at(layer), batch, sim)
                pool.at(layer).record_frames(got, batch.frames)
                for r, (row, plan) in enumerate(zip(rows, plans)):
                    ref = refs[row, layer]
                    base = plan.lane * W
                    assert got[r].tolist() == [base + e for e in expected[r]], (step, row, layer)
                    lane = table.lane(*row)
                    assert pool.queue(layer, lane.lane, lane.ring_order) == list(ref.queue), (step, row, layer)
                    assert pool.held_frames(layer, lane.slots) == ref.holds
                    refreshes += any(e < S for e in expected[r]) and ref.full
    assert sum(sizes[("a", 0)]) > 55  # crossed the RoPE restart at 50
    if threshold > -1:
        assert refreshes > 0  # the refresh really fired in full windows


def test_first_refresh_is_the_empty_sink_and_sinks_become_frames_0_1_6():
    """The reference's signature: chunk 1 sees sink 2 empty (similarity 0) and queues it, so
    chunk 5 (the first with a full window) overwrites sink 2, not ring entry 3."""
    table = SlotTable(W, W, S, 1024, policy="sdv2", refresh=True)
    pool = KVPool([0], W, 1, 1, 2, torch.float32, "cpu", W, track_frames=True)
    table.add_stream("s", 1)
    lane = table.lane("s", 0)
    for k in range(6):
        plan = lane.plan(2 if k == 0 else 1)
        batch = AttnBatch.from_plans([plan], "cpu", W, 0.2, "sdv2")
        held = pool.held_frames(0, lane.slots)
        sim = torch.tensor([[0.0 if held[s] is None else 0.9 for s in range(S)]]) if batch.test_before else None
        pool.at(0).record_frames(choose_writes(pool.at(0), batch, sim), batch.frames)
    assert pool.held_frames(0, lane.slots)[:S] == [0, 1, 6]
    assert pool.queue(0, lane.lane, lane.ring_order) == [3, 4, 5]


def test_rope_restarts_at_window_minus_one_without_touching_keys():
    table = SlotTable(W, W, S, 1024, policy="sdv2", refresh=False, rebase_frame=50)
    table.add_stream("s", 1)
    lane = table.lane("s", 0)
    starts = [lane.plan(2 if k == 0 else 1).write_pos[0] for k in range(100)]
    assert starts[:3] == [0, 2, 3]
    assert starts[48:52] == [49, 5, 6, 7]  # chunk 49 would start at 50: restarts at W - 1
    assert max(starts) == 49 and starts[-1] == rope_starts([2] + [1] * 99)[-1]
    assert all(plan.rebase_delta == 0 for plan in [lane.plan(1)])


def test_sdv2_config_refuses_multi_frame_chunks():
    from streamdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="chunk_latents"):
        load_config("tiny", ["sampling.chunk_latents=2"])


def test_sdv2_config_accepts_exactly_the_windows_a_lane_can_stream():
    """A window whose filling queues no ring entry passed the config and stopped every stream at
    the chunk after the window filled (a review: window 3, sinks 1, "engine loop failed"). The
    config's rule against the lane itself, every small window, sink count and first chunk."""
    from streamdiff.cache.slots import Sdv2Lane
    from streamdiff.config import ConfigError, load_config

    checked = refused = 0
    for window in range(2, 10):
        for sinks in range(1, window):
            for first in range(1, min(window, 8) + 1):  # the config allows first chunks of 1-8
                sets = [f"cache.window={window}", f"cache.sinks={sinks}", f"sampling.first_chunk_latents={first}",
                        f"cache.rebase_frame={max(window, 10)}"]
                try:
                    load_config("tiny", sets)
                    accepted = True
                except ConfigError as e:
                    assert "no ring entry" in str(e), str(e)
                    accepted = False
                lane = Sdv2Lane(0, list(range(window)), sinks, 64, refresh=False, rebase_frame=max(window, 10))
                try:
                    for n in [first] + [1] * (2 * window):
                        lane.plan(n)
                    streams = True
                except ValueError:
                    streams = False
                assert accepted == streams, (window, sinks, first)
                checked += 1
                refused += not accepted
    assert refused > 5 and checked - refused > 5


def test_a_peek_leaves_the_lane_as_it_was():
    """A filler row peeks at the plan the lane's next chunk will get; the peek must not commit
    anything, or the real chunk then plans from a queue the look-ahead already changed. (With
    the default window, sinks and first chunk the ring entry is deduplicated: 1 sink shows it.)"""
    lane = Sdv2Lane(0, list(range(W)), 1, 100)
    lane.plan(1)
    before = (lane.filled, lane.next_pos, list(lane.ring_order), lane.frame, lane.chunks)
    peeked = lane.peek(1)
    assert (lane.filled, lane.next_pos, list(lane.ring_order), lane.frame, lane.chunks) == before
    assert lane.plan(1).ring_order == peeked.ring_order
