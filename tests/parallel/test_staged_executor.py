"""Pipeline stages in one process == the LocalExecutor (the Ray transport runs the same
messages; test_ray_stages.py repeats the key cases over actors).

Tolerance: TOL grey levels (stage_helpers.py). The stages run the same blocks on the same slot
plans and the first stage runs the same StreamState code; the VAE batches streams per forward
instead of per step, which only changes float rounding."""

from __future__ import annotations

import contextlib
import logging
import time

import pytest

from engine_helpers import RELAXED, Feeder, max_abs_diff, params
from stage_helpers import SPECS, TOL, core_for, reference, run_streams
from streamdiff.config import with_overrides
from streamdiff.engine.types import StreamClosedError
from streamdiff.parallel.executor import InProcessStages, StagedExecutor, StageFailure
from streamdiff.pipeline.frames import synthetic_clip


@pytest.fixture(scope="module")
def ref(cfg4, comps4):
    return reference(cfg4, comps4)


def assert_equal(got, ref):
    for sid in SPECS:
        assert got[sid].shape == ref[sid].shape and len(got[sid]) > 10, sid
        assert max_abs_diff(got[sid], ref[sid]) <= TOL, sid


@pytest.mark.parametrize("counts", [[2, 2], [1, 2, 1], [1, 1, 1, 1]])
def test_stages_equal_local(cfg4, ref, counts):
    assert_equal(run_streams(cfg4, StagedExecutor(cfg4, InProcessStages(cfg4, counts, "cpu"))), ref)


def test_each_stage_holds_only_its_blocks(cfg4, comps4):
    stages = InProcessStages(cfg4, [1, 2, 1], "cpu")
    full = dict(comps4.model.named_parameters())
    for worker, (start, end) in zip(stages.workers, [(0, 1), (1, 3), (3, 4)]):
        info = worker.info()
        blocks = {n for n in info["param_names"] if n.startswith("blocks.")}
        assert {int(n.split(".")[1]) for n in blocks} == set(range(start, end))
        assert info["block_params"] == sum(p.numel() for n, p in full.items()
                                           if n.startswith("blocks.") and start <= int(n.split(".")[1]) < end)
        assert ("patch_embedding.weight" in info["param_names"]) == (start == 0)
        assert ("proj_out.weight" in info["param_names"]) == (end == 4)
        assert info["pool_layers"] == list(range(start, end))
        assert info["has_text"] == (start == 0) and info["has_vae"] == (start == 0 or end == 4)


def test_moving_blocks_mid_stream_keeps_outputs(cfg4, ref):
    """Blocks (weights, K/V, prompt K/V) move between stages while streams are mid-flight."""
    splits = {3: [1, 3], 5: [3, 1], 6: [2, 2]}

    def between(r, core, executor):
        if r in splits:
            executor.repartition(splits[r])
            assert executor.counts == splits[r]
            # every condition's prompt K/V moved with its blocks: none left behind on the donor
            held = {w.runner.model.block_range: [set(kv) for _, kv in w._cross_kvs()] for w in executor.stages.workers}
            assert all(layers and all(kv == set(range(*blocks)) for kv in layers) for blocks, layers in held.items())

    executor = StagedExecutor(cfg4, InProcessStages(cfg4, [2, 2], "cpu"))
    assert_equal(run_streams(cfg4, executor, between=between), ref)
    assert [after for _, after in executor.rebalances] == [[1, 3], [3, 1], [2, 2]]


def test_a_slow_stage_loses_blocks(cfg4, ref):
    """Stage 1's blocks made 150 ms slower each (a slower device): the partitioner moves
    blocks off it, outputs stay equal. (40 ms did not stay 1.5x slower for 3 steps in a row on
    a loaded 2-CPU machine, as in the Ray variant of this test.)"""
    cfg = with_overrides(cfg4, parallel={"rebalance": True, "rebalance_after_steps": 3, "rebalance_threshold": 1.5})
    stages = InProcessStages(cfg, [2, 2], "cpu")
    stages.workers[1].set_slowdown(150.0)
    executor = StagedExecutor(cfg, stages)
    assert_equal(run_streams(cfg, executor), ref)
    assert executor.rebalances and executor.counts[1] < 2
    assert executor.rebalances[0][0] == [2, 2]


