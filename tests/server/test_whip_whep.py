"""OBS-shaped WHIP publisher, a WHEP viewer of its output, control over REST, DELETE."""

import asyncio
import logging

import aiohttp

from streamdiff.server.app import ENGINE_KEY, SETTINGS_KEY

from gateway_helpers import (HEIGHT, WIDTH, answer, auth, obs_like_offer, running_server, sessions_of, until,
                             viewer_offer)

SDP = {"Content-Type": "application/sdp"}


async def _whip_whep():
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            # 1. OPTIONS advertises SDP and CORS.
            async with http.options(f"{url}/whip/studio") as resp:
                assert resp.status == 204
                assert resp.headers["Accept-Post"] == "application/sdp"
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
            # 2. Publish like OBS.
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/studio", data=offer,
                                 headers={**auth(), "Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201, await resp.text()
                location = resp.headers["Location"]
                assert resp.content_type == "application/sdp"
                answer_sdp = await resp.text()
            assert location.startswith("/whip/studio/")
            assert "a=candidate:" in answer_sdp  # no trickle: candidates are in the answer
            assert answer_sdp.count("m=") == 2 and "opus" in answer_sdp.lower() and "H264" in answer_sdp
            await answer(pub, answer_sdp)
            publisher = sessions.publisher("studio")
            # 3. A viewer plays the stream's output.
            view, voffer, collector = await viewer_offer()
            async with http.post(f"{url}/whep/studio", data=voffer,
                                 headers={**auth(), "Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201, await resp.text()
                view_location = resp.headers["Location"]
                await answer(view, await resp.text())
            await asyncio.wait_for(collector.enough.wait(), 120)
            assert publisher.reader.frames_pushed > 0
            # 4. Control the OBS-fed stream by its key.
            async with http.patch(f"{url}/sessions/studio/params", json={"prompt": "oil painting", "steps": 1},
                                  headers=auth()) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["params"]["steps"] == 1
            async with http.patch(f"{url}/sessions/studio/params", json={"steps": 9}, headers=auth()) as resp:
                assert resp.status == 400 and "steps" in (await resp.json())["error"]
            # 5. Trickle is refused clearly; DELETE ends viewer and publisher.
            async with http.patch(f"{url}{location}", headers=auth()) as resp:
                assert resp.status == 405 and "trickle" in await resp.text()
            async with http.delete(f"{url}{view_location}", headers=auth()) as resp:
                assert resp.status == 200
            async with http.delete(f"{url}{location}", headers=auth()) as resp:
                assert resp.status == 200
            async with http.delete(f"{url}{location}", headers=auth()) as resp:  # DELETE is idempotent
                assert resp.status == 200 and "ended already: WHIP DELETE" in await resp.text()
            assert sessions.sessions == {}
            assert (await app[ENGINE_KEY].stats())["streams"] == 0
        await pub.close()
        await view.close()
        return collector.frames


def test_whip_publish_whep_view_delete():
    frames = asyncio.run(_whip_whep())
    assert len(frames) >= 6
    assert all(px.shape == (HEIGHT, WIDTH, 3) for _, px in frames)
    pts = [p for p, _ in frames]
    assert all(b > a for a, b in zip(pts, pts[1:]))


async def _viewers_over_the_limit():
    async with running_server(max_viewers=2) as (url, app):
        sessions = sessions_of(app)
        sdp_headers = {**auth(), "Content-Type": "application/sdp"}
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/studio", data=offer, headers=sdp_headers) as resp:
                assert resp.status == 201, await resp.text()
                await answer(pub, await resp.text())
            peers, replies = [pub], []
            for _ in range(3):  # never connected: offers alone count
                view, voffer, _ = await viewer_offer()
                peers.append(view)
                async with http.post(f"{url}/whep/studio", data=voffer, headers=sdp_headers) as resp:
                    replies.append((resp.status, await resp.text(), resp.headers.get("Retry-After"),
                                    resp.headers.get("Location")))
            async with http.get(f"{url}/healthz") as resp:
                health = await resp.json()
            async with http.delete(f"{url}{replies[0][3]}", headers=auth()) as resp:  # one leaves: room again
                assert resp.status == 200
            view, voffer, _ = await viewer_offer()
            peers.append(view)
            async with http.post(f"{url}/whep/studio", data=voffer, headers=sdp_headers) as resp:
                again = resp.status
            # both places held by players that never connected, for longer than replace_pending_after_s:
            # a newcomer takes the oldest one's (abandoned offers held every place for 30 s)
            for session in sessions.sessions.values():
                if session.kind == "whep":
                    session.created_s -= 20.0 + (session.id == replies[1][3].rsplit("/", 1)[1])
            view, voffer, _ = await viewer_offer()
            peers.append(view)
            async with http.post(f"{url}/whep/studio", data=voffer, headers=sdp_headers) as resp:
                replaced = (resp.status, [why for _, _, why in sessions.ended.values() if "took its place" in why],
                            replies[1][3].rsplit("/", 1)[1] in sessions.ended)
            stream_alive = sessions.publisher("studio") is not None
            # a player waiting for a stream not live yet (viewer.html asks every 2 s)
            view, voffer, _ = await viewer_offer()
            peers.append(view)
            async with http.post(f"{url}/whep/later", data=voffer, headers=sdp_headers) as resp:
                waiting = resp.status
        for pc in peers:
            await pc.close()
    return replies, health, again, replaced, stream_alive, waiting


def test_whep_viewers_are_bounded_and_the_publisher_is_untouched(caplog):
    """Each WHEP player encodes on its own and holds sockets: a flood of offers was unbounded."""
    with caplog.at_level(logging.INFO, logger="streamdiff.events"):
        replies, health, again, replaced, stream_alive, waiting = asyncio.run(_viewers_over_the_limit())
    assert [status for status, *_ in replies] == [201, 201, 503]
    status, text, retry_after, _ = replies[2]
    assert "2 viewers already watching (--max-viewers), 2 of them still connecting" in text and retry_after
    # the console says what the client is told (a probe: it left out the peers still connecting)
    assert any(r.getMessage().startswith("refused whep session (stream key studio): 2 viewers already watching "
                                         "(--max-viewers), 2 of them still connecting") for r in caplog.records)
    assert (health["viewers"], health["max_viewers"], health["streams"]) == (2, 2, 1)
    assert again == 201 and stream_alive
    status, why, oldest_ended = replaced
    assert status == 201 and len(why) == 1 and oldest_ended, replaced
    # a player waiting for its publisher is told 404 without a console line each time it asks
    assert waiting == 404 and not any("(stream key later)" in r.getMessage() for r in caplog.records)


async def _players_share_an_encoder():
    from gateway_helpers import Collector
    from aiortc import RTCPeerConnection
    from aiortc.rtcrtpsender import RTCRtpSender

    async def vp8_viewer():
        pc, collector = RTCPeerConnection(), Collector()
        transceiver = pc.addTransceiver("video", direction="recvonly")
        transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                         if c.mimeType == "video/VP8"])
        pc.on("track", lambda track: collector.attach(track, want=6) if track.kind == "video" else None)
        await pc.setLocalDescription(await pc.createOffer())
        return pc, pc.localDescription.sdp, collector

    async with running_server(max_viewers=8) as (url, app):
        sessions = sessions_of(app)
        sdp_headers = {**auth(), "Content-Type": "application/sdp"}
        async with aiohttp.ClientSession() as http:
            async def watch(make=viewer_offer):
                pc, offer, collector = await make()
                async with http.post(f"{url}/whep/studio", data=offer, headers=sdp_headers) as resp:
                    assert resp.status == 201, await resp.text()
                    await answer(pc, await resp.text())
                return pc, collector

            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/studio", data=offer, headers=sdp_headers) as resp:
                assert resp.status == 201, await resp.text()
                await answer(pub, await resp.text())
            fanout = sessions.publisher("studio").fanout
            players = [await watch() for _ in range(3)]
            await asyncio.wait_for(asyncio.gather(*(c.enough.wait() for _, c in players)), 120)
            h264 = fanout.encoders["video/h264"]
            shared = (len(fanout.encoders), h264.encoded, fanout.frames_out, len(h264.players))
            late = await watch()  # joins mid-stream: a keyframe is made for it
            vp8 = await watch(vp8_viewer)  # another codec: an encoder of its own
            await asyncio.wait_for(asyncio.gather(late[1].enough.wait(), vp8[1].enough.wait()), 120)
            codecs = sorted(fanout.encoders)
            for pc, _ in [*players, late, vp8]:
                await pc.close()
            for _ in range(200):  # the server sees the peers go
                if not fanout.encoders:
                    break
                await asyncio.sleep(0.05)
            left = dict(fanout.encoders)
        await pub.close()
    return shared, codecs, left


def test_whep_players_share_one_encoder_per_codec():
    """A probe measured a player's own encoder at about 6 % of a core: 16 players took the
    demo's stream from 30 to 10 fps. Now each frame is encoded once per codec."""
    (encoders, encoded, frames_out, players), codecs, left = asyncio.run(_players_share_an_encoder())
    assert encoders == 1 and players == 3 and 0 < encoded <= frames_out  # once a frame, not 3 times
    assert codecs == ["video/h264", "video/vp8"]
    assert left == {}  # the last player out closed each encoder


async def _publish_and_play(url: str, http, sessions):
    """An OBS-like publisher on `studio` and one H.264 WHEP player of it, playing: (publisher
    peer, player peer, the player's session id, the stream's shared H.264 encoder, the player's
    frames)."""
    sdp_headers = {**auth(), "Content-Type": "application/sdp"}
    pub, offer = await obs_like_offer()
    async with http.post(f"{url}/whip/studio", data=offer, headers=sdp_headers) as resp:
        await answer(pub, await resp.text())
    view, voffer, collector = await viewer_offer()
    async with http.post(f"{url}/whep/studio", data=voffer, headers=sdp_headers) as resp:
        viewer_id = resp.headers["X-Session-Id"]
        await answer(view, await resp.text())
    await asyncio.wait_for(collector.enough.wait(), 120)
    return pub, view, viewer_id, sessions.publisher("studio").fanout.encoders["video/h264"], collector


async def _encoder_fails():
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, view, viewer_id, encoder, _ = await _publish_and_play(url, http, sessions)

            def broken(*args, **kwargs):
                raise RuntimeError("codec gone")

            encoder._encode = broken
            for _ in range(200):
                if viewer_id not in sessions.sessions:
                    break
                await asyncio.sleep(0.05)
            why = sessions.why_ended(viewer_id)
            publisher_alive = sessions.publisher("studio") is not None
        await view.close()
        await pub.close()
    return why, publisher_alive


def test_a_failed_shared_encoder_ends_its_players_sessions():
    """A probe forced the encoder to fail: its player stayed "connected" with no video and held
    its --max-viewers place; a generic WHEP player would wait on a frozen picture."""
    why, publisher_alive = asyncio.run(_encoder_fails())
    assert why and why.startswith("the stream's encoder failed") and publisher_alive


def test_the_default_bitrate_follows_the_frame_size():
    """A probe: at the old fixed 4 Mbit/s the demo's 256x256 H.264 sent so many packets that a
    1 s loss burst outlasted aiortc's resend history (0.5 s of them) and froze WHEP players."""
    from streamdiff.server.webrtc import default_bitrate_bps

    assert default_bitrate_bps(256, 256, 30) == 1_966_080  # the demo: 1 bit a pixel a frame
    assert default_bitrate_bps(512, 512, 30) == default_bitrate_bps(832, 480, 30) == 4_000_000
    assert default_bitrate_bps(64, 48, 30) == 1_000_000

    async def settings(**given):
        async with running_server(warm=False, **given) as (_, app):
            return app[SETTINGS_KEY].bitrate_bps

    assert asyncio.run(settings()) == 1_000_000  # the tests' 64x48 tiny preset: the floor
    assert asyncio.run(settings(bitrate_bps=750_000)) == 750_000  # --bitrate-kbps wins


async def _a_player_asks_for_a_keyframe():
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, view, viewer_id, encoder, _ = await _publish_and_play(url, http, sessions)
            encoder.KEYFRAME_EVERY_S = 1e9  # only asked-for keyframes from here on
            keys, encode = [], encoder._encode

            def recording(frame, keyframe):
                keys.append(keyframe)
                return encode(frame, keyframe)

            encoder._encode = recording
            await asyncio.sleep(1.0)
            unasked = sum(keys)
            server_sender = sessions.sessions[viewer_id].pc.getSenders()[0]
            receiver = view.getReceivers()[0]
            # what aiortc's receiver sends when its jitter buffer lost a frame's packets
            await receiver._send_rtcp_pli(server_sender._ssrc)
            for _ in range(100):
                if any(keys[-3:]) or sum(keys) > unasked:
                    break
                await asyncio.sleep(0.05)
            after_one = sum(keys) - unasked
            for _ in range(10):  # a storm of requests over about one second
                await receiver._send_rtcp_pli(server_sender._ssrc)
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)
            frames, storm = len(keys), sum(keys) - unasked - after_one
            listed = {s["session"]: s for s in await (await http.get(f"{url}/sessions", headers=auth())).json()}
        await view.close()
        await pub.close()
    return unasked, after_one, storm, frames, listed[viewer_id]


