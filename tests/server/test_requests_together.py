"""Requests that arrive together (found by a fuzzing client): the session limit and a stream key's
single publisher hold while the engine's admission is awaited, and a request cancelled during
its admission leaves no engine stream behind."""

from __future__ import annotations

import asyncio

import aiohttp
from aiortc import RTCPeerConnection

from gateway_helpers import SyntheticVideo, auth, obs_like_offer, running_server, sessions_of, tiny_config

from streamdiff.server.http import ENGINE_KEY

SDP = {"Content-Type": "application/sdp"}


def slow_admission(engine, wait_s: float = 0.5, *, after: bool = False):
    """Make the engine's admission take `wait_s` (before it, or after the engine admitted), so
    that requests sent together are all in flight while one of them is being admitted."""
    real = engine.add_stream

    async def add_stream(*args, **kwargs):
        if not after:
            await asyncio.sleep(wait_s)
        admission = await real(*args, **kwargs)
        if after:
            await asyncio.sleep(wait_s)
        return admission

    engine.add_stream = add_stream


async def _browser_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTrack(SyntheticVideo())
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def _offers_together():
    async with running_server(max_streams=4, max_sessions=2) as (url, app):
        slow_admission(app[ENGINE_KEY])
        peers = [await _browser_offer() for _ in range(4)]
        async with aiohttp.ClientSession() as http:
            async def post(sdp):
                async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer"}, headers=auth()) as r:
                    return r.status, await r.text()

            replies = await asyncio.gather(*(post(sdp) for _, sdp in peers))
            streams = sessions_of(app).stream_count
            engine_streams = (await app[ENGINE_KEY].stats())["streams"]
        for pc, _ in peers:
            await pc.close()
    return replies, streams, engine_streams


def test_offers_sent_together_do_not_pass_the_session_limit():
    replies, streams, engine_streams = asyncio.run(_offers_together())
    statuses = sorted(status for status, _ in replies)
    assert statuses == [200, 200, 503, 503], replies
    assert all("--max-sessions" in text for status, text in replies if status == 503), replies
    assert streams == 2 and engine_streams == 2


async def _one_key_twice():
    async with running_server(max_streams=4) as (url, app):
        slow_admission(app[ENGINE_KEY])
        (pub1, offer1), (pub2, offer2) = await obs_like_offer(), await obs_like_offer()
        async with aiohttp.ClientSession() as http:
            async def post(sdp):
                async with http.post(f"{url}/whip/cam", data=sdp, headers={**SDP, **auth()}) as r:
                    return r.status, await r.text()

            replies = await asyncio.gather(post(offer1), post(offer2))
            publishers = [s for s in sessions_of(app).sessions.values() if s.kind == "whip"]
        await pub1.close()
        await pub2.close()
    return replies, publishers


def test_one_stream_key_published_twice_at_once_gets_one_publisher():
    replies, publishers = asyncio.run(_one_key_twice())
    assert sorted(status for status, _ in replies) == [201, 409], replies
    assert any("'cam' is already being published" in text for status, text in replies if status == 409), replies
    assert len(publishers) == 1


async def _cancelled_admission():
    async with running_server(max_streams=2) as (url, app):
        engine, sessions = app[ENGINE_KEY], sessions_of(app)
        slow_admission(engine, 1.0, after=True)
        opening = asyncio.create_task(sessions.open("browser", None, "a fox"))
        for _ in range(200):  # until the engine has admitted it (its admission then waits 1 s)
            if (await engine.stats())["streams"] == 1:
                break
            await asyncio.sleep(0.02)
        assert sessions.stream_count == 1  # counted while it is admitted
        opening.cancel()
        try:
            await opening
        except asyncio.CancelledError:
            pass
        for _ in range(200):
            if (await engine.stats())["streams"] == 0:
                break
            await asyncio.sleep(0.02)
        return (await engine.stats())["streams"], sessions.stream_count, dict(sessions.sessions)


def test_a_request_cancelled_during_its_admission_leaves_no_engine_stream():
    engine_streams, counted, sessions = asyncio.run(_cancelled_admission())
    assert (engine_streams, counted, sessions) == (0, 0, {})


