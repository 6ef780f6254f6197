"""The output track shows every frame of a chunk burst, spread at the production rate."""

from __future__ import annotations

import asyncio
import fractions
from types import SimpleNamespace

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from streamdiff.server.webrtc import FanOut, FrameQueue, OutputTrack


def frame(i: int) -> np.ndarray:
    return np.full((16, 16, 3), i, np.uint8)


async def _bursts():
    queue = FrameQueue(maxlen=8)
    track = OutputTrack(queue, max_fps=100.0)
    got = []

    async def produce():
        for burst in range(4):  # 4 frames every 0.2 s: 20 frames/s produced in bursts
            for k in range(4):
                queue.put(frame(burst * 4 + k))
            await asyncio.sleep(0.2)

    producer = asyncio.create_task(produce())
    for _ in range(16):
        out = await track.recv()
        got.append((out.pts, int(out.to_ndarray(format="rgb24")[0, 0, 0])))
    await producer
    return got, queue.dropped


def test_bursts_are_delivered_whole_and_in_order():
    got, dropped = asyncio.run(_bursts())
    assert [v for _, v in got] == list(range(16)) and dropped == 0
    pts = [p for p, _ in got]
    assert all(b > a for a, b in zip(pts, pts[1:]))
    # After the first bursts the rate is known: later frames of a burst are spaced out, not
    # sent back to back (a back-to-back burst would be < 1 ms apart).
    gaps_ms = [(b - a) / 90 for a, b in zip(pts[8:], pts[9:])]
    assert min(gaps_ms) > 20


def test_full_queue_drops_the_oldest():
    queue = FrameQueue(maxlen=3)
    for i in range(5):
        queue.put(frame(i))
    assert queue.dropped == 2
    assert [int(f[0, 0, 0]) for f in queue.frames] == [2, 3, 4]


class SimulatedTime:
    """A clock that moves only when the track sleeps (each sleep wakes `late_s` late, as an event
    loop does) or when the consumer spends `encode_s` between two recv calls."""

    def __init__(self, late_s: float):
        self.now, self.late_s = 0.0, late_s

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds + self.late_s
        await asyncio.sleep(0)


async def _time_in_gateway(fps: float, bursts: int) -> list[float]:
    """Bursts of 4 frames every 4/fps s (a chunked engine at `fps`); aiortc's sender calls recv,
    encodes for 3 ms, calls again. Returns each frame's time from put to leaving the track."""
    clock = SimulatedTime(late_s=0.001)
    queue = FrameQueue(maxlen=8, clock=clock)
    track = OutputTrack(queue, max_fps=30.0, sleep=clock.sleep)
    put_s: dict[int, float] = {}
    due = [4 / fps * b for b in range(bursts)]

    def deliver() -> None:  # every burst whose time has come
        while due and due[0] <= clock.now:
            b = bursts - len(due)
            for k in range(4):
                put_s[4 * b + k] = due[0]
                queue.put(frame(4 * b + k))
            due.pop(0)

    waits = []
    while due or queue.frames:
        deliver()
        if not queue.frames and due:  # the sender waits for the engine: time passes to the next burst
            clock.now = due[0]
            deliver()
        recv = asyncio.ensure_future(track.recv())
        while not recv.done():  # frames keep coming while the track sleeps
            await asyncio.sleep(0)
            deliver()
        out = recv.result()
        waits.append(clock.now - put_s[int(out.to_ndarray(format="rgb24")[0, 0, 0])])
        clock.now += 0.003  # the encoder
    return waits


def test_the_time_in_the_gateway_does_not_grow_at_a_low_frame_rate():
    """Found by a one-hour soak at 5 fps: the glass-to-glass latency climbed ~4 ms a second while
    the engine's stayed flat, because each frame was scheduled from when the track woke, so each
    late wake-up stayed in the delay. Spreading a burst of 4 at 5 fps delays its last frame by 3
    periods (0.6 s), and no more however long the stream runs."""
    for fps in (5.0, 2.0):
        waits = asyncio.run(_time_in_gateway(fps, bursts=60))  # 240 frames (ids < 256)
        period = 1 / fps
        settled, late = waits[60:140], waits[160:]  # the production rate is known after 33 frames
        assert max(late) < 3 * period + 0.05, (fps, max(late))
        assert abs(np.mean(late) - np.mean(settled)) < 0.02, (fps, np.mean(settled), np.mean(late))


def test_a_player_behind_skips_to_the_next_keyframe_and_asks_for_one():
    from streamdiff.server.webrtc import PlayerTrack

    class Encoder:
        want_keyframe = False

        def leave(self, player):
            pass

    def packet(pts: int) -> SimpleNamespace:  # (what the track reads of an av.Packet)
        return SimpleNamespace(pts=pts, time_base=fractions.Fraction(1, 30))

    player = PlayerTrack()
    player.encoder = Encoder()
    player.put(packet(0), keyframe=False)  # joined mid-GOP: nothing it could decode yet
    assert player.skipped == 1 and not player._queue
    for i in range(1, 1 + PlayerTrack.QUEUE_PACKETS):
        player.put(packet(i), keyframe=i == 1)
    assert len(player._queue) == PlayerTrack.QUEUE_PACKETS and not player.encoder.want_keyframe
    player.put(packet(9), keyframe=False)  # a full queue: the player is behind
    assert player.encoder.want_keyframe and player.skipped == 1 + PlayerTrack.QUEUE_PACKETS + 1
    key = packet(10)
    player.put(key, keyframe=True)
    got = asyncio.run(player.recv())
    assert got is key and player.sent == 1


