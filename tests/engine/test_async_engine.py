"""AsyncEngine: the asyncio handle over the engine thread (pytest-asyncio is not used: each test
runs its own `asyncio.run`)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from engine_helpers import FakeClock, FakeExecutor, max_abs_diff
from streamdiff.engine import AsyncEngine, LocalExecutor, StreamClosedError
from streamdiff.engine.async_engine import _Inbox
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_pipeline import StreamPipeline


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "streamdiff-engine"]


async def wait_consumed(engine: AsyncEngine) -> None:
    """Until the engine thread has taken every pushed frame into a chunk."""
    for _ in range(2000):
        if (await engine.stats())["waiting_frames"] == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("frames were never consumed")


def test_push_next_frame_round_trip_equals_the_pipeline(comps, cfg):
    """Two streams through the real model: frames pushed chunk by chunk come back from
    next_frame with the pts they went in with, equal to StreamPipeline's (<= 1 grey level)."""
    from streamdiff.engine.model_runner import ModelRunner

    clips = {"one": synthetic_clip(17, 64, 48, seed=1), "two": synthetic_clip(17, 64, 48, seed=2)}
    steps = {"one": 1, "two": 2}

    async def main():
        engine = AsyncEngine(cfg, LocalExecutor(ModelRunner(comps)))
        await engine.start()
        try:  # stopped on failure too: a leftover engine thread would fail the next tests
            assert engine.warmup_ms is not None and engine.warmup_ms > 0
            for sid in clips:  # a service level any CI machine meets: this test is not about admission
                admission = await engine.add_stream(sid, f"prompt {sid}", steps=steps[sid], seed=7,
                                                    target_fps=1.0, deadline_ms=60_000)
                assert admission, admission.reason
            got = {sid: [] for sid in clips}
            pos = 0
            while pos < 17:
                n = 5 if pos == 0 else 4
                for sid in clips:
                    for i in range(pos, pos + n):
                        engine.push_frame(sid, clips[sid][i], pts=1000 + i)
                pos += n
                await wait_consumed(engine)
            expected = {sid: 17 - 4 * (steps[sid] - 1) for sid in clips}
            for sid in clips:
                for _ in range(expected[sid]):
                    got[sid].append(await engine.next_frame(sid, timeout=60))
            return got, engine.metrics()
        finally:
            await engine.stop()

    got, snap = asyncio.run(main())
    for sid, clip in clips.items():
        ref = StreamPipeline(comps, f"prompt {sid}", steps=steps[sid], seed=7).push(clip)
        assert [o.pts for o in got[sid]] == [1000 + i for i in range(len(ref))]
        assert max_abs_diff(np.stack([o.frame for o in got[sid]]), ref) <= 1
        assert all(o.output_s >= o.arrival_s for o in got[sid])
        s = snap["streams"][sid]
        assert s["frames_out"] == len(ref) and s["time_to_first_frame_ms"] > 0
    assert snap["warmup_ms"] > 0 and snap["steps"] >= 4
    assert not engine_threads()


def fake_engine(cfg, **kw) -> AsyncEngine:
    clock = FakeClock()
    return AsyncEngine(cfg, FakeExecutor(clock, step_ms=1.0), warmup=False, **kw)


