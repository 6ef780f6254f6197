"""An offer's handler awaits (its turn, the engine's admission, aiortc's negotiation, the stream's
parameters); meanwhile its session, or the stream it would watch, may end, and the server may stop.
A probe of those awaits, each held open here by a gate: a viewer was attached to a source that had
ended (201, no frame, its --max-viewers place held while its player's reports kept it alive); an
offer admitted after the shutdown's close_all outlived it; a session ended while it was negotiated
was told "could not negotiate" (400: a page does not retry it) or got 200 with an answer."""

from __future__ import annotations

import asyncio

import aiohttp
from aiortc import RTCPeerConnection
from gateway_helpers import SyntheticVideo, answer, auth, obs_like_offer, running_server, sessions_of, viewer_offer

from streamdiff.server.http import ENGINE_KEY

SDP = {"Content-Type": "application/sdp"}


class Gate:
    """The next call of `obj.name` (`hold`) waits until `release` is set; `entered` says it came."""

    made: list[Gate] = []  # every gate, released when a flow ends (a failed one would hang its server)

    def __init__(self, obj=None, name: str = ""):
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        Gate.made.append(self)
        if obj is not None:
            self.hold(obj, name)

    def hold(self, obj, name: str) -> None:
        real, armed = getattr(obj, name), [True]

        async def held(*args, **kwargs):
            if armed[0]:
                armed[0] = False
                self.entered.set()
                await self.release.wait()
            return await real(*args, **kwargs)

        setattr(obj, name, held)


def gate_negotiation(sessions) -> Gate:
    """A gate on the next session peer's setRemoteDescription (after the trial peer's)."""
    gate, real_new_peer, made = Gate(), sessions.new_peer, [0]

    def new_peer():
        pc = real_new_peer()
        made[0] += 1
        if made[0] == 2:  # 1: _refused_by_aiortc's trial peer, 2: the session's
            gate.hold(pc, "setRemoteDescription")
            sessions.new_peer = real_new_peer
        return pc

    sessions.new_peer = new_peer
    return gate