def test_a_player_that_asks_for_a_keyframe_gets_one_soon():
    """A probe dropped a WHEP player's packets: its decoder asked for a keyframe (RTCP PLI),
    the shared encoder never heard it, and the picture stayed broken until the next periodic
    keyframe. Requests are now answered, at most one keyframe every half second."""
    unasked, after_one, storm, frames, listed = asyncio.run(_a_player_asks_for_a_keyframe())
    assert unasked == 0 and after_one == 1, (unasked, after_one)
    assert 1 <= storm <= 3 and frames > 3 * storm, (storm, frames)  # ten requests in a second: not ten keyframes
    assert listed["keyframe_requests"] == 11, listed


async def _a_player_across_a_reconnect():
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, view, viewer_id, _, collector = await _publish_and_play(url, http, sessions)
            player, first = sessions.sessions[viewer_id], sessions.publisher("studio")
            sent, take = [], player.player.recv

            async def taken():  # the pts of each packet its RTP sender takes (its RTP timestamp, less an origin)
                packet = await take()
                sent.append(packet.pts)
                return packet

            player.player.recv = taken
            await until(lambda: sent, "a packet of the first publisher's stream sent")
            await pub.close()  # OBS's network drops (or its Stop); it publishes to the key again
            await until(lambda: first.closed and (player.closed or player.source is None), "the source ends")
            assert not player.closed, sessions.why_ended(viewer_id)  # its session waits for the key's next publisher
            assert player.stats()["waiting_for_publisher_s"] >= 0  # (/sessions says so)
            collector.want = len(collector.frames) + 6  # frames decoded from the next publisher's stream
            collector.enough.clear()
            again, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/studio", data=offer, headers={**auth(), **SDP}) as resp:
                await answer(again, await resp.text())
            await asyncio.wait_for(collector.enough.wait(), 120)
            second = sessions.publisher("studio")
            resumed = (player.source is second, sorted(second.fanout.encoders))
            sent_then = list(sent)
            await again.close()  # and now it does not come back: the player is freed after the grace
            await until(lambda: second.closed and (player.closed or player.source is None), "the source ends")
            player.waiting_s -= sessions.player_grace_s  # (as if it had waited that long)
            await until(lambda: player.closed, "the player freed")
            left = (sessions.sessions, first.fanout.encoders, second.fanout.encoders,
                    [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(("encode-", "fanout-"))])
            why = sessions.why_ended(viewer_id)
        await view.close()
    return resumed, sent_then, left, why


