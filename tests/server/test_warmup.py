"""The gateway listens while the engine warms up: a page opened early loads, its offer waits for
the engine, an OBS publisher that cannot wait is told to come back, and a start that fails is
said to every client and ends `streamdiff serve` with its error. Before, the port refused
connections for the whole warm-up (about 10 s on a CPU, minutes with compilation on a GPU), so
the first user to arrive after `make run` saw the browser's "unable to connect"."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import aiohttp
from aiortc import RTCPeerConnection

from gateway_helpers import SyntheticVideo, answer, obs_like_offer, running_server, tiny_config
from streamdiff.engine import AsyncEngine
from streamdiff.parallel import build_executor
from streamdiff.server.app import SETTINGS_KEY


class GatedEngine(AsyncEngine):
    """An engine whose start waits for `gate` (a warm-up as long as the test wants), then fails
    with `fail` if one is given."""

    def __init__(self, fail: Exception | None = None):
        super().__init__(tiny_config(), executor_factory=build_executor)
        self.gate = asyncio.Event()
        self.fail = fail

    async def start(self) -> None:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        await super().start()


async def _health(http, url) -> tuple[int, dict]:
    async with http.get(f"{url}/healthz") as resp:
        return resp.status, await resp.json()


async def _early_offer():
    engine = GatedEngine()
    async with running_server(token=None, warm=False, engine=engine, warmup_wait_s=0.3) as (url, app):
        async with aiohttp.ClientSession() as http:
            status, health = await _health(http, url)
            assert status == 503 and health["state"] == "warming" and not health["ok"]
            assert health["defaults"]["steps"] >= 1  # the page reads its fields from this body
            async with http.get(f"{url}/") as resp:
                assert resp.status == 200 and "StreamDiff" in await resp.text()

            # OBS cannot wait long: after warmup_wait_s it is told to come back, and why.
            obs, sdp = await obs_like_offer()
            async with http.post(f"{url}/whip/early", data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert "still warming up" in await resp.text()
            await obs.close()

            # So is a page whose offer comes too early (it retries by itself, saying why).
            pc = RTCPeerConnection()
            pc.addTrack(SyntheticVideo())
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert "still warming up" in (await resp.json())["error"]
            await pc.close()

            # Given time, a page's offer waits for the engine, then gets its answer and its frames.
            app[SETTINGS_KEY].warmup_wait_s = 120.0
            pc = RTCPeerConnection()
            pc.addTrack(SyntheticVideo())
            got = asyncio.Event()

            @pc.on("track")
            def _track(track):
                async def first():
                    await track.recv()
                    got.set()
                asyncio.ensure_future(first())

            await pc.setLocalDescription(await pc.createOffer())
            post = asyncio.ensure_future(http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp,
                                                                          "type": "offer"}))
            await asyncio.sleep(0.5)
            assert not post.done()  # held, not refused
            engine.gate.set()
            resp = await asyncio.wait_for(post, 120)
            body = await resp.json()
            assert resp.status == 200, body
            await answer(pc, body["sdp"])
            await asyncio.wait_for(got.wait(), 60)
            status, health = await _health(http, url)
            assert status == 200 and health["state"] == "ready" and health["streams"] == 1
            await pc.close()


async def _failed_start():
    engine = GatedEngine(fail=RuntimeError("CUDA out of memory at 832x480"))
    async with running_server(token=None, warm=False, engine=engine, warmup_wait_s=30.0) as (url, app):
        async with aiohttp.ClientSession() as http:
            engine.gate.set()
            obs, sdp = await obs_like_offer()
            async with http.post(f"{url}/whip/k", data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
                text = await resp.text()
                assert resp.status == 503 and "the model failed to start: CUDA out of memory at 832x480" in text
            await obs.close()
            status, health = await _health(http, url)
            assert status == 503 and health["state"] == "failed"


async def _clients_that_cannot_wait(caplog):
    """OBS gives up a WHIP POST after 8 s: WHIP is told to come back sooner than a page waits.
    A client that gives up while its offer waits gets no session: before, the held offer went on
    once the model was warm and opened one, which held the publisher's key (a second Start got
    409) and a place until it timed out."""
    from streamdiff.server.app import SESSIONS_KEY

    engine = GatedEngine()
    async with running_server(token=None, warm=False, engine=engine, warmup_wait_s=60.0,
                              whip_warmup_wait_s=0.3) as (url, app):
        async with aiohttp.ClientSession() as http:
            obs, sdp = await obs_like_offer()
            async with http.post(f"{url}/whip/soon", data=sdp, headers={"Content-Type": "application/sdp"},
                                 timeout=aiohttp.ClientTimeout(total=8)) as resp:  # OBS's curl timeout
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"  # a page would still be waiting
            await obs.close()

            app[SETTINGS_KEY].whip_warmup_wait_s = 60.0
            pc = RTCPeerConnection()
            pc.addTrack(SyntheticVideo())
            await pc.setLocalDescription(await pc.createOffer())
            obs, sdp = await obs_like_offer()
            gave_up = aiohttp.ClientTimeout(total=0.5)
            for path, kwargs in ((f"{url}/offer", {"json": {"sdp": pc.localDescription.sdp, "type": "offer"}}),
                                 (f"{url}/whip/gone", {"data": sdp, "headers": {"Content-Type": "application/sdp"}})):
                try:
                    async with http.post(path, timeout=gave_up, **kwargs) as resp:
                        raise AssertionError(f"{path} answered {resp.status} during the warm-up")
                except asyncio.TimeoutError:
                    pass
            engine.gate.set()
            for _ in range(200):  # the held requests go on once the model is warm
                if caplog.text.count("left while the model warmed up; no session opened") >= 2:
                    break
                await asyncio.sleep(0.05)
            assert "a page offer's client left while the model warmed up" in caplog.text
            assert "a WHIP offer's client left while the model warmed up" in caplog.text
            assert app[SESSIONS_KEY].snapshot()["sessions"] == 0
            async with http.post(f"{url}/whip/gone", data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201  # the key is free: OBS's second Start publishes
            await obs.close()
            await pc.close()


def test_a_client_that_cannot_wait_for_the_warm_up_is_answered_in_time_or_leaves_nothing(caplog):
    caplog.set_level("INFO", logger="streamdiff.server")
    asyncio.run(_clients_that_cannot_wait(caplog))


def test_the_port_answers_during_warm_up_and_an_early_offer_waits_for_the_engine():
    asyncio.run(_early_offer())


def test_a_failed_start_is_said_to_every_client():
    asyncio.run(_failed_start())


FAILING_SERVE = """
import asyncio, sys, threading, time, urllib.request, urllib.error
import streamdiff.engine
from streamdiff.cli import main
from streamdiff.config import ConfigError

