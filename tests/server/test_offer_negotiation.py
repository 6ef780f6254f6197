"""What the gateway makes of offers a probe sent (RFC 9725 WHIP, the WHEP draft): offers sent
together while the server is full pass no limit, an offer aiortc cannot take is refused before it
is given a place, the codecs aiortc can use are taken and the others refused with 406, a player's
stream goes on the section it receives on, and a session's URL answers other methods with one Allow."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from gateway_helpers import (Collector, SyntheticVideo, answer, auth, codec_only, obs_like_offer, running_server,
                             sessions_of, until)
from streamdiff.server.sdp import directions_per_section

SDP = {"Content-Type": "application/sdp"}


async def _post(http, url, path, sdp):
    async with http.post(f"{url}{path}", data=sdp, headers={**SDP, **auth()}) as resp:
        return resp.status, await resp.text(), resp.headers


REPLACEABLE_S = 2.0


async def _together_when_full():
    """A full server holding an offer that never connected (its place goes to a newcomer): two
    offers at once on one key, on two keys, and three players at once. The holder's close is
    awaited while the second request ran its checks: both passed them."""
    # (newcomers that have not connected by then are replaceable too: the requests sent together
    # must all be in well within it, also on a slow machine)
    async with running_server(max_sessions=1, max_viewers=2, replace_pending_after_s=REPLACEABLE_S) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            results = {}
            for mode in ("one key", "two keys"):
                holder, offer = await obs_like_offer()
                await holder.close()  # never connects
                status, _, _ = await _post(http, url, "/whip/holder", offer)
                assert status == 201
                await asyncio.sleep(REPLACEABLE_S + 0.1)
                keys = ("dup", "dup") if mode == "one key" else ("k1", "k2")
                statuses = await asyncio.gather(*[_post(http, url, f"/whip/{k}", offer) for k in keys])
                results[mode] = (sorted(s for s, _, _ in statuses), sessions.stream_count)
                for session in list(sessions.sessions.values()):
                    await sessions.close(session.id, "next case")
            # players: two that never connect hold the two places of a live (never connected) stream
            publisher, offer = await obs_like_offer()
            await publisher.close()
            assert (await _post(http, url, "/whip/live", offer))[0] == 201
            player = RTCPeerConnection()
            player.addTransceiver("video", direction="recvonly")
            await player.setLocalDescription(await player.createOffer())
            view = player.localDescription.sdp
            await player.close()
            assert [(await _post(http, url, "/whep/live", view))[0] for _ in range(2)] == [201, 201]
            await asyncio.sleep(REPLACEABLE_S + 0.1)
            statuses = await asyncio.gather(*[_post(http, url, "/whep/live", view) for _ in range(3)])
            results["players"] = (sorted(s for s, _, _ in statuses), sessions.viewer_count)
    return results


def test_offers_sent_together_to_a_full_server_pass_no_limit():
    results = asyncio.run(_together_when_full())
    assert results["one key"] == ([201, 409], 1)  # one publisher for the key, not two
    assert results["two keys"] == ([201, 503], 1)  # --max-sessions 1 holds
    assert results["players"] == ([201, 201, 503], 2)  # --max-viewers 2 holds


NO_ICE = ("a=ice-ufrag:", "a=ice-pwd:")


def _without_ice(offer: str) -> str:
    return "".join(line for line in offer.splitlines(keepends=True) if not line.startswith(NO_ICE))


def _one_mid_twice(offer: str) -> str:
    """Both media sections under a=mid:0 (a probe: aiortc took it, then failed at its answer)."""
    return offer.replace("a=mid:1", "a=mid:0")


async def _unusable_offer_on_a_full_server(damage):
    async with running_server(max_sessions=1, replace_pending_after_s=0.2) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            holder, offer = await obs_like_offer()
            await holder.close()
            assert (await _post(http, url, "/whip/holder", offer))[0] == 201
            await asyncio.sleep(0.3)  # the holder would give its place to a newcomer now
            assert "a=mid:1" in offer
            status, text, headers = await _post(http, url, "/whip/broken", damage(offer))
            keys = [s.stream_key for s in sessions.sessions.values()]
            ended = list(sessions.ended.values())
    return status, text, headers, keys, ended


@pytest.mark.parametrize("damage, said", [(_without_ice, "could not negotiate"),
                                          (_one_mid_twice, "a=mid:0 names two media sections")])
def test_an_offer_aiortc_cannot_take_is_refused_before_it_takes_a_place(damage, said):
    """No ICE credentials, one mid for two sections: 400, not 503 with Retry-After (a client that
    obeys it retried for ever), and the session waiting to connect keeps its place (it was evicted
    for an offer that then failed)."""
    status, text, headers, keys, ended = asyncio.run(_unusable_offer_on_a_full_server(damage))
    assert status == 400 and said in text and "Retry-After" not in headers, (status, text)
    assert keys == ["holder"] and not ended


async def _publisher_with_a_session_level_direction():
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            assert offer.count("a=sendonly") == 2 and "\r\nt=0 0\r\n" in offer
            # the same offer with its direction said once for the session (RFC 8866 allows it)
            moved = offer.replace("a=sendonly\r\n", "").replace("\r\nt=0 0\r\n", "\r\nt=0 0\r\na=sendonly\r\n")
            status, text, headers = await _post(http, url, "/whip/session-level", moved)
            assert status == 201, text
            await answer(pub, text)
            sid = headers["X-Session-Id"]
            await until(lambda: sessions.sessions[sid].reader is not None and
                        sessions.sessions[sid].reader.frames_received > 0, "its video arrives")
            await pub.close()
    return text


def test_a_direction_said_once_for_the_whole_offer_is_taken():
    """A probe: an offer whose a=sendonly is at session level (valid SDP) passed our direction
    check, then failed in aiortc at its answer (`None is not in list`): a place taken, and 503 with
    Retry-After on a busy server. The direction now goes into each section for aiortc."""
    answer_sdp = asyncio.run(_publisher_with_a_session_level_direction())
    assert answer_sdp.count("a=recvonly") == 2, answer_sdp


def test_a_sections_own_direction_wins_over_the_session_level_one():
    """A section that says its own direction keeps it alone when the session-level one is written
    into the others: aiortc takes the last direction a section lists, so the session's would win
    and a recvonly section would be answered as one that sends (a review)."""
    offer = ("v=0\r\na=sendonly\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
             "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=recvonly\r\n")
    lines = directions_per_section(offer).split("\r\n")
    audio, video = lines.index("m=audio 9 UDP/TLS/RTP/SAVPF 111"), lines.index("m=video 9 UDP/TLS/RTP/SAVPF 96")
    assert "a=sendonly" not in lines[:audio] and "a=sendonly" in lines[audio:video], lines
    assert [line for line in lines[video:] if line in ("a=sendonly", "a=recvonly")] == ["a=recvonly"], lines


def _with_h264(offer: str, fmtp: str | None) -> str:
    """An OBS-like offer whose H.264 payloads carry `fmtp` (None: no fmtp line at all)."""
    out = []
    for line in offer.splitlines(keepends=True):
        if line.startswith("a=fmtp:") and "profile-level-id" in line:
            if fmtp is not None:
                out.append(line.split(" ", 1)[0] + " " + fmtp + "\r\n")
            continue
        out.append(line)
    return "".join(out)


def _audio_only_in(offer: str, codec: str) -> str:
    """An OBS-like offer (audio its last section) whose audio offers `codec` alone, as payload type 96."""
    head, audio = offer.split("m=audio", 1)
    m_line, rest = audio.split("\r\n", 1)
    lines = [line for line in rest.split("\r\n") if not line.startswith("a=rtpmap:")]
    return head + "m=audio" + " ".join(m_line.split(" ")[:3] + ["96"]) + "\r\n" + f"a=rtpmap:96 {codec}\r\n" + \
        "\r\n".join(lines)


def _sections(sdp: str) -> dict[str, list[str]]:
    """kind -> lines of an answer's section of that kind (its m-line first), and the BUNDLE group's mids."""
    out = {"bundle": next(line for line in sdp.splitlines() if line.startswith("a=group:BUNDLE")).split()[1:]}
    for part in sdp.split("\r\nm=")[1:]:
        out[part.split(" ", 1)[0]] = ("m=" + part).splitlines()
    return out


async def _codecs():
    async with running_server(max_sessions=4, max_streams=2) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            _, offer = await obs_like_offer()
            mode0 = await _post(http, url, "/whip/m0", _with_h264(offer, "packetization-mode=0;profile-level-id=42e01f"))
            no_fmtp = await _post(http, url, "/whip/nofmtp", _with_h264(offer, None))
            # a browser-like publisher: VP8 only (aiortc's default offer lists VP8 first)
            pub = RTCPeerConnection()
            vp8 = [c for c in pub.addTransceiver(SyntheticVideo(), direction="sendonly").sender.getCapabilities("video").codecs
                   if c.mimeType in ("video/VP8", "video/rtx")]
            pub.getTransceivers()[0].setCodecPreferences(vp8)
            await pub.setLocalDescription(await pub.createOffer())
            status, sdp, _ = await _post(http, url, "/whip/vp8", pub.localDescription.sdp)
            await answer(pub, sdp)
            session = next(s for s in sessions.sessions.values() if s.stream_key == "vp8")
            await until(lambda: session.reader is not None and session.reader.frames_received >= 3, "VP8 frames arrive")
            # players that offer no codec aiortc can send
            av1 = offer.replace("a=sendonly", "a=recvonly")
            for line in offer.splitlines():
                if line.startswith("a=rtpmap:") and "H264/" in line:
                    av1 = av1.replace(line, line.replace("H264/", "AV1/"))
            player_av1 = await _post(http, url, "/whep/vp8", av1)
            high = _with_h264(offer, "packetization-mode=1;profile-level-id=640c1f").replace("a=sendonly", "a=recvonly")
            player_high = await _post(http, url, "/whep/vp8", high)
            # audio in a codec aiortc does not have (AAC): the audio section is rejected, not the offer
            aac = await _post(http, url, "/whip/aac", _audio_only_in(offer, "MP4A-LATM/90000"))
            aac_player = await _post(http, url, "/whep/vp8", _audio_only_in(offer, "MP4A-LATM/90000").replace(
                "a=sendonly", "a=recvonly"))
            await pub.close()
    return mode0, no_fmtp, status, player_av1, player_high, aac, aac_player


def test_codecs_aiortc_can_use_are_taken_and_the_others_refused_with_406():
    """H.264 in packetization-mode 0 (what an fmtp line without it means) passed the profile check
    and then failed in aiortc with a 400 that said nothing; a VP8 publisher was refused although
    aiortc receives it; a player offering AV1 or High-profile H.264 only got a bare 400."""
    mode0, no_fmtp, vp8_status, player_av1, player_high, aac, aac_player = asyncio.run(_codecs())
    for status, text, _ in (mode0, no_fmtp):
        assert status == 406 and "packetization-mode=1" in text, (status, text)
    assert vp8_status == 201
    assert player_av1[0] == 406 and "AV1" in player_av1[1] and "VP8" in player_av1[1], player_av1
    assert player_high[0] == 406 and "High (640c1f)" in player_high[1], player_high
    # Audio with no codec in common: RFC 3264 rejects that section (port 0), the video is answered.
    # aiortc refused the whole offer with 400 (a probe: a publisher's stream refused for its audio).
    for (status, sdp, _), video in ((aac, "a=recvonly"), (aac_player, "a=sendonly")):
        assert status == 201, (status, sdp)
        sections = _sections(sdp)
        audio = sections["audio"]
        assert audio[0].split()[1] == "0" and "a=inactive" in audio, audio
        assert not any(line.startswith("a=candidate:") for line in audio), audio
        mid = next(line[6:] for line in audio if line.startswith("a=mid:"))
        assert mid not in sections["bundle"] and sections["bundle"], sections["bundle"]
        assert video in sections["video"] and sections["video"][0].split()[1] != "0", sections["video"]


async def _player_with_two_video_sections(sends: str | None, receives: str | None):
    async with running_server() as (url, app):
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            status, sdp, _ = await _post(http, url, "/whip/two", offer)
            assert status == 201
            await answer(pub, sdp)
            player, collector = RTCPeerConnection(), Collector()
            # sendonly: a camera it sends nowhere
            for direction, mime in (("sendonly", sends), ("recvonly", receives)):
                transceiver = player.addTransceiver("video", direction=direction)
                if mime is not None:
                    codec_only(transceiver, mime)

            @player.on("track")
            def _track(track):
                if track.kind == "video" and track is player.getTransceivers()[1].receiver.track:
                    collector.attach(track, want=3)

            await player.setLocalDescription(await player.createOffer())
            status, sdp, _ = await _post(http, url, "/whep/two", player.localDescription.sdp)
            directions = [line[2:] for line in sdp.splitlines() if line in ("a=sendonly", "a=inactive", "a=recvonly",
                                                                            "a=sendrecv")]
            await answer(player, sdp)
            await asyncio.wait_for(collector.enough.wait(), 60)
            await player.close()
            await pub.close()
    return status, directions, len(collector.frames)


@pytest.mark.parametrize("sends, receives", [(None, None), ("video/VP8", "video/H264"), ("video/H264", "video/VP8")])
def test_a_players_stream_goes_on_the_section_it_receives_on(sends, receives):
    """A WHEP offer [sendonly, recvonly]: the stream went on the first section (aiortc's addTrack
    takes the first of a kind), which the player does not receive on, and every section was
    answered sendonly: connected, no picture. And in the codec of that section, not of the first
    (a review: VP8 packets went out on the H.264 section and the player decoded nothing)."""
    status, directions, frames = asyncio.run(_player_with_two_video_sections(sends, receives))
    assert status == 201
    assert directions == ["inactive", "sendonly"], directions
    assert frames >= 3


async def _resource_methods():
    async with running_server() as (url, app):
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            _, _, headers = await _post(http, url, "/whip/m", offer)
            location = headers["Location"]
            allows = []
            for method in ("GET", "PUT", "PATCH"):
                async with http.request(method, f"{url}{location}", headers=auth()) as resp:
                    allows.append((resp.status, resp.headers.get("Allow")))
            # a preflight advertises Accept-Post where a POST is taken: the endpoint, not a session's URL
            accept_post = []
            for path in ("/whip/m", location):
                async with http.options(f"{url}{path}") as resp:
                    accept_post.append((resp.status, resp.headers.get("Accept-Post")))
            async with http.delete(f"{url}{location}", headers=auth()) as resp:
                deleted = resp.status
            await pub.close()
    return allows, deleted, accept_post


def test_a_sessions_url_answers_other_methods_with_one_allow():
    allows, deleted, accept_post = asyncio.run(_resource_methods())
    assert allows == [(405, "DELETE, OPTIONS")] * 3  # GET said "DELETE,OPTIONS,PATCH", PATCH "DELETE, OPTIONS"
    assert deleted == 200
    assert accept_post == [(204, "application/sdp"), (204, None)]


async def _admitted_while_the_pipeline_fails():
    from streamdiff.engine.types import StreamsLost
    from streamdiff.server.http import ENGINE_KEY

    async with running_server() as (url, app):
        engine = app[ENGINE_KEY]

        async def fails(session_id, *args, **kwargs):  # a stage died twice while the stream was added
            raise StreamsLost([session_id], "pipeline stage failed (test); stage [1] replaced", True)

        engine.add_stream = fails
        pub, offer = await obs_like_offer()
        async with aiohttp.ClientSession() as http:
            status, text, headers = await _post(http, url, "/whip/cam", offer)
        await pub.close()
        return status, text, headers, len(sessions_of(app).sessions)


def test_a_pipeline_that_fails_while_a_stream_is_admitted_is_503_not_500():
    """A Ray probe: the offer that met a dead stage got 500 Internal Server Error."""
    status, text, headers, sessions = asyncio.run(_admitted_while_the_pipeline_fails())
    assert status == 503 and "the model pipeline failed while admitting this stream" in text, (status, text)
    assert "Retry-After" in headers and sessions == 0
