"""Headless Chromium (Debian's `chromium`, driven by Playwright through its executable path) with
a fake camera, against the plain `make run` configuration (the demo preset at its own size and
service level, no SLO flags), warmed up while other processes load every CPU:

- the first user is admitted, the output <video> shows decoded, non-blank frames and the status
  line clears once they play; a refused second user sees a countdown and is retried
  automatically; Stop resets the overlay; a tab that crashes frees its stream within seconds;
- viewer.html says "waiting for stream KEY…" until it plays, and reconnects on its own; the main
  page of a random-weight (tiny) server says its picture is noise.
Screenshots go to artifacts/. `.ci/run` installs chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from gateway_helpers import TOKEN, answer, obs_like_offer, running_server, sessions_of, tiny_config

from streamdiff.config import load_config, with_overrides
from streamdiff.server.http import ENGINE_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

# Pixel statistics of a <video>, drawn onto a canvas in the page.
VIDEO_STATS_JS = """(id) => {
  const v = document.getElementById(id);
  if (!v || v.videoWidth === 0 || v.readyState < 2) return null;
  const c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext("2d");
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let n = 0, sum = 0, sq = 0;
  for (let i = 0; i < d.length; i += 4) { const y = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += y; sq += y * y; n++; }
  const mean = sum / n;
  return { width: c.width, height: c.height, mean, std: Math.sqrt(sq / n - mean * mean), time: v.currentTime };
}"""
# The page's stream-parameter fields, as the user sees them.
FIELDS_JS = """() => ({ steps: Number(document.getElementById("steps").value),
  noise: Number(document.getElementById("noise").value), seed: Number(document.getElementById("seed").value),
  motion: document.getElementById("motion").checked })"""
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required"]


async def _until(check, timeout_s: float, every_s: float = 0.1):
    """Poll `check()` (async) until it returns something truthy; the last value otherwise."""
    value = None
    for _ in range(int(timeout_s / every_s)):
        value = await check()
        if value:
            return value
        await asyncio.sleep(every_s)
    return value


@contextlib.contextmanager
def cpu_load():
    """Keep every CPU busy (the warm-up of a `make run` on a machine doing other work)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in burners:
            p.kill()
            p.wait()


async def _browser(pw):
    return await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)


async def _make_run_flow() -> dict:
    from playwright.async_api import async_playwright

    cfg = load_config("demo")  # exactly what `make run` serves
    out: dict = {}
    with cpu_load():
        # a crashed tab's stream is freed 1 s after its control socket drops (3 s by default: the
        # wait is the server's setting, the freeing is what is checked)
        server = running_server(token=None, config=cfg, target_fps=None, deadline_ms=None, output_fps=None,
                                max_sessions=1, retry_after_s=2, control_grace_s=1.0)
        url, app = await server.__aenter__()  # warms up under load
    try:
        sessions = sessions_of(app)
        async with async_playwright() as pw:
            browser = await _browser(pw)
            try:
                # 1. The first user is admitted and sees frames; the status line clears.
                one = await browser.new_page()
                await one.goto(url + "/")
                await one.wait_for_load_state("networkidle")  # the page has read /healthz's defaults
                out["fields"] = await one.evaluate(FIELDS_JS)
                out["about"] = await one.inner_text("#about")
                await one.click("#start")
                stats = await _until(lambda: _playing(one, "output"), 180)
                # the overlay says "–" until it has a rate, then the received frame rate
                out["overlay_playing"] = await _until(lambda: _overlay_rate(one), 30)
                out["preview_box"] = await one.evaluate(
                    "() => [...document.querySelectorAll('#local, #output')].map(v => v.getBoundingClientRect())"
                    ".map(r => [r.width, r.height])")
                ARTIFACTS.mkdir(exist_ok=True)
                await one.screenshot(path=str(ARTIFACTS / "browser.png"))
                out["stats"], out["message"] = stats, await one.inner_text("#message")
                out["means_first"] = await one.inner_text("#means")
                out["first_message"] = out["message"] if stats else await one.inner_text("#message")
                first_id = next(iter(sessions.sessions), None)
                first_key = sessions.sessions[first_id].stream_key if first_id else None  # the tab's own key
                out["watch"] = (await one.is_visible("#watch"), await one.get_attribute("#watch", "href"), first_key)
                out["first_params"] = await sessions.engine.params(first_id) if first_id else None
                # A prompt the demo does not know: the page says what the model makes of it.
                await one.fill("#prompt", "a claymation world")
                await one.click("#apply")
                out["means_free"] = await _until(lambda: _text_with(one, "#means", "claymation"), 30)
                # Noise far from what the demo learnt: the applied line says what to expect.
                await one.fill("#noise", "0.8")
                await one.click("#apply")
                out["outside"] = await _until(lambda: _message_with(one, "trained for noise about 0.2"), 30)
                # 2. A second user is refused (one stream at a time here), with a countdown.
                two = await browser.new_page()
                await two.goto(url + "/")
                await two.click("#start")
                out["countdown"] = await _until(lambda: _message_with(two, "Retrying in"), 60)
                out["busy_preview"] = await two.evaluate("() => document.getElementById('local').style.aspectRatio")
                await two.screenshot(path=str(ARTIFACTS / "browser-refused.png"))
                # 3. The first user stops: overlay reset, and the second is admitted by itself. A
                # frame-rate reading still awaited when Stop is pressed must not write the overlay
                # again (a CI run saw "15.0 fps · latency –" after Stop): its reading is held back
                # until after the click.
                await one.evaluate(SLOW_STATS_JS)
                out["stats_held"] = await _until(lambda: one.evaluate("() => window.statsHeld > 0"), 5, 0.05)
                await one.click("#stop")
                await one.evaluate("() => window.releaseStats()")
                await asyncio.sleep(0.3)
                out["overlay_after_stop"] = await one.inner_text("#overlay")
                out["watch_after_stop"] = await one.is_visible("#watch")
                out["second_admitted"] = await _until(
                    lambda: _async(lambda: any(sid != first_id for sid in sessions.sessions)), 60)
                out["second_stats"] = await _until(lambda: _playing(two, "output"), 180)
                # 4. The second tab crashes: its stream is freed within seconds.
                with contextlib.suppress(Exception):
                    await two.goto("chrome://crash", timeout=5000)
                out["freed_after_crash"] = await _until(lambda: _async(lambda: not sessions.sessions), 15)
            finally:
                await browser.close()
    finally:
        await server.__aexit__(None, None, None)
    return out