async def _page_offer():
    pc = RTCPeerConnection()
    pc.addTransceiver(SyntheticVideo(), direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def _overtaken() -> dict:
    out: dict = {}
    async with running_server(max_streams=3) as (url, app), aiohttp.ClientSession() as http:
        sessions, engine = sessions_of(app), app[ENGINE_KEY]
        peers = []
        try:
            # 1. A viewer of A waits for its turn (B's admission holds it); A's publisher leaves.
            pub_a, offer = await obs_like_offer()
            peers.append(pub_a)
            async with http.post(f"{url}/whip/A", data=offer, headers={**SDP, **auth()}) as r:
                assert r.status == 201, await r.text()
                where_a = r.headers["Location"]
                await answer(pub_a, await r.text())
            admission = Gate(engine, "add_stream")
            pub_b, offer = await obs_like_offer()
            peers.append(pub_b)
            b = asyncio.create_task(http.post(f"{url}/whip/B", data=offer, headers={**SDP, **auth()}))
            await admission.entered.wait()
            viewer_waits = Gate(sessions, "open")  # (the viewer's open, which then waits for B's)
            viewer, offer, _ = await viewer_offer()
            peers.append(viewer)
            v = asyncio.create_task(http.post(f"{url}/whep/A", data=offer, headers={**SDP, **auth()}))
            await viewer_waits.entered.wait()  # (it has looked its source up)
            viewer_waits.release.set()
            async with http.delete(f"{url}{where_a}", headers=auth()) as r:
                assert r.status == 200
            admission.release.set()
            async with await b as r:
                out["publisher b"] = r.status
            async with await v as r:
                out["late viewer"] = (r.status, (await r.text()).strip())
            out["viewers left"] = sum(s.kind == "whep" for s in sessions.sessions.values())
            # 2. A page's session ends (its Stop's DELETE) while its offer is negotiated, and
            #    while its parameters are read for the reply.
            for name in ("negotiation", "params"):
                gate = gate_negotiation(sessions) if name == "negotiation" else Gate(engine, "params")
                page, offer = await _page_offer()
                peers.append(page)
                p = asyncio.create_task(http.post(f"{url}/offer", json={"sdp": offer, "type": "offer", "key": name},
                                                  headers=auth()))
                await gate.entered.wait()
                (sid,) = [s.id for s in sessions.sessions.values() if s.stream_key == name]
                async with http.delete(f"{url}/sessions/{sid}", headers=auth()) as r:
                    assert r.status == 200
                gate.release.set()
                async with await p as r:
                    out[f"page {name}"] = (r.status, (await r.json()).get("error", ""), r.headers.get("Retry-After"))
            # 3. The server stops while a publisher's admission is awaited.
            admission = Gate(engine, "add_stream")
            pub_c, offer = await obs_like_offer()
            peers.append(pub_c)
            c = asyncio.create_task(http.post(f"{url}/whip/C", data=offer, headers={**SDP, **auth()}))
            await admission.entered.wait()
            await sessions.close_all()  # what the app's shutdown does
            admission.release.set()
            async with await c as r:
                out["during shutdown"] = (r.status, (await r.text()).strip())
            out["after shutdown"] = (len(sessions.sessions), (await engine.stats())["streams"])
        finally:
            for gate in Gate.made:
                gate.release.set()
            Gate.made.clear()
            for pc in peers:
                await pc.close()
    return out


def test_offers_overtaken_by_an_end_or_a_shutdown_are_refused_and_leave_nothing():
    out = asyncio.run(_overtaken())
    assert out["publisher b"] == 201, out
    status, said = out["late viewer"]
    assert status == 404 and "no stream 'A' is live" in said, out["late viewer"]  # viewer.html asks again in 2 s
    assert out["viewers left"] == 0, out
    for name in ("negotiation", "params"):
        status, said, retry = out[f"page {name}"]
        assert status == 503 and retry is not None, (name, out[f"page {name}"])
        assert "the session ended while its offer was answered (its client ended it" in said, (name, said)
    status, said = out["during shutdown"]
    assert status == 503 and "the server is stopping" in said, out["during shutdown"]
    assert out["after shutdown"] == (0, 0), out["after shutdown"]



async def _source_ends_while_a_player_negotiates() -> dict:
    out: dict = {}
    async with running_server() as (url, app), aiohttp.ClientSession() as http:
        sessions = sessions_of(app)
        peers = []
        try:
            pub, offer = await obs_like_offer()
            peers.append(pub)
            async with http.post(f"{url}/whip/src", data=offer, headers={**SDP, **auth()}) as r:
                assert r.status == 201, await r.text()
                await answer(pub, await r.text())
            source = sessions.publisher("src")
            real_new_peer, made = sessions.new_peer, [0]

            def new_peer():  # the session's peer (after the trial one): its source ends as the
                pc = real_new_peer()  # negotiation's last await ends (a browser's mDNS candidates)
                made[0] += 1
                if made[0] == 2:
                    real = pc.setRemoteDescription

                    async def negotiated(description):
                        await real(description)
                        await sessions.close(source.id, "the publisher left (test)")

                    pc.setRemoteDescription = negotiated
                    sessions.new_peer = real_new_peer
                return pc

            sessions.new_peer = new_peer
            viewer, offer, _ = await viewer_offer()
            peers.append(viewer)
            async with http.post(f"{url}/whep/src", data=offer, headers={**SDP, **auth()}) as r:
                out["viewer"] = (r.status, (await r.text()).strip())
            await asyncio.sleep(0.5)
            out["encoders"] = dict(source.fanout.encoders)
            out["encoding"] = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("encode-")]
            out["sessions"] = len(sessions.sessions)
        finally:
            for pc in peers:
                await pc.close()
    return out


def test_a_player_whose_source_ends_while_it_negotiates_leaves_no_encoder():
    """A review: the source's session ended while a player's offer was in setRemoteDescription; the
    player got its 503, but an encoder was made on the ended fan-out, and its task ran for ever."""
    out = asyncio.run(_source_ends_while_a_player_negotiates())
    status, said = out["viewer"]
    assert status == 503 and "ended" in said, out["viewer"]
    assert out["encoders"] == {} and out["encoding"] == [] and out["sessions"] == 0, out