def test_a_player_plays_on_when_its_key_is_published_again():
    """A generic WHEP player (OBS's WHEP source, ffplay) lost the stream at every reconnect of
    its publisher ("its source ended") and had to be restarted by hand. It now keeps its session
    and plays the key's next publisher, on the same RTP stream; none within the grace frees it."""
    resumed, pts, left, why = asyncio.run(_a_player_across_a_reconnect())
    assert resumed == (True, ["video/h264"]), resumed  # (the codec it negotiated)
    assert len(pts) >= 6 and all(b > a for a, b in zip(pts, pts[1:])), pts  # the new encoder's after the last sent
    assert left == ({}, {}, {}, []), left
    assert why == "its source studio ended and no publisher took the key within 15 s", why


async def _publish_until_frames(url, http, sessions, key: str, pub, offer: str):
    """POST `offer` (made by the peer `pub`) to /whip/KEY, answer `pub`, and wait until its first
    frames reach the model; its session."""
    async with http.post(f"{url}/whip/{key}", data=offer, headers={**auth(), "Content-Type": "application/sdp"}) as resp:
        assert resp.status == 201, await resp.text()
        await answer(pub, await resp.text())
    publisher = sessions.publisher(key)
    for _ in range(1200):
        if publisher.reader.frames_pushed > 0:
            break
        await asyncio.sleep(0.05)
    return publisher