# The page's next getStats() answers only once released: a reading that is on its way when the
# user presses Stop.
SLOW_STATS_JS = """() => {
  const real = RTCPeerConnection.prototype.getStats;
  const held = [];
  window.statsHeld = 0;
  window.releaseStats = () => { RTCPeerConnection.prototype.getStats = real; held.forEach((go) => go()); };
  RTCPeerConnection.prototype.getStats = function (...args) {
    const answer = real.apply(this, args);
    window.statsHeld += 1;
    return new Promise((resolve) => held.push(() => resolve(answer)));
  };
}"""


async def _async(fn):
    return fn()


async def _playing(page, video_id: str):
    stats = await page.evaluate(VIDEO_STATS_JS, video_id)
    return stats if stats and stats["time"] > 0.5 else None


async def _overlay_rate(page):
    text = await page.inner_text("#overlay")
    rate = text.split(" fps")[0]
    return text if " fps" in text and rate.replace(".", "", 1).isdigit() and float(rate) > 0 else None


async def _text_with(page, selector: str, text: str):
    said = await page.inner_text(selector)
    return said if text in said else None


async def _message_with(page, text: str):
    message = await page.inner_text("#message")
    return message if text in message else None


def test_make_run_page_admits_under_load_retries_refused_users_and_frees_crashed_tabs():
    out = asyncio.run(_make_run_flow())
    stats = out["stats"]
    assert stats is not None, f"no output video; page said: {out['first_message']!r}"
    assert (stats["width"], stats["height"]) == (256, 256)  # the preset's frame size
    assert stats["std"] > 5.0, stats  # a picture, not a blank or constant frame
    assert out["message"] == ""  # the status line cleared when frames arrived
    assert out["overlay_playing"], "the overlay never showed a frame rate above 0"
    (lw, lh), (ow, oh) = out["preview_box"]  # the camera preview is cropped to the output's shape
    assert lh > 0 and abs(lw / lh - ow / oh) < 0.02, out["preview_box"]
    assert out["countdown"] and "busy" in out["countdown"], out
    # while busy, the camera preview is already cropped to the model's frame (a page probe: 4:3
    # until output played)
    assert out["busy_preview"] == "256 / 256", out["busy_preview"]
    assert out["stats_held"], out  # a reading was held back over the Stop (else the next line checks no race)
    assert out["overlay_after_stop"] == ""  # hidden while nothing streams
    assert out["second_admitted"] and out["second_stats"] is not None, out
    assert out["freed_after_crash"], "a crashed tab kept its stream"
    assert "the demo" in out["about"] and "noise" not in out["about"], out["about"]  # what make run serves
    assert out["means_first"] == "style: starry night", out["means_first"]  # the page's first prompt
    assert out["means_free"] and "as: a photo" in out["means_free"], out["means_free"]
    visible, href, first_key = out["watch"]  # the page links a viewer of its own output, by the tab's key
    assert visible and first_key.startswith("page-") and href == f"viewer.html?key={first_key}", out["watch"]
    assert not out["watch_after_stop"], out["watch"]
    assert out["outside"] and "noise 0.8" in out["outside"] and "expect mostly noise" in out["outside"], out["outside"]
    # The page shows the preset's stream parameters and, untouched, the stream gets them (it sent
    # its own 0.3 and motion-aware noise to every preset before).
    s = load_config("demo").sampling
    preset = {"steps": s.steps, "noise": s.noise_strength, "seed": s.seed, "motion": s.motion_aware}
    assert out["fields"] == preset, out["fields"]
    p = out["first_params"]
    assert p is not None and (p.steps, p.noise_strength, p.seed, p.motion_aware) == tuple(preset.values()), p