@pytest.mark.parametrize(
    "changes, field, allowed",
    [
        ({"steps": 0}, "steps", "1 to 4"),
        ({"steps": 5}, "steps", "1 to 4"),
        ({"steps": 2.5}, "steps", "1 to 4"),
        ({"noise_strength": 1.5}, "noise_strength", "0.1 to 1"),
        ({"noise_strength": 0.0}, "noise_strength", "0.1 to 1"),
        ({"seed": -1}, "seed", "0 to 9223372036854775807"),
        ({"seed": 2**63}, "seed", "allowed 0 to 9223372036854775807"),
        ({"prompt_blend_chunks": 100}, "prompt_blend_chunks", "0 to 64"),
        ({"motion_aware": "yes"}, "motion_aware", "true or false"),
        ({"prompt": 3}, "prompt", "string"),
        ({"guidance": 3}, "guidance", "known: prompt"),
    ],
)
def test_update_params_rejects_bad_values_naming_field_and_range(cfg, changes, field, allowed):
    async def main():
        async with fake_engine(cfg) as engine:
            assert await engine.add_stream("s", "a cat")
            with pytest.raises(ValueError) as info:
                await engine.update_params("s", **changes)
            good = await engine.update_params("s", steps=3, noise_strength=0.5, motion_aware=False, seed=9)
            return str(info.value), good, await engine.params("s")

    message, good, now = asyncio.run(main())
    assert field in message and allowed in message
    assert good == now and (now.steps, now.noise_strength, now.motion_aware, now.seed) == (3, 0.5, False, 9)


def test_bad_add_and_push_are_refused(cfg):
    async def main():
        async with fake_engine(cfg) as engine:
            with pytest.raises(ValueError, match="steps"):
                await engine.add_stream("s", "a cat", steps=9)
            assert await engine.add_stream("s", "a cat")
            with pytest.raises(KeyError):
                await engine.add_stream("s", "again")
            with pytest.raises(ValueError, match=r"uint8 \[48, 64, 3\]"):
                engine.push_frame("s", np.zeros((48, 64), np.uint8))
            with pytest.raises(KeyError):
                engine.push_frame("nobody", np.zeros((48, 64, 3), np.uint8))
            refused = [await engine.add_stream(f"x{i}", "p") for i in range(cfg.cache.max_streams)]
            assert [bool(a) for a in refused] == [True] * (cfg.cache.max_streams - 1) + [False]
            assert "KV pool full" in refused[-1].reason

    asyncio.run(main())


def test_remove_wakes_the_reader_and_stop_joins_the_thread(cfg):
    async def main():
        engine = fake_engine(cfg)
        await engine.start()
        assert engine.running and len(engine_threads()) == 1
        assert await engine.add_stream("s", "a cat", steps=1)
        frame = np.zeros((48, 64, 3), np.uint8)
        for i in range(5):
            engine.push_frame("s", frame, pts=i)
        got = [await engine.next_frame("s", timeout=10) for _ in range(5)]
        assert [o.pts for o in got] == [0, 1, 2, 3, 4]
        assert len({o.frame_id for o in got}) == 5
        waiter = asyncio.create_task(engine.next_frame("s"))  # nothing more is coming
        await asyncio.sleep(0.02)
        assert not waiter.done()
        assert await engine.remove_stream("s")
        with pytest.raises(StreamClosedError):
            await waiter
        assert (await engine.stats())["streams"] == 0
        assert await engine.remove_stream("s") is False
        await engine.stop()
        assert not engine.running
        with pytest.raises(RuntimeError):
            engine.push_frame("s", frame)
        await engine.stop()  # idempotent

    asyncio.run(main())
    assert not engine_threads()


def test_stop_releases_a_waiting_reader(cfg):
    async def main():
        engine = fake_engine(cfg)
        await engine.start()
        assert await engine.add_stream("s", "a cat")
        waiter = asyncio.create_task(engine.next_frame("s"))
        await asyncio.sleep(0.02)
        await engine.stop()
        with pytest.raises(StreamClosedError):
            await waiter

    asyncio.run(main())
    assert not engine_threads()


class _CountedExecutor(FakeExecutor):
    def __init__(self):
        super().__init__(FakeClock(), step_ms=1.0)
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1
        super().shutdown()