async def _a_publisher_that_stops_answering_consent_checks():
    """FFmpeg's WHIP muxer answers STUN only during its handshake. aioice closes a connection
    after 6 unanswered consent checks (RFC 7675), so every FFmpeg publish ended ~30 s in; a
    publisher's session keeps going while its video comes (checks every 0.1 s here)."""
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            publisher = await _publish_until_frames(url, http, sessions, "ffmpeg", pub, offer)
            for transceiver in pub.getTransceivers():  # from now on the publisher ignores STUN requests
                transceiver.sender.transport.transport._connection.request_received = lambda *args: None
            pushed = publisher.reader.frames_pushed
            await asyncio.sleep(6.0)  # 6 checks of 0.1 s, each timing out after aioice's 0.5 s RTO
            assert not publisher.closed and sessions.publisher("ffmpeg") is publisher, sessions.why_ended(publisher.id)
            assert pub.connectionState == "connected"
            assert publisher.reader.frames_pushed > pushed  # its video still reaches the model
        await pub.close()


def test_a_publisher_that_stops_answering_consent_checks_keeps_publishing(monkeypatch):
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.1)
    asyncio.run(_a_publisher_that_stops_answering_consent_checks())


async def _a_sendrecv_player():
    """A WHEP player whose offer is sendrecv gets a sendonly answer (the WHEP draft's rule; it was
    answered sendrecv) and plays."""
    from aiortc import RTCPeerConnection

    from streamdiff.server.sdp import video_directions

    async with running_server() as (url, app):
        async with aiohttp.ClientSession() as http:
            sdp_headers = {**auth(), "Content-Type": "application/sdp"}
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/studio", data=offer, headers=sdp_headers) as resp:
                await answer(pub, await resp.text())
            view = RTCPeerConnection()
            view.addTransceiver("video", direction="sendrecv")
            got = asyncio.Event()
            view.on("track", lambda track: asyncio.ensure_future(track.recv()).add_done_callback(lambda _: got.set()))
            await view.setLocalDescription(await view.createOffer())
            assert video_directions(view.localDescription.sdp) == ["sendrecv"]
            async with http.post(f"{url}/whep/studio", data=view.localDescription.sdp, headers=sdp_headers) as resp:
                assert resp.status == 201, await resp.text()
                answer_sdp = await resp.text()
            assert video_directions(answer_sdp) == ["sendonly"]
            await answer(view, answer_sdp)
            await asyncio.wait_for(got.wait(), 120)
        await pub.close()
        await view.close()


