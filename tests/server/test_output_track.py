"""The output track shows every frame of a chunk burst, spread at the production rate."""

from __future__ import annotations

import asyncio

import numpy as np

from streamdiff.server.webrtc import FrameQueue, OutputTrack


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