def test_a_failed_or_cancelled_warm_up_shuts_the_executor_down(cfg, monkeypatch):
    """The gateway starts the engine in the background and cancels that start when the server
    stops during warm-up (server.startup); a warm-up that fails (device memory) or is cancelled
    must not leave the executor's stage threads or actors behind. A cancelled start waits for the
    warm-up step in flight: it cannot be cut short in its thread."""
    from streamdiff.engine.core import EngineCore

    def failing(self, *a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(EngineCore, "warmup", failing)
    built = []
    engine = AsyncEngine(cfg, executor_factory=lambda c: built.append(_CountedExecutor()) or built[-1])
    with pytest.raises(RuntimeError, match="out of memory"):
        asyncio.run(engine.start())
    assert built[0].shutdowns == 1 and engine.executor is None and not engine.running

    in_step = threading.Event()
    finished = []

    def slow(self, *a, **k):
        in_step.set()
        threading.Event().wait(0.5)
        finished.append(True)
        return 1.0

    monkeypatch.setattr(EngineCore, "warmup", slow)
    given = _CountedExecutor()
    engine = AsyncEngine(cfg, given)

    async def cancel_start_once(event: threading.Event):
        task = asyncio.create_task(engine.start())
        await asyncio.to_thread(event.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_start_once(in_step))
    assert finished == [True] and given.shutdowns == 1 and not engine.running
    assert not engine_threads()

    # Cancelled while the executor is being built (a Ray probe: SIGTERM during `serve --stages`'s
    # start left its actors and compiled graph to Ray's exit hook: 60 s, exit 1): the build is
    # waited for and what it made shut down.
    building, made = threading.Event(), []

    def slow_build(c):
        building.set()
        threading.Event().wait(0.5)
        made.append(_CountedExecutor())
        return made[-1]

    engine = AsyncEngine(cfg, executor_factory=slow_build)
    asyncio.run(cancel_start_once(building))
    assert len(made) == 1 and made[0].shutdowns == 1 and engine.executor is None and not engine.running


class _SlowExecutor(FakeExecutor):
    """Steps (with chunks) and command-only plans that take real time: calls land mid-step."""

    def __init__(self, step_s: float, command_s: float = 0.0):
        super().__init__(FakeClock(), step_ms=1.0)
        self.step_s, self.command_s = step_s, command_s

    def execute(self, plan, inputs):
        time.sleep(self.step_s if plan.chunks else self.command_s)
        return super().execute(plan, inputs)


def test_cancelled_refused_and_repeated_calls_on_one_id_keep_the_engine_consistent(cfg):
    """An engine probe: a remove_stream or add_stream whose caller was cancelled mid-step left the
    stream admitted with no output queue (its id could never be removed or added again, its KV lane
    held); a refused add dropped the queue of a later add of the same id; a stream removed and added
    again under its id got the removed one's last frames."""
    relaxed = {"target_fps": 1.0, "deadline_ms": 1e6}
    frame = np.zeros((48, 64, 3), np.uint8)

    async def main():
        got = {}
        engine = AsyncEngine(cfg, _SlowExecutor(step_s=0.05, command_s=0.03), warmup=False)
        await engine.start()
        try:
            # 1. A remove cancelled while a step runs still removes; the id comes back.
            assert await engine.add_stream("a", "p", steps=1, **relaxed)
            for i in range(5):
                engine.push_frame("a", frame, pts=i)
            await asyncio.sleep(0.01)  # (the loop is in a 50 ms step)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(engine.remove_stream("a"), 0.005)
            await asyncio.sleep(0.1)
            got["after cancelled remove"] = (await engine.stats())["streams"]
            got["added again"] = bool(await engine.add_stream("a", "p", steps=1, **relaxed))
            assert await engine.remove_stream("a")
            # 2. An add cancelled while its command runs (30 ms) is undone after it.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(engine.add_stream("b", "p", steps=1, **relaxed), 0.01)
            await asyncio.sleep(0.1)
            got["after cancelled add"] = ((await engine.stats())["streams"], await engine.remove_stream("b"),
                                          bool(await engine.add_stream("b", "p", steps=1, **relaxed)))
            # 3. With the pool full, an add that will be refused, its remove, a removal that makes
            #    room and a second add of the same id, all at once: the second add's stream works.
            for sid in ("c", "d", "e"):
                assert await engine.add_stream(sid, "p", steps=1, **relaxed)
            first = asyncio.ensure_future(engine.add_stream("x", "p", steps=1, **relaxed))
            await asyncio.sleep(0)
            results = await asyncio.gather(first, engine.remove_stream("x"), engine.remove_stream("c"),
                                           engine.add_stream("x", "p", steps=1, **relaxed))
            got["refused then admitted"] = [bool(r) for r in results]
            for _ in range(5):  # (a first chunk; push_frame raised KeyError: its queue was gone)
                engine.push_frame("x", frame, pts="x")
            got["x served"] = (await engine.next_frame("x", timeout=30)).pts
            # 4. Removed and added again while its chunk is in a step: only the new stream's frames.
            for i in range(5):
                engine.push_frame("d", frame, pts=("old", i))
            await asyncio.sleep(0.01)
            assert all(await asyncio.gather(engine.remove_stream("d"), engine.add_stream("d", "p", steps=1, **relaxed)))
            for i in range(5):
                engine.push_frame("d", frame, pts=("new", i))
            got["d again"] = [(await engine.next_frame("d", timeout=30)).pts[0] for _ in range(5)]
        finally:
            await asyncio.wait_for(engine.stop(), 30)
        return got

    got = asyncio.run(main())
    assert got["after cancelled remove"] == 0 and got["added again"], got
    assert got["after cancelled add"] == (0, False, True), got
    assert got["refused then admitted"] == [False, False, True, True] and got["x served"] == "x", got
    assert got["d again"] == ["new"] * 5, got


def test_a_full_output_queue_keeps_the_newest_frames_and_counts_the_overwritten(cfg):
    """A reader that falls behind gets the newest `output_queue_frames` frames, no more and no
    fewer, and the frames it never saw are counted as overwritten (a review): a queue one longer
    would add a frame of latency to every lagging viewer and its count would not match."""

    async def main():
        async with fake_engine(cfg, output_queue_frames=2) as engine:
            assert await engine.add_stream("s", "a cat", steps=1)
            for chunk in (range(5), range(5, 9)):  # two chunks, handed over one after the other
                for i in chunk:
                    engine.push_frame("s", np.zeros((48, 64, 3), np.uint8), pts=i)
                for _ in range(2000):
                    if engine.metrics()["streams"]["s"]["frames_out"] == chunk[-1] + 1:
                        break
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.02)  # the outputs are handed over on the event loop
            got = [(await engine.next_frame("s", timeout=1)).pts for _ in range(2)]
            with pytest.raises(asyncio.TimeoutError):  # nothing older was kept behind them
                await engine.next_frame("s", timeout=0.05)
            return got, engine.metrics()["streams"]["s"]["frames_overwritten"]

    got, overwritten = asyncio.run(main())
    assert got == [7, 8] and overwritten == 7


def test_next_frame_gives_up_after_its_timeout(cfg):
    """`next_frame(timeout=...)` raises TimeoutError on time when no frame comes (a review): a
    handler polling a stalled stream must get control back instead of waiting forever."""

    async def main():
        async with fake_engine(cfg) as engine:
            assert await engine.add_stream("s", "a cat")
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.next_frame("s", timeout=0.05), 2.0)
            return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0


def test_the_inbox_keeps_the_newest_inbox_frames_of_a_stream_and_counts_the_rest():
    """Under overload a stream's inbox holds exactly `inbox_frames` frames, the newest, and says
    how many were pushed out (a review): holding one fewer would drop input a step could still
    have used, and the dropped-input count would be off by one."""
    inbox = _Inbox(frames_per_stream=3)
    for i in range(5):
        inbox.frame("s", (None, i, 0.0))
    inbox.frame("t", (None, 0, 0.0))
    commands, frames, overflow = inbox.take(0)
    assert commands == [] and [pts for _, pts, _ in frames["s"]] == [2, 3, 4] and len(frames["t"]) == 1
    assert overflow == {"s": 2}