def test_a_block_move_that_fails_leaves_every_block_held_and_the_streams_served(cfg4, ref, caplog):
    """A review: a block move the receiving stage refused (its GPU out of memory) escaped the
    engine step (AsyncEngine's loop, every session and the server ended) with the block it
    carried held by neither stage. The donor takes it back, the split stays, rebalancing is off."""
    cfg = with_overrides(cfg4, parallel={"rebalance": True, "rebalance_after_steps": 3, "rebalance_threshold": 1.5})
    stages = InProcessStages(cfg, [2, 2], "cpu")
    stages.workers[1].set_slowdown(150.0)  # blocks would move to stage 0, which refuses them

    def out_of_memory(package):
        raise RuntimeError("CUDA out of memory (simulated)\nmore lines")

    stages.workers[0].take_blocks = out_of_memory
    executor = StagedExecutor(cfg, stages)

    def between(r, core, executor):
        if not executor.rebalance_enabled:  # the move was tried: the rest of the run at full speed
            stages.workers[1].set_slowdown(0.0)

    with caplog.at_level(logging.WARNING):
        assert_equal(run_streams(cfg, executor, between=between), ref)
    assert [w.runner.model.block_range for w in stages.workers] == [(0, 2), (2, 4)]
    assert executor.counts == [2, 2] and not executor.rebalances and not executor.rebalance_enabled
    assert "stopped at [2, 2] (RuntimeError: CUDA out of memory (simulated)); the split stays" in caplog.text


def test_a_stage_refuses_to_give_away_its_last_block_or_take_blocks_not_next_to_its_range(cfg4):
    """A DiT stage with no blocks breaks the chain, and one holding blocks not adjacent to its
    range would claim blocks it lacks: both moves are refused before anything changes."""
    stages = InProcessStages(cfg4, [1, 2, 1], "cpu")  # [0, 1), [1, 3), [3, 4)
    first, middle, last = stages.workers
    with pytest.raises(ValueError, match="cannot give"):
        middle.give_blocks([1, 2])
    assert middle.info()["block_range"] == (1, 3)
    package = middle.give_blocks([1])  # the middle stage now holds [2, 3)
    with pytest.raises(ValueError, match="not adjacent"):
        last.take_blocks(package)  # block 1 is not next to [3, 4)
    assert last.info()["block_range"] == (3, 4)
    first.take_blocks(package)  # where it belongs
    assert first.info()["block_range"] == (0, 2)


class BoundedStages(InProcessStages):
    """In-process stages that hold at most `max_executions` forwards unread, as Ray's compiled
    graph does (one past it raised RayCgraphCapacityExceeded there: a stage failure)."""

    max_executions = 3  # Ray's for 2 stages

    def __init__(self, *args):
        super().__init__(*args)
        self.unread = self.most = 0

    def submit(self, msg):
        self.unread += 1
        self.most = max(self.most, self.unread)
        assert self.unread <= self.max_executions, "a forward past the transport's bound"
        return super().submit(msg)

    def get(self, handle):
        self.unread -= 1
        return super().get(handle)

    def ready(self, handle) -> bool:
        return False  # as a forward on its way: the core keeps its plans in flight up to depth


def _staggered(cfg, executor, rounds: int = 6) -> dict:
    """Two 2-step streams, each stepped once after its own chunk (as the live loop steps when
    their frames come apart): plans of both are in flight together."""
    core, clock = core_for(cfg, executor)
    feeder = Feeder(core, clock, {sid: synthetic_clip(5 + 4 * rounds, 64, 48, seed=seed)
                                  for sid, seed in (("a", 11), ("b", 12))})
    for sid, seed in (("a", 1), ("b", 2)):
        assert core.add_stream(sid, params(cfg, f"prompt {sid}", steps=2, seed=seed), RELAXED)
    for _ in range(rounds):
        for sid in ("a", "b"):
            feeder.feed(sid)
            if (report := core.step()) is not None:
                feeder.reports.append(report)
            clock.t += 1 / 30
        clock.t += 4 / 30
    feeder.drain()
    assert not core.take_closed() and not core.restarted
    return {sid: feeder.frames(sid) for sid in ("a", "b")}