def test_a_frame_that_cannot_be_made_ends_the_track_and_says_why():
    """A fault probe: an exception making the output frame went to aiortc's sender, which logged
    it and stopped sending: the picture froze, the session stayed "connected" and held its place.
    Now the track ends (as a track end, which the sender takes quietly) and `on_fail` gets the
    reason, which the server turns into the session's end."""
    from aiortc.mediastreams import MediaStreamError

    async def run():
        queue, ended = FrameQueue(maxlen=4), []
        track = OutputTrack(queue, max_fps=100.0, on_fail=ended.append)
        queue.put(frame(1))
        first = await track.recv()
        queue.put(np.zeros((16, 16), np.uint8))  # not rgb24: VideoFrame.from_ndarray refuses it
        try:
            await track.recv()
        except MediaStreamError as exc:
            return first, ended, track.readyState, str(exc)
        return first, ended, track.readyState, None

    first, ended, state, said = asyncio.run(run())
    assert int(first.to_ndarray(format="rgb24")[0, 0, 0]) == 1
    assert said is not None and ended == [said] and said.startswith("an output frame could not be made")
    assert state == "ended"


async def _closed_while_its_codec_is_made(monkeypatch) -> tuple[object, object]:
    import threading
    from types import SimpleNamespace

    from streamdiff.server import webrtc

    making, go, encoded = threading.Event(), threading.Event(), threading.Event()
    real_context, real_encode = webrtc._codec_context, webrtc.SharedEncoder._encode

    def slow_context(*args):
        making.set()
        go.wait(10)  # making a libx264 context takes a moment
        return real_context(*args)

    def encode(self, *args):
        try:
            return real_encode(self, *args)
        finally:
            encoded.set()

    monkeypatch.setattr(webrtc, "_codec_context", slow_context)
    monkeypatch.setattr(webrtc.SharedEncoder, "_encode", encode)

    class OneFrame:
        async def next_frame(self, stream_id):
            if not getattr(self, "sent", False):
                self.sent = True
                return SimpleNamespace(frame=np.zeros((48, 64, 3), np.uint8), latency_ms=1.0, pts=None)
            await asyncio.Event().wait()

    fanout = webrtc.FanOut(OneFrame(), "s")
    encoder = fanout.player("video/h264", 30.0, 1_000_000).encoder
    await asyncio.get_running_loop().run_in_executor(None, making.wait, 10)
    await encoder.close()  # its last player left while the first frame's codec was being made
    go.set()
    await asyncio.get_running_loop().run_in_executor(None, encoded.wait, 10)
    await fanout.close()
    return encoder._codec, encoded.is_set()


def test_an_encoder_closed_while_its_codec_is_made_keeps_no_codec(monkeypatch):
    """A review: the codec made in the executor thread was assigned after `_run`'s end had cleared
    it, and the closed encoder kept the libx264 context and its threads until a cycle collection."""
    codec, encoded = asyncio.run(_closed_while_its_codec_is_made(monkeypatch))
    assert encoded and codec is None


class _FramesOnDemand:
    """An engine stand-in whose stream outputs the frames a test hands it, when it hands them."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    async def next_frame(self, stream_id):
        return SimpleNamespace(frame=await self.queue.get(), latency_ms=1.0, pts=None)


async def _a_second_player_joins():
    engine = _FramesOnDemand()
    fanout = FanOut(engine, "s")
    try:
        first = fanout.player("video/h264", 100.0, 1_000_000)
        for i in range(2):  # the first player is served: its keyframe, then a frame that is not one
            engine.queue.put_nowait(np.full((48, 64, 3), 40 * i, np.uint8))
            await asyncio.wait_for(first.recv(), 5)
        second = fanout.player("video/h264", 100.0, 1_000_000)
        assert second.encoder is first.encoder  # (one encoder for both)
        engine.queue.put_nowait(np.full((48, 64, 3), 120, np.uint8))
        got = await asyncio.wait_for(second.recv(), 1.0)
        return got, second.skipped
    finally:
        await fanout.close()


def test_a_player_joining_a_running_stream_gets_a_keyframe_at_once():
    """A WHEP viewer that joins a stream others already watch gets a keyframe with the next frame
    (a review): otherwise it could decode nothing and showed no picture until the periodic
    keyframe, up to KEYFRAME_EVERY_S later."""
    got, skipped = asyncio.run(_a_second_player_joins())
    assert got is not None and skipped == 0


def test_unsubscribing_ends_the_reader_of_the_slot():
    """A slot taken off the fan-out is closed: its reader (an output track) ends instead of
    waiting for ever for frames that will not come (a review)."""

    async def run():
        fanout = FanOut(_FramesOnDemand(), "s")
        try:
            slot = fanout.subscribe()
            reader = asyncio.create_task(slot.get())
            await asyncio.sleep(0.01)
            fanout.unsubscribe(slot)
            with pytest.raises(MediaStreamError):
                await asyncio.wait_for(reader, 1.0)
            return fanout.slots
        finally:
            await fanout.close()

    assert asyncio.run(run()) == set()
