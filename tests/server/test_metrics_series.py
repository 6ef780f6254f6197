"""/metrics as a Prometheus server reads it: a re-measure of the idle engine (after a refused
stream) is not shown (its counters started afresh, so every counter went back to 0 and then
jumped back, and a `__warmup__` stream appeared), and a page's stream carries its key."""

import asyncio

import aiohttp
from aiortc import RTCPeerConnection
from prometheus_client.parser import text_string_to_metric_families

from gateway_helpers import SyntheticVideo, answer, auth, running_server, sessions_of, until
from streamdiff.engine.core import WARMUP_STREAM
from streamdiff.server.app import ENGINE_KEY
from streamdiff.server.prom import exposition


def _samples(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


async def _remeasure_not_shown():
    async with running_server() as (url, app):
        engine, sessions = app[ENGINE_KEY], sessions_of(app)
        assert await engine.add_stream("s1", "a cat")
        await engine.remove_stream("s1")
        before = _samples(exposition(engine, sessions))
        assert before[("streamdiff_streams_removed_total", ())] == 1
        core, during = engine._core, []
        measure, step = core.measure, core.step

        def recording_step(*args, **kwargs):  # the dummy stream's steps: scrape meanwhile
            report = step(*args, **kwargs)
            during.append(_samples(exposition(engine, sessions)))
            return report

        def recording_measure(*args, **kwargs):
            core.step = recording_step
            try:
                return measure(*args, **kwargs)
            finally:
                core.step = step

        core.measure = recording_measure
        core.wants_measure = True  # as a refused stream asks
        await engine.stats()  # wakes the loop: idle, so it re-measures
        await until(lambda: not core.wants_measure and during, "the re-measure ran")
        for seen in during:
            for key, value in before.items():  # counters and histograms: unchanged, never back
                assert seen.get(key) == value, (key, value, seen.get(key))
            assert not any(dict(labels).get("stream") == WARMUP_STREAM for _, labels in seen)
        assert _samples(exposition(engine, sessions)) == before


def test_a_remeasure_of_the_idle_engine_is_not_shown_in_metrics():
    asyncio.run(_remeasure_not_shown())


async def _page_key_label():
    async with running_server() as (url, app):
        engine, sessions = app[ENGINE_KEY], sessions_of(app)
        async with aiohttp.ClientSession() as http:
            pcs, ids = [], {}
            for key in ("page-0123456789abcdef", None):
                pc = RTCPeerConnection()
                pc.addTrack(SyntheticVideo())
                await pc.setLocalDescription(await pc.createOffer())
                body = {"sdp": pc.localDescription.sdp, "type": "offer", **({"key": key} if key else {})}
                async with http.post(f"{url}/offer", json=body, headers=auth()) as r:
                    assert r.status == 200, await r.text()
                    reply = await r.json()
                await answer(pc, reply["sdp"])
                pcs.append(pc)
                ids[reply["session"]] = key or ""
            labels = {dict(lab)["stream"]: dict(lab)["key"] for name, lab in _samples(exposition(engine, sessions))
                      if name == "streamdiff_stream_frames_in"}
            assert labels == ids
            for pc in pcs:
                await pc.close()


def test_a_page_stream_is_labelled_with_its_key():
    asyncio.run(_page_key_label())