async def _viewer_flow() -> dict:
    from playwright.async_api import async_playwright

    out: dict = {}
    async with running_server(token=None, max_viewers=1, player_timeout_s=2.0) as (url, app), \
            aiohttp.ClientSession() as http, async_playwright() as pw:
        browser = await _browser(pw)
        try:
            # The main page of a server with random weights (tiny) says its picture is noise.
            main = await browser.new_page()
            await main.goto(url + "/")
            await main.wait_for_load_state("networkidle")
            out["about"] = await main.inner_text("#about")
            await main.close()
            # A key the server can never play: the viewer says why instead of waiting for it.
            bad = await browser.new_page()
            await bad.goto(url + "/viewer.html?key=bad%20key!")
            out["bad_key"] = await _until(lambda: _text_with(bad, "#status", "refused"), 30)
            await bad.close()
            page = await browser.new_page()
            await page.goto(url + "/viewer.html?key=cam")
            out["before"] = await page.inner_text("#status")

            async def publish():
                pub, offer = await obs_like_offer()
                async with http.post(f"{url}/whip/cam", data=offer, headers={"Content-Type": "application/sdp"}) as r:
                    assert r.status == 201, await r.text()
                    await answer(pub, await r.text())
                    return pub, r.headers["Location"]

            pub, location = await publish()
            out["playing"] = await _until(lambda: _playing(page, "v"), 120)
            out["status_hidden"] = await page.is_hidden("#status")
            # Chromium's RTCP reports keep its player alive past player_timeout_s (2 s here): twice
            # that, with the server's check (at most 1 s apart) run several times meanwhile.
            sessions = sessions_of(app)
            watching = [s.id for s in sessions.sessions.values() if s.kind == "whep"]
            await asyncio.sleep(4.0)
            player = sessions.sessions.get(watching[0]) if len(watching) == 1 else None
            heard_recently = player is not None and player.rtcp_s is not None and time.monotonic() - player.rtcp_s < 2.0
            out["kept"] = (heard_recently, sessions.why_ended(watching[0]) if watching else None)
            await page.screenshot(path=str(ARTIFACTS / "viewer.png"))
            # One viewer at most here: a second one says the server is full, not "waiting for stream".
            second = await browser.new_page()
            await second.goto(url + "/viewer.html?key=cam")
            out["second_viewer"] = await _until(lambda: _text_with(second, "#status", "busy"), 30)
            await second.close()
            async with http.delete(f"{url}{location}") as r:
                assert r.status == 200
            await pub.close()
            out["waiting_again"] = await _until(
                lambda: _async_page_text(page, "#status", "waiting for stream cam"), 30)
            pub, location = await publish()
            out["replaying"] = await _until(lambda: _visible_and_playing(page), 120)
            # An attempt given up while its answer was being applied (the stall check's retry after
            # 8 s without a frame, called here at once) fails late on its closed peer: the newer,
            # playing one goes on (it was torn down and a third one made: a page probe).
            await page.close(run_before_unload=True)
            await _until(lambda: _async(lambda: not any(s.kind == "whep" for s in sessions.sessions.values())), 10, 0.1)
            late = await browser.new_page()
            await late.add_init_script(HOLD_FIRST_ANSWER_JS)
            await late.goto(url + "/viewer.html?key=cam")
            await _until(lambda: late.evaluate("() => window.answers >= 1"), 30, 0.1)
            await late.evaluate("() => retry(100)")
            out["second_attempt"] = await _until(lambda: _visible_and_playing(late), 60)
            await late.evaluate("() => window.releaseAnswer()")
            await late.wait_for_timeout(1000)
            out["after_late_failure"] = (bool(await _visible_and_playing(late)),
                                         await late.evaluate("() => window.deletes"),
                                         sum(s.kind == "whep" for s in sessions.sessions.values()))
            await pub.close()
        finally:
            await browser.close()
    return out


# The first answer a viewer gets is applied only once released (a busy device); DELETEs are counted.
HOLD_FIRST_ANSWER_JS = """(() => {
  const real = RTCPeerConnection.prototype.setRemoteDescription;
  window.answers = 0; window.deletes = 0;
  RTCPeerConnection.prototype.setRemoteDescription = function (...args) {
    if (++window.answers > 1) return real.apply(this, args);
    return new Promise((ok, no) => { window.releaseAnswer = () => real.apply(this, args).then(ok, no); });
  };
  const realFetch = window.fetch.bind(window);
  window.fetch = (url, opts) => { if (opts && opts.method === "DELETE") window.deletes += 1; return realFetch(url, opts); };
})();"""


async def _whip(http, url: str, publisher) -> object:
    """Publish `publisher` (its peer and offer) on key cam over WHIP; returns the peer."""
    pub, offer = publisher
    async with http.post(f"{url}/whip/cam", data=offer, headers={"Content-Type": "application/sdp"}) as r:
        assert r.status == 201, await r.text()
        await answer(pub, await r.text())
    return pub


def _viewers_seen(sessions) -> int:
    """WHEP sessions made so far, live and ended."""
    return sum(s.kind == "whep" for s in sessions.sessions.values()) + \
        sum(kind == "whep" for kind, _, _ in sessions.ended.values())


async def _viewer_of_a_silent_stream() -> dict:
    """A viewer answered by a publisher that sends nothing (a crashed OBS whose key a new
    publisher is about to take over): its session never plays and its peer stays connected."""
    from playwright.async_api import async_playwright

    from gateway_helpers import Paused, publisher_of

    out: dict = {}
    async with running_server(token=None, input_timeout_s=120.0) as (url, app), aiohttp.ClientSession() as http, \
            async_playwright() as pw:
        sessions = sessions_of(app)
        silent = Paused()
        silent.paused.set()
        pub = await _whip(http, url, await publisher_of(silent))
        browser = await _browser(pw)
        try:
            page = await browser.new_page()
            await page.goto(url + "/viewer.html?key=cam")

            out["first"] = await _until(lambda: _async(lambda: _viewers_seen(sessions) >= 1), 30)
            out["asked_again"] = await _until(lambda: _async(lambda: _viewers_seen(sessions) >= 2), 30)
            out["status"] = await page.inner_text("#status")
        finally:
            await browser.close()
            await pub.close()
    return out