def test_plans_in_flight_stay_within_the_transports_bound_on_forwards(cfg4, comps4):
    """A Ray fuzzer: at lane stride 1 a plan goes in one micro-batch per stage and up to `depth`
    plans are in flight, stages^2 forwards where Ray's graph holds stages + 1: the one past it
    failed the stages, and every stream restarted with a fresh cache (131 grey levels off)."""
    from streamdiff.engine import LocalExecutor
    from streamdiff.engine.model_runner import ModelRunner

    stages = BoundedStages(cfg4, [2, 2], "cpu")
    got = _staggered(cfg4, StagedExecutor(cfg4, stages))
    want = _staggered(cfg4, LocalExecutor(ModelRunner(comps4, 4)))
    assert 2 <= stages.most <= stages.max_executions  # (4 without the bound)
    for sid in want:
        assert len(got[sid]) == len(want[sid]) > 10 and max_abs_diff(got[sid], want[sid]) <= TOL, sid


class FailingStages(InProcessStages):
    """In-process stages whose next step fails once; `recover` rebuilds or gives up."""

    def __init__(self, *args, rebuild: bool):
        super().__init__(*args)
        self.fail, self.rebuild = False, rebuild

    def get(self, handle):
        if self.fail:
            self.fail = False
            raise StageFailure("stage 1 died")
        return handle

    def recover(self):
        if not self.rebuild:
            raise RuntimeError("no GPU left for stage 1")
        return "stage [1] replaced"


@pytest.mark.parametrize("rebuild", [True, False])
def test_failed_stage_resumes_or_closes_streams(cfg4, rebuild, caplog):
    from engine_helpers import RELAXED, Feeder
    from streamdiff.pipeline.frames import synthetic_clip

    stages = FailingStages(cfg4, [2, 2], "cpu", rebuild=rebuild)
    core, clock = core_for(cfg4, StagedExecutor(cfg4, stages))
    assert core.add_stream("a", params(cfg4, "x", steps=2), RELAXED)
    feeder = Feeder(core, clock, {"a": synthetic_clip(60, 64, 48)})
    for _ in range(3):
        feeder.round()
    before = len(feeder.outputs["a"])
    stages.fail = True
    with caplog.at_level(logging.WARNING, logger="streamdiff.parallel.executor"):
        feeder.round()
    said = [r.getMessage() for r in caplog.records if r.name == "streamdiff.parallel.executor"]
    assert len(said) == 1 and "stage 1 died" in said[0], said  # one line of our own says what happened
    assert ("stage [1] replaced; 1 stream restart" if rebuild else "could not be rebuilt") in said[0], said
    totals = core.metrics.snapshot()["totals"]  # (a Ray probe: /metrics counted no failure at all)
    assert (totals["pipeline_failures"], totals["pipeline_failures_unrecovered"]) == (1, 0 if rebuild else 1)
    if rebuild:
        assert "fresh cache" in core.restarted["a"] and "a" in core.stream_ids
        for _ in range(3):
            feeder.round()
        assert len(feeder.outputs["a"]) > before  # re-prepared (5 frames) and serving again
        assert core.take_closed() == {}
    else:
        assert core.stream_ids == [] and "could not be rebuilt" in core.take_closed()["a"]
    # A new stream works on the (rebuilt or surviving) pipeline either way.
    assert core.add_stream("n", params(cfg4, "y", steps=1), RELAXED)
    feeder.clips["n"], feeder.pos["n"], feeder.outputs["n"] = synthetic_clip(20, 64, 48, seed=5), 0, []
    for _ in range(2):
        feeder.round(["n"])
    assert len(feeder.outputs["n"]) == 9


class SilentStages(InProcessStages):
    """Stages that stop answering (a Ray cluster gone: its channels never get data): `ready`
    says no for ever, `get` fails when its bound passes (as Ray's and the threads' do)."""

    silent = False

    def ready(self, handle):
        return not self.silent

    def get(self, handle):
        if self.silent:
            raise StageFailure("a forward was not back within 0.3 s")
        return handle

    def recover(self):
        raise RuntimeError("the Ray cluster is gone")