def test_a_whep_offer_that_is_sendrecv_is_answered_sendonly():
    asyncio.run(_a_sendrecv_player())


async def _an_offer_without_candidates():
    """OBS 30.2+ sends its WHIP offer with no candidates (it trickles none either): the server
    learns the publisher's address from its connectivity checks, and the stream runs."""
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            bare = "".join(line for line in offer.splitlines(keepends=True)
                           if not line.startswith(("a=candidate:", "a=end-of-candidates")))
            assert "a=candidate:" in offer and "a=candidate:" not in bare
            publisher = await _publish_until_frames(url, http, sessions, "obs32", pub, bare)
            assert publisher.reader.frames_pushed > 0
        await pub.close()


def test_a_whip_offer_without_candidates_connects():
    asyncio.run(_an_offer_without_candidates())


async def _players_come_and_go():
    """Live codec contexts (PyAV) after each of four players came and went, the collector off."""
    import gc

    import av

    async with running_server() as (url, app):
        sessions = sessions_of(app)
        sdp_headers = {**auth(), "Content-Type": "application/sdp"}
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/studio", data=offer, headers=sdp_headers) as resp:
                await answer(pub, await resp.text())
            fanout = sessions.publisher("studio").fanout
            counts = []
            gc.disable()  # as between the collector's runs on a busy server: only reference counts free
            try:
                for _ in range(4):
                    view, voffer, collector = await viewer_offer()
                    async with http.post(f"{url}/whep/studio", data=voffer, headers=sdp_headers) as resp:
                        await answer(view, await resp.text())
                    await asyncio.wait_for(collector.enough.wait(), 120)
                    await view.close()
                    for _ in range(400):
                        if not fanout.encoders and not sessions.viewer_count:
                            break
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)
                    counts.append(sum(isinstance(o, av.CodecContext) for o in gc.get_objects()))
            finally:
                gc.enable()
        await pub.close()
    return counts