async def _viewer_of_a_slow_stream(step_s: float, watch_s: float) -> dict:
    """A viewer of a stream whose steps take `step_s`: its frames come in bursts that far apart."""
    from playwright.async_api import async_playwright

    from streamdiff.server.app import ENGINE_KEY

    out: dict = {}
    async with running_server(token=None) as (url, app), aiohttp.ClientSession() as http, async_playwright() as pw:
        runner = app[ENGINE_KEY].executor.runner  # slowed once warm (a slow warm-up is not the test)
        runner.extra_ms_per_block = 1000.0 * step_s / runner.cfg.model.num_layers
        sessions = sessions_of(app)
        pub = await _whip(http, url, await obs_like_offer())
        browser = await _browser(pw)
        try:
            page = await browser.new_page()
            await page.goto(url + "/viewer.html?key=cam")
            out["playing"] = await _until(lambda: _playing(page, "v"), 120)
            await asyncio.sleep(watch_s)
            out["viewers"] = _viewers_seen(sessions)
        finally:
            await browser.close()
            await pub.close()
    return out


def test_a_viewer_of_a_slow_stream_learns_its_bursts_instead_of_reconnecting_for_ever():
    """A page probe: a viewer of a stream at 2.5 s a step took each pause between its bursts of
    frames for a stopped stream before it had learnt any gap, and reconnected every 4-7 s (with
    --max-viewers 1 giving its place away each time). After at most one such reconnect it waits."""
    out = asyncio.run(_viewer_of_a_slow_stream(step_s=2.0, watch_s=12.0))
    assert out["playing"], out
    assert 1 <= out["viewers"] <= 2, out  # (0: the count no longer finds the viewer's sessions)


def test_a_viewer_whose_session_never_plays_asks_again():
    """Found by a probe of OBS reconnects: a viewer that re-subscribed to a crashed publisher just
    before a new one took its key waited ~17 s for Chrome's ICE timeout: the stall check skipped
    sessions that had not played yet. Now an answered session gets 8 s for its first frame."""
    out = asyncio.run(_viewer_of_a_silent_stream())
    assert out["first"] and out["asked_again"], out
    assert "waiting for stream cam" in out["status"], out


async def _async_page_text(page, selector: str, text: str):
    return (await page.is_visible(selector)) and text in await page.inner_text(selector)


async def _visible_and_playing(page):
    return await page.is_hidden("#status") and await _playing(page, "v")


def test_viewer_waits_for_the_stream_plays_it_and_reconnects_on_its_own():
    out = asyncio.run(_viewer_flow())
    assert out["kept"][0], out["kept"]  # a browser player reports (RTCP): not taken for a killed one
    assert out["before"] == "waiting for stream cam…"
    assert out["bad_key"] and "(400): a stream key is 1-64 characters" in out["bad_key"], out["bad_key"]
    assert '"tiny"' in out["about"] and "random weights" in out["about"] and "noise" in out["about"], out["about"]
    assert out["playing"] and out["status_hidden"]
    assert out["second_viewer"] and "1 viewer already watching" in out["second_viewer"], out["second_viewer"]
    assert out["waiting_again"], "the viewer did not notice the stream ended"
    assert out["replaying"], "the viewer did not reconnect to the republished stream"
    # the given-up attempt's session was ended by its retry (1 DELETE); the playing one was not
    assert out["second_attempt"] and out["after_late_failure"] == (True, 1, 1), out["after_late_failure"]


# The camera prompt answered after 1.2 s, as a user reading it would; the asks and the answers counted.
SLOW_CAMERA_JS = """(() => {
  const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  window.cameraAsked = 0; window.cameraGiven = 0;
  navigator.mediaDevices.getUserMedia = (c) => { window.cameraAsked += 1;
    return new Promise((ok, no) => setTimeout(
      () => real(c).then((got) => { window.cameraGiven += 1; ok(got); }, no), 1200)); };
})();"""
# Every fetch whose URL path has one of `window.holdFetch`'s strings is sent, and its answer held
# until `window.release(string)`: a request on its way while the user acts. (The page's addresses
# are relative, "offer" and "healthz": the path is matched once resolved against the page.)
HOLD_FETCH_JS = """(() => {
  const real = window.fetch.bind(window);
  window.held = {}; window.heldCount = {};
  window.holdFetch = window.holdFetch || [];
  window.release = (tag) => { (window.held[tag] || []).forEach((go) => go()); window.held[tag] = []; };
  window.fetch = (url, opts) => {
    const path = new URL(url instanceof Request ? url.url : String(url), location.href).pathname;
    const tag = window.holdFetch.find((t) => path.includes(t));
    if (!tag) return real(url, opts);
    const answer = real(url, opts);
    window.heldCount[tag] = (window.heldCount[tag] || 0) + 1;
    return new Promise((ok, no) => { (window.held[tag] = window.held[tag] || []).push(() => answer.then(ok, no)); });
  };
})();"""
# A tab busy elsewhere: its page hears the other tabs' answers about its stream key 1 s late.
SLOW_KEY_ANSWERS_JS = """(() => {
  const d = Object.getOwnPropertyDescriptor(BroadcastChannel.prototype, "onmessage");
  const slowed = (fn) => (ev) => {
    if (!(ev.data && ev.data.held)) return fn(ev);
    window.answersSlowed = (window.answersSlowed || 0) + 1;
    setTimeout(() => fn(ev), 1000);
  };
  Object.defineProperty(BroadcastChannel.prototype, "onmessage", { configurable: true, get() { return d.get.call(this); },
    set(fn) { d.set.call(this, slowed(fn)); } });
})();"""
PAGE_STATE_JS = """() => ({ start: !document.getElementById("start").disabled, stop: !document.getElementById("stop").disabled,
  camera: document.getElementById("local").srcObject !== null, message: document.getElementById("message").innerText })"""


