"""Gateway failure paths: auth, content type, malformed SDP, no usable codec, server full, /ws garbage."""

import asyncio

import aiohttp

from gateway_helpers import answer, auth, obs_like_offer, running_server, sessions_of, viewer_offer

SDP = {"Content-Type": "application/sdp"}
VP8_ONLY_SDP = """v=0
o=- 1 1 IN IP4 127.0.0.1
s=-
t=0 0
m=video 9 UDP/TLS/RTP/SAVPF 96
c=IN IP4 0.0.0.0
a=sendonly
a=mid:0
a=rtpmap:96 VP8/90000
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwx
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF
a=setup:actpass
"""


async def _errors():
    # Server admits only one stream: the engine's KV pool has 1 stream slot, the gateway limit is higher,
    # so the 503 below comes from the engine refusing admission.
    async with running_server(max_streams=1, max_sessions=4) as (url, app):
        async with aiohttp.ClientSession() as http:
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/k", data=offer, headers={**SDP, **auth("wrong")}) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.post(f"{url}/whip/k", data=offer, headers=SDP) as resp:
                assert resp.status == 401
            async with http.post(f"{url}/whip/k", data=offer, headers={**auth(), "Content-Type": "text/plain"}) as resp:
                assert resp.status == 415
            async with http.post(f"{url}/whip/k", data="hello there", headers={**SDP, **auth()}) as resp:
                assert resp.status == 400 and "malformed SDP" in await resp.text()
            # a line aiortc cannot read is named (a probe: "could not negotiate the offer", and a
            # ValueError on the console that named no line)
            unread = (
                (VP8_ONLY_SDP.replace("VP8/90000", "VP8"), "line 9 cannot be read: 'a=rtpmap:96 VP8'"),
                (VP8_ONLY_SDP.replace("SAVPF 96", "SAVPF 300"), "line 5 cannot be read: 'm=video 9"),
                (VP8_ONLY_SDP.replace("a=rtpmap:96 VP8/90000", "a=fmtp:96 max-fr=30"),
                 "line 9 ('a=fmtp:96 max-fr=30') is for a payload type no a=rtpmap line defines"),
            )
            for damaged, line in unread:
                async with http.post(f"{url}/whip/k", data=damaged, headers={**SDP, **auth()}) as resp:
                    assert resp.status == 400 and f"malformed SDP: {line}" in await resp.text()
                sendrecv = damaged.replace("a=sendonly", "a=sendrecv")
                async with http.post(f"{url}/offer", json={"sdp": sendrecv, "type": "offer"}, headers=auth()) as resp:
                    assert resp.status == 400 and f"malformed SDP: {line}" in (await resp.json())["error"]
            av1 = VP8_ONLY_SDP.replace("VP8/90000", "AV1/90000")  # OBS with an AV1 encoder picked
            async with http.post(f"{url}/whip/k", data=av1, headers={**SDP, **auth()}) as resp:
                assert resp.status == 406
                assert "H.264" in (text := await resp.text()) and "OBS" in text
            # H.264 in High profile only (FFmpeg's libx264 default): 406 saying which profile to pick,
            # where aiortc's failed negotiation gave a 400 that said nothing.
            high = VP8_ONLY_SDP.replace("VP8/90000", "H264/90000\na=fmtp:96 packetization-mode=1;profile-level-id=64001f")
            async with http.post(f"{url}/whip/k", data=high, headers={**SDP, **auth()}) as resp:
                assert resp.status == 406
                assert "High (64001f)" in (text := await resp.text()) and "-profile:v baseline" in text
            async with http.post(f"{url}/offer", json={"sdp": "garbage", "type": "offer"}, headers=auth()) as resp:
                assert resp.status == 400
            view, view_offer, _ = await viewer_offer()
            async with http.post(f"{url}/whep/nobody", data=view_offer, headers={**SDP, **auth()}) as resp:
                assert resp.status == 404 and resp.headers["Retry-After"] == "2"  # not live yet: come back
            await view.close()
            # the one admitted stream, its offer read from a file that a Windows editor saved with a
            # UTF-8 byte-order mark (a probe: refused as "malformed SDP: it must start with 'v=0'")
            async with http.post(f"{url}/whip/k", data=("\ufeff" + offer).encode(), headers={**SDP, **auth()}) as resp:
                assert resp.status == 201, await resp.text()
                session_id = resp.headers["X-Session-Id"]
                await answer(pub, await resp.text())
            # full: a second publisher is refused with Retry-After
            pub2, offer2 = await obs_like_offer()
            async with http.post(f"{url}/whip/other", data=offer2, headers={**SDP, **auth()}) as resp:
                assert resp.status == 503
                assert int(resp.headers["Retry-After"]) > 0
            async with http.post(f"{url}/whip/k", data=offer2, headers={**SDP, **auth()}) as resp:
                assert resp.status == 409  # same key published twice
            assert len(sessions_of(app).sessions) == 1
            # /ws: garbage gets an error reply and the socket stays up
            async with http.ws_connect(f"{url}/ws?session={session_id}", headers=auth()) as ws:
                replies = []

                async def reply():
                    while True:
                        msg = await ws.receive_json(timeout=30)
                        if msg["type"] != "stats":
                            return msg
                        replies.append(msg)

                await ws.send_str("{not json")
                assert (await reply())["type"] == "error"
                await ws.send_json({"type": "launch"})
                assert "unknown message type" in (await reply())["error"]
                await ws.send_json({"type": "params", "steps": "many"})
                assert "steps" in (await reply())["error"]
                await ws.send_json({"type": "params", "colour": 3})
                assert "colour" in (await reply())["error"]
                # a bad value is named in the client's word, not the engine's (motion_aware, noise_strength)
                await ws.send_json({"type": "params", "motion": "false"})
                assert (await reply())["error"].startswith("motion must be true or false")
                await ws.send_json({"type": "params", "noise": 7})
                error = (await reply())["error"]
                assert error.startswith("noise") and "noise_strength" not in error, error
                await ws.send_json({"type": "params", "prompt": "a fox", "noise": 0.5, "seed": 7, "motion": False,
                                    "blend": 5})
                msg = await reply()
                assert msg["type"] == "params" and msg["params"]["prompt"] == "a fox" and msg["params"]["seed"] == 7
                assert msg["params"]["blend"] == 5  # the reply names every field applied (blend was left out)
                assert not ws.closed
            async with http.get(f"{url}/ws?session={session_id}&token=wrong") as resp:
                assert resp.status == 401
        await pub.close()
        await pub2.close()


