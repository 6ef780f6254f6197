"""Offers answered whose peers never connect (a tab closed while connecting, blocked UDP, a client
that posts offers and leaves) give their place to a newcomer that would be refused, once they
have not connected for `replace_pending_after_s`. Found by a probe: one such offer at 4 denoise
steps kept every other user out for the 30 s connect timeout (the engine's admission protects
the step it was promised), and `max_sessions` of them the whole server."""

from __future__ import annotations

import asyncio

import aiohttp

from gateway_helpers import answer, auth, obs_like_offer, running_server, sessions_of, until

from streamdiff.scheduler.types import Admission
from streamdiff.server.http import ENGINE_KEY

SDP = {"Content-Type": "application/sdp"}


async def _post(http, url, key):
    pc, offer = await obs_like_offer()
    async with http.post(f"{url}/whip/{key}", data=offer, headers={**SDP, **auth()}) as resp:
        return pc, resp.status, await resp.text(), resp.headers


def _age(sessions, seconds: float) -> None:
    """Sessions made `seconds` earlier than they were (a wait without waiting: a flake hunt saw a
    loaded machine take 0.57 s over one offer, so a 0.5 s rule judged the 'too soon' one late)."""
    for session in sessions.sessions.values():
        session.created_s -= seconds


async def _limit_replaced():
    async with running_server(max_sessions=1, replace_pending_after_s=30) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            gone, first, _, _ = await _post(http, url, "gone")
            await gone.close()  # never applies its answer: never connects
            early, second, text, _ = await _post(http, url, "user")  # too soon: it may still connect
            await early.close()
            _age(sessions, 31)
            user, third, _, _ = await _post(http, url, "user")
        ended = [why for kind, key, why in sessions.ended.values() if key == "gone"]
        streams = (await app[ENGINE_KEY].stats())["streams"]
        await user.close()
    return first, second, text, third, ended, streams


def test_an_offer_that_never_connected_gives_its_place_to_a_newcomer():
    first, second, text, third, ended, streams = asyncio.run(_limit_replaced())
    assert (first, second, third) == (201, 503, 201)
    assert "gives its place to a new one" in text, text
    assert ended and "took its place" in ended[0], ended
    assert streams == 1  # the replaced offer's engine stream was given back


def refuse_beside_another(engine):
    """The engine admits one stream alone (as the demo on a CPU does a 4-step stream: the
    next would slow it below what it was promised)."""
    real = engine.add_stream

    async def add_stream(stream_id, *args, **kwargs):
        if (await engine.stats())["streams"]:
            return Admission(stream_id, False, "another stream would slow down")
        return await real(stream_id, *args, **kwargs)

    engine.add_stream = add_stream


async def _admission_replaced():
    async with running_server(max_sessions=4, replace_pending_after_s=30) as (url, app):
        refuse_beside_another(app[ENGINE_KEY])
        async with aiohttp.ClientSession() as http:
            gone, first, _, _ = await _post(http, url, "gone")
            await gone.close()
            early, second, _, _ = await _post(http, url, "user")
            await early.close()
            _age(sessions_of(app), 31)
            user, third, _, _ = await _post(http, url, "user")
        keys = [s.stream_key for s in sessions_of(app).sessions.values()]
        await user.close()
    return first, second, third, keys


def test_an_offer_that_never_connected_gives_its_engine_stream_to_a_newcomer():
    first, second, third, keys = asyncio.run(_admission_replaced())
    assert (first, second, third) == (201, 503, 201)
    assert keys == ["user"]


async def _connected_kept():
    async with running_server(max_sessions=1, replace_pending_after_s=0.2) as (url, app):
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pub, first, sdp, _ = await _post(http, url, "live")
            await answer(pub, sdp)
            await until(lambda: any(s.connected_s for s in sessions.sessions.values()), "the publisher connects")
            await asyncio.sleep(0.3)
            other, second, _, _ = await _post(http, url, "other")
            await other.close()
        keys = [s.stream_key for s in sessions.sessions.values()]
        await pub.close()
    return first, second, keys


def test_a_connected_stream_keeps_its_place():
    first, second, keys = asyncio.run(_connected_kept())
    assert (first, second) == (201, 503)
    assert keys == ["live"]


async def _two_pending():
    settings = {"max_streams": 4, "max_sessions": 2, "replace_pending_after_s": 5, "connect_timeout_s": 60}
    async with running_server(**settings) as (_, app):
        sessions = sessions_of(app)
        old = await sessions.open("whip", "old")
        young = await sessions.open("whip", "young")
        old.created_s -= 20
        young.created_s -= 10  # both past the rule, neither connected nor timed out
        new = await sessions.open("whip", "new")
        keys = sorted(s.stream_key for s in sessions.sessions.values())
        for session in (old, young, new):
            await sessions.close(session.id)
    return keys


def test_the_oldest_offer_that_never_connected_gives_its_place_first():
    """Of two offers that never connected, the one waiting longest gives its place to a newcomer:
    it is the likeliest to be abandoned, and the younger may still connect (a review)."""
    assert asyncio.run(_two_pending()) == ["new", "young"]