async def _page_follows_its_user_flow() -> dict:
    """Found by a user trying the page: Stop pressed while the camera was still being asked for
    left a hidden stream running (the page said "stopped"); Start, Stop, Start raced on one peer;
    a stream the server ended left the page frozen with Start disabled."""
    from playwright.async_api import async_playwright

    out: dict = {}
    async with running_server(token=None) as (url, app), async_playwright() as pw:
        sessions = sessions_of(app)
        browser = await _browser(pw)
        try:
            context = await browser.new_context()  # a second tab of it below
            page = await context.new_page()
            await page.add_init_script(SLOW_CAMERA_JS + HOLD_FETCH_JS)
            await page.goto(url + "/")
            await page.wait_for_load_state("networkidle")
            # 1. Stop while the camera is being asked for: nothing streams afterwards.
            await page.click("#start")
            await page.wait_for_timeout(300)
            await page.click("#stop")
            out["camera_at_early_stop"] = await page.evaluate("() => [window.cameraAsked, window.cameraGiven]")
            await page.wait_for_timeout(3000)  # the camera arrives at 1.2 s; any offer would follow
            out["after_early_stop"] = (await page.evaluate(PAGE_STATE_JS), len(sessions.sessions))
            # 1b. Stop while the offer's answer is on its way (the server has made the session, its
            #     peer never connects): the session ends with the Stop (it held the tab's key and a
            #     place for 30 s, and Start again waited on a 409).
            await page.evaluate("() => { window.holdFetch = ['/offer']; }")
            await page.click("#start")
            out["offer_held"] = await _until(
                lambda: page.evaluate("() => (window.heldCount['/offer'] || 0) > 0"), 30, 0.1)
            out["made_before_stop"] = await _until(lambda: _async(lambda: len(sessions.sessions)), 30, 0.1)
            await page.click("#stop")
            await page.evaluate("() => { window.holdFetch = []; window.release('/offer'); }")
            out["freed_on_stop"] = await _until(lambda: _async(lambda: not sessions.sessions), 5, 0.1)
            # 2. Start, Stop, Start: one session, streaming.
            await page.click("#start")
            await page.wait_for_timeout(100)
            await page.click("#stop")
            await page.click("#start")
            out["restart_playing"] = await _until(lambda: _playing(page, "output"), 120)
            out["restart_sessions"] = await _until(lambda: _async(lambda: len(sessions.sessions) == 1), 40)
            # 2a. A duplicated tab copies sessionStorage, the stream key with it: it takes a key of
            # its own at once (it waited through three 409s, ~9 s), and keeps that one on a reload.
            key_js = "() => sessionStorage.getItem('streamdiff.key')"
            key = await page.evaluate(key_js)
            # Two copies open at once (the first one slow to hear answers) answer each other: the tab
            # they came from kept streaming on its key but had taken a new one (a page probe).
            copied = f"""if (!sessionStorage.getItem("test.copied")) {{
              sessionStorage.setItem("test.copied", "1"); sessionStorage.setItem("streamdiff.key", {key!r}); }}"""
            dup = await context.new_page()
            await dup.add_init_script(SLOW_KEY_ANSWERS_JS + copied)
            await dup.goto(url + "/")
            dup2 = await context.new_page()
            await dup2.add_init_script(copied)
            await dup2.goto(url + "/")
            dup_key = await _until(lambda: _async_value(dup, key_js, lambda v: v != key), 5)
            dup2_key = await _until(lambda: _async_value(dup2, key_js, lambda v: v != key), 5)
            out["dup_answers_slowed"] = await dup.evaluate("() => window.answersSlowed || 0")
            await dup.reload()
            await dup.wait_for_timeout(500)
            out["duplicate"] = (key, await page.evaluate(key_js), dup_key, await dup.evaluate(key_js),
                                [s.stream_key for s in sessions.sessions.values()], dup2_key)
            await dup.close()
            await dup2.close()
            # 2b. Another controller (`streamdiff control`) changes the stream: the page follows it,
            # a field its user once applied included (its next Apply would have undone the change).
            from streamdiff.client.control import send_params

            await page.fill("#seed", "5")
            await page.click("#apply")
            out["own_seed"] = await _until(lambda: _message_with(page, "seed 5"), 30)
            # (a seed past 2^53, which a page's numbers cannot hold exactly: shown ...992 before)
            await send_params(url, next(iter(sessions.sessions)), {"prompt": "changed elsewhere",
                                                                   "seed": 9007199254740993, "noise": 0.55})
            out["elsewhere"] = await _until(lambda: _async_value(
                page, "() => [document.getElementById('prompt').value, document.getElementById('seed').value, "
                      "document.getElementById('message').textContent]", lambda v: v[0] == "changed elsewhere"), 20)
            # 3. Bad field values are refused on the page, and the stream goes on.
            await page.fill("#seed", "1.5")
            await page.click("#apply")
            out["bad_seed"] = await page.inner_text("#message")
            # 4. The server ends the stream: the page goes back to its start state and says why.
            (session_id,) = list(sessions.sessions)
            await sessions.close(session_id, "test: the server ends it")
            out["after_server_end"] = await _until(
                lambda: _async_state(page, lambda s: s["start"] and "Press Start webcam" in s["message"]), 30)
            # 5. The camera goes (unplugged, permission taken back): said at once, the stream freed.
            await page.fill("#seed", "3")  # step 3 left it invalid: Start would refuse
            await page.click("#start")
            out["streaming_again"] = await _until(lambda: _async(lambda: len(sessions.sessions) == 1), 120)
            # the noise field followed the other controller (0.55); the new stream runs the preset's
            preset_noise = str(app[ENGINE_KEY].cfg.sampling.noise_strength)
            out["noise_after_restart"] = await _until(lambda: _async_value(
                page, "() => document.getElementById('noise').value", lambda v: v == preset_noise), 30)
            # 5a. The camera sends nothing (a frozen device): said after a few seconds, not only
            #     when the server ends the stream for want of video
            out["camera_sent"] = await _until(lambda: _async(lambda: any(
                (s.reader is not None and s.reader.frames_received > 0) for s in sessions.sessions.values())), 60)
            await page.evaluate("() => pc.getSenders().find((s) => s.track && s.track.kind === 'video').replaceTrack(null)")
            out["no_video_said"] = await _until(lambda: _message_with(page, "no video from your camera"), 30)
            await page.evaluate("() => document.getElementById('local').srcObject.getVideoTracks()[0]"
                                ".dispatchEvent(new Event('ended'))")
            out["camera_gone"] = await _until(
                lambda: _async_state(page, lambda s: s["start"] and "Your camera stopped" in s["message"]), 30)
            out["freed_after_camera"] = await _until(lambda: _async(lambda: not sessions.sessions), 30)
            # 6. The page's first /healthz answers after a stream began and another controller
            #    changed it: the fields keep what the stream runs (the preset's values came back).
            late = await context.new_page()
            await late.add_init_script("window.holdFetch = ['/healthz'];" + HOLD_FETCH_JS)
            await late.goto(url + "/")
            out["healthz_held"] = await _until(
                lambda: late.evaluate("() => (window.heldCount['/healthz'] || 0) > 0"), 10, 0.1)
            await late.evaluate("() => { window.holdFetch = []; }")
            await late.click("#start")
            await _until(lambda: late.evaluate("() => ws !== null && ws.readyState === WebSocket.OPEN"), 60, 0.2)
            await send_params(url, next(iter(sessions.sessions)), {"noise": 0.55})
            noise_js = "() => document.getElementById('noise').value"
            await _until(lambda: _async_value(late, noise_js, lambda v: v == "0.55"), 20, 0.2)
            await late.evaluate("() => window.release('/healthz')")
            await late.wait_for_timeout(500)
            out["noise_after_late_defaults"] = await late.evaluate(noise_js)
        finally:
            await browser.close()
    return out