def test_a_stage_that_stops_answering_is_noticed_by_the_live_loop(cfg4):
    """The live loop steps with block=False and collects only what is `ready` (a Ray probe: with
    the cluster stopped the streams froze without a word, step_timeout_s never fired): a plan
    overdue by parallel.step_timeout_s is collected, so its failure closes the streams."""
    import time

    cfg = with_overrides(cfg4, parallel={"step_timeout_s": 0.3})
    stages = SilentStages(cfg, [2, 2], "cpu")
    core, clock = core_for(cfg, StagedExecutor(cfg, stages))
    assert core.add_stream("a", params(cfg, "x", steps=1), RELAXED)
    clip = synthetic_clip(40, 64, 48)
    for k in range(9):  # a first chunk (run at submit) and a steady one
        core.push_frame("a", clip[k], pts=k)
        core.step(block=False)
    stages.silent = True
    deadline, k = time.monotonic() + 10, 9
    while "a" in core.stream_ids and time.monotonic() < deadline:
        core.push_frame("a", clip[k % len(clip)], pts=k)  # the camera goes on
        core.step(block=False)  # as AsyncEngine's loop does
        time.sleep(0.02)
        k += 1
    assert core.stream_ids == [], "the stream stayed on a pipeline that no longer answers"
    assert "not back within" in core.take_closed()["a"]


def test_closed_stream_reaches_async_waiters(cfg4):
    """Through AsyncEngine: a stage fails and cannot be rebuilt; the stream's waiting
    next_frame raises StreamClosedError carrying the reason, and the engine keeps running."""
    import asyncio

    from engine_helpers import RELAXED
    from streamdiff.engine import AsyncEngine
    from streamdiff.pipeline.frames import synthetic_clip

    stages = FailingStages(cfg4, [2, 2], "cpu", rebuild=False)

    async def main():
        engine = AsyncEngine(cfg4, StagedExecutor(cfg4, stages))
        await engine.start()
        try:
            assert await engine.add_stream("a", "x", slo=RELAXED, steps=1)
            clip = synthetic_clip(40, 64, 48)
            for frame in clip[:5]:
                engine.push_frame("a", frame)
            await engine.next_frame("a", timeout=60)  # served before the failure
            stages.fail = True
            for frame in clip[5:13]:
                engine.push_frame("a", frame)
            with pytest.raises(StreamClosedError, match="could not be rebuilt"):
                for _ in range(20):
                    await engine.next_frame("a", timeout=60)
            assert (await engine.stats())["streams"] == 0
        finally:
            await engine.stop()

    asyncio.run(main())


def test_a_first_chunk_teaches_the_cost_model_the_period_it_took_not_its_wall_time(cfg4):
    """A plan with a first chunk runs to the end at submit, one stage after another, so its wall
    time is at least the stages' sum; the scheduler takes a plan to end `depth` periods after it
    starts, so what it must learn is the slowest stage's time, like any plan's (before: the wall
    time, 156 ms reported against a 69 ms period)."""
    from streamdiff.parallel.executor import pipeline_period_ms

    executor = StagedExecutor(cfg4, InProcessStages(cfg4, [2, 2], "cpu"))
    core, clock = core_for(cfg4, executor)
    learnt = []
    observe = core.scheduler.cost_model.observe
    core.scheduler.cost_model.observe = lambda rows, tokens, ms, chunks=0, firsts=0: (
        learnt.append(ms), observe(rows, tokens, ms, chunks, firsts))
    assert core.add_stream("s", params(cfg4, "a red fox", steps=1), RELAXED)
    clip = synthetic_clip(9, 64, 48, seed=5)
    reported = []
    for frames in (clip[:5], clip[5:9]):
        for frame in frames:
            core.push_frame("s", frame)
        report = core.step()
        while report.result is None:
            report = core.step()
        stage_ms = executor.last_stage_ms
        assert len(stage_ms) == 2 and min(stage_ms) > 0
        assert report.result.step_ms == pipeline_period_ms(stage_ms) < sum(stage_ms)
        reported.append((report.plan.chunks[0].first, report.result.step_ms))
        clock.t += 4 / 30
    assert [first for first, _ in reported] == [True, False]
    assert learnt == [ms for _, ms in reported]