async def _params_burst():
    async with running_server(max_streams=2) as (url, app):
        engine = app[ENGINE_KEY]
        real, applied = engine.update_params, []

        async def slow_update(stream_id, **changes):  # a CPU step between two changes
            await asyncio.sleep(0.3)
            applied.append(changes)
            return await real(stream_id, **changes)

        engine.update_params = slow_update
        real_params = engine.params

        async def slow_params(stream_id):  # every engine call waits for a step to end
            await asyncio.sleep(0.3)
            return await real_params(stream_id)

        engine.params = slow_params
        session = await sessions_of(app).open("browser", None, "a fox")
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{url}/ws?session={session.id}", headers=auth()) as ws:
                for seed in range(20):
                    await ws.send_json({"type": "params", "seed": seed})
                await ws.send_json({"type": "ping"})
                replies = []
                while len(replies) < 13 or not any(r["type"] == "params" for r in replies):
                    msg = await ws.receive_json(timeout=30)
                    if msg["type"] != "stats":
                        replies.append(msg)
                # gone with most of the burst still waiting
            for _ in range(20):
                await asyncio.sleep(0.3)
            return replies, len(applied)


def test_a_burst_of_params_is_bounded_and_a_closed_socket_drops_what_waits():
    """Found by a fuzzing client: every params message waited on the engine in the socket's
    receive loop, so 150 quick changes took minutes, a ping behind them waited as long, and
    closing the socket did not stop them. A control probe: the refusals of a burst still asked
    the engine for the params in use, one step each, and a ping behind 40 waited 26 s."""
    replies, applied = asyncio.run(_params_burst())
    kinds = [r["type"] for r in replies]
    refused = [r for r in replies if r["type"] == "error"]
    assert "pong" in kinds and kinds.index("pong") < kinds.index("params"), kinds  # the ping did not wait
    assert len(refused) >= 20 - 8 - 1 and all("already waiting" in r["error"] for r in refused), refused
    params = [r for r in replies if r["type"] == "params"]
    assert params[0]["params"]["seed"] == 0  # applied in order
    assert applied <= 2 + 1, applied  # the rest was dropped with the socket (2: applied or started before it closed)


async def _offer_while_the_last_stream_closes():
    async with running_server(max_streams=1) as (url, app):
        sessions = sessions_of(app)
        first = await sessions.open("browser", None, "a fox")
        # The ending session's input reader takes its time to stop (a slow peer) while a new
        # user's offer comes in.
        let_go = asyncio.Event()

        class SlowReader:
            @staticmethod
            async def close():
                await let_go.wait()

        assert first.reader is None  # no peer yet: this stand-in is its reader
        first.reader = SlowReader()
        closing = asyncio.ensure_future(sessions.close(first.id, "the user left"))
        await asyncio.sleep(0)
        pc, sdp = await _browser_offer()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer"}, headers=auth()) as r:
                status, body = r.status, await r.text()
        let_go.set()
        await closing
        await pc.close()
        return status, body


def test_an_offer_is_not_refused_for_a_stream_that_is_ending():
    """Found by a probe: a session left the list at once but told the engine only after its
    reader, tasks and fan-out had stopped, so an offer in between met a full engine and was
    refused naming the stream that had just ended."""
    status, body = asyncio.run(_offer_while_the_last_stream_closes())
    assert status == 200, body


async def _more_steps_than_the_pool_holds():
    from streamdiff.config import with_overrides

    config = with_overrides(tiny_config(), cache={"pool_lanes": 3})
    async with running_server(config=config) as (url, app):
        pc, sdp = await _browser_offer()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer", "steps": 4},
                                 headers=auth()) as r:
                said = (r.status, (await r.json())["error"], "Retry-After" in r.headers)
        await pc.close()
        return said, len(sessions_of(app).sessions)


def test_more_steps_than_the_kv_pool_holds_is_a_400_that_says_what_fits():
    """An admission probe: on an empty server it was 503 "KV pool full" with Retry-After."""
    (status, error, retry), sessions = asyncio.run(_more_steps_than_the_pool_holds())
    assert status == 400 and not retry and sessions == 0, (status, error, retry)
    assert "at most 3 steps fit" in error and "full" not in error, error
