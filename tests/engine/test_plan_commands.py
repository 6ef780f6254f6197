"""Stream commands travel in the plan: the core decides (add, remove, steps change, live
changes), the executor applies new / finished / restarted / updated streams, on the KV lanes
the scheduler allocated."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import RELAXED, H, W, FakeClock, model_core, params
from streamdiff.config import with_overrides
from streamdiff.engine.model_runner import ModelRunner
from streamdiff.engine.types import ChunkInput, FrameMeta, StreamCommands
from streamdiff.scheduler.types import PlannedChunk, StepPlan


def test_commands_coalesce_until_a_plan_takes_them(cfg):
    cmds = StreamCommands()
    a, b = params(cfg, "a"), params(cfg, "b")
    cmds.add("x", a, (0, 1))
    cmds.remove("x")  # never reached an executor
    assert not cmds
    cmds.remove("y")
    cmds.add("y", b, (2, 3))  # removed then added again: finished first, then new
    cmds.update("y", b.with_changes({"seed": 7}), ("seed",))  # folds into its start
    cmds.update("z", a.with_changes({"seed": 2}), ("seed",))
    cmds.update("z", a.with_changes({"prompt": "p", "seed": 2}), ("prompt",))  # folds: sets all the first set
    cmds.update("z", a.with_changes({"prompt": "p", "seed": 3}), ("seed",))  # after a prompt change: kept apart
    cmds.update("z", a.with_changes({"prompt": "p", "seed": 4}), ("seed",))  # folds into the seed change
    plan = cmds.plan(0.0)
    assert not cmds and plan.step_id == -1 and plan.chunks == ()
    assert plan.finished_streams == ("y",)
    assert [(s.stream_id, s.params.seed, s.kv_lanes) for s in plan.new_streams] == [("y", 7, (2, 3))]
    assert [(u.stream_id, u.changed, u.params.seed) for u in plan.updated_streams] == [
        ("z", ("seed", "prompt"), 2), ("z", ("seed",), 4)]
    # a prompt change then its blend length: two changes in turn (folded, the blend would start
    # from the prompt before the first; the runner applies them in order)
    cmds.update("z", a.with_changes({"prompt": "q"}), ("prompt",))
    cmds.update("z", a.with_changes({"prompt": "q", "prompt_blend_chunks": 4}), ("prompt_blend_chunks",))
    cmds.update("w", b.with_changes({"prompt": "r"}), ("prompt",))
    cmds.update("z", a.with_changes({"prompt": "s", "prompt_blend_chunks": 4}), ("prompt",))
    plan = cmds.plan(0.0)
    assert [(u.stream_id, u.changed) for u in plan.updated_streams] == [
        ("z", ("prompt",)), ("z", ("prompt_blend_chunks", "prompt")), ("w", ("prompt",))]
    cmds.remove("z")  # a removal cancels every pending change of the stream, not the others'
    cmds.update("w", b.with_changes({"seed": 5}), ("seed",))
    assert [(u.stream_id, u.changed) for u in cmds.plan(0.0).updated_streams] == [("w", ("seed",))]
    cmds.update("z", a, ("seed",))
    cmds.restart("z", a.with_changes({"steps": 3}), (4, 5, 6))  # a restart replaces pending updates
    plan = cmds.attach(StepPlan(9, 0.0, (), 0, 0, 0.0))
    assert plan.step_id == 9 and plan.updated_streams == () and plan.restarted_streams[0].kv_lanes == (4, 5, 6)


def test_runner_applies_plan_commands_on_the_lanes_given(comps, cfg):
    from streamdiff.engine.model_runner import ModelRunner

    runner = ModelRunner(comps, max_streams=2)
    window, total = cfg.cache.window, runner.slots.free_slots
    cmds = StreamCommands()
    cmds.add("s", params(cfg, "a fox", steps=2), (5, 3))
    runner.execute(cmds.plan(0.0), {})
    assert [lane.lane for lane in runner.slots.streams["s"].lanes] == [5, 3]
    assert runner.slots.free_slots == total - 2 * window  # 2 steps: 2 lanes, not 4
    cmds.update("s", params(cfg, "a whale", steps=2), ("prompt",))
    runner.execute(cmds.plan(0.0), {})
    assert runner.streams["s"].prompt == "a whale"
    cmds.restart("s", params(cfg, "a whale", steps=3), (0, 1, 2))
    runner.execute(cmds.plan(0.0), {})
    assert runner.streams["s"].steps == 3 and [lane.lane for lane in runner.slots.streams["s"].lanes] == [0, 1, 2]
    cmds.remove("s")
    runner.execute(cmds.plan(0.0), {})
    assert runner.params == {} and runner.streams == {} and runner.slots.free_slots == total
    cmds.add("t", params(cfg, "a fox", steps=1), (0, 1))
    with pytest.raises(ValueError, match="2 KV lanes for 1 steps"):
        runner.execute(cmds.plan(0.0), {})


def test_engine_lanes_are_the_schedulers_and_admission_counts_pool_lanes(cfg):
    from streamdiff.engine import AdmissionRefused
    from streamdiff.engine.core import EngineCore
    from streamdiff.engine.executor import LocalExecutor
    from streamdiff.engine.model_runner import ModelRunner
    from streamdiff.model.build import build_components

    small = with_overrides(cfg, cache={"pool_lanes": 5})
    runner = ModelRunner(build_components(small), max_streams=4)
    core = EngineCore(small, LocalExecutor(runner), clock=FakeClock())
    assert runner.slots.allocator.num_lanes == 5
    assert core.add_stream("a", params(small, "a", steps=2), RELAXED)
    assert core.add_stream("b", params(small, "b", steps=2), RELAXED)
    refused = core.add_stream("c", params(small, "c", steps=2), RELAXED)
    assert not refused and "KV pool full" in refused.reason and "cache.pool_lanes" in refused.reason
    assert core.add_stream("d", params(small, "d", steps=1), RELAXED)
    for sid in ("a", "b", "d"):
        assert tuple(lane.lane for lane in runner.slots.streams[sid].lanes) == core.scheduler.kv_lanes_of(sid)
    with pytest.raises(AdmissionRefused, match="KV pool full"):
        core.update_params("a", steps=3)  # no lane left: nothing changes
    assert runner.streams["a"].steps == 2 and core.params("a").steps == 2
    core.remove_stream("d")
    assert core.update_params("a", steps=3).steps == 3
    assert runner.streams["a"].steps == 3
    assert tuple(lane.lane for lane in runner.slots.streams["a"].lanes) == core.scheduler.kv_lanes_of("a")
    assert core.scheduler.kv_lanes_of("a")[:2] == (0, 1)  # it kept its lanes and took one more


def test_a_seed_change_during_a_prompt_blend_does_not_restart_it(comps, cfg):
    """A live change that is not a prompt change (seed, noise) leaves a prompt blend in progress
    alone: re-applying the prompt would restart the blend (it lasts longer than asked) or, with no
    blend, encode the prompt again on every seed or noise change."""
    runner = ModelRunner(comps, max_streams=2)
    cmds = StreamCommands()
    p = params(cfg, "a red car", steps=1)
    cmds.add("s", p, (0,))
    runner.execute(cmds.plan(0.0), {})
    state = runner.streams["s"]
    blend = p.with_changes({"prompt": "a blue house", "prompt_blend_chunks": 2})
    cmds.update("s", blend, ("prompt", "prompt_blend_chunks"))
    runner.execute(cmds.plan(0.0), {})
    state._advance_blend()  # chunk 1 of 2 (what start_chunk does)
    cmds.update("s", blend.with_changes({"seed": 5}), ("seed",))
    runner.execute(cmds.plan(0.0), {})
    state._advance_blend()  # chunk 2 of 2: the blend is done
    assert state._blend is None and state.cond_key == ("prompt", "a blue house")
    assert state.seed == 5


def test_a_chunk_of_the_wrong_size_is_refused_before_it_reaches_the_stream(comps, cfg):
    """A chunk whose frame count is not what the stream's next chunk takes (5 first, then 4) is
    refused before the VAE and the stream's state see it."""
    runner = ModelRunner(comps, max_streams=2)
    cmds = StreamCommands()
    cmds.add("s", params(cfg, "x", steps=1), (0,))
    runner.execute(cmds.plan(0.0), {})
    frames = np.zeros((4, H, W, 3), np.uint8)  # [4, H, W, 3]: a first chunk takes 5
    metas = tuple(FrameMeta(i, i, 0.0) for i in range(4))
    chunk = PlannedChunk("s", (0, 1, 2, 3), lanes=1, first=True, latents=2, tokens=0, due_s=1.0,
                         emit_frame_ids=(0, 1, 2, 3))
    plan = StepPlan(0, 0.0, (chunk,), rows=1, tokens=0, predicted_ms=1.0)
    with pytest.raises(ValueError, match="its next chunk takes 5"):
        runner.execute(plan, {"s": ChunkInput(frames, metas)})
    assert runner.streams["s"].chunk_index == 0
