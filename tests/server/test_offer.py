"""Browser-style session through POST /offer: synthetic frames in, processed frames out."""

import asyncio

import aiohttp
from aiortc import RTCPeerConnection

from gateway_helpers import HEIGHT, WIDTH, Collector, SyntheticVideo, answer, auth, running_server, sessions_of


async def _offer_roundtrip():
    async with running_server() as (url, app):
        pc = RTCPeerConnection()
        collector = Collector()
        pc.addTrack(SyntheticVideo())

        @pc.on("track")
        def _track(track):
            collector.attach(track, want=6)

        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                       "prompt": "a cat"}, headers=auth()) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            await answer(pc, body["sdp"])
            await asyncio.wait_for(collector.enough.wait(), 120)
            session = sessions_of(app).sessions[body["session"]]
            assert session.reader.frames_pushed > 0
            assert session.fanout.frames_out > 0
    # graceful shutdown: the server closed every peer and freed every stream on its way out
    assert sessions_of(app).sessions == {}
    for _ in range(600):  # poll until the client sees its peer go (no timing assertion)
        if pc.connectionState in ("closed", "failed"):
            break
        await asyncio.sleep(0.05)
    assert pc.connectionState in ("closed", "failed")
    await pc.close()
    await collector.task
    return collector.frames


def test_offer_frames_flow_with_increasing_pts():
    frames = asyncio.run(_offer_roundtrip())
    assert len(frames) >= 6
    for _, pixels in frames:
        assert pixels.shape == (HEIGHT, WIDTH, 3)
    pts = [p for p, _ in frames]
    assert all(b > a for a, b in zip(pts, pts[1:])), pts
    # the engine's output is not the (uniform) black frame aiortc sends before media flows
    assert any(px.std() > 0 for _, px in frames)