async def _async_state(page, check):
    state = await page.evaluate(PAGE_STATE_JS)
    return state if check(state) else None


def test_the_page_follows_stop_restart_and_a_stream_the_server_ends():
    out = asyncio.run(_page_follows_its_user_flow())
    state, sessions = out["after_early_stop"]
    assert sessions == 0 and state["start"] and not state["stop"] and not state["camera"], out["after_early_stop"]
    assert out["camera_at_early_stop"] == [1, 0], out  # Stop came while the camera was asked for, not after
    assert out["offer_held"], out  # Stop came while the offer's answer was held back, not after it
    assert out["made_before_stop"] == 1 and out["freed_on_stop"], out  # within 5 s, not the server's 30
    assert out["restart_playing"] and out["restart_sessions"], out
    key, key_after, dup_key, dup_key_reloaded, streams, dup2_key = out["duplicate"]
    assert key and key_after == key and streams == [key], out["duplicate"]  # the first tab keeps its key
    assert dup_key and dup_key != key and dup_key_reloaded == dup_key, out["duplicate"]
    assert dup2_key and dup2_key not in (key, dup_key), out["duplicate"]
    assert out["dup_answers_slowed"] > 0, out  # the first copy did hear the answers late
    # a change another controller made shows on the page (it kept showing its own last values)
    assert out["own_seed"] and out["elsewhere"] and out["elsewhere"][1] == "9007199254740993", out
    assert "seed 9007199254740993" in out["elsewhere"][2], out["elsewhere"]
    assert out["elsewhere"][2].startswith('changed by another controller: "changed elsewhere"'), out["elsewhere"]
    assert 'seed "1.5" is not a whole number' in out["bad_seed"], out["bad_seed"]
    # and why, in the server's words
    assert out["after_server_end"] and "The server ended this stream: test: the server ends it" in \
        out["after_server_end"]["message"], out
    # a page probe: a camera unplugged mid-stream froze the picture for 10 s with no word
    assert out["streaming_again"] and out["camera_gone"] and not out["camera_gone"]["camera"], out
    assert out["freed_after_camera"], "the stream outlived its camera"
    # a page probe: after Stop and Start a field showed another controller's value the new stream
    # did not use (the offer sent only the fields its user had changed)
    assert out["noise_after_restart"], out
    # a page probe: a camera that sent nothing showed "0.0 fps" and no word for 10 s
    assert out["camera_sent"] and out["no_video_said"], out  # (a camera that had sent video, then none)
    assert out["healthz_held"], out  # the page's first /healthz answered only after the change
    assert out["noise_after_late_defaults"] == "0.55", out["noise_after_late_defaults"]