def test_a_first_chunks_encode_forward_counts_in_the_plans_stage_times(cfg4):
    """A first chunk's encode rides on a forward of its own, with no rows: its stages' time is
    part of the plan's, in the period and in what the rebalancer sees."""
    from streamdiff.engine.stage_io import StepOut

    executor = StagedExecutor(cfg4, InProcessStages(cfg4, [2, 2], "cpu"), rebalance=False)

    def out(rows, stage_ms):
        return StepOut((0, 0), rows, None, {}, [{"total": t, "blocks": t, "num_blocks": 2, "cpu": t} for t in stage_ms])

    assert executor._observe([out([], [30.0, 5.0]), out(["a row"], [20.0, 40.0])]) == 50.0
    assert executor.last_stage_ms == [50.0, 45.0]


def assert_a_new_stream_is_served(core, feeder, cfg4) -> None:
    """After a stage failure the engine goes on: a new stream gets its first two chunks' frames."""
    assert core.add_stream("n", params(cfg4, "y", steps=1), RELAXED)
    feeder.clips["n"], feeder.pos["n"], feeder.outputs["n"] = synthetic_clip(20, 64, 48, seed=5), 0, []
    for _ in range(2):
        feeder.round(["n"])
    assert len(feeder.outputs["n"]) == 9


def test_a_stage_thread_that_raises_closes_the_streams_not_the_engine(cfg4, caplog):
    """Threads backend: an error raised inside a stage is a StageFailure like a Ray stage's (one
    line, the streams closed with the reason), not an exception that ends the engine loop."""
    from engine_helpers import Feeder
    from streamdiff.parallel.executor import ThreadedStages

    stages = ThreadedStages(cfg4, [2, 2], "cpu")
    try:
        core, clock = core_for(cfg4, StagedExecutor(cfg4, stages))
        assert core.add_stream("a", params(cfg4, "x", steps=2), RELAXED)
        feeder = Feeder(core, clock, {"a": synthetic_clip(60, 64, 48)})
        for _ in range(3):
            feeder.round()
        real = stages.workers[1].run

        def boom(msg):
            raise RuntimeError("illegal memory access")

        stages.workers[1].run = boom
        with caplog.at_level(logging.WARNING, logger="streamdiff.parallel.executor"):
            feeder.round()
        said = [r.getMessage() for r in caplog.records if r.name == "streamdiff.parallel.executor"]
        assert len(said) == 1 and "illegal memory access" in said[0], said
        assert core.stream_ids == [] and "illegal memory access" in core.take_closed()["a"]
        stages.workers[1].run = real  # the engine goes on: a new stream is served
        assert_a_new_stream_is_served(core, feeder, cfg4)
    finally:
        stages.shutdown()


def test_a_stage_thread_stuck_in_a_forward_fails_the_calls_behind_it(cfg4):
    """A review: after a forward timed out the recovery asks every stage to clear its streams, and
    that call waited behind the stuck forward without a bound: the engine thread froze for good."""
    import threading

    from streamdiff.parallel.executor import ThreadedStages
    from streamdiff.parallel.messages import StageInput
    from streamdiff.parallel.transport import StageFailure

    stages = ThreadedStages(cfg4, [2, 2], "cpu", timeout_s=0.5)
    release = threading.Event()
    stages.workers[1].run = lambda msg: release.wait(30)  # stuck until released
    try:
        handle = stages.submit(StageInput(0, 0, "steady", {}, []))
        with pytest.raises(StageFailure, match="not back within 0.5 s"):
            stages.get(handle)
        with pytest.raises(StageFailure, match="stage 1 did not answer clear_all within 0.5 s"):
            stages.call(1, "clear_all")
    finally:
        release.set()
        stages.shutdown()


