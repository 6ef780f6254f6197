"""VAE off the critical stage (`parallel.vae_stages`): encode and decode run as stages of their
own, the DiT stages carry only blocks, and the output equals the local run."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from engine_helpers import max_abs_diff
from stage_helpers import SPECS, TOL, reference, run_streams
from streamdiff.config import load_config, with_overrides
from streamdiff.engine.stage_io import MAX_LANES
from streamdiff.model.flops import tokens_per_frame
from streamdiff.parallel.executor import InProcessStages, StagedExecutor, cpu_period_ms, pipeline_period_ms
from streamdiff.parallel.transport import CoreMeter, CoreShare, proc_busy_s, threads_cpu_s, usable_cores
from streamdiff.parallel.messages import StageSpec, message_bytes, stage_specs
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


def test_a_first_or_last_dit_stage_without_blocks_is_refused():
    """The first DiT stage holds the patch embedding and the last the head: neither may have an
    empty block range (a middle stage may)."""
    with pytest.raises(ValueError, match="need blocks"):
        StageSpec(0, 2, (0, 0))
    with pytest.raises(ValueError, match="need blocks"):
        StageSpec(1, 2, (4, 4))
    StageSpec(1, 3, (2, 2), False, False, "none")


def test_the_message_bound_holds_a_hop_of_first_chunks():
    """A stream's first chunk (sampling.first_chunk_latents) is longer than the steady chunk: the
    bound Ray sizes its channels with holds a hop of first-chunk hidden states for every row."""
    cfg = load_config("tiny", ["video.width=64", "video.height=48", "model.num_heads=32"])  # a wide model
    s, v = cfg.sampling, cfg.video
    assert s.first_chunk_latents > s.chunk_latents
    rows = cfg.cache.max_streams * MAX_LANES
    hidden = 4 * s.first_chunk_latents * tokens_per_frame(v.width, v.height) * cfg.model.dim  # one row's, fp32
    assert message_bytes(cfg) >= rows * hidden


def test_the_message_bound_holds_a_new_prompt_embedding_for_every_stream():
    """A hop carries a new prompt embedding per stream (host tensors travel with the message even
    when hidden states go over NCCL): umT5-sized embeddings dominate such a hop."""
    cfg = load_config("tiny", ["video.width=64", "video.height=48", "model.text_dim=4096", "text.max_length=512"])
    prompt = 4 * cfg.text.max_length * cfg.model.text_dim  # one [max_length, text_dim] fp32 embedding
    assert message_bytes(cfg, hop_tensors=False) >= cfg.cache.max_streams * prompt


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
        assert executor.stages.shared_cores == max(1, usable_cores() // torch.get_num_threads())
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


def test_stages_sharing_cpu_cores_from_their_cpu_time_and_the_cores_they_had():
    assert cpu_period_ms([60.0, 25.0, 50.0], free_cores=2.0) == 67.5  # the work over two cores
    assert cpu_period_ms([60.0, 25.0, 50.0], free_cores=1.35) == pytest.approx(100.0)  # others took 0.65
    assert cpu_period_ms([60.0, 5.0, 5.0], free_cores=2.0) == 60.0  # one thread, one core at most
    assert cpu_period_ms([60.0, 25.0, 50.0], free_cores=2.0, helper_ms=15.0) == 75.0  # and the codecs' work


def test_core_meter_counts_what_everything_else_kept_busy():
    """Cores left to the process = cores less (machine busy time less the process's CPU time) per
    second, over a sliding window; the process's CPU time outside the threads (codecs) is counted
    per chunk done, or as taken cores while no chunk is done; nothing before `min_s`; never
    below 0.25."""
    t = {"now": 0.0, "busy": 100.0, "process": 30.0, "mine": 10.0}
    meter = CoreMeter(2, lambda: t["mine"], window_s=3.0, min_s=1.0, busy_s=lambda: t["busy"],
                      clock=lambda: t["now"], process_cpu=lambda: t["process"])
    assert meter.share() is None  # no history yet

    def tick(seconds, busy_cores, mine_cores, helper_cores=0.0):
        t["now"] += seconds
        t["busy"] += seconds * busy_cores
        t["mine"] += seconds * mine_cores
        t["process"] += seconds * (mine_cores + helper_cores)

    tick(0.5, 2.0, 2.0)
    assert meter.share() is None  # half a second: too short to tell
    tick(0.5, 2.0, 1.5)  # another process took half a core for half a second
    assert meter.share() == CoreShare(2.0 - 0.25, 0.0)
    for _ in range(8):
        tick(1.0, 2.0, 1.0)  # now it holds a whole core
    assert meter.share().free == pytest.approx(1.0)  # the window forgot the idle start
    for _ in range(8):
        tick(1.0, 2.0, 1.4, helper_cores=0.4)  # this process's codecs take 0.4 of a core, no chunk done
    assert meter.share(chunks_done=0).free == pytest.approx(2.0 - 0.2 - 0.4)
    done = 0
    for _ in range(8):
        tick(1.0, 2.0, 1.4, helper_cores=0.4)
        done += 20  # 20 chunks a second: 20 ms of codec CPU each
        share = meter.share(chunks_done=done)
    assert share.free == pytest.approx(2.0 - 0.2) and share.helper_ms_per_chunk == pytest.approx(20.0)
    for _ in range(8):
        tick(1.0, 2.0, 0.0)  # the machine is taken
    assert meter.share(done).free == 0.25
    assert CoreMeter(2, lambda: 0.0, busy_s=lambda: None).share() is None  # no /proc/stat


def test_core_meter_never_says_fewer_than_a_quarter_core_while_chunks_get_done():
    """A machine another process keeps busy still leaves the stages 0.25 of a core in the meter's
    eyes, also while chunks get done (a review): the stages' period is their CPU time over the
    free cores, and zero of them would make it infinite, refusing every stream."""
    t = {"now": 0.0, "busy": 0.0, "process": 0.0, "mine": 0.0}
    meter = CoreMeter(2, lambda: t["mine"], window_s=3.0, min_s=1.0, busy_s=lambda: t["busy"],
                      clock=lambda: t["now"], process_cpu=lambda: t["process"])
    meter.share(chunks_done=0)
    t["now"], t["busy"] = 2.0, 2.0 * 3.0  # 3 busy cores' worth of others' work on a 2-core share
    share = meter.share(chunks_done=10)
    assert share.free == 0.25 and share.helper_ms_per_chunk == 0.0


def test_busy_time_counts_the_cpus_this_process_may_use():
    """A container's cpuset or `taskset`: the load on CPUs the stages cannot run on is not theirs
    to lose. Busy = every field but idle and iowait, in clock ticks."""
    stat = ("cpu  400 0 200 1000 100 0 0 0 0 0\n"
            "cpu0 100 0 50 300 50 0 0 0 0 0\n"
            "cpu1 300 0 150 700 50 0 0 0 0 0\n"
            "intr 12345\n")
    hz = os.sysconf("SC_CLK_TCK")
    assert proc_busy_s(None, stat) == pytest.approx(600 / hz)
    assert proc_busy_s({0}, stat) == pytest.approx(150 / hz)
    assert proc_busy_s({0, 1}, stat) == pytest.approx(600 / hz)
    if os.path.exists("/proc/stat"):
        assert proc_busy_s() > 0


def test_threads_cpu_clock_counts_a_busy_thread_and_forgets_an_ended_one():
    """Where the platform has per-thread CPU clocks (Linux) a busy thread's time grows; where it
    has none the threads count nothing (and ThreadedStages keeps no meter: the wall-time rule)."""
    clocks = hasattr(time, "pthread_getcpuclockid")
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        first = threads_cpu_s([thread])
        end = time.monotonic() + 5.0
        while threads_cpu_s([thread]) < first + 0.05 and time.monotonic() < end:
            time.sleep(0.01)
        if clocks:
            assert threads_cpu_s([thread]) >= first + 0.05
        else:
            assert threads_cpu_s([thread]) == first == 0.0
    finally:
        stop.set()
        thread.join()
    assert threads_cpu_s([thread]) == 0.0


def test_threaded_stages_run_at_the_configured_torch_threads_and_reason_over_the_cores(cfg4):
    """`runtime.threads` holds for in-process stages as for a one-process engine (the served demo's
    stage threads ran at torch's default, one per core, where its config says one each), and with
    stage threads sharing the cores the scheduler's depth is the cores when fewer than the stages."""
    from streamdiff.parallel import build_executor

    before = torch.get_num_threads()
    cfg = with_overrides(cfg4, parallel={"backend": "threads", "vae_stages": True}, runtime={"threads": 1})
    torch.set_num_threads(2)
    executor = build_executor(cfg)
    try:
        assert torch.get_num_threads() == 1
        cores = usable_cores()
        assert executor.stages.shared_cores == cores
        assert executor.period_depth == min(3, cores) and executor.depth == 3
        assert (executor.stages.meter is not None) == hasattr(time, "pthread_getcpuclockid")
    finally:
        executor.shutdown()
        torch.set_num_threads(before)


def test_executor_moves_no_blocks_while_a_vae_stage_is_the_slowest(cfg_vae):
    """The executor gives the rebalancer the VAE stages' time as a floor: DiT stages 2x apart
    behind a slower decode stage keep their split (a move mid-stream would not shorten the period)."""
    from streamdiff.engine.stage_io import StepOut

    cfg = with_overrides(cfg_vae, parallel={"rebalance": True, "rebalance_after_steps": 2})
    executor = StagedExecutor(cfg, InProcessStages(cfg, [2, 2]))
    wall = [5.0, 20.0, 40.0, 90.0]  # encode, DiT 10 ms a block, DiT 20 ms a block, decode
    dit = (1, 2)
    out = StepOut((0, 0), ["a row"], None, {}, [{"total": w, "blocks": w if k in dit else 0.0,
                                                 "num_blocks": 2 if k in dit else 0, "cpu": w}
                                                for k, w in enumerate(wall)])
    for _ in range(4):
        assert executor._observe([out]) == 90.0
    assert executor.counts == [2, 2] and not executor.rebalances


def test_drill_stages_that_sleep_per_block_are_not_held_to_the_shared_cores(cfg4):
    """With parallel.block_delay_ms the stages mostly sleep, as GPU-bound stages wait (a drill of
    `bench --stages`): no core is shared, and the period is their wall time, not CPU over cores."""
    from streamdiff.parallel.transport import ThreadedStages

    drill = ThreadedStages(with_overrides(cfg4, parallel={"block_delay_ms": 1.0}), [2, 2], "cpu")
    try:
        assert drill.shared_cores is None and drill.meter is None
    finally:
        drill.shutdown()


def test_executor_takes_the_period_from_cpu_time_where_the_transport_measures_the_cores(cfg_vae):
    """Stages on shared cores: the period the scheduler learns is the plan's stage CPU time over
    the cores they had (wall time counts every wait for a core); the wall-time rule where the
    transport cannot measure the cores. The engine reasons over `period_depth`."""
    from streamdiff.engine.core import EngineCore
    from streamdiff.engine.stage_io import StepOut

    executor = StagedExecutor(cfg_vae, InProcessStages(cfg_vae, [4]), rebalance=False)
    wall, cpu = [90.0, 60.0, 140.0], [50.0, 40.0, 70.0]
    out = StepOut((0, 0), ["a row"], None, {}, [{"total": w, "blocks": w if k == 1 else 0.0, "num_blocks": 4 if k == 1 else 0,
                                                 "cpu": c} for k, (w, c) in enumerate(zip(wall, cpu))])
    assert executor._observe([out]) == 140.0  # devices of their own: the slowest stage
    executor.stages.shared_cores = 2
    assert executor._observe([out]) == pipeline_period_ms(wall, 2) == 145.0
    assert executor.period_depth == 2 and executor.depth == 3
    seen = []
    executor.stages.core_share = lambda chunks_done: seen.append(chunks_done) or CoreShare(1.6, 0.0)
    assert executor._observe([out], chunks=2) == cpu_period_ms(cpu, 1.6) == 100.0
    # the codecs' 12 ms a chunk go with the plan's chunks: a plan of 3 takes 36 ms more work
    executor.stages.core_share = lambda chunks_done: seen.append(chunks_done) or CoreShare(1.6, 12.0)
    assert executor._observe([out], chunks=3) == cpu_period_ms(cpu, 1.6, 36.0) == pytest.approx(122.5)
    assert seen == [2, 5]  # the meter is told the chunks done so far
    executor.stages.core_share = lambda chunks_done: None  # not measured yet
    assert executor._observe([out]) == 145.0
    core = EngineCore(cfg_vae, executor)
    assert core.depth == core.scheduler.pipeline_depth == 3 and core.scheduler.periods_through == 2
