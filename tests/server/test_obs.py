"""What OBS 30-32 and WHEP players really do (issue 16, items 3, 5-7): simulcast offers, WHEP
HEAD, H.264 + Opus in the WHEP answer, the docs that match, and the console lines."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from pathlib import Path

import aiohttp
from aiortc import RTCPeerConnection

from gateway_helpers import answer, auth, obs_like_offer, running_server, sessions_of
from streamdiff.server.sdp import answer_simulcast, simulcast_rids
from streamdiff.server.sessions import enable_event_log, events

SDP = {"Content-Type": "application/sdp"}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "obs.md"


def _with_layers(offer: str, n: int) -> str:
    """OBS 32.1 with Total Layers = n: one `a=rid:X send` per layer and `a=simulcast:send`."""
    lines, out, in_video = offer.splitlines(), [], False
    for line in lines:
        if line.startswith("m=") and in_video:
            out += [f"a=rid:{i} send" for i in range(n)] + ["a=simulcast:send " + ";".join(map(str, range(n)))]
        in_video = line.startswith("m=video") if line.startswith("m=") else in_video
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def _video_section(sdp: str) -> str:
    return sdp.split("m=video", 1)[1].split("\r\nm=", 1)[0]


async def _obs():
    async with running_server(max_streams=1, max_sessions=1) as (url, app):
        async with aiohttp.ClientSession() as http:
            # 1. Three layers: refused with a clear 400 naming the OBS setting; nothing made.
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/cam", data=_with_layers(offer, 3), headers={**SDP, **auth()}) as r:
                text = await r.text()
                assert r.status == 400 and "Total Layers" in text and "simulcast" in text, text
            assert sessions_of(app).sessions == {}
            # ... as are a wrong Content-Type and a missing token (OBS shows only "Failed to connect").
            async with http.post(f"{url}/whip/cam", data=offer, headers={"Content-Type": "text/plain", **auth()}) as r:
                assert r.status == 415
            async with http.post(f"{url}/whip/cam", data=offer, headers=SDP) as r:
                assert r.status == 401
            # ... and a server URL without its stream key (a probe: aiohttp's bare 404, no console line)
            async with http.post(f"{url}/whip/", data=offer, headers={**SDP, **auth()}) as r:
                text = await r.text()
                assert r.status == 404 and "no stream key in the URL" in text and "/whip/KEY" in text, text
            # 2. One layer: accepted, and the answer accepts that layer (the URL pasted with a
            #    trailing slash is the same endpoint: it was a bare 404).
            async with http.post(f"{url}/whip/cam/", data=_with_layers(offer, 1), headers={**SDP, **auth()}) as r:
                assert r.status == 201, await r.text()
                answer_sdp, location = await r.text(), r.headers["Location"]
                assert location == f"/whip/cam/{r.headers['X-Session-Id']}", location
                assert "X-StreamDiff-Expect" in r.headers
            video = _video_section(answer_sdp)
            assert "a=rid:0 recv" in video and "a=simulcast:recv 0" in video
            await answer(pub, answer_sdp)
            # 3. WHEP: HEAD, and an answer with H.264 first and Opus audio.
            async with http.head(f"{url}/whep/cam", headers=auth()) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("application/sdp")
            view = RTCPeerConnection()
            view.addTransceiver("video", direction="recvonly")  # offers VP8 first, then H.264
            view.addTransceiver("audio", direction="recvonly")
            await view.setLocalDescription(await view.createOffer())
            async with http.post(f"{url}/whep/cam", data=view.localDescription.sdp, headers={**SDP, **auth()}) as r:
                assert r.status == 201, await r.text()
                whep_answer = await r.text()
            video = _video_section(whep_answer)
            first_pt = video.split("\r\n", 1)[0].split()[3]
            assert re.search(rf"a=rtpmap:{first_pt} H264/90000", video), video
            audio = whep_answer.split("m=audio", 1)[1]
            assert "opus/48000" in audio.lower() and ("a=sendonly" in audio or "a=sendrecv" in audio)
            # 4. A second publisher is refused (503) and the console says why.
            pub2, offer2 = await obs_like_offer()
            async with http.post(f"{url}/whip/other", data=offer2, headers={**SDP, **auth()}) as r:
                assert r.status == 503
            async with http.delete(f"{url}{location}", headers=auth()) as r:
                assert r.status == 200
        for pc in (pub, pub2, view):
            await pc.close()


def test_simulcast_whep_and_the_console_lines():
    logging.getLogger().setLevel(logging.WARNING)  # as without -v
    out = io.StringIO()
    handler = enable_event_log(out)
    try:
        asyncio.run(_obs())
    finally:
        events.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert any(re.search(r"session \w+ \(whip, key cam\) started, admitted .* expect about [\d.]+ fps", l) for l in lines), lines
    refused = [l for l in lines if "refused whip session" in l]
    # every refusal once on the console, with the reason the client got (found by a probe: only
    # the session manager's refusals were printed, not the SDP, codec, content-type or token ones)
    assert sum("(stream key other)" in l and "--max-sessions" in l for l in refused) == 1, lines
    assert sum("(stream key cam): 400" in l and "Total Layers" in l for l in refused) == 1, lines
    assert sum("(stream key cam): 415 Content-Type must be application/sdp" in l for l in refused) == 1, lines
    assert sum("(stream key cam): 401" in l for l in refused) == 1, lines
    assert sum("(stream key -): 404 no stream key in the URL" in l for l in refused) == 1, lines
    assert len(refused) == 5, refused
    assert any(re.search(r"session \w+ \(whip, key \w+\) ended after \d+ s.*: WHIP DELETE", l) for l in lines), lines
    assert any(re.search(r"session \w+ \(whep, key \w+\) ended", l) for l in lines), lines


def test_simulcast_layers_are_the_rids_sent_and_the_answer_takes_them_on_the_video_section():
    """Only `a=rid:X send` lines are layers the publisher sends (rids it would receive are not,
    or a one-layer offer reads as two and is refused naming Total Layers); and the answer accepts
    the layer on the video section even when video is the offer's last section, as OBS orders
    them (a review)."""
    offer = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rid:h recv\r\na=rid:l recv\r\na=rid:q send\r\n"
    assert simulcast_rids(offer) == ["q"]
    answer_sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n"
    lines = answer_simulcast(answer_sdp, ["q"]).split("\r\n")
    video = lines.index("m=video 9 UDP/TLS/RTP/SAVPF 96")
    assert "a=rid:q recv" in lines[video:] and "a=simulcast:recv q" in lines[video:], lines
    assert "a=rid:q recv" not in lines[:video], lines


def test_obs_docs_match_what_obs_does():
    text = DOCS.read_text()
    assert "discard the body" in text and "OBS log" in text and "server console" in text
    assert "OBS does not read `Retry-After`" in text
    assert "may retry" not in text  # the old claim that OBS honours Retry-After
    assert "**Total Layers**" in text and "**1**" in text