async def _what_start_says(word: str, *, token: str | None, host: str | None = None, camera: bool = True,
                           on_load: bool = False):
    """Open the page (as `host`, resolved to this machine, when given: a plain-http address that is
    not localhost, as another machine on the network sees the server), press Start, and return the
    message that has `word` in it (with `on_load`, first the one it shows before Start too); no
    session may have been made."""
    from playwright.async_api import async_playwright

    # a server for other machines (--host 0.0.0.0) answers to any name they use for it
    async with running_server(token=token, allowed_hosts=("*",) if host else ()) as (url, app), \
            async_playwright() as pw:
        port = url.rsplit(":", 1)[1]
        rules = [f"--host-resolver-rules=MAP {host} 127.0.0.1"] if host else []
        args = ARGS if camera else [a for a in ARGS if a != "--use-fake-device-for-media-stream"]
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*args, *rules])
        try:
            page = await browser.new_page()
            await page.goto(f"http://{host}:{port}/" if host else url + "/")  # no ?token=
            before = await _until(lambda: _message_with(page, word), 30) if on_load else None
            await page.click("#start")
            said = await _until(lambda: _message_with(page, word), 30)
            assert not sessions_of(app).sessions
            return (before, said) if on_load else said
        finally:
            await browser.close()


def test_a_page_on_plain_http_from_another_machine_says_why_there_is_no_camera():
    """A docs walkthrough: `--host 0.0.0.0` serves other machines, but there the page said "The
    camera was refused or is missing (TypeError)": a browser gives the camera only to https or
    localhost pages."""
    said = asyncio.run(_what_start_says("https", token=None, host="streamdiff.test"))
    assert said and "localhost" in said and "ssh -L" in said, said


def test_a_machine_without_a_camera_is_told_none_was_found():
    """A page probe: a machine with no camera was told "The camera was refused or is missing
    (NotFoundError). Allow camera access for this page", though nothing had been refused."""
    said = asyncio.run(_what_start_says("No camera", token=None, camera=False))
    assert said and said.startswith("No camera was found") and "Allow" not in said, said


def test_a_page_opened_without_the_servers_token_says_how_to_open_it():
    """It said "The server refused the session: 401" (the reply's text went unread)."""
    # said on load, before Start asks for the camera (a page probe: only after it), and on Start
    on_load, said = asyncio.run(_what_start_says("token", token=TOKEN, on_load=True))  # a server with a token
    assert on_load and "wants a token" in on_load and "?token=" in on_load, on_load
    assert said and "wants a token" in said and "?token=" in said, said


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FOCUS_JS = "() => document.activeElement && document.activeElement.id"
RAW_FIELDS_JS = """() => Object.fromEntries(["steps", "noise", "seed", "blend"].map(
  (id) => [id, document.getElementById(id).value]))"""


async def _async_value(page, js: str, check):
    value = await page.evaluate(js)
    return value if check(value) else None
FULLSCREEN_JS = """() => { const r = document.getElementById("output").getBoundingClientRect();
  return { element: document.fullscreenElement && document.fullscreenElement.id, width: r.width, height: r.height,
           screen: [window.innerWidth, window.innerHeight] }; }"""


async def _page_across_a_server_restart() -> dict:
    """Found by a probe of the page: after a server restart the page said the control connection
    had closed and stayed stopped (and "Cannot reach the server" stayed up once it was back);
    Start and Stop dropped the keyboard focus to the page; Enter in a number field did nothing;
    Fullscreen showed the 512 px picture in a corner of a black screen."""
    from playwright.async_api import async_playwright

    out: dict = {}
    port = _free_port()
    async with async_playwright() as pw:
        browser = await _browser(pw)
        try:
            page = await browser.new_page()
            async with running_server(token=None, port=port) as (url, app):
                # /healthz unanswered: the fields show nothing rather than values not in use
                await page.route("**/healthz", lambda route: route.abort())
                await page.goto(url + "/")
                await page.wait_for_timeout(500)
                out["fields_unread"] = await page.evaluate(RAW_FIELDS_JS)
                await page.unroute("**/healthz")
                out["fields_read"] = await _until(
                    lambda: _async_value(page, RAW_FIELDS_JS, lambda f: f["steps"] != ""), 10)
                out["fullscreen_before_start"] = await page.is_disabled("#fullscreen")  # (it showed black)
                await page.focus("#start")
                await page.keyboard.press("Enter")
                out["focus_after_start"] = await page.evaluate(FOCUS_JS)
                out["playing"] = await _until(lambda: _playing(page, "output"), 120)
                await page.fill("#seed", "7")
                await page.press("#seed", "Enter")
                out["applied"] = await _until(lambda: _message_with(page, "seed 7"), 30)
                await page.click("#fullscreen")
                out["fullscreen"] = await _until(lambda: page.evaluate(FULLSCREEN_JS), 10)
                await page.evaluate("() => document.exitFullscreen()")
                viewer = await browser.new_page()  # a viewer of a key nobody publishes, across the restart
                await viewer.goto(url + "/viewer.html?key=cam")
                out["viewer_live"] = await _until(lambda: _async_page_text(viewer, "#status", "waiting for stream cam"), 30)
            # the server stops (its sessions are closed first, as on Ctrl-C) and comes back
            out["waiting"] = await _until(lambda: _message_with(page, "Reconnecting once the server answers"), 30)
            out["waiting_state"] = await page.evaluate(PAGE_STATE_JS)
            out["viewer_down"] = await _until(lambda: _async_page_text(viewer, "#status", "does not answer"), 30)
            out["viewer_down_text"] = await viewer.inner_text("#status")
            async with running_server(token=None, port=port) as (url, app):
                sessions = sessions_of(app)
                out["replaying"] = await _until(lambda: _playing(page, "output"), 120)
                out["viewer_back"] = await _until(
                    lambda: _async_page_text(viewer, "#status", "waiting for stream cam"), 30)
                out["seed_kept"] = [p.seed for p in [await sessions.engine.params(sid) for sid in sessions.sessions]]
                await page.fill("#steps", "9")  # typed, never applied: must not end the next recovery
            # it comes back with another preset: the page shows that preset's values, and the stream
            # runs with them (untouched fields are not sent)
            other = with_overrides(tiny_config(), sampling={"noise_strength": 0.45})
            async with running_server(token=None, port=port, config=other) as (url, app):
                sessions = sessions_of(app)
                out["replaying_other"] = await _until(lambda: _playing(page, "output"), 120)
                out["other_fields"] = await page.evaluate(RAW_FIELDS_JS)
                out["other_params"] = [(p.steps, p.noise_strength, p.seed)
                                       for p in [await sessions.engine.params(sid) for sid in sessions.sessions]]
            out["waiting_again"] = await _until(lambda: _message_with(page, "Reconnecting"), 30)
            # a check of the server on its way when the user gives up answers after it: what it
            # says is not for the page any more (it put the preset's values over a field typed since)
            held, release, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

            async def answer_late(route):
                held.set()
                await release.wait()
                await route.fulfill(status=200, content_type="application/json", body=json.dumps(
                    {"ok": True, "state": "ready", "defaults": {"steps": 3, "noise": 0.5}}))
                answered.set()

            await page.route("**/healthz", answer_late)
            await asyncio.wait_for(held.wait(), 10)
            await page.focus("#stop")
            await page.keyboard.press("Enter")  # gives up waiting
            out["focus_after_stop"] = await page.evaluate(FOCUS_JS)
            await page.fill("#steps", "9")
            release.set()
            # the page has the answer once it is fulfilled; what it did with it (its fields reset, a
            # Start) shows at once, well within the second given it here
            await asyncio.wait_for(answered.wait(), 10)
            await page.wait_for_timeout(1000)
            out["after_stop"] = await page.evaluate(PAGE_STATE_JS)
            out["steps_after_stop"] = await page.input_value("#steps")
        finally:
            await browser.close()
    return out


