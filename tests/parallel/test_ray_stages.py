"""Pipeline stages as Ray actors (CPU actors, Ray Compiled Graph over shared-memory channels,
one local Ray instance for the module): same frames as the LocalExecutor (TOL grey levels,
see stage_helpers.py), each actor holds only its blocks, a slow stage loses blocks, and a
killed actor is replaced while its streams resume."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from engine_helpers import RELAXED, Feeder, max_abs_diff, params  # noqa: E402
from stage_helpers import SPECS, TOL, core_for, drive, frames_of, local, reference, run_streams  # noqa: E402
from streamdiff.config import with_overrides  # noqa: E402
from streamdiff.parallel.executor import StagedExecutor  # noqa: E402
from streamdiff.parallel.ray_executor import RayStages  # noqa: E402
from streamdiff.pipeline.frames import synthetic_clip  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ref(cfg4, comps4):
    return reference(cfg4, comps4)


def assert_actors_hold_only_their_blocks(stages: RayStages, comps4) -> None:
    """Each actor holds only its own blocks (and the first / last their VAE half's module)."""
    full = dict(comps4.model.named_parameters())
    for k, (start, end) in enumerate(r.block_range for r in stages.specs):
        info = stages.call(k, "info")
        assert info["block_range"] == (start, end)
        assert info["block_params"] == sum(p.numel() for n, p in full.items()
                                           if n.startswith("blocks.") and start <= int(n.split(".")[1]) < end)
        assert {int(n.split(".")[1]) for n in info["param_names"] if n.startswith("blocks.")} == set(range(start, end))


# Three stages over Ray are covered with plans in flight (test_ray_stages_overlapping_plans_equal_local).
@pytest.mark.parametrize("vae_stages", [False, True])
def test_ray_stages_equal_local(cfg4, comps4, ref, vae_stages):
    counts = [2, 2]
    cfg = with_overrides(cfg4, parallel={"vae_stages": vae_stages})
    stages = RayStages(cfg, counts)
    executor = StagedExecutor(cfg, stages)
    try:
        assert len(stages.actors) == len(counts) + (2 if vae_stages else 0)  # own actors for encode / decode
        got = run_streams(cfg, executor)
        for sid in SPECS:
            assert got[sid].shape == ref[sid].shape and max_abs_diff(got[sid], ref[sid]) <= TOL, sid
        assert_actors_hold_only_their_blocks(stages, comps4)
    finally:
        executor.shutdown()


def test_ray_slow_stage_loses_blocks(cfg4, ref):
    cfg = with_overrides(cfg4, parallel={"rebalance": True, "rebalance_after_steps": 3, "rebalance_threshold": 1.5})
    stages = RayStages(cfg, [2, 2])
    executor = StagedExecutor(cfg, stages)
    try:
        # 150 ms more per block: far above the noise of a loaded 2-CPU machine, where 40 ms once
        # failed to stay 1.5x slower for 3 steps in a row and nothing moved
        stages.call(1, "set_slowdown", 150.0)
        got = run_streams(cfg, executor)
        assert executor.rebalances and executor.counts[1] < 2
        assert stages.call(1, "info")["block_range"] == stages.specs[1].block_range
        for sid in SPECS:
            assert max_abs_diff(got[sid], ref[sid]) <= TOL, sid
    finally:
        executor.shutdown()


@pytest.mark.parametrize("counts", [[2, 2], [1, 2, 1]])
def test_ray_stages_overlapping_plans_equal_local(cfg_auto, comps4, counts):
    """One plan per stage in flight over actors (lane stride D = stages, chosen automatically):
    the frames of the local executor at the same stride, with live prompt and seed changes."""
    depth = len(counts)
    stages = RayStages(cfg_auto, counts)
    executor = StagedExecutor(cfg_auto, stages)
    try:
        core, got, _, _ = drive(cfg_auto, executor, 2)
        assert core.params("s").lane_stride == depth and executor.peak_in_flight == depth
        assert_actors_hold_only_their_blocks(stages, comps4)
    finally:
        executor.shutdown()
    _, ref, _, _ = drive(with_overrides(cfg_auto, parallel={"lane_stride": depth}), local(comps4), 2)
    assert len(got) == len(ref) > 20
    assert max_abs_diff(frames_of(got), frames_of(ref)) <= TOL


def test_live_loop_does_not_wait_on_a_plan_in_the_actors(cfg_auto, comps4):
    """A live loop steps with `block=False`: while the oldest plan is still in a stage actor
    and no new chunk is ready, the step returns at once and leaves it in flight (it used to
    wait for it: a camera stream over Ray got one chunk per plan latency), asking does not
    take the result away, and a chunk that arrives meanwhile enters the pipeline. The frames
    are the local executor's."""
    stages = RayStages(cfg_auto, [2, 2])
    executor = StagedExecutor(cfg_auto, stages)
    clip = synthetic_clip(5 + 4 * 3, 64, 48, seed=21)
    chunks = [clip[:5]] + [clip[5 + 4 * c: 9 + 4 * c] for c in range(3)]

    def run(cfg, executor, live: bool):
        core, clock = core_for(cfg, executor)
        assert core.add_stream("s", params(cfg, "a red fox", steps=1, seed=7), RELAXED)
        outputs, waited, pts = [], 0, 0
        for frames in chunks:
            for frame in frames:
                core.push_frame("s", frame, pts=pts)
                pts += 1
            report = core.step(block=not live)
            assert report is not None and report.plan.chunks  # the new chunk entered the pipeline
            if live and core.plans_in_flight and not report.plan.chunks[0].first:  # a first chunk runs at submit
                # nothing new: the step neither waits for the plan in the actors nor collects it
                assert core.step(block=False) is None and core.plans_in_flight == 1
                deadline = time.monotonic() + 120
                while (polled := core.step(block=False)) is None:
                    waited += 1
                    assert time.monotonic() < deadline, "the plan never reported ready"
                    time.sleep(0.005)
                assert polled.result is not None and core.plans_in_flight == 0
            outputs += core.pop_outputs("s")
            clock.t += 4 / 30
        core.drain()
        return outputs + core.pop_outputs("s"), waited

    try:
        stages.call(1, "set_slowdown", 400.0)  # a forward spends 0.8 s in stage 1
        got, waited = run(cfg_auto, executor, live=True)
    finally:
        executor.shutdown()
    assert waited > 0
    ref, _ = run(with_overrides(cfg_auto, parallel={"lane_stride": 2}), local(comps4), live=False)
    assert len(got) == len(ref) > 0
    assert max_abs_diff(frames_of(got), frames_of(ref)) <= TOL


def test_a_teardown_that_hangs_is_bounded_and_the_stages_are_replaced(cfg4, ref):
    """Ray's teardown waits without a bound on a stage loop that missed its cancel (the demo at
    256x256 on CPU actors hung there forever when its warm-up removed its stream, until the
    channels were sized for its messages: the next test). Bounded:
    `idle` returns after `teardown_timeout_s`, every actor is replaced before the next graph,
    and streams are then served with the frames of the local executor."""
    import threading

    stages = RayStages(cfg4, [2, 2])
    executor = StagedExecutor(cfg4, stages)
    hang = threading.Event()
    try:
        stages.dag.teardown = lambda *args, **kwargs: hang.wait()  # a loop that never stops
        stages.teardown_timeout_s = 0.3  # (this teardown never returns: the bound is waited out in full)
        stages.idle_teardown_s = 0  # torn down as soon as idle
        old = list(stages.actors)
        stages.idle()  # returns: before the bound it waited here forever
        assert stages.dag is None and stages.stale
        got = run_streams(cfg4, executor)
        assert not stages.stale and all(new is not o for new, o in zip(stages.actors, old))
        for actor in old:
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(actor.ping.remote(), timeout=30)
        for sid in SPECS:
            assert max_abs_diff(got[sid], ref[sid]) <= TOL, sid
    finally:
        hang.set()
        executor.shutdown()


def test_messages_past_rays_default_channel_size_do_not_stall_teardown(cfg4):
    """Frames of 256x192 through an encode stage: every message between the actors is larger
    than Ray's default channel (1 MB). Ray grows a channel for such a message onto a new buffer
    that a graph teardown does not close, and the stage reading it never stopped (the demo over
    Ray hung in warm-up). With channels sized for the largest message, `idle` tears the graph
    down within its bound, the actors stay, and the next stream is served."""
    import pickle

    w, h = 256, 192
    cfg = with_overrides(cfg4, video={"width": w, "height": h}, parallel={"vae_stages": True})
    stages = RayStages(cfg, [2, 2])
    executor = StagedExecutor(cfg, stages)
    try:
        stages.teardown_timeout_s = 10.0
        core, clock = core_for(cfg, executor)
        sids = ["a", "b"]
        clips = {sid: synthetic_clip(5 + 4 * 5, w, h, seed=k) for k, sid in enumerate(sids)}
        steady = sum(len(pickle.dumps(clips[sid][:4])) for sid in sids)
        assert steady > 1_000_000  # every steady step's frames alone pass Ray's default
        for k, sid in enumerate(sids):
            assert core.add_stream(sid, params(cfg, "a red fox", steps=1, seed=k), RELAXED)
        feeder = Feeder(core, clock, clips)
        for _ in range(6):  # more steps than a channel has buffers: each buffer held one
            feeder.round(sids)
        assert all(len(feeder.frames(sid)) > 0 for sid in sids)
        for sid in sids:
            core.remove_stream(sid)
        actors = list(stages.actors)
        # Streams that come and go within `idle_teardown_s` keep the compiled graph: every compile
        # leaks Ray's channel buffers (a churn probe: +172 MB of the server a loop of 7 streams).
        stages.idle_teardown_s = 2.0
        graph, compiles = stages.dag, stages.compiles
        stages.idle()  # (as the executor does once no stream is left)
        assert stages.dag is graph  # kept while the next stream may come
        assert core.add_stream("e", params(cfg, "a blue whale", steps=1, seed=8), RELAXED)
        feeder = Feeder(core, clock, {"e": synthetic_clip(5 + 4 * 2, w, h, seed=4)})
        for _ in range(3):
            feeder.round(["e"])
        assert len(feeder.frames("e")) > 0 and stages.dag is graph and stages.compiles == compiles
        core.remove_stream("e")
        stages.idle_teardown_s = 0.2  # (the window that kept the graph is above: here it only has to pass)
        stages.idle()
        deadline = time.monotonic() + 60
        while stages.dag is not None and time.monotonic() < deadline:  # torn down once idle that long
            time.sleep(0.1)
        assert stages.dag is None and not stages.stale  # the teardown ended within its bound
        assert core.add_stream("d", params(cfg, "a blue whale", steps=1, seed=9), RELAXED)
        feeder = Feeder(core, clock, {"d": synthetic_clip(5 + 4 * 3, w, h, seed=5)})
        for _ in range(4):
            feeder.round(["d"])
        assert len(feeder.frames("d")) > 0 and stages.actors == actors and stages.compiles == compiles + 1
    finally:
        executor.shutdown()


def test_channels_hold_the_largest_message_within_their_share_of_the_object_store(cfg4, caplog):
    """Channel buffers: the largest message the config can make, at least Ray's default, and
    all of them at most CHANNEL_STORE_SHARE of the object store; past that (many streams of
    large frames) smaller, with one warning that names the setting."""
    from streamdiff.parallel.messages import message_bytes
    from streamdiff.parallel.ray_executor import CHANNEL_STORE_SHARE, channel_bytes

    assert channel_bytes(cfg4, 16, 1e12) == 1_000_000 > message_bytes(cfg4)  # small frames: Ray's default
    big = with_overrides(cfg4, video={"width": 256, "height": 192}, cache={"max_streams": 64})
    need = message_bytes(big)
    with caplog.at_level("WARNING", logger="streamdiff.parallel.ray_executor"):
        assert channel_bytes(big, 16, 16 * need / CHANNEL_STORE_SHARE) == need  # just fits
        assert not caplog.records
        capped = channel_bytes(big, 16, 16 * need)  # would take the whole store
    assert 1_000_000 <= capped and 16 * capped <= CHANNEL_STORE_SHARE * 16 * need
    assert len(caplog.records) == 1 and "cache.max_streams=64" in caplog.text
    assert channel_bytes(big, 16, 16e6) == 1_000_000  # a store too small for a share: never below Ray's default


# a step's ref deleted after its actor died must not raise from __del__ (the graph is torn down first)
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_killed_stage_with_plans_in_flight_recovers(cfg_auto):
    """An actor killed while plans are in flight: every plan in flight is lost with it, the
    actor is replaced, the stream restarts with a fresh cache and is served again, and a new
    stream is served on the rebuilt pipeline."""
    stages = RayStages(cfg_auto, [2, 2])
    executor = StagedExecutor(cfg_auto, stages)
    try:
        core, clock = core_for(cfg_auto, executor)
        assert core.add_stream("a", params(cfg_auto, "x", steps=2), RELAXED)
        clip = synthetic_clip(200, 64, 48)
        pos, outputs = 0, []

        def one_step():
            nonlocal pos
            while core.waiting_frames("a") < 5:  # always a full chunk waiting (a first chunk takes 5)
                core.push_frame("a", clip[pos % len(clip)], pts=pos)
                pos += 1
            core.step()
            clock.t += 4 / 30
            return core.pop_outputs("a") if "a" in core.stream_ids else []

        outputs_after: list = []
        while len(outputs) < 12 or executor.peak_in_flight < 2 or not core.plans_in_flight:
            outputs += one_step()
        old = stages.actors[1]
        ray.kill(old)
        t0 = time.monotonic()
        # a liveness bound, not a speed one: replacing the actor (a new Ray worker loading its
        # blocks) took over 15 s on a slow 2-CPU machine in the middle of the suite
        while time.monotonic() - t0 < 90.0 and not outputs_after:
            got = one_step()
            if "a" in core.restarted:
                outputs_after += got
        assert outputs_after, "the stream did not resume within 90 s"
        assert "fresh cache" in core.restarted["a"] and "[1] replaced" in core.restarted["a"]
        assert stages.actors[1] is not old and executor.resources()["plans_in_flight"] == core.plans_in_flight
        assert core.add_stream("n", params(cfg_auto, "y", steps=1), RELAXED)
        feeder = Feeder(core, clock, {"n": synthetic_clip(60, 64, 48, seed=5)})
        for _ in range(12):
            if len(feeder.outputs["n"]) >= 9:
                break
            feeder.round()
        assert len(feeder.outputs["n"]) >= 9, len(feeder.outputs["n"])
    finally:
        executor.shutdown()


def test_stages_that_die_while_no_stream_runs_are_replaced_for_the_next_stream(cfg4, caplog):
    """A Ray probe: a stage killed while no stream ran made the next offer fail (StreamsLost out
    of add_stream: HTTP 500), and a second kill then aborted the whole server inside Ray (the
    rebuilt graph had never run). Now the stream being added is added again on the rebuilt
    pipeline, a rebuilt graph is compiled by the step that runs it, and an actor that died
    while no graph was up is replaced before the next one."""
    stages = RayStages(cfg4, [2, 2])
    executor = StagedExecutor(cfg4, stages)
    core, clock = core_for(cfg4, executor)

    def serve(sid: str, seed: int) -> None:
        assert core.add_stream(sid, params(cfg4, "x", steps=1, seed=seed), RELAXED)
        feeder = Feeder(core, clock, {sid: synthetic_clip(5 + 4 * 3, 64, 48, seed=seed)})
        for _ in range(4):
            feeder.round([sid])
        assert len(feeder.frames(sid)) > 0, sid
        core.remove_stream(sid)

    def kill(k: int) -> None:
        old = stages.actors[k]
        ray.kill(old)  # (asynchronous: a ping sent at once may still be answered)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get(old.ping.remote(), timeout=5)
            except ray.exceptions.RayActorError:
                return
            time.sleep(0.1)
        pytest.fail("the killed actor still answers")

    try:
        serve("a", 1)
        kill(1)  # the graph is still up (kept for idle_teardown_s)
        serve("b", 2)
        assert "b" not in core.restarted and "b" not in core.closed
        stages.recover()  # as a failed step leaves it: no graph until a step runs one
        assert stages.dag is None
        kill(0)
        stages.idle_teardown_s = 0
        with caplog.at_level("WARNING", logger="streamdiff.parallel.ray_executor"):
            serve("c", 3)
        assert "pipeline stage [0] died while no stream ran: replaced" in caplog.text, caplog.text
    finally:
        executor.shutdown()


def test_a_cluster_without_a_cpu_for_every_stage_is_one_line(cfg4, monkeypatch):
    """A Ray probe: a cluster with too few CPUs left the stage actors pending and the server
    'warming up' for 5 minutes without a word."""
    from streamdiff.parallel import ray_executor
    from streamdiff.parallel.ray_executor import ClusterError

    monkeypatch.setattr(ray_executor, "CPU_WAIT_S", 0.5)
    cfg = with_overrides(cfg4, parallel={"vae_stages": True})
    with pytest.raises(ClusterError, match=r"the Ray cluster has 4 of its 4 CPUs free for 6 stages \(one CPU each\)"):
        RayStages(cfg, [1, 1, 1, 1])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_async_engine_serves_over_ray_stages(cfg4):
    """`parallel.num_stages=2` is all it takes: AsyncEngine builds the Ray executor, warms up
    through the stages and serves a stream. Once no stream is left the stage actors rest: no
    compiled graph polls its channels (issue 16, item 9: each used to keep ~65 % of a core)."""
    import asyncio

    from streamdiff.engine import AsyncEngine
    from streamdiff.parallel import build_executor

    cfg = with_overrides(cfg4, parallel={"num_stages": 2})

    async def main():
        engine = AsyncEngine(cfg, build_executor(cfg))
        await engine.start()
        try:
            assert isinstance(engine.executor, StagedExecutor) and engine.executor.num_stages == 2
            assert await engine.add_stream("s", "a stream", slo=RELAXED, steps=2)
            for frame in synthetic_clip(13, 64, 48):
                engine.push_frame("s", frame)
            outs = [await engine.next_frame("s", timeout=60) for _ in range(5)]
            assert [o.frame.shape for o in outs] == [(48, 64, 3)] * 5 and outs[0].frame_id < outs[-1].frame_id
            # Idle: no stream left, the graph is torn down (after `idle_teardown_s`, 30 s when
            # serving) and the actors use (almost) no CPU.
            stages = engine.executor.stages
            stages.idle_teardown_s = 0.2
            await engine.remove_stream("s")
            for _ in range(300):  # the limit only turns a hang into a failure
                if stages.dag is None:
                    break
                await asyncio.sleep(0.1)
            assert stages.dag is None
            pids = [ray.get(a.__ray_call__.remote(lambda self: __import__("os").getpid())) for a in stages.actors]
            before = [_cpu_s(pid) for pid in pids]
            # (the same 0.1 of a core as 0.3 s in 3 s; a read loop left polling takes ~0.65 of one)
            await asyncio.sleep(1.5)
            used = [_cpu_s(pid) - b for pid, b in zip(pids, before)]
            assert max(used) < 0.15, f"idle stage actors used {used} CPU seconds in 1.5 s"
            # A new stream compiles the graph again and is served.
            assert await engine.add_stream("t", "again", slo=RELAXED, steps=1)
            for frame in synthetic_clip(9, 64, 48):
                engine.push_frame("t", frame)
            assert (await engine.next_frame("t", timeout=120)).frame.shape == (48, 64, 3)
        finally:
            await engine.stop()

    asyncio.run(main())


def test_rays_dead_actor_cancel_traceback_is_not_shown_other_errors_are(caplog):
    """Found by a probe: a killed stage actor printed Ray's "Error cancelling worker task" with
    two ActorDiedError tracebacks; the executor's own line says what happened instead."""
    import inspect
    import logging
    import sys

    import ray.dag.compiled_dag_node as dag_node

    # Ray's own logger and line (the filter keys on both: were either renamed by Ray, a record made
    # here under the filter's name and text would pass while Ray's went through unfiltered)
    logger = dag_node.logger
    assert logger.name == "ray.dag.compiled_dag_node", logger.name
    assert 'logger.exception("Error cancelling worker task")' in inspect.getsource(dag_node)
    with caplog.at_level(logging.ERROR, logger=logger.name):
        for exc in (ray.exceptions.ActorDiedError(), RuntimeError("channel broke")):
            try:
                raise exc
            except Exception:
                logger.error("Error cancelling worker task", exc_info=sys.exc_info())
    shown = [r.exc_info[1] for r in caplog.records if r.name == logger.name]
    assert [type(e).__name__ for e in shown] == ["RuntimeError"]


def test_starting_ray_keeps_this_processes_sigterm_handler():
    """ray.init puts its own SIGTERM handler (sys.exit) in place, even when Ray is up already: a
    bench over Ray actors stopped with SIGTERM exited 1 with nothing, where Ctrl-C reports what
    was measured (a probe). The CLI's handler stays."""
    import signal

    from streamdiff.parallel.ray_executor import _init_ray

    def mine(signum, frame):
        raise AssertionError("not called here")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        _init_ray(ignore_reinit_error=True)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
