"""What the server hands the model from an incoming video track: frames of another shape are
centre-cropped to the model's aspect, then scaled (a 4:3 webcam or a 16:9 OBS scene into the
square demo keeps its proportions), and a stamped frame's id is still read when the crop cuts
its strip."""

from __future__ import annotations

import asyncio

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from streamdiff.client.video_io import to_model_frame
from streamdiff.server.webrtc import InputReader
from streamdiff.stamp import encode_id


def frame_of(pixels: np.ndarray) -> VideoFrame:
    return VideoFrame.from_ndarray(pixels, format="rgb24")


def bright_box(pixels: np.ndarray) -> tuple[int, int]:
    """Width and height of the region brighter than mid-grey."""
    ys, xs = np.nonzero(pixels.mean(axis=2) > 128)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def test_a_wider_frame_loses_its_sides_and_keeps_its_proportions():
    src = np.zeros((480, 640, 3), np.uint8)
    src[:, :80] = (255, 0, 0)  # only in the sides a square crop removes
    src[:, 560:] = (0, 0, 255)
    src[120:360, 200:440] = 255  # a white square, 240 x 240, in the middle
    out = to_model_frame(frame_of(src), 256, 256)
    assert out.shape == (256, 256, 3) and out.flags.c_contiguous
    w, h = bright_box(out)
    assert abs(w - h) <= 2 and abs(w - 128) <= 3, (w, h)  # 240 x 480/256 scale; squashing gives 96 x 128
    inner = out[:, 1:-1]  # the first and last columns may blend the crop's edge (scaled by 0.53)
    r, g, b = (inner[:, :, i].astype(int) for i in range(3))
    assert not ((r - g > 60) | (b - g > 60)).any()  # nothing of the red or blue sides is left


def test_a_taller_frame_loses_top_and_bottom_and_same_shape_is_only_scaled():
    src = np.zeros((640, 480, 3), np.uint8)
    src[240:400, 160:320] = 255
    w, h = bright_box(to_model_frame(frame_of(src), 128, 128))
    assert abs(w - h) <= 2 and abs(w - 43) <= 3, (w, h)
    same = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    assert np.array_equal(to_model_frame(frame_of(same), 64, 48),
                          frame_of(same).to_ndarray(format="rgb24", width=64, height=48))


class OneFrame(MediaStreamTrack):
    kind = "video"

    def __init__(self, pixels: np.ndarray):
        super().__init__()
        self.pixels = pixels

    async def recv(self) -> VideoFrame:
        if self.pixels is None:
            raise MediaStreamError
        frame = frame_of(self.pixels)
        frame.pts, self.pixels = 7, None
        return frame


class Engine:
    def __init__(self):
        self.pushed = []

    def push_frame(self, stream_id, pixels, pts):
        self.pushed.append((pixels, pts))


def test_a_stamped_wider_frame_keeps_its_id_and_the_model_gets_the_crop():
    src = np.full((480, 640, 3), 90, np.uint8)
    stamped = encode_id(src, 4242)

    async def run():
        engine = Engine()
        reader = InputReader(OneFrame(stamped), engine, "s", 64, 64, stamp=True)
        for _ in range(200):
            if engine.pushed:
                break
            await asyncio.sleep(0.05)
        await reader.close()
        return engine.pushed

    (pixels, pts), = asyncio.run(run())
    assert pixels.shape == (64, 64, 3)
    assert pts.stamp_id == 4242 and pts.pts == 7
    assert np.array_equal(pixels, to_model_frame(frame_of(stamped), 64, 64))


class Burst(MediaStreamTrack):
    """`n` frames as fast as they are asked for, then the end of the track."""

    kind = "video"

    def __init__(self, n: int):
        super().__init__()
        self.n, self.sent = n, 0

    async def recv(self) -> VideoFrame:
        if self.sent == self.n:
            raise MediaStreamError
        frame = frame_of(np.zeros((48, 64, 3), np.uint8))
        frame.pts, self.sent = self.sent, self.sent + 1
        return frame


def test_every_received_frame_is_pushed_or_counted_as_superseded():
    class SlowEngine(Engine):  # a push costs a little, so the reader gets ahead of the pusher
        def push_frame(self, stream_id, pixels, pts):
            import time
            time.sleep(0.002)
            super().push_frame(stream_id, pixels, pts)

    async def run():
        engine = SlowEngine()
        reader = InputReader(Burst(50), engine, "s", 64, 48)
        await asyncio.wait_for(asyncio.gather(*reader.tasks), 60)
        return reader, engine.pushed

    reader, pushed = asyncio.run(run())
    assert reader.frames_received == 50 and reader.frames_pushed == len(pushed)
    assert reader.frames_superseded > 0 and reader.frames_received == reader.frames_pushed + reader.frames_superseded
    assert pushed[-1][1] == 49  # the newest frame always goes in


def test_unreadable_frames_are_skipped_then_end_the_session_with_a_reason(monkeypatch, caplog):
    """A fault probe: a frame that could not be converted ended the reader's push task without a
    word; frames kept arriving (no input timeout), so the session stayed "connected" on a frozen
    picture until the client left. One bad frame is skipped with a console line; frames that
    cannot be read for `BAD_FRAMES_S` end the session with the reason."""
    import logging

    import streamdiff.server.webrtc as webrtc

    real = webrtc.to_model_frame
    bad = {3, 4}  # two bad frames in a row among good ones: skipped

    class Slow(Burst):
        async def recv(self):
            await asyncio.sleep(0.01)
            return await super().recv()

    def flaky(frame, width, height):
        if frame.pts in bad or frame.pts >= 20:  # from frame 20 on, none can be read
            raise ValueError("odd pixel format")
        return real(frame, width, height)

    monkeypatch.setattr(webrtc, "to_model_frame", flaky)
    monkeypatch.setattr(InputReader, "BAD_FRAMES_S", 0.2)

    async def run():
        engine, ended = Engine(), []
        reader = InputReader(Slow(200), engine, "s", 64, 48, on_fail=ended.append)
        await asyncio.wait_for(asyncio.gather(*reader.tasks, return_exceptions=True), 60)
        return reader, engine.pushed, ended

    with caplog.at_level(logging.WARNING, logger="streamdiff.server.webrtc"):
        reader, pushed, ended = asyncio.run(run())
    pts = [p for _, p in pushed]
    assert pts[:3] == [0, 1, 2] and 3 not in pts and 4 not in pts and 5 in pts and max(pts) == 19
    assert len(ended) == 1 and "no video frame could be read for" in ended[0] and "odd pixel format" in ended[0]
    said = [r.getMessage() for r in caplog.records]
    assert sum("could not be read" in s and "skipped" in s for s in said) == 1, said  # once, not per frame