def test_error_paths():
    asyncio.run(_errors())


def test_ws_unknown_session_and_auth():
    async def run():
        async with running_server() as (url, app):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/ws?session=nope", headers=auth()) as resp:
                    assert resp.status == 404
                async with http.get(f"{url}/ws?session=nope") as resp:
                    assert resp.status == 401
                async with http.get(f"{url}/healthz") as resp:
                    health = await resp.json()
                    assert resp.status == 200 and health["ok"]
                # the preset's stream parameters, in the control words the page sends back
                sampling = sessions_of(app).engine.cfg.sampling
                assert health["defaults"] == {"steps": sampling.steps, "noise": sampling.noise_strength,
                                              "seed": sampling.seed, "motion": sampling.motion_aware, "blend": 0}
                for page, marker in (("/", "app.js"), ("/viewer.html", "`whep/"), ("/app.js", "fetch(\"offer\"")):
                    async with http.get(f"{url}{page}") as resp:
                        assert resp.status == 200 and marker in await resp.text()
                async with http.get(f"{url}/metrics") as resp:
                    assert resp.status == 200
                    assert "streamdiff_gateway_sessions" in await resp.text()

    asyncio.run(run())


def test_a_refusal_tells_the_client_no_other_clients_session_id():
    """Found by a soak: a 503 read "busy: stream '39fc751722604344', admitted best effort ..., would
    slow down": another client's session id, which opens that session's routes. The console line
    keeps it; the client reads "another stream". The reasons come from the real scheduler."""
    import uuid

    from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw, StreamSLO
    from streamdiff.server.sessions import without_other_ids

    running, newcomer = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]
    sched = FrameScheduler(FixedCostModel(LinearLaw(0.0, 40.0, 0.0)), max_streams=4)  # 40 ms per row
    assert sched.add_stream(running, StreamSLO(30.0, 1000.0), 256, 1, 0.0)
    refused = sched.add_stream(newcomer, StreamSLO(30.0, 1000.0), 256, 4, 0.0)  # 5 rows: too slow for 30 fps
    assert not refused and running in refused.reason, refused.reason
    told = without_other_ids(refused.reason, newcomer)
    assert running not in told and "another stream" in told, told
    assert without_other_ids(f"steps=2 refused for stream '{newcomer}': x", newcomer) == "steps=2 refused for this stream: x"
