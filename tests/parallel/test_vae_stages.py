"""VAE off the critical stage (`parallel.vae_stages`): encode and decode run as stages of their
own, the DiT stages carry only blocks, and the output equals the local run."""

from __future__ import annotations

import os

import pytest
import torch

from engine_helpers import max_abs_diff
from stage_helpers import SPECS, TOL, reference, run_streams
from streamdiff.config import with_overrides
from streamdiff.parallel.executor import InProcessStages, StagedExecutor, pipeline_period_ms
from streamdiff.parallel.messages import stage_specs
from streamdiff.parallel.partition import Rebalancer, StageSample


@pytest.fixture(scope="module")
def ref(cfg4, comps4):
    return reference(cfg4, comps4)


@pytest.fixture(scope="module")
def cfg_vae(cfg4):
    return with_overrides(cfg4, parallel={"vae_stages": True})


def test_specs_put_the_vae_halves_on_stages_of_their_own():
    specs = stage_specs([(0, 2), (2, 4)], vae_stages=True)
    assert [(s.index, s.block_range, s.first, s.last, s.vae) for s in specs] == [
        (0, (0, 0), False, False, "encode"),
        (1, (0, 2), True, False, "none"),
        (2, (2, 4), False, True, "none"),
        (3, (4, 4), False, False, "decode"),
    ]
    plain = stage_specs([(0, 2), (2, 4)])
    assert [(s.first, s.last, s.vae) for s in plain] == [(True, False, "encode"), (False, True, "decode")]


@pytest.mark.parametrize("counts", [[2, 2], [4]])
def test_vae_stages_equal_local(cfg_vae, ref, counts):
    stages = InProcessStages(cfg_vae, counts, "cpu")
    infos = [w.info() for w in stages.workers]
    assert [i["vae"] for i in infos] == ["encode"] + ["none"] * len(counts) + ["decode"]
    assert [i["has_vae"] for i in infos] == [True] + [False] * len(counts) + [True]
    assert infos[0]["dit_params"] == infos[-1]["dit_params"] == 0 and infos[1]["has_text"]
    executor = StagedExecutor(cfg_vae, stages)
    assert executor.counts == counts
    got = run_streams(cfg_vae, executor)
    for sid in SPECS:
        assert got[sid].shape == ref[sid].shape and len(got[sid]) > 10, sid
        assert max_abs_diff(got[sid], ref[sid]) <= TOL, sid
    # Every stage was timed; the encode and decode stages ran no blocks.
    assert len(executor.last_stage_ms) == len(counts) + 2 and min(executor.last_stage_ms) > 0


def test_rebalancer_keeps_the_split_when_a_vae_stage_is_the_bottleneck():
    def feed(reb, floor_ms):
        for _ in range(3):  # stage 0: 10 ms per block, stage 1: 30 ms per block
            reb.observe([StageSample(20.0, 20.0, 2), StageSample(60.0, 60.0, 2)], floor_ms=floor_ms)
        return reb.proposal()

    assert feed(Rebalancer([2, 2], 1.25, 3, smoothing=1.0), floor_ms=0.0) == [3, 1]
    assert feed(Rebalancer([2, 2], 1.25, 3, smoothing=1.0), floor_ms=100.0) is None  # moving blocks cannot help


def test_stream_commands_reach_every_stage(cfg_vae):
    """Add, steps change and removal ride in the plans: every stage holds the stream on the
    scheduler's lanes, and a removed stream's slots are zeroed on every DiT stage."""
    from engine_helpers import RELAXED, Feeder, params
    from stage_helpers import core_for
    from streamdiff.pipeline.frames import synthetic_clip

    stages = InProcessStages(cfg_vae, [2, 2], "cpu")
    core, clock = core_for(cfg_vae, StagedExecutor(cfg_vae, stages))
    for sid in ("a", "b"):
        assert core.add_stream(sid, params(cfg_vae, sid, steps=2), RELAXED)
    feeder = Feeder(core, clock, {sid: synthetic_clip(30, 64, 48, seed=i) for i, sid in enumerate("ab")})
    for _ in range(3):
        feeder.round()
    core.update_params("a", steps=3)
    feeder.round()
    runners = [w.runner for w in stages.workers]
    for r in runners:
        assert set(r.params) == {"a", "b"} and r.params["a"].steps == 3
    for r in runners[1:3]:  # the DiT stages know each stream's lanes
        assert r.kv_lanes["a"] == core.scheduler.kv_lanes_of("a") and len(r.kv_lanes["a"]) == 3
    assert runners[1].streams["a"].steps == 3 and not runners[2].streams  # StreamStates: first DiT stage only
    lanes_b = core.scheduler.kv_lanes_of("b")
    slots_b = [g * cfg_vae.cache.window + i for g in lanes_b for i in range(cfg_vae.cache.window)]
    assert all(r.pool.k[:, slots_b].any() for r in runners[1:3])  # b's K/V was written on both
    core.remove_stream("b")
    for r in runners:
        assert set(r.params) == {"a"}
    for r in runners[1:3]:
        assert not r.pool.k[:, slots_b].any() and not r.pool.v[:, slots_b].any()


