"""Connect/vanish cycles leave no session, engine stream or task behind."""

import asyncio

import aiohttp
from aiortc import RTCPeerConnection

from gateway_helpers import SyntheticVideo, answer, auth, obs_like_offer, running_server, sessions_of
from streamdiff.server.app import ENGINE_KEY

CYCLES = 20
OUR_TASKS = ("read-", "push-", "fanout-", "drain-", "watchdog-")


async def _until(predicate, what: str, limit_s: float = 60.0) -> None:
    """Poll (not a timing assertion: the limit only turns a hang into a clear failure)."""
    for _ in range(int(limit_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _our_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(OUR_TASKS) and not t.done()]


async def _cycles():
    async with running_server(connect_timeout_s=1.0) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            for i in range(CYCLES):
                if i % 2 == 0:  # browser peer that connects, then vanishes (closes without DELETE)
                    pc = RTCPeerConnection()
                    pc.addTrack(SyntheticVideo())
                    await pc.setLocalDescription(await pc.createOffer())
                    async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"},
                                         headers=auth()) as resp:
                        assert resp.status == 200, await resp.text()
                        body = await resp.json()
                    sid = body["session"]
                    await answer(pc, body["sdp"])
                    await _until(lambda: sid not in sessions.sessions or
                                 sessions.sessions[sid].pc.connectionState == "connected", "connected")
                else:  # OBS-like publisher that posts its offer and never uses the answer
                    pc, offer = await obs_like_offer()
                    async with http.post(f"{url}/whip/key{i}", data=offer,
                                         headers={**auth(), "Content-Type": "application/sdp"}) as resp:
                        assert resp.status == 201, await resp.text()
                        sid = resp.headers["X-Session-Id"]
                await pc.close()
                await _until(lambda: sid not in sessions.sessions, f"session {sid} freed (cycle {i})")
            await _until(lambda: not _our_tasks(), "gateway tasks finished")
            assert sessions.sessions == {}
            assert (await app[ENGINE_KEY].stats())["streams"] == 0
            assert app[ENGINE_KEY].metrics()["streams"] == {}


def test_connect_vanish_cycles_leave_nothing_behind():
    asyncio.run(_cycles())
