"""Pipeline stages == the LocalExecutor through a stream's whole life, not only steady
streaming: prompt changes with and without blending (a blend of a blend, a long blend with
chunks in flight), live steps changes (re-prepare, up and down), seed / noise / motion
changes, streams removed and re-added under the same key, a scene cut in the input, the RoPE
restart (`cache.rebase_frame` lowered so it happens within the clip), streams joining and
leaving at different times with different steps; at lane stride 1 and with plans in flight
(the automatic stride D = stages, several streams at once, live changes decided while plans
are in flight); and blocks moved off the first stage after conditions it no longer holds.

Frames are compared per stream (and per re-add) by pts: at stride 1 the same frames in the
same order; at stride D the frames both runs emitted (D > 1 drops more chunks in flight at a
restart and leaves more in the lag at the end). Tolerance: TOL grey levels (stage_helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import RELAXED, max_abs_diff, params
from stage_helpers import TOL, core_for
from streamdiff.config import with_overrides
from streamdiff.engine import LocalExecutor
from streamdiff.parallel.executor import InProcessStages, StagedExecutor, ThreadedStages, TickStages
from streamdiff.pipeline.frames import synthetic_clip

# round -> events: ("add", stream, prompt, steps, seed) | ("rm", stream) | ("upd", stream, changes)
LIFE = {
    0: [("add", "a", "a watercolor city", 2, 1), ("add", "b", "a charcoal sketch", 1, 2)],
    2: [("add", "c", "a neon night", 3, 3)],
    3: [("upd", "a", {"prompt": "a pencil drawing"}),
        ("upd", "b", {"prompt": "a blue whale", "prompt_blend_chunks": 3})],
    4: [("upd", "b", {"prompt": "a red fox", "prompt_blend_chunks": 2})],  # a blend of a blend
    5: [("upd", "c", {"steps": 2}), ("upd", "a", {"seed": 99, "noise_strength": 0.6})],
    6: [("rm", "b")],
    7: [("add", "b", "a charcoal sketch", 3, 5), ("upd", "a", {"motion_aware": False})],
    9: [("rm", "c")],
    10: [("upd", "b", {"prompt": "a neon night", "prompt_blend_chunks": 2})],
    11: [("upd", "a", {"steps": 3})],  # after its RoPE restart (chunk 5) has been seen
}
IN_FLIGHT = {  # long blends with many chunks in flight, re-adds in the round of the removal
    0: [("add", "a", "a watercolor city", 4, 1), ("add", "b", "a charcoal sketch", 2, 2)],
    2: [("upd", "b", {"prompt": "a blue whale", "prompt_blend_chunks": 3}),
        ("upd", "a", {"prompt": "a red fox", "prompt_blend_chunks": 12})],
    3: [("rm", "b"), ("add", "b", "a neon night", 2, 2), ("add", "c", "a red fox", 1, 4)],
    4: [("upd", "b", {"prompt": "a blue whale", "prompt_blend_chunks": 3})],
    # two changes of one stream before its next chunk (a fuzzer: while plans were in flight they
    # were folded into one, so a swap then a blend blended from the prompt before the swap, a
    # blend then the slider at 0 swapped at once, a swap then the slider blended)
    5: [("upd", "b", {"prompt": "a pencil drawing"}), ("upd", "b", {"prompt": "a red fox", "prompt_blend_chunks": 4})],
    6: [("upd", "a", {"prompt": "a charcoal sketch"})],
    7: [("upd", "a", {"prompt": "a neon night", "prompt_blend_chunks": 10})],
    8: [("upd", "c", {"prompt": "a blue whale", "prompt_blend_chunks": 4}), ("upd", "c", {"prompt_blend_chunks": 0}),
        ("upd", "c", {"seed": 11})],
    9: [("upd", "b", {"steps": 3}), ("upd", "c", {"prompt": "a pencil drawing", "prompt_blend_chunks": 9})],
    10: [("upd", "a", {"prompt": "a watercolor city"}), ("upd", "a", {"prompt_blend_chunks": 6}),
         ("upd", "a", {"noise_strength": 0.5})],
    12: [("rm", "c"), ("add", "c", "a pencil drawing", 4, 9)],
    13: [("upd", "c", {"prompt": "a blue whale", "prompt_blend_chunks": 9})],
}


def clip_with_a_cut(sid: str) -> np.ndarray:
    k = ord(sid)
    out = synthetic_clip(160, 64, 48, seed=100 + k)
    out[30:] = synthetic_clip(160, 64, 48, seed=200 + k)[30:]  # a scene cut at frame 30
    return out


def live(cfg, executor, script: dict, rounds: int, staggered: bool, between=None) -> tuple[dict, dict]:
    """Drive `script` through an EngineCore over `executor`. Each round each stream gets a chunk
    (5 frames after an add, else 4). Not `staggered`: then step until idle. `staggered`: one
    `step()` after each stream's chunk, so plans stay in flight across rounds and live changes
    are decided while they are. Returns ({(stream, n-th add): [(pts, frame)]}, input drops)."""
    core, clock = core_for(cfg, executor)
    clips: dict[str, np.ndarray] = {}
    pos: dict[str, int] = {}
    gen: dict[str, int] = {}
    fresh: dict[str, bool] = {}
    active: list[str] = []
    outs: dict[tuple, list] = {}
    drops: dict[str, int] = {}

    def collect():
        for sid in active:
            for o in core.pop_outputs(sid):
                outs.setdefault((sid, gen[sid]), []).append((o.pts, o.frame))

    def count_drops():
        for sid, s in core.metrics.streams.items():
            drops[sid] = max(drops.get(sid, 0), s.dropped.get("input", 0))

    for r in range(rounds):
        if between is not None:
            between(r, core, executor)
        for event in script.get(r, []):
            kind, sid = event[0], event[1]
            if kind in ("add", "rm") or "steps" in event[2]:
                core.drain()  # (the core drains too; a removal would drop what that delivers)
                collect()
                count_drops()
            if kind == "add":
                _, _, prompt, steps, seed = event
                gen[sid] = gen.get(sid, -1) + 1
                clips.setdefault(sid, clip_with_a_cut(sid))
                pos.setdefault(sid, 0)
                assert core.add_stream(sid, params(cfg, prompt, steps=steps, seed=seed), RELAXED)
                fresh[sid] = True
                active.append(sid)
            elif kind == "rm":
                assert core.remove_stream(sid)
                active.remove(sid)
            else:
                core.update_params(sid, **event[2])
                collect()
        for sid in list(active):
            for _ in range(5 if fresh[sid] else 4):
                core.push_frame(sid, clips[sid][pos[sid]], pts=(gen[sid], pos[sid]))
                pos[sid] += 1
            fresh[sid] = False
            if staggered:
                core.step()
                collect()
                clock.t += 1 / 30
        if not staggered:
            while core.step() is not None:
                pass
        collect()
        clock.t += 4 / 30
    core.drain()
    collect()
    count_drops()
    return outs, drops


def assert_same_frames(got: dict, ref: dict, same_order: bool) -> None:
    assert set(got) == set(ref)
    for key, want in ref.items():
        have = dict(got[key])
        if same_order:
            assert [p for p, _ in got[key]] == [p for p, _ in want], key
        common = [(have[p], f) for p, f in want if p in have]
        assert len(common) >= min(5, len(want)), (key, len(common), len(want))
        assert [p for p, _ in got[key]] == [p for p, _ in want if p in have], key  # in order, none extra
        diffs = [max_abs_diff(a, b) for a, b in common]
        assert max(diffs) <= TOL, (key, diffs)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on this shared 2-CPU machine the local run of IN_FLIGHT took 42 s with
    two threads per op (they wait for each other at every barrier) and 3 s with one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cfg_life(cfg4):
    return with_overrides(cfg4, cache={"rebase_frame": 6})  # the RoPE restart at chunk 5 (start 6)


@pytest.fixture(scope="module")
def comps_life(cfg_life):
    from streamdiff.model.build import build_components

    return build_components(cfg_life)  # the local runner's slot table follows comps.cfg


def local(comps):
    from streamdiff.engine.model_runner import ModelRunner

    return LocalExecutor(ModelRunner(comps, 4))


@pytest.fixture(scope="module")
def ref_life(cfg_life, comps_life):
    return live(cfg_life, local(comps_life), LIFE, 14, staggered=False)[0]


@pytest.fixture(scope="module")
def ref_in_flight(cfg_life, comps_life):
    return live(cfg_life, local(comps_life), IN_FLIGHT, 26, staggered=True)


@pytest.mark.parametrize("transport,counts,vae_stages", [
    (InProcessStages, [1, 2, 1], False),
    (ThreadedStages, [2, 2], False),
    (TickStages, [1, 3], True),
])
def test_a_streams_whole_life_equals_local(cfg_life, ref_life, transport, counts, vae_stages):
    cfg = with_overrides(cfg_life, parallel={"vae_stages": vae_stages})
    executor = StagedExecutor(cfg, transport(cfg, counts, "cpu"))
    try:
        got, drops = live(cfg, executor, LIFE, 14, staggered=False)
    finally:
        executor.shutdown()
    assert not any(drops.values())
    assert_same_frames(got, ref_life, same_order=True)
    assert len(got[("a", 0)]) > 4 * 9  # past the RoPE restart (chunk 5) and the cut (frame 30)


@pytest.mark.parametrize("transport,counts,vae_stages", [
    (TickStages, [1, 2, 1], False),
    (TickStages, [2, 2], True),
    (ThreadedStages, [2, 2], True),
])
def test_several_streams_with_plans_in_flight_equal_local(cfg_life, ref_in_flight, transport, counts, vae_stages):
    """Lane stride D = stages (3 or 4), three streams with 1-4 steps joining, leaving, re-added,
    changing steps and blending prompts while plans are in flight: the frames of the local
    stride-1 run, each stream in order."""
    ref, ref_drops = ref_in_flight
    cfg = with_overrides(cfg_life, parallel={"vae_stages": vae_stages, "lane_stride": 0})
    executor = StagedExecutor(cfg, transport(cfg, counts, "cpu"))
    try:
        got, drops = live(cfg, executor, IN_FLIGHT, 26, staggered=True)
    finally:
        executor.shutdown()
    assert not any(drops.values()) and not any(ref_drops.values())
    assert executor.peak_in_flight == executor.depth >= 3
    assert_same_frames(got, ref, same_order=False)


def test_blocks_move_off_the_first_stage_after_conditions_it_dropped(cfg4, comps4):
    """Moving blocks from the first stage to the next after a finished blend (the first stage
    no longer holds its embedding, the next still holds its K/V) and after more prompts than
    the first stage's prompt cache keeps: the receiver gets the embeddings, outputs stay
    equal (it raised KeyError / AttributeError and left the stages half-moved)."""
    script = {0: [("add", "a", "p0", 1, 1), ("add", "b", "q0", 2, 2)],
              1: [("upd", "a", {"prompt": "a blue whale", "prompt_blend_chunks": 3})]}
    for r in range(2, 8):
        script[r] = [("upd", "b", {"prompt": f"q{r}"})] + ([("upd", "a", {"prompt": f"p{r}"})] if r >= 4 else [])

    def between(r, core, executor):
        if r == 9:
            executor.repartition([1, 3])
        if r == 11:
            executor.repartition([2, 2])

    ref, _ = live(cfg4, local(comps4), script, 13, staggered=False)
    executor = StagedExecutor(cfg4, InProcessStages(cfg4, [2, 2], "cpu"))
    got, _ = live(cfg4, executor, script, 13, staggered=False, between=between)
    assert [after for _, after in executor.rebalances] == [[1, 3], [2, 2]]
    assert_same_frames(got, ref, same_order=True)
