"""Every input frame is accounted for exactly once: frames_in = frames_out + dropped_frames + the
frames the engine holds, and once a stream is removed the totals add up exactly. Output frames
overwritten unread are counted apart (they were output)."""

from __future__ import annotations

import asyncio

import numpy as np

from engine_helpers import RELAXED, FakeClock, Feeder, model_core, params
from streamdiff.engine import AsyncEngine
from streamdiff.pipeline.frames import synthetic_clip


def test_totals_add_up_through_lag_a_steps_change_and_removal(comps, cfg):
    clock = FakeClock()
    core = model_core(comps, clock)
    clips = {sid: synthetic_clip(60, cfg.video.width, cfg.video.height, seed=i) for i, sid in enumerate("ab")}
    feeder = Feeder(core, clock, clips)
    assert core.add_stream("a", params(cfg, "x", steps=2), RELAXED)  # two lanes: a chunk of lag
    assert core.add_stream("b", params(cfg, "y", steps=1), RELAXED)
    for _ in range(3):
        feeder.round()
    core.update_params("b", steps=2)  # nothing in b's lag yet: it restarts without a drop
    for _ in range(2):
        feeder.round()
    core.update_params("a", steps=1)  # a's chunk in the lag is dropped
    feeder.round()
    feeder.feed("a", 3)  # waiting, not a whole chunk
    feeder.drain()
    streams = core.metrics.snapshot()["streams"]
    assert streams["a"]["dropped_by_cause"]["restart"] == 4
    for sid in "ab":
        s = streams[sid]
        assert s["frames_in"] == feeder.pos[sid] and s["frames_out"] == len(feeder.outputs[sid])
        held = s["frames_in"] - s["frames_out"] - s["dropped_frames"]
        lag = 4 if sid == "b" else 0  # b runs two lanes: one chunk inside the model
        assert held == core.waiting_frames(sid) + lag > 0
    for sid in "ab":
        assert core.remove_stream(sid)
    totals = core.metrics.snapshot()["totals"]
    pushed, out = sum(feeder.pos.values()), sum(len(o) for o in feeder.outputs.values())
    assert totals["frames_in"] == pushed and totals["frames_out"] == out
    assert totals["dropped_frames"] == pushed - out > 4  # the restart's 4, and what was held
    assert totals["frames_overwritten"] == 0


def test_output_frames_overwritten_unread_are_output_not_dropped(comps, cfg):
    clock = FakeClock()
    core = model_core(comps, clock)
    core.output_queue_frames = 4
    assert core.add_stream("a", params(cfg, "x", steps=1), RELAXED)
    clip = synthetic_clip(21, cfg.video.width, cfg.video.height, seed=0)
    for i, frame in enumerate(clip):  # 21 frames: 5 + 4 x 4, nobody reads
        core.push_frame("a", frame, pts=i)
        while core.step() is not None:
            pass
    s = core.metrics.snapshot()["streams"]["a"]
    read = core.pop_outputs("a")
    assert s["frames_in"] == s["frames_out"] == 21 and s["dropped_frames"] == 0
    assert len(read) == core.output_queue_frames and s["frames_overwritten"] == 21 - len(read)
    assert [o.pts for o in read] == list(range(21 - len(read), 21))  # the newest kept


def test_a_burst_into_the_async_engine_counts_every_frame_in(cfg):
    async def run():
        engine = AsyncEngine(cfg, output_queue_frames=4)
        await engine.start()
        try:
            assert await engine.add_stream("s", "x", steps=1, target_fps=1.0, deadline_ms=1e6)
            frame = np.zeros((cfg.video.height, cfg.video.width, 3), np.uint8)
            for i in range(40):  # in one turn of the event loop: the inbox keeps 8 of them
                engine.push_frame("s", frame, i)
            for _ in range(600):  # poll until the loop took them all (the limit only ends a hang)
                s = engine.metrics()["streams"]["s"]
                if s["frames_in"] == 40 and s["frames_in"] == s["frames_out"] + s["dropped_frames"] + \
                        (await engine.stats())["waiting_frames"]:
                    break
                await asyncio.sleep(0.05)
            await engine.remove_stream("s")
            return s, engine.metrics()["totals"]
        finally:
            await engine.stop()

    s, totals = asyncio.run(run())
    assert s["frames_in"] == 40 and s["dropped_by_cause"]["input"] > 0
    assert totals["frames_in"] == 40 and totals["frames_in"] == totals["frames_out"] + totals["dropped_frames"]


def test_frames_still_on_their_way_in_when_a_stream_is_removed_are_counted(cfg):
    """A probe: frames pushed while the loop was busy, then the stream removed, were counted
    nowhere (30 pushed, frames_in 5): neither in nor dropped, so the totals no longer said what
    came in. They count as in and dropped ("removed"), whichever side of the loop they were on."""
    async def run():
        engine = AsyncEngine(cfg)
        await engine.start()
        try:
            totals = []
            for sid in ("a", "b"):
                assert await engine.add_stream(sid, "x", steps=1, target_fps=1.0, deadline_ms=1e6)
                frame = np.zeros((cfg.video.height, cfg.video.width, 3), np.uint8)
                for i in range(30):  # in one turn of the event loop: none has reached the engine yet
                    engine.push_frame(sid, frame, i)
                await engine.remove_stream(sid)
                totals.append(dict(engine.metrics()["totals"]))
            return totals
        finally:
            await engine.stop()

    for k, totals in enumerate(asyncio.run(run())):
        assert totals["frames_in"] == 30 * (k + 1), totals
        assert totals["frames_in"] == totals["frames_out"] + totals["dropped_frames"], totals
