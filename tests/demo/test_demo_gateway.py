"""The demo through the gateway: an aiortc client sends a held-out photograph's clip to POST
/offer with prompt `a photo` and frame-id stamps; every frame it gets back is the frame it sent
with that id (compared below the stamp strip, after VP8 both ways), and the ids come back in
the order they were sent, at issue 14's >= 20 dB (every frame; the shipped weights give 22.8 dB
mean, 22.5 the lowest, docs/demo.md)."""

from __future__ import annotations

import asyncio
import fractions
import sys
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from av import VideoFrame

from streamdiff.config import load_config
from streamdiff.demo.data import HELD_OUT_PHOTO, load_photo, make_clip
from streamdiff.engine import AsyncEngine
from streamdiff.parallel import build_executor
from streamdiff.server.app import ServerSettings, build_app
from streamdiff.server.startup import START_KEY
from streamdiff.stamp import decode_id, encode_id, stamp_height

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from gateway_helpers import Collector  # noqa: E402

SIZE = 256
FRAMES = 120
WANT = 24
MEAN_PSNR_DB = MIN_PSNR_DB = 20.0  # issue 14's bar; measured: mean 22.8, min 22.5 (24 frames)


class ClipTrack(MediaStreamTrack):
    """The clip at 10 fps, frame i stamped with id 1000 + i; then the last frame again."""

    kind = "video"

    def __init__(self, clip: np.ndarray):
        super().__init__()
        self.clip, self.n = clip, 0

    async def recv(self) -> VideoFrame:
        await asyncio.sleep(0.1)
        i = min(self.n, len(self.clip) - 1)
        frame = VideoFrame.from_ndarray(encode_id(self.clip[i], 1000 + i), format="rgb24")
        frame.pts, frame.time_base = self.n, fractions.Fraction(1, 10)
        self.n += 1
        return frame


async def _roundtrip(clip: np.ndarray) -> list[np.ndarray]:
    engine = AsyncEngine(load_config("demo"), executor_factory=build_executor)  # as `make run` serves it
    app = build_app(engine, ServerSettings(token=None, target_fps=0.05, deadline_ms=600_000.0, output_fps=15.0,
                                           ice_loopback=True))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    assert await app[START_KEY].ready(600) is None  # warm before the clip's clock starts
    pc = RTCPeerConnection()
    collector = Collector()
    try:
        pc.addTrack(ClipTrack(clip))

        @pc.on("track")
        def _track(track):
            collector.attach(track, want=WANT)

        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                       "prompt": "a photo", "stamp": True}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
        await asyncio.wait_for(collector.enough.wait(), 240)
    finally:
        await pc.close()
        await runner.cleanup()
        if collector.task is not None:
            await collector.task
    return [px for _, px in collector.frames]


def test_a_photo_comes_back_through_webrtc_in_order():
    clip = make_clip(load_photo(HELD_OUT_PHOTO), FRAMES, SIZE, np.random.default_rng(7), speed_px=2.0)
    received = asyncio.run(_roundtrip(clip))
    strip = stamp_height(SIZE)
    ids, scores = [], []
    for px in received:
        fid = decode_id(px)
        if fid is None:  # the black frames aiortc sends before media flows carry no id
            continue
        i = fid - 1000
        assert 0 <= i < FRAMES, fid
        ids.append(i)
        mse = np.mean((px[strip:].astype(np.float64) - clip[i][strip:].astype(np.float64)) ** 2)
        scores.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
    assert len(ids) >= WANT // 2, f"only {len(ids)} stamped frames came back"
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids  # in order, each once
    assert np.mean(scores) >= MEAN_PSNR_DB and min(scores) >= MIN_PSNR_DB, (round(float(np.mean(scores)), 2), round(min(scores), 2), len(scores))