def _new_stream_after_a_timeout(cfg4, timed_out: bool):
    """A stream "n" served on threaded stages, after (`timed_out`) a stream whose forward with a
    new prompt's embedding outlived the step timeout in a slow stage 0: (what stage 1 still held
    once the late forward had drained, n's frames)."""
    from engine_helpers import Feeder
    from streamdiff.parallel.executor import ThreadedStages

    stages = ThreadedStages(cfg4, [2, 2], "cpu", timeout_s=1.0)
    held = None
    try:
        core, clock = core_for(cfg4, StagedExecutor(cfg4, stages))
        if timed_out:
            assert core.add_stream("a", params(cfg4, "x", steps=2), RELAXED)
            feeder = Feeder(core, clock, {"a": synthetic_clip(60, 64, 48)})
            feeder.round()
            core.update_params("a", prompt="a new prompt")  # its embedding rides with the next forward
            stages.workers[0].set_slowdown(1000.0)  # 2 s a forward against the 1 s timeout
            feeder.round()
            assert "a" in core.take_closed()
            stages.workers[0].set_slowdown(0.0)
            deadline = time.monotonic() + 30  # the late forward leaves stage 0 (not a timing check)
            while time.monotonic() < deadline:
                with contextlib.suppress(StageFailure):  # (a call waits behind the late forward)
                    if not stages.call(0, "info")["streams"]:
                        break
                time.sleep(0.2)
            time.sleep(1.0)  # and would reach stage 1
            info = stages.call(1, "info")
            held = (info["streams"], info["cond_keys"], int(stages.workers[1].runner.pool.k.abs().sum() > 0))
        assert core.add_stream("n", params(cfg4, "y", steps=2), RELAXED)
        feeder = Feeder(core, clock, {"n": synthetic_clip(40, 64, 48, seed=5)})
        for _ in range(9):
            feeder.round(["n"])
        return held, feeder.frames("n")
    finally:
        stages.shutdown()


def test_a_forward_that_outlived_its_timeout_leaves_nothing_for_the_next_stream(cfg4):
    """A review: a forward that timed out in a slow (live) stage ran on, and stage 1 ran it after
    the recovery had cleared it: K/V, a prompt and a stream stayed there, and the next stream on
    those lanes came out 14 grey levels off. Every stage now drops a forward from before a recovery."""
    held, after = _new_stream_after_a_timeout(cfg4, True)
    _, clean = _new_stream_after_a_timeout(cfg4, False)
    assert held == (0, 0, 0), held
    assert len(after) > 10 and max_abs_diff(after, clean) <= TOL

@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread killed on purpose
def test_a_stage_thread_that_ends_is_noticed_at_once_and_started_again(cfg4, caplog):
    """A fault probe: a stage thread that ended (its loop raised) left the engine waiting the step
    timeout (30 s) on every forward and call, closing every new stream after it, while /healthz
    said ready. Now the wait fails as soon as the thread is seen gone, the streams are closed
    with the reason, the thread is started again and the next stream is served."""
    from engine_helpers import Feeder
    from streamdiff.parallel.executor import ThreadedStages

    stages = ThreadedStages(cfg4, [2, 2], "cpu", timeout_s=120)
    try:
        core, clock = core_for(cfg4, StagedExecutor(cfg4, stages))
        assert core.add_stream("a", params(cfg4, "x", steps=1), RELAXED)
        feeder = Feeder(core, clock, {"a": synthetic_clip(60, 64, 48)})
        feeder.round()
        stages._queues[1].put("not a message")  # stage 1's loop fails on it and its thread ends
        stages._threads[1].join(timeout=10)
        assert not stages._threads[1].is_alive()
        from streamdiff.parallel.messages import StageInput
        from streamdiff.parallel.transport import StageFailure

        lost = stages.submit(StageInput(0, 0, "steady", {}, []))  # never back: stage 1 is gone
        assert stages.ready(lost)  # so the live loop collects it now, not once it is overdue
        with pytest.raises(StageFailure, match="stage 1's thread ended"):
            stages.get(lost)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="streamdiff.parallel.executor"):
            for _ in range(3):
                if not core.stream_ids:
                    break
                feeder.round()
        assert time.monotonic() - t0 < 60  # not the 120 s timeout
        said = [r.getMessage() for r in caplog.records if r.name == "streamdiff.parallel.executor"]
        assert len(said) == 1 and "stage 1's thread ended (ValueError" in said[0], said
        assert "stage thread 1 started again" in said[0] and "1 stream closed" in said[0], said
        reason = core.take_closed()["a"]
        assert "stage 1's thread ended" in reason and reason.endswith("start the stream again"), reason
        assert core.stream_ids == [] and stages._threads[1].is_alive()
        assert_a_new_stream_is_served(core, feeder, cfg4)  # on the restarted thread
    finally:
        stages.shutdown()