def test_the_page_waits_for_a_restarted_server_and_keeps_the_keyboard_focus():
    out = asyncio.run(_page_across_a_server_restart())
    assert out["fields_unread"] == {"steps": "", "noise": "", "seed": "", "blend": ""}, out
    s = tiny_config().sampling  # what running_server serves; a live prompt change is not blended by default
    assert out["fields_read"] == {"steps": str(s.steps), "noise": f"{s.noise_strength:g}", "seed": str(s.seed),
                                  "blend": "0"}, out
    assert out["focus_after_start"] == "stop", out
    assert out["playing"] and out["applied"], out
    assert out["fullscreen_before_start"], out
    full = out["fullscreen"]
    assert full["element"] == "outpane" and full["height"] == full["screen"][1], full  # fills the screen's height
    assert out["waiting"] and out["waiting_state"]["stop"] and out["waiting_state"]["camera"], out
    assert out["replaying"], "the page did not start again once the server was back"
    # a page probe: with the server stopped the viewer said "waiting for stream KEY…", as before any
    # stream existed; it says the server does not answer, and waits for the stream again once it does
    assert out["viewer_live"] and out["viewer_down"] and out["viewer_back"], out
    assert out["viewer_down_text"].startswith("the server at 127.0.0.1:"), out["viewer_down_text"]
    assert out["seed_kept"] == [7], out  # what the user changed comes along
    steps = str(tiny_config().sampling.steps)
    assert out["replaying_other"], "a field typed wrong and never applied ended the recovery"
    assert out["other_fields"] == {"steps": steps, "noise": "0.45", "seed": "7", "blend": "0"}, out["other_fields"]
    assert out["other_params"] == [(int(steps), 0.45, 7)], out["other_params"]
    assert out["focus_after_stop"] == "start", out
    assert out["steps_after_stop"] == "9", out  # (an answer that came after Stop had reset it)
    state = out["after_stop"]
    assert state["start"] and not state["stop"] and not state["camera"] and state["message"] == "stopped", state


async def _on_a_phone() -> dict:
    from playwright.async_api import async_playwright

    out = {}
    async with running_server(token=None) as (url, app), async_playwright() as pw:
        browser = await _browser(pw)

        async def phone(width: int, height: int) -> None:
            context = await browser.new_context(viewport={"width": width, "height": height}, is_mobile=True,
                                                has_touch=True)
            page = await context.new_page()
            await page.goto(url + "/")
            await page.click("#start")
            playing = await _until(lambda: _playing(page, "output"), 120)
            out[width] = (height, playing, await page.locator("#output").bounding_box(),
                          await page.locator("#prompt").bounding_box())
            await page.screenshot(path=str(ARTIFACTS / f"phone_{width}.png"))
            await context.close()

        try:  # both phones at once, each in its own context (the server takes two streams)
            await asyncio.gather(phone(375, 667), phone(320, 568))
        finally:
            await browser.close()
    return out


def test_on_a_phone_the_restyled_picture_is_on_the_first_screen():
    """A page probe: at 375 x 667 the controls, the about text and the status line filled the first
    screen, and the restyled picture began 110 px above its bottom (at 320 x 568 below it)."""
    phones = asyncio.run(_on_a_phone())
    assert sorted(phones) == [320, 375], phones
    for width, (height, playing, output, prompt) in phones.items():
        assert playing, width  # the layout of a page that shows a picture (an empty one passed too)
        assert output["y"] + output["height"] <= height, (width, output)  # all of it, without scrolling
        assert output["width"] >= 0.9 * (width - 24), (width, output)  # as wide as the screen allows
        assert prompt["y"] > output["y"], (width, prompt, output)  # the controls follow it
