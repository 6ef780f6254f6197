"""What OBS and other WHIP/WHEP clients meet around a session's life (found by driving the
gateway as OBS does): offers pointed at the wrong endpoint, a publisher that sends no video, a
crashed OBS that publishes again to its key, and OBS's Stop (peer closed, then DELETE)."""

import asyncio

import aiohttp
import pytest

from gateway_helpers import (Paused, answer, auth, obs_like_offer, publisher_of, running_server,
                             sessions_of, until, viewer_offer)
from streamdiff.server.app import ENGINE_KEY
from streamdiff.server.sdp import SdpError, require_directions, video_directions
from streamdiff.server.sessions import SessionManager

SDP = {"Content-Type": "application/sdp"}


def test_video_directions_follow_the_section_then_the_session_default():
    sdp = "v=0\na=recvonly\nm=audio 9 X 111\na=sendonly\nm=video 9 X 96\nm=video 9 X 97\na=inactive\n"
    assert video_directions(sdp) == ["recvonly", "inactive"]  # the first takes the session's default
    assert video_directions("v=0\nm=video 9 X 96\n") == ["sendrecv"]  # none said: sendrecv (RFC 8866)
    require_directions(sdp, sends=False, receives=True, what="-")
    with pytest.raises(SdpError, match="is inactive/recvonly: it sends no video to restyle; go elsewhere"):
        require_directions(sdp, sends=True, receives=False, what="go elsewhere")


async def _wrong_endpoints():
    async with running_server() as (url, app):
        async with aiohttp.ClientSession() as http:
            # A viewer (recvonly) pointed at the publishing endpoint: it was admitted and held the key.
            view, view_sdp, _ = await viewer_offer()
            async with http.post(f"{url}/whip/cam", data=view_sdp, headers={**SDP, **auth()}) as resp:
                text = await resp.text()
                assert resp.status == 400 and "sends no video" in text and "/whep/cam" in text, text
            # A publisher (sendonly) pointed at the viewing endpoint of a live stream: it was
            # answered recvonly and its video decoded for nothing.
            pub, pub_sdp = await obs_like_offer()
            async with http.post(f"{url}/whip/cam", data=pub_sdp, headers={**SDP, **auth()}) as resp:
                assert resp.status == 201, await resp.text()
                await answer(pub, await resp.text())
            other, other_sdp = await obs_like_offer()
            async with http.post(f"{url}/whep/cam", data=other_sdp, headers={**SDP, **auth()}) as resp:
                text = await resp.text()
                assert resp.status == 400 and "receives no video" in text and "/whip/cam" in text, text
            # The page's endpoint needs video both ways.
            async with http.post(f"{url}/offer", json={"sdp": pub_sdp, "type": "offer"}, headers=auth()) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400 and "receives no video" in error, error
            assert [s.kind for s in sessions_of(app).sessions.values()] == ["whip"]
            # The answer's content type is the bare media type (application/sdp defines no charset).
            async with http.post(f"{url}/whep/cam", data=view_sdp, headers={**SDP, **auth()}) as resp:
                assert resp.status == 201 and resp.headers["Content-Type"] == "application/sdp", resp.headers
                location = resp.headers["Location"]
            async with http.options(f"{url}{location}") as resp:  # a resource takes DELETE, not POST
                assert resp.status == 204 and "Accept-Post" not in resp.headers
        for pc in (view, pub, other):
            await pc.close()


def test_offers_at_the_wrong_endpoint_are_refused_in_one_line():
    asyncio.run(_wrong_endpoints())


async def _silent_publishers():
    # takeover well before the input timeout, so the silent first publisher is still there to take over
    # (2 s between them for the new publisher's POST); both short, as each phase waits them out
    async with running_server(connect_timeout_s=10.0, input_timeout_s=4.0, takeover_after_s=2.0) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            # 1. A publisher that connects and never sends video is freed with its engine stream.
            silent = Paused()
            silent.paused.set()
            pc, offer = await publisher_of(silent)
            async with http.post(f"{url}/whip/quiet", data=offer, headers={**SDP, **auth()}) as resp:
                assert resp.status == 201, await resp.text()
                quiet_id = resp.headers["X-Session-Id"]
                await answer(pc, await resp.text())
            await until(lambda: sessions.sessions.get(quiet_id) is None or
                         sessions.sessions[quiet_id].pc.connectionState == "connected", "connected")
            await until(lambda: quiet_id not in sessions.sessions, "the silent publisher freed")
            assert sessions.why_ended(quiet_id).startswith("no video arrived for ")
            assert await _engine_streams(app, 0) == 0
            await pc.close()
            # 2. OBS publishes, then crashes (its video stops; its peer is not closed).
            video = Paused()
            first, offer = await publisher_of(video)
            async with http.post(f"{url}/whip/studio", data=offer, headers={**SDP, **auth()}) as resp:
                assert resp.status == 201, await resp.text()
                first_id = resp.headers["X-Session-Id"]
                await answer(first, await resp.text())
            await until(lambda: sessions.sessions[first_id].reader is not None and
                         sessions.sessions[first_id].reader.frames_received > 0, "video arrives")
            # while its video arrives, the key is its own
            second, offer = await publisher_of(Paused())
            async with http.post(f"{url}/whip/studio", data=offer, headers={**SDP, **auth()}) as resp:
                text = await resp.text()
                assert resp.status == 409 and "gives it up after 2 s" in text, text
            video.paused.set()
            await until(lambda: sessions.sessions[first_id].input_idle_s() >= 2.0, "the first publisher silent")
            # OBS restarted: the same key is taken over at once (not after the old peer's timeout)
            async with http.post(f"{url}/whip/studio", data=offer, headers={**SDP, **auth()}) as resp:
                assert resp.status == 201, await resp.text()
                second_id = resp.headers["X-Session-Id"]
                await answer(second, await resp.text())
            assert first_id not in sessions.sessions and "a new publisher took stream key studio" in \
                sessions.why_ended(first_id)
            assert sessions.publisher("studio").id == second_id
            assert await _engine_streams(app, 1) == 1
            # 3. A publisher that streamed and vanished (no close, no DELETE) is freed once its
            # video stops for input_timeout_s, not after ICE consent (about 30 s).
            await until(lambda: sessions.sessions[second_id].reader is not None and
                         sessions.sessions[second_id].reader.frames_received > 0, "the second publisher's video")
            second.getTransceivers()[0].sender.track.paused.set()
            await until(lambda: second_id not in sessions.sessions, "the vanished publisher freed", limit_s=20)
            assert sessions.why_ended(second_id).startswith("no video arrived for ")
            assert await _engine_streams(app, 0) == 0
        await first.close()
        await second.close()