class Failing(streamdiff.engine.AsyncEngine):
    async def start(self):
        await asyncio.sleep(3.0)  # the port listens meanwhile
        raise ConfigError("weights/transformer.safetensors: not enough memory for the DiT")

streamdiff.engine.AsyncEngine = Failing

def probe():
    end = time.monotonic() + 60  # until the port listens: on a loaded machine the imports take seconds
    while time.monotonic() < end:
        try:
            urllib.request.urlopen("http://127.0.0.1:PORT/healthz", timeout=1)
        except urllib.error.HTTPError as exc:
            print("healthz", exc.code, exc.read().decode()[:40], flush=True)
            return
        except OSError:
            time.sleep(0.05)

threading.Thread(target=probe, daemon=True).start()
sys.exit(main(["serve", "--config", "tiny", "--port", "PORT"]))
"""


def _serve_patched(script: str) -> tuple[subprocess.CompletedProcess, int]:
    """`streamdiff serve --config tiny` in a child whose engine `script` replaces, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-c", script.replace("PORT", str(port))], capture_output=True, text=True,
                          timeout=120), port


def test_serve_listens_while_warming_and_a_failed_warm_up_ends_it_with_the_error_in_one_line():
    run, port = _serve_patched(FAILING_SERVE)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert 'healthz 503 {"ok": false, "state": "warming"' in run.stdout, run.stdout
    assert f"warming up tiny on http://127.0.0.1:{port}/" in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last == "streamdiff: error: weights/transformer.safetensors: not enough memory for the DiT", run.stderr
    assert "Traceback" not in run.stderr


async def _bench_waits():
    from streamdiff.client.bench import BenchError, _probe

    engine = GatedEngine()
    async with running_server(token=None, warm=False, engine=engine) as (url, app):
        async with aiohttp.ClientSession() as http:
            try:
                await _probe(http, url, warmup_wait_s=0.3)
            except BenchError as exc:
                timed_out = str(exc)
            asyncio.get_running_loop().call_later(0.5, engine.gate.set)
            body = await _probe(http, url)
    return timed_out, body


def test_the_end_to_end_bench_waits_for_a_warming_server(capsys):
    timed_out, body = asyncio.run(_bench_waits())
    assert "still warming up its model after 0 s" in timed_out
    assert body["ok"] and body["state"] == "ready"
    assert "is warming up its model; waiting for it" in capsys.readouterr().err


async def _engine_fails():
    from gateway_helpers import auth, sessions_of
    from streamdiff.server.app import ENGINE_KEY

    async with running_server() as (url, app):
        engine, sessions = app[ENGINE_KEY], sessions_of(app)
        told = []
        engine.add_failure_callback(told.append)
        async with aiohttp.ClientSession() as http:
            pc = RTCPeerConnection()
            pc.addTrack(SyntheticVideo())
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"},
                                 headers=auth()) as resp:
                body = await resp.json()
            await answer(pc, body["sdp"])
            sid = body["session"]

            def broken(*a, **k):
                raise RuntimeError("device lost")

            engine._core.step = broken  # the next step fails in the engine's thread
            for _ in range(200):
                if sid not in sessions.sessions:
                    break
                await asyncio.sleep(0.05)
            await pc.close()
            return sid in sessions.sessions, sessions.why_ended(sid), told


def test_an_engine_that_fails_ends_every_session_saying_why():
    """Found by a probe: after the engine loop failed, every session stayed "connected" with no
    frames, and nobody was told. Now each session ends with the reason (the page shows it), and
    the failure reaches the server (`streamdiff serve` then stops with exit 1)."""
    still_open, why, told = asyncio.run(_engine_fails())
    assert not still_open and why == "the engine failed: device lost"
    assert len(told) == 1 and "device lost" in str(told[0])


BROKEN_ENGINE_SERVE = """
import sys, threading, time, urllib.request
import streamdiff.engine
from streamdiff.cli import main

class Breaks(streamdiff.engine.AsyncEngine):
    async def start(self):
        await super().start()
        def broken(*a, **k):
            time.sleep(1.0)
            raise RuntimeError("device lost")
        self._core.step = broken

streamdiff.engine.AsyncEngine = Breaks
sys.exit(main(["serve", "--config", "tiny", "--port", "PORT"]))
"""


def test_serve_stops_with_exit_1_when_its_engine_fails():
    run, _ = _serve_patched(BROKEN_ENGINE_SERVE)
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    last = run.stderr.strip().splitlines()[-1]
    assert last == "streamdiff: error: the engine failed, so the server stopped: RuntimeError('device lost')", last