def test_a_change_whose_plan_fails_closes_the_stream_instead_of_leaving_it_frozen(cfg4):
    """A fault probe: a prompt change sent while nothing was in flight went at once in a plan of
    its own; its stage failed (the prompt encoder raised), the executor forgot the stream and the
    error left `update_params` before the core did: the stream stayed listed and froze, its
    session "connected" until the client left. Now it is closed with the reason, as in a step."""
    from engine_helpers import Feeder
    from streamdiff.engine.types import StreamClosedError
    from streamdiff.parallel.executor import ThreadedStages

    stages = ThreadedStages(cfg4, [2, 2], "cpu")
    try:
        core, clock = core_for(cfg4, StagedExecutor(cfg4, stages))
        for sid in ("a", "b"):
            assert core.add_stream(sid, params(cfg4, "x", steps=1), RELAXED)
        feeder = Feeder(core, clock, {"a": synthetic_clip(60, 64, 48), "b": synthetic_clip(60, 64, 48, seed=3)})
        feeder.round()
        core.drain()
        assert core.plans_in_flight == 0  # the change goes at once, in a plan of its own
        real = stages.workers[0].run

        def boom(msg):
            raise RuntimeError("the prompt encoder failed")

        stages.workers[0].run = boom
        with pytest.raises(StreamClosedError, match="the prompt encoder failed"):
            core.update_params("a", prompt="a red fox")
        assert core.stream_ids == []  # both: the stage held them
        closed = core.take_closed()
        assert set(closed) == {"a", "b"} and all("the prompt encoder failed" in why for why in closed.values())
        stages.workers[0].run = real
        assert_a_new_stream_is_served(core, feeder, cfg4)
    finally:
        stages.shutdown()


def test_a_plan_never_goes_in_more_micro_batches_than_it_has_rows(cfg4):
    """`parallel.micro_batches` above a plan's stream rows gives one forward a row, no more (a
    review): each forward beyond that is an empty pass through every stage, time the streams
    wait for and nothing comes of."""
    cfg = with_overrides(cfg4, parallel={"micro_batches": 4})
    executor = StagedExecutor(cfg, InProcessStages(cfg, [2, 2], "cpu"))
    try:
        assert [executor.micro_batches(rows) for rows in (1, 2, 3, 4, 6)] == [1, 2, 3, 4, 4]
        # 0 (automatic): streams that overlap plans go in one forward, stride-1 streams one per stage
        auto = StagedExecutor(cfg4, executor.stages)
        assert [auto.micro_batches(4, overlapping) for overlapping in (True, False)] == [1, 2]
    finally:
        executor.shutdown()


def test_a_stuck_forward_fails_its_timeout_after_submission_even_when_collected_late(cfg4):
    """The live loop collects a plan some time after submitting it: a stuck forward must still
    fail `timeout_s` after it went in (a review), or the streams freeze for up to twice the
    configured step timeout before the engine recovers."""
    import threading

    from streamdiff.parallel.executor import ThreadedStages
    from streamdiff.parallel.messages import StageInput
    from streamdiff.parallel.transport import StageFailure

    stages = ThreadedStages(cfg4, [2, 2], "cpu", timeout_s=1.0)
    release = threading.Event()
    stages.workers[1].run = lambda msg: release.wait(30)  # stuck until released
    try:
        t0 = time.monotonic()
        handle = stages.submit(StageInput(0, 0, "steady", {}, []))
        time.sleep(0.9)  # the loop did other work before it collected the plan
        with pytest.raises(StageFailure, match="not back within 1 s"):
            stages.get(handle)
        assert time.monotonic() - t0 < 1.7  # (counted from the collection: 1.9 s at least)
    finally:
        release.set()
        stages.shutdown()