def test_threads_backend_runs_encode_dit_and_decode_on_threads_equal_to_local(cfg4, ref):
    """`parallel.backend: threads` with `vae_stages` (the demo preset's executor): build_executor
    gives a thread per stage, encode and decode included, and the frames of the local run."""
    from streamdiff.parallel import build_executor
    from streamdiff.parallel.transport import ThreadedStages

    cfg = with_overrides(cfg4, parallel={"backend": "threads", "vae_stages": True})
    executor = build_executor(cfg)
    try:
        assert isinstance(executor, StagedExecutor) and isinstance(executor.stages, ThreadedStages)
        assert executor.counts == [4]
        assert not executor.rebalance_enabled  # cfg4's `parallel.rebalance: false` holds
        assert [w.info()["vae"] for w in executor.stages.workers] == ["encode", "none", "decode"]
        # the three threads share this CPU: the period the scheduler learns counts that
        assert executor.stages.shared_cores == max(1, (os.cpu_count() or 1) // torch.get_num_threads())
        got = run_streams(cfg, executor)
        assert min(executor.stages.busy_s) > 0  # every stage ran on its own thread
    finally:
        executor.shutdown()
    assert not any(t.is_alive() for t in executor.stages._threads)
    for sid in SPECS:
        assert got[sid].shape == ref[sid].shape and max_abs_diff(got[sid], ref[sid]) <= TOL, sid


def test_stages_sharing_cpu_cores_take_at_least_their_work_over_the_cores():
    assert pipeline_period_ms([90.0, 60.0, 140.0]) == 140.0  # stages with a device each: the slowest
    assert pipeline_period_ms([90.0, 60.0, 140.0], shared_cores=2) == 145.0  # three threads on 2 cores
    assert pipeline_period_ms([90.0, 60.0, 140.0], shared_cores=4) == 140.0  # enough cores: the slowest
    assert pipeline_period_ms([90.0, 60.0, 140.0], shared_cores=1) == 290.0  # one core: all of it


@pytest.mark.parametrize("vae_stages", [True, False])
def test_every_message_fits_the_bound_transports_size_their_buffers_with(cfg4, vae_stages):
    """`message_bytes` bounds every message of a forward (Ray sizes its channels with it: a
    larger message stalls a graph's teardown, test_ray_stages.py). The busiest case: every
    stream the cache allows at four denoise steps, first chunks, a prompt blend, through
    encode / DiT / DiT / decode stages or two DiT stages holding the VAE halves. Every tensor
    sent is its own, not a view that pickles a larger one with it (the encoded latents were
    views of the encoder's output, 4-8x their size)."""
    import dataclasses
    import pickle

    from engine_helpers import RELAXED, Feeder, params
    from stage_helpers import core_for
    from streamdiff.parallel.messages import message_bytes
    from streamdiff.pipeline.frames import synthetic_clip

    cfg = with_overrides(cfg4, parallel={"vae_stages": vae_stages})
    stages = InProcessStages(cfg, [2, 2])
    sizes: dict[str, int] = {}
    views: list[str] = []  # tensors sent that pickle more than themselves (views of a larger one)

    def tensors(value, path="msg"):
        if isinstance(value, torch.Tensor):
            yield path, value
        elif dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                yield from tensors(getattr(value, f.name), f"{path}.{f.name}")
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from tensors(item, f"{path}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for k, item in enumerate(value):
                yield from tensors(item, f"{path}[{k}]")

    for worker in stages.workers:
        def run(msg, worker=worker, inner=worker.run):
            out = inner(msg)
            name = f"{type(out).__name__} from stage {worker.spec.index}"
            sizes[name] = max(sizes.get(name, 0), len(pickle.dumps(out, protocol=5)))
            views.extend(f"{name}: {path}" for path, t in tensors(out) if t.untyped_storage().nbytes() > t.nbytes)
            return out
        worker.run = run
    core, clock = core_for(cfg, StagedExecutor(cfg, stages))
    sids = [f"s{k}" for k in range(cfg.cache.max_streams)]
    clips = {sid: synthetic_clip(5 + 4 * 5, 64, 48, seed=k) for k, sid in enumerate(sids)}
    for k, sid in enumerate(sids):
        assert core.add_stream(sid, params(cfg, "a red fox", steps=4, seed=k), RELAXED)
    feeder = Feeder(core, clock, clips)
    for r in range(6):
        if r == 2:
            core.update_params(sids[0], prompt="a blue whale", prompt_blend_chunks=2)
        feeder.round(sids)
    assert all(len(feeder.frames(sid)) > 0 for sid in sids)
    bound = message_bytes(cfg)
    assert len(sizes) == len(stages.workers) and max(sizes.values()) <= bound, (sizes, bound)
    assert max(sizes.values()) > bound / 3, (sizes, bound)  # a bound, not a blanket: Ray allocates it per buffer
    assert not views, views[:5]
