"""Test helpers for the gateway: a real server on 127.0.0.1 (ephemeral port) around a tiny
engine, and in-process aiortc clients (browser-like, OBS-like WHIP publisher, WHEP viewer)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time

import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from av import AudioFrame, VideoFrame

from streamdiff.config import load_config
from streamdiff.engine import AsyncEngine
from streamdiff.parallel import build_executor
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.server.app import SESSIONS_KEY, ServerSettings, app_runner, build_app
from streamdiff.server.startup import START_KEY

WIDTH, HEIGHT = 64, 48
TOKEN = "s3cret"


async def until(predicate, what: str, limit_s: float = 60.0) -> None:
    """Poll `predicate` (not a timing assertion: the limit only turns a hang into a clear failure)."""
    for _ in range(int(limit_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def tiny_config(max_streams: int = 2):
    return load_config("tiny", [f"video.width={WIDTH}", f"video.height={HEIGHT}", f"cache.max_streams={max_streams}"])


@contextlib.asynccontextmanager
async def running_server(token: str | None = TOKEN, max_streams: int = 2, config=None, warm: bool = True,
                         engine: AsyncEngine | None = None, port: int = 0, **settings):
    """Yields (base_url, app), once the engine is warm (`warm=False`: at once, as `serve` listens),
    on `port` (0: a free one).
    Very loose CPU SLO (0.05 fps, 600 s deadline; warm-up timings on a
    busy CPU are noisy) so the engine admits several streams; `target_fps=None, deadline_ms=None`
    gives the preset's own service level. The engine's executor is the one `streamdiff serve`
    builds for the config (the demo preset's threads, the local one for the tiny preset), unless
    `engine` is given."""
    if engine is None:
        engine = AsyncEngine(config if config is not None else tiny_config(max_streams), executor_factory=build_executor)
    settings = {"target_fps": 0.05, "deadline_ms": 600_000.0, "output_fps": 15.0, **settings}
    app = build_app(engine, ServerSettings(token=token, ice_loopback=True, **settings))
    runner = app_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    if warm:
        assert await app[START_KEY].ready(300) is None
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


def auth(token: str | None = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


class SyntheticVideo(MediaStreamTrack):
    """Synthetic moving shapes at `fps`, pts on a 90 kHz clock."""

    kind = "video"

    def __init__(self, fps: float = 15.0, width: int = WIDTH, height: int = HEIGHT):
        super().__init__()
        self.clip = synthetic_clip(30, width, height)
        self.period_s, self.n, self.start = 1.0 / fps, 0, None

    async def recv(self) -> VideoFrame:
        if self.start is None:
            self.start = time.monotonic()
        wait = self.start + self.n * self.period_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = VideoFrame.from_ndarray(self.clip[self.n % len(self.clip)], format="rgb24")
        frame.pts, frame.time_base = int(self.n * self.period_s * 90_000), fractions.Fraction(1, 90_000)
        self.n += 1
        return frame


class Silence(MediaStreamTrack):
    kind = "audio"

    def __init__(self):
        super().__init__()
        self.n = 0

    async def recv(self) -> AudioFrame:
        await asyncio.sleep(0.02)
        frame = AudioFrame.from_ndarray(np.zeros((1, 960), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, self.n * 960, fractions.Fraction(1, 48_000)
        self.n += 1
        return frame


class Collector:
    """Receives frames from a remote video track into a list of (pts, array)."""

    def __init__(self):
        self.frames: list[tuple[int, np.ndarray]] = []
        self.task = None
        self.enough = asyncio.Event()
        self.want = 0

    def attach(self, track, want: int) -> None:
        self.want = want
        self.task = asyncio.create_task(self._run(track))

    async def _run(self, track) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                self.frames.append((frame.pts, frame.to_ndarray(format="rgb24")))
                if len(self.frames) >= self.want:
                    self.enough.set()


def codec_only(transceiver, mime: str = "video/H264") -> None:
    """The transceiver offers `mime` alone (and rtx)."""
    codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType in (mime, "video/rtx")]
    transceiver.setCodecPreferences(codecs)


async def obs_like_offer() -> tuple[RTCPeerConnection, str]:
    """A WHIP publisher shaped like OBS: sendonly H.264 video + Opus audio, no trickle."""
    pc = RTCPeerConnection()
    video = pc.addTransceiver(SyntheticVideo(), direction="sendonly")
    codec_only(video)
    pc.addTransceiver(Silence(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers all candidates here
    return pc, pc.localDescription.sdp


class Paused(SyntheticVideo):
    """Video that stops while `paused` is set: an encoder that sends nothing (a WHIP client
    pointed at the wrong endpoint with a track, a crashed OBS whose peer has not timed out)."""

    def __init__(self):
        super().__init__()
        self.paused = asyncio.Event()

    async def recv(self):
        if self.paused.is_set():
            await asyncio.Event().wait()  # never: the sender stops sending
        return await super().recv()


async def publisher_of(track: MediaStreamTrack) -> tuple[RTCPeerConnection, str]:
    """A WHIP publisher of `track` alone: sendonly H.264 video, no audio, no trickle."""
    pc = RTCPeerConnection()
    codec_only(pc.addTransceiver(track, direction="sendonly"))
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def viewer_offer() -> tuple[RTCPeerConnection, str, Collector]:
    pc = RTCPeerConnection()
    collector = Collector()
    pc.addTransceiver("video", direction="recvonly")

    @pc.on("track")
    def _track(track):
        if track.kind == "video":
            collector.attach(track, want=6)

    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp, collector


async def answer(pc: RTCPeerConnection, sdp: str) -> None:
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))


def sessions_of(app):
    return app[SESSIONS_KEY]