def test_a_player_that_leaves_takes_its_encoder_with_it():
    """A soak probe: each WHEP player that came and went left its shared encoder's libx264
    context (and, at 256x256, its threads: 10 players took a server from 18 to 38) until Python's
    cycle collector happened to run."""
    counts = asyncio.run(_players_come_and_go())
    assert counts[-1] == counts[0], counts  # it grew by one a player


async def _a_player_that_goes_silent():
    async with running_server(player_timeout_s=1.5) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, view, viewer_id, _, _ = await _publish_and_play(url, http, sessions)
            player = sessions.sessions[viewer_id]
            await asyncio.sleep(3.0)  # longer than the timeout: a player that reports stays
            assert not player.closed and player.rtcp_s is not None

            async def muted(packets):
                return None

            for transceiver in view.getTransceivers():  # as if killed: its reports stop
                transceiver.receiver._send_rtcp = muted
            for _ in range(120):
                if player.closed:
                    break
                await asyncio.sleep(0.05)
            why = sessions.why_ended(viewer_id)
            publisher_alive = not sessions.publisher("studio").closed
        await pub.close()
        await view.close()
    return why, publisher_alive


def test_a_player_whose_reports_stop_is_freed_soon():
    """A soak probe: a WHEP player killed with kill -9 was sent video and held its place among
    the viewers for 32 s, until ICE consent expired."""
    why, publisher_alive = asyncio.run(_a_player_that_goes_silent())
    assert why is not None and "sent no RTCP report" in why, why
    assert publisher_alive


async def _whip_with_a_prompt():
    async with running_server() as (url, app), aiohttp.ClientSession() as http:
        sessions = sessions_of(app)
        pub, offer = await obs_like_offer()
        async with http.post(f"{url}/whip/studio?prompt=starry%20night", data=offer,
                             headers={**auth(), "Content-Type": "application/sdp"}) as resp:
            assert resp.status == 201, await resp.text()
            await answer(pub, await resp.text())
        params = await sessions.engine.params(sessions.publisher("studio").id)
        bad_pub, bad_offer = await obs_like_offer()
        async with http.post(f"{url}/whip/other?prompt={'x' * 1200}", data=bad_offer,
                             headers={**auth(), "Content-Type": "application/sdp"}) as resp:
            too_long = (resp.status, await resp.text())
        await bad_pub.close()
        async with http.post(f"{url}/offer", json={"sdp": "v=0", "type": "offer"}) as resp:  # no token
            unauthorized = (resp.status, resp.content_type, await resp.json())
        await pub.close()
    return params.prompt, too_long, unauthorized


def test_a_whip_url_can_carry_the_streams_first_prompt():
    """A docs walkthrough: an OBS stream always began with the empty prompt (the demo's `a
    photo`): OBS has no field for one. `?prompt=` on the WHIP URL sets it. And the JSON endpoints'
    401 is JSON too (it was the one refusal in plain text)."""
    prompt, too_long, unauthorized = asyncio.run(_whip_with_a_prompt())
    assert prompt == "starry night"
    assert too_long[0] == 400 and "prompt" in too_long[1]
    assert unauthorized[0] == 401 and unauthorized[1] == "application/json" and "Bearer" in unauthorized[2]["error"]
