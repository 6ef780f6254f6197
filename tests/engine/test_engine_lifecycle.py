"""Streams come and go: removing one frees everything it held, and many add/remove cycles leave
the pool, the runner, the scheduler and the core's bookkeeping where they started."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

from engine_helpers import RELAXED, FakeClock, Feeder, model_core, params
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_state import StreamState


def bookkeeping(core, resident: str | None = None) -> dict:
    """Sizes of everything the engine keys by stream (the resident stream's waiting input and
    outputs, which vary with where its chunks stand, left out)."""
    stats = core.stats()
    if resident is not None:
        stats["waiting_frames"] -= core.waiting_frames(resident)
        stats["output_frames"] -= core.output_frames_waiting(resident)
    runner = core.executor.runner
    return {
        "streams": stats["streams"],
        "waiting": stats["waiting_frames"],
        "outputs": stats["output_frames"],
        "sched_streams": stats["scheduler_streams"],
        "sched_free": stats["scheduler_free_stream_slots"],
        "sched_open_plans": len(core.scheduler._open),
        "runner_streams": len(runner.streams),
        "runner_params": len(runner.params),
        "free_slots": runner.slots.free_slots,
        "slot_table_streams": len(runner.slots.streams),
        "metric_streams": len(core.metrics.streams),
    }


def count_live(kind) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def test_removing_a_stream_mid_chunk_frees_everything(comps, cfg):
    clock = FakeClock()
    core = model_core(comps, clock)
    empty = bookkeeping(core)
    clips = {sid: synthetic_clip(30, 64, 48, seed=i) for i, sid in enumerate(("keep", "gone"))}
    for sid in clips:
        assert core.add_stream(sid, params(cfg, f"prompt {sid}", steps=3), RELAXED)
    feeder = Feeder(core, clock, clips)
    for _ in range(3):
        feeder.round()
    feeder.feed("gone", 2)  # half a chunk waiting
    feeder.feed("keep", 2)
    runner = core.executor.runner
    state = runner.streams["gone"]
    assert state.in_flight and core.waiting_frames("gone") == 2  # lanes hold chunks, frames wait
    held = list(runner.slots.streams["gone"].all_slots())
    state_ref, vae_ref = weakref.ref(state), weakref.ref(state.vae_state)
    del state

    assert core.remove_stream("gone")
    # 1. Everything keyed by the stream is gone; the other stream is as it was.
    after = bookkeeping(core)
    assert after["streams"] == after["runner_streams"] == after["sched_streams"] == after["metric_streams"] == 1
    assert after["free_slots"] == empty["free_slots"] - 3 * cfg.cache.window  # only "keep"'s 3 lanes
    assert after["sched_free"] == empty["sched_free"] - 1
    assert core.waiting_frames() == core.waiting_frames("keep") == 2
    # a removed stream is named (a change racing its removal got KeyError('gone'), its bare id)
    for call in (lambda: core.push_frame("gone", clips["gone"][0]), lambda: core.update_params("gone", seed=3),
                 lambda: core.params("gone"), lambda: core.pop_outputs("gone")):
        with pytest.raises(KeyError, match="unknown stream 'gone'"):
            call()
    # 2. Its KV slots are zeroed and its state (lanes, VAE caches, prompt K/V) is released.
    pool = runner.pool
    assert not pool.k[:, held].any() and not pool.v[:, held].any()
    gc.collect()
    assert state_ref() is None and vae_ref() is None
    # 3. The remaining stream goes on; removing it too restores the empty engine.
    feeder.clips.pop("gone")
    feeder.outputs.pop("gone")
    feeder.feed("keep", 2)
    feeder.drain()
    core.remove_stream("keep")
    assert bookkeeping(core) == empty
    assert not core.remove_stream("keep")  # unknown: ignored


def test_many_add_remove_cycles_leave_no_trace(comps, cfg):
    clock = FakeClock()
    core = model_core(comps, clock, max_streams=2)
    rng = np.random.default_rng(0)
    frames = synthetic_clip(9, 64, 48, seed=9)
    assert core.add_stream("resident", params(cfg, "always here", steps=2), RELAXED)

    def cycle(i: int) -> None:
        sid = f"s{i}"
        assert core.add_stream(sid, params(cfg, f"prompt {i % 7}", steps=int(rng.integers(1, 5)), seed=i), RELAXED)
        for k in range(int(rng.integers(0, 10))):  # 0..9 frames: nothing, a prepare, a steady chunk
            core.push_frame(sid, frames[k], pts=k)
            if k % 2:
                core.push_frame("resident", frames[k], pts=k)
            while core.step() is not None:
                pass
        core.pop_outputs(sid, limit=int(rng.integers(0, 3)))  # leave some outputs behind
        core.pop_outputs("resident")
        if i % 3 == 0:
            core.update_params(sid, prompt="changed", prompt_blend_chunks=2)
        assert core.remove_stream(sid)

    for i in range(8):  # warm the caches: every prompt seen once (text and prompt K/V LRUs)
        cycle(i)
    start = bookkeeping(core, "resident")
    tensors_start, states_start = count_live(torch.Tensor), count_live(StreamState)
    tracemalloc.start()
    snap_start = tracemalloc.take_snapshot()
    for i in range(8, 108):
        cycle(i)
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap_start, "filename"))
    tracemalloc.stop()
    assert bookkeeping(core, "resident") == start
    total_slots = core.executor.runner.slots.allocator.num_slots
    assert start["runner_streams"] == 1 and start["free_slots"] == total_slots - 2 * cfg.cache.window
    assert count_live(StreamState) == states_start == 1
    # The resident stream's lanes and VAE caches hold a few tensors more or less depending on
    # where its chunks stand; one leaked stream state would hold dozens.
    assert count_live(torch.Tensor) <= tensors_start + 20
    assert len(core.executor.runner._prompt_cache) <= core.executor.runner._prompt_cache_size
    assert grown < 512 * 1024, f"Python heap grew by {grown} bytes over 100 cycles"


def test_warmup_runs_the_model_path_and_leaves_nothing_behind(comps, cfg):
    clock = FakeClock()
    core = model_core(comps, clock)
    empty = bookkeeping(core)
    warmup_ms = core.warmup()
    assert warmup_ms > 0 and core.metrics.warmup_ms == warmup_ms
    # the prepare + every lane, at the preset's steps, at one step (where rows = chunks), and two
    # streams at one step together (a step's fixed cost against a chunk's)
    assert core.scheduler.cost_model.samples == (1 + cfg.sampling.steps) + (1 + 1) + (1 + 1)
    assert bookkeeping(core) == empty
    assert core.add_stream("s", params(cfg, "x"), RELAXED)
    with pytest.raises(RuntimeError, match="before any stream"):
        core.warmup()
