"""Connect/vanish cycles leave no session, engine stream or task behind."""

import asyncio
import gc
import logging

import aiohttp
from aiortc import RTCPeerConnection

from gateway_helpers import SyntheticVideo, answer, auth, obs_like_offer, running_server, sessions_of, until
from streamdiff.server.app import ENGINE_KEY

# Each kind of peer three times (the later ones after one of their kind was freed): the checks at
# the end are absolute (no session, task or engine stream left), so any cycle that leaks fails them;
# a publisher's cycle waits out the connect timeout (2 s), hence no more.
CYCLES = 6
OUR_TASKS = ("read-", "push-", "fanout-", "drain-", "watchdog-")


def _our_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(OUR_TASKS) and not t.done()]


async def _cycles():
    async with running_server(connect_timeout_s=2.0) as (url, app):  # (1 s: a loaded CI once took longer to answer)
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
                    await until(lambda: sid not in sessions.sessions or
                                 sessions.sessions[sid].pc.connectionState == "connected", "connected")
                else:  # OBS-like publisher that posts its offer and never uses the answer
                    pc, offer = await obs_like_offer()
                    async with http.post(f"{url}/whip/key{i}", data=offer,
                                         headers={**auth(), "Content-Type": "application/sdp"}) as resp:
                        assert resp.status == 201, await resp.text()
                        sid = resp.headers["X-Session-Id"]
                await pc.close()
                await until(lambda: sid not in sessions.sessions, f"session {sid} freed (cycle {i})")
            await until(lambda: not _our_tasks(), "gateway tasks finished")
            assert sessions.sessions == {}
            assert (await app[ENGINE_KEY].stats())["streams"] == 0
            assert app[ENGINE_KEY].metrics()["streams"] == {}


def test_connect_vanish_cycles_leave_nothing_behind():
    asyncio.run(_cycles())


async def _leave_mid_handshake(caplog) -> int:
    """OBS-like publishers whose sessions are freed while the server's DTLS handshake runs,
    until one of them catches aiortc's connect task mid-way (the session's close awaits other
    things first, so the handshake sometimes ends before the peer closes). Returns the cycles."""
    def seen() -> bool:
        return any(r.levelno >= logging.ERROR or "a peer closed while connecting" in r.getMessage()
                   for r in caplog.records)

    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            for i in range(50):  # usually 1-2; a loaded CI machine once missed 20 in a row
                pc, offer = await obs_like_offer()
                async with http.post(f"{url}/whip/key{i}", data=offer,
                                     headers={**auth(), "Content-Type": "application/sdp"}) as resp:
                    assert resp.status == 201, await resp.text()
                    sid, answer_sdp = resp.headers["X-Session-Id"], await resp.text()
                await answer(pc, answer_sdp)
                dtls = sessions.sessions[sid].pc.getTransceivers()[0].receiver.transport
                for _ in range(100_000):  # its first steps take a few ms: watch closely
                    if dtls.state != "new":
                        break
                    await asyncio.sleep(0.0002)
                if i % 2:  # a lost peer: its connection closes at once, then the session
                    await sessions.sessions[sid].pc.close()
                await sessions.close(sid, "the client left")  # what DELETE and a lost peer do
                await pc.close()
                await asyncio.sleep(0.1)
                gc.collect()  # an unretrieved task exception is logged when its task is freed
                await asyncio.sleep(0.05)
                if seen():
                    break
            assert sessions.sessions == {}
            return i + 1


def test_a_peer_freed_during_its_handshake_logs_no_error(caplog):
    """aiortc's own connect task raises when its peer closes mid-handshake (InvalidStateError,
    "RTCIceTransport is closed"); the server takes that exception instead of leaving asyncio
    to log it as an error with a traceback (it did, at the first such peer)."""
    caplog.set_level(logging.ERROR)
    caplog.set_level(logging.DEBUG, logger="streamdiff.server.webrtc")  # (the capture handler too)
    cycles = asyncio.run(_leave_mid_handshake(caplog))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("a peer closed while connecting" in r.getMessage() for r in caplog.records), cycles
