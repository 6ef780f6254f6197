"""Browser-style session through POST /offer: synthetic frames in, processed frames out."""

import asyncio

import aiohttp
from aiortc import RTCPeerConnection

from gateway_helpers import HEIGHT, WIDTH, Collector, SyntheticVideo, answer, auth, running_server, sessions_of

from streamdiff.server.http import ENGINE_KEY


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
                                                       "prompt": "a cat", "seed": 7}, headers=auth()) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            # what the stream runs, in control words: the page shows it in the fields it did not send
            sampling = app[ENGINE_KEY].cfg.sampling
            assert body["params"] == {"prompt": "a cat", "steps": sampling.steps, "noise": sampling.noise_strength,
                                      "seed": 7, "motion": sampling.motion_aware, "blend": 0}, body
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


async def _orphans():
    async with running_server(control_grace_s=0.5) as (url, app):
        sessions = sessions_of(app)
        pc = RTCPeerConnection()
        pc.addTrack(SyntheticVideo())
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
            for rate in (True, 0):  # a camera rate of 0 never reaches the engine's admission
                async with http.post(f"{url}/offer", json={**offer, "input_fps": rate}, headers=auth()) as resp:
                    error = (await resp.json())["error"]
                    assert resp.status == 400 and "input_fps must be a number from 1 to 240" in error, (rate, error)
            # the page says its camera's rate: what it is told assumes it (a probe: 15 fps told 30)
            async with http.post(f"{url}/offer", json={**offer, "input_fps": 7.5}, headers=auth()) as resp:
                body = await resp.json()
                assert resp.status == 200 and 0 < body["expect"]["fps"] <= 7.5, body
            await answer(pc, body["sdp"])
            sid = body["session"]
            # Another controller (`streamdiff control`) comes and goes: the stream stays.
            async with http.ws_connect(f"{url}/ws?session={sid}", headers=auth()) as ws:
                await ws.send_json({"type": "ping"})
            await asyncio.sleep(1.5)
            assert sid in sessions.sessions
            # The page's own socket drops (its tab crashed; the peer never closes): freed.
            ws = await http.ws_connect(f"{url}/ws?session={sid}&owner=1", headers=auth())
            await ws.close()
            for _ in range(100):
                if sid not in sessions.sessions:
                    break
                await asyncio.sleep(0.1)
            assert sid not in sessions.sessions
        await pc.close()


def test_a_page_whose_control_socket_drops_is_freed_and_other_controllers_do_not_count():
    asyncio.run(_orphans())


async def _a_page_with_its_own_key():
    from gateway_helpers import viewer_offer

    out = {}
    async with running_server() as (url, app), aiohttp.ClientSession() as http:
        sessions = sessions_of(app)

        async def page_offer():
            pc = RTCPeerConnection()
            pc.addTrack(SyntheticVideo())
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                       "key": "page-1a2b"}, headers=auth()) as resp:
                return pc, resp.status, await resp.json(), resp.headers.get("Retry-After")

        first, status, body, _ = await page_offer()
        await answer(first, body["sdp"])
        out["first"] = (status, body["watch"].startswith("/viewer.html?key=page-1a2b&token="))
        view, voffer, collector = await viewer_offer()  # a viewer of the page's stream, by its key
        async with http.post(f"{url}/whep/page-1a2b", data=voffer, headers={**auth(), "Content-Type": "application/sdp"}) as r:
            out["viewer"] = r.status
            await answer(view, await r.text())
        await asyncio.wait_for(collector.enough.wait(), 120)
        second, status, body2, retry = await page_offer()  # the same tab while its stream is live
        out["taken"] = (status, retry)
        await second.close()
        # its page holds the control socket: a duplicated tab (the same key) is still refused
        async with http.ws_connect(f"{url}/ws?session={body['session']}&owner=1", headers=auth()):
            await asyncio.sleep(0.2)
            duplicate, status, _, _ = await page_offer()
            out["duplicate"] = status
            await duplicate.close()
        # the socket closed (the tab reloaded, or lost its connection): the tab that comes back with
        # its key takes it at once instead of waiting out 409s (a probe: three, then a new key)
        back, status, body_back, _ = await page_offer()
        out["back"] = (status, [why for kind, key, why in sessions.ended.values()
                                if (kind, key) == ("browser", "page-1a2b")])
        await back.close()
        await first.close()  # the page reconnects: its old session ends, the key comes free
        for _ in range(200):
            if sessions.publisher("page-1a2b") is None:
                break
            await asyncio.sleep(0.05)
        third, status, body3, _ = await page_offer()
        out["again"] = (status, body3.get("watch") == body["watch"])
        await third.close()
        async with http.post(f"{url}/offer", json={"sdp": "v=0", "type": "offer", "key": "bad key"}, headers=auth()) as r:
            out["bad key"] = (r.status, (await r.json())["error"])
        await view.close()
    return out


def test_a_page_streams_under_its_own_key_across_reconnects():
    """A page probe: every reconnect made a new session id, and an open viewer of the page's
    output (its watch link, an OBS source) waited for the old id for ever. The page sends a key
    of its own, the same across its reconnects: its viewer link stays valid."""
    out = asyncio.run(_a_page_with_its_own_key())
    assert out["first"] == (200, True) and out["viewer"] == 201
    assert out["taken"] == (409, "3")  # still live: the page retries in 3 s
    assert out["duplicate"] == 409
    status, ended = out["back"]
    assert status == 200 and len(ended) == 1 and ended[0].startswith("its page came back"), out["back"]
    assert out["again"] == (200, True)
    assert out["bad key"][0] == 400 and "key must be" in out["bad key"][1]
