"""A live change the engine's admission refuses (more denoise steps than the other streams'
promises allow) is one console line with the reason, as a refused offer is. Found by a probe:
`steps=3 refused` reached the client only, so an operator saw nothing."""

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

        async def update_params(stream_id, **changes):
            raise AdmissionRefused(f"steps=3 refused for this stream: stream '{stream_id}' would slow down")

        engine.update_params = update_params
        async with aiohttp.ClientSession() as http:
            pc, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/cam", data=offer,
                                 headers={"Content-Type": "application/sdp", **auth()}) as resp:
                assert resp.status == 201
            async with http.patch(f"{url}/sessions/cam/params", json={"steps": 3}, headers=auth()) as resp:
                status, body = resp.status, await resp.json()
        await pc.close()
    return status, body


def test_a_refused_change_is_logged_with_its_reason(caplog):
    with caplog.at_level(logging.INFO, logger="streamdiff.events"):
        status, body = asyncio.run(_refused_change())
    assert status == 400 and "this stream would slow down" in body["error"], body
    lines = [r.getMessage() for r in caplog.records if r.name == "streamdiff.events"]
    assert any(line.startswith("refused a change of session") and "key cam" in line and "steps=3 refused" in line
               for line in lines), lines
