"""Admission in the engine: an empty engine always admits (best effort, with what to expect),
refusals carry a hint of what would help, and a refusal makes the idle engine measure again,
so a busy warm-up is not a life sentence (issue 16, items 1-2)."""

from __future__ import annotations

import asyncio

from engine_helpers import FakeClock, FakeExecutor, params
from streamdiff.config import load_config
from streamdiff.engine import AsyncEngine, EngineCore
from streamdiff.scheduler import FrameScheduler, OnlineCostModel, StreamSLO

SLO = StreamSLO(2.0, 8000.0)  # the tiny preset's CPU service level


def _stale_core(cfg, step_ms: float = 40.0) -> EngineCore:
    """A core whose cost model learnt ~2.2 s steps (a warm-up on a busy CPU) while the executor
    really takes `step_ms`."""
    clock = FakeClock()
    model = OnlineCostModel()
    sched = FrameScheduler(model, max_streams=4)
    core = EngineCore(cfg, FakeExecutor(clock, step_ms), scheduler=sched, clock=clock)
    rows = cfg.sampling.steps
    for _ in range(3):
        model.observe(rows, rows * 2 * core.tokens_per_frame, 2158.0 + 100.0 * rows)
    model.mark_provisional()
    return core


def test_empty_engine_admits_best_effort_and_a_refusal_says_what_would_help(cfg):
    core = _stale_core(cfg)
    first = core.add_stream("a", params(cfg, "x"), SLO)
    assert first and first.best_effort
    assert 0 < first.expected_fps < 2.0 and first.expected_latency_ms > 0
    second = core.add_stream("b", params(cfg, "x"), SLO)
    assert not second
    assert "stream 'a'" in second.reason  # refused only to protect the stream inside
    for hint in ("fewer denoise steps", "smaller frame size", "another GPU", "--target-fps"):
        assert hint in second.reason
    assert core.wants_measure


def test_refusal_then_idle_measures_again_and_admits_on_fresh_numbers(cfg):
    core = _stale_core(cfg, step_ms=40.0)
    assert core.add_stream("a", params(cfg, "x"), SLO)
    assert not core.add_stream("b", params(cfg, "x"), SLO)
    assert core.measure() is False  # never while a stream runs
    core.remove_stream("a")
    assert core.measure() is True
    model = core.scheduler.cost_model
    assert all(ms == 40.0 for *_, ms in model._window)  # the stale samples are gone
    step_ms, fps, _ = core.expect()
    assert step_ms < 100.0 and fps >= 2.0
    for sid in ("a", "b", "c"):
        adm = core.add_stream(sid, params(cfg, "x"), SLO)
        assert adm and not adm.best_effort, adm.reason


def test_serving_steps_replace_the_warm_up_samples(cfg):
    core = _stale_core(cfg, step_ms=40.0)
    model = core.scheduler.cost_model
    model.observe(2, 100, 40.0)
    assert model.samples == 4  # warm-up samples still count until enough new ones
    for _ in range(model.min_samples - 1):
        model.observe(2, 100, 40.0)
    assert model.samples == model.min_samples and all(ms == 40.0 for *_, ms in model._window)


def test_async_engine_measures_when_idle_after_a_refusal(cfg):
    async def run():
        core_kwargs = {}
        stale = _stale_core(cfg, step_ms=40.0)
        engine = AsyncEngine(cfg, stale.executor, warmup=False, scheduler=stale.scheduler, **core_kwargs)
        async with engine:
            assert await engine.add_stream("a", "x", slo=SLO)
            assert not await engine.add_stream("b", "x", slo=SLO)
            await engine.remove_stream("a")
            for _ in range(100):  # the loop measures once it is idle
                step_ms, _, _ = await engine.expect()
                if step_ms < 100.0:
                    break
                await asyncio.sleep(0.05)
            assert step_ms < 100.0
            assert (await engine.add_stream("b", "x", slo=SLO)).best_effort is False

    asyncio.run(run())


def test_presets_carry_their_service_level():
    tiny = load_config("tiny")
    assert (tiny.slo.target_fps, tiny.slo.deadline_ms) == (2.0, 8000.0)
    gpu = load_config("wan-1.3b")
    assert gpu.slo.target_fps == 0.0  # video.fps
