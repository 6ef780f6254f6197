"""A live change the engine's admission refuses (more denoise steps than the other streams'
promises allow) is one console line with the reason, as a refused offer is. Found by a probe:
`steps=3 refused` reached the client only, so an operator saw nothing. Like a refused offer it is
a 503 with Retry-After while other streams hold the room (a probe: a 400 told the client its value
was bad), a 400 when no retry can help."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from gateway_helpers import auth, obs_like_offer, running_server

from streamdiff.engine import AdmissionRefused
from streamdiff.server.http import ENGINE_KEY


async def _refused_change():
    async with running_server() as (url, app):
        engine = app[ENGINE_KEY]

        lasting = False

        async def update_params(stream_id, **changes):
            raise AdmissionRefused(f"steps=3 refused for this stream: stream '{stream_id}' would slow down",
                                   lasting=lasting)

        engine.update_params = update_params
        said = {}
        async with aiohttp.ClientSession() as http:
            pc, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/cam", data=offer,
                                 headers={"Content-Type": "application/sdp", **auth()}) as resp:
                assert resp.status == 201
            async with http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as ws:
                for lasting in (False, True):
                    async with http.patch(f"{url}/sessions/cam/params", json={"steps": 3}, headers=auth()) as resp:
                        said[lasting] = (resp.status, await resp.json(), resp.headers.get("Retry-After"))
                    await ws.send_json({"type": "params", "steps": 3})
                    async for msg in ws:
                        if (reply := msg.json())["type"] == "error":
                            said[lasting, "ws"] = reply
                            break
        await pc.close()
    return said


def test_a_refused_change_is_logged_with_its_reason(caplog):
    with caplog.at_level(logging.INFO, logger="streamdiff.events"):
        said = asyncio.run(_refused_change())
    status, body, retry = said[False]
    assert status == 503 and retry == "10" and "this stream would slow down" in body["error"], said[False]
    assert said[False, "ws"]["retry_after_s"] == 10 and "would slow down" in said[False, "ws"]["error"]
    status, body, retry = said[True]  # more steps than the pool has lanes: no retry helps
    assert status == 400 and retry is None and "would slow down" in body["error"], said[True]
    assert "retry_after_s" not in said[True, "ws"], said[True, "ws"]
    lines = [r.getMessage() for r in caplog.records if r.name == "streamdiff.events"]
    assert any(line.startswith("refused a change of session") and "key cam" in line and "steps=3 refused" in line
               for line in lines), lines