async def _engine_streams(app, want: int, limit_s: float = 10.0) -> int:
    """The engine's stream count once it is `want` (or the last seen after `limit_s`): a session
    leaves the session list first, its engine stream is removed a moment later."""
    for _ in range(int(limit_s / 0.05)):
        got = (await app[ENGINE_KEY].stats())["streams"]
        if got == want:
            return got
        await asyncio.sleep(0.05)
    return got


def test_a_silent_publisher_is_freed_and_its_key_taken_over():
    asyncio.run(_silent_publishers())


async def _stop_like_obs():
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/live", data=offer, headers={**SDP, **auth()}) as resp:
                assert resp.status == 201, await resp.text()
                location, sid = resp.headers["Location"], resp.headers["X-Session-Id"]
                await answer(pub, await resp.text())
            await until(lambda: sessions.sessions[sid].pc.connectionState == "connected", "connected")
            # its id under another key's URL ends nothing: the key in the URL must be the session's own
            async with http.delete(f"{url}/whip/other/{sid}", headers=auth()) as resp:
                assert resp.status == 404 and sid in sessions.sessions
            await pub.close()  # OBS's Stop: the peer first ...
            await until(lambda: sid not in sessions.sessions, "the close ends the session")
            async with http.delete(f"{url}{location}", headers=auth()) as resp:  # ... then DELETE
                text = await resp.text()
                assert resp.status == 200 and text.startswith("session ended already: peer connection"), text
            # only the resource it was: the same id under another key or kind, or an unknown id, is not found
            for path in (f"/whip/other/{sid}", f"/whep/live/{sid}", "/whip/live/0123456789abcdef"):
                async with http.delete(f"{url}{path}", headers=auth()) as resp:
                    assert resp.status == 404, path
            async with http.delete(f"{url}{location}") as resp:
                assert resp.status == 401  # still needs the token


def test_delete_after_the_peer_closed_is_answered_200():
    asyncio.run(_stop_like_obs())


async def _ends_remembered() -> list:
    # a WHEP session holds no engine stream: no engine is needed
    sessions = SessionManager(object(), max_sessions=1, target_fps=1.0, deadline_ms=1000.0)
    sessions.ENDED_KEPT = 2
    ids = []
    for n in (1, 2, 3):
        session = await sessions.open("whep", "k")
        ids.append(session.id)
        await sessions.close(session.id, f"reason {n}")
    await sessions.close_all()
    return [sessions.why_ended(i) for i in ids]


def test_the_oldest_ended_session_is_forgotten_first():
    """The server remembers why the last sessions ended (a late DELETE is answered 200 with the
    reason, a socket is told why); once full, the oldest end goes, not the one that just happened
    (a review)."""
    assert asyncio.run(_ends_remembered()) == [None, "reason 2", "reason 3"]


async def _connecting():
    async with running_server(max_sessions=1) as (url, app):
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/a", data=offer, headers={**SDP, **auth()}) as resp:
                assert resp.status == 201  # its answer is never used: the peer never connects
            other, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/b", data=offer, headers={**SDP, **auth()}) as resp:
                text = await resp.text()
        for pc in (pub, other):
            await pc.close()
    return resp.status, text


def test_a_refusal_says_when_the_streams_in_use_are_peers_still_connecting():
    """Found by a probe: 30 offers abandoned before ICE were refused as 'busy: 4 streams already
    running' while no stream ran; the slots come back at the connect timeout (or, to a newcomer,
    once not connected for replace_pending_after_s)."""
    status, text = asyncio.run(_connecting())
    assert status == 503 and "not connected 10 s after its offer gives its place" in text, text
    assert "the one stream is taken (--max-sessions) by a peer still connecting" in text, text
