"""Frame-id stamps through the gateway: the id read from an input frame is drawn into the tiny
model's output frame made from it, and `streamdiff bench --url` (client/bench.py) measures
glass-to-glass latencies that agree with the server's own metrics."""

from __future__ import annotations

import asyncio
import fractions
import statistics

import aiohttp
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from av import VideoFrame

from gateway_helpers import HEIGHT, TOKEN, WIDTH, auth, obs_like_offer, running_server, sessions_of, tiny_config
from streamdiff.client.bench import BenchError, format_report, run_e2e
from streamdiff.engine import AsyncEngine
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.server.app import ENGINE_KEY
from streamdiff.server.sessions import wait_closed
from streamdiff.server.webrtc import FanOut, InputReader, Stamped
from streamdiff.stamp import ID_MODULO, decode_id, encode_id, stamp_height

# The client's latency also holds what the engine does not see: VP8 encode, loopback RTP and
# decode both ways (the smallest per-frame extra measured at 64x48 on 2 CPUs: ~140 ms) and the
# output pacing, which shows a chunk's 4 frames one period of the 15 fps output cap apart,
# behind at most FrameQueue.maxlen = 8 queued frames (<= 8 x 67 = 533 ms). That bounds the
# extra to ~700 ms; measured: median 290-390 ms, max 610 ms, and the means differ by 300-390 ms.
# MARGIN_MS = 1000 leaves room for a busy shared CPU (it passed repeatedly at load average 5).
MARGIN_MS = 1000.0


class KnownFrames(MediaStreamTrack):
    """Frames at 15 fps with pts = index and `ids[index]` drawn in; the next frame is handed out
    only after the reader pushed the previous one, so the reader never skips one (the engine
    may still drop stale frames: the test follows each output's pts, not its position)."""

    kind = "video"

    def __init__(self, clip: np.ndarray, ids: list[int]):
        super().__init__()
        self.clip, self.ids, self.n = clip, ids, 0
        self.reader: InputReader | None = None

    async def recv(self) -> VideoFrame:
        await asyncio.sleep(1 / 15)
        while self.reader is None or self.reader.frames_pushed < self.n:
            await asyncio.sleep(0.002)
        if self.n == len(self.ids):
            await asyncio.Event().wait()  # no more frames: hold, like an idle camera
        frame = VideoFrame.from_ndarray(encode_id(self.clip[self.n], self.ids[self.n]), format="rgb24")
        frame.pts, frame.time_base = self.n, fractions.Fraction(1, 15)
        self.n += 1
        return frame


async def _through_the_tiny_model(n_in: int = 150, n_out: int = 12):
    engine = AsyncEngine(tiny_config(max_streams=2))
    await engine.start()
    pulled: dict[str, list] = {"stamped": [], "plain": []}  # OutputFrames, in the order FanOut took them
    original = engine.next_frame

    async def spy(stream_id, timeout=None):
        out = await original(stream_id, timeout)
        pulled[stream_id].append(out)
        return out

    engine.next_frame = spy
    clip = synthetic_clip(n_in, WIDTH, HEIGHT, seed=3)
    ids = [(1 + 40503 * i) % ID_MODULO for i in range(n_in)]  # arbitrary, well spread
    parts, delivered = [], {}
    try:
        for sid in pulled:
            admission = await engine.add_stream(sid, "a cat", target_fps=0.05, deadline_ms=600_000.0)
            assert admission, admission.reason
            stamp = sid == "stamped"
            fanout = FanOut(engine, sid, stamp=stamp)
            slot = fanout.subscribe()
            track = KnownFrames(clip, ids)
            track.reader = InputReader(track, engine, sid, WIDTH, HEIGHT, stamp=stamp)
            parts.append((fanout, track.reader, slot, sid))

        async def take(slot) -> list[np.ndarray]:
            return [await asyncio.wait_for(slot.get(), 60) for _ in range(n_out)]

        taken = await asyncio.gather(*(take(slot) for _, _, slot, _ in parts))
        for (_, _, slot, sid), frames in zip(parts, taken):
            delivered[sid] = frames
            assert slot.dropped == 0  # so the i-th delivered frame is the i-th pulled
    finally:
        for fanout, reader, _, _ in parts:
            await reader.close()
            await fanout.close()
        await engine.stop()
    return clip, ids, pulled, delivered


def test_stamped_output_carries_the_id_of_its_input_frame():
    clip, ids, pulled, delivered = asyncio.run(_through_the_tiny_model())
    strip = stamp_height(HEIGHT)
    # 1. Stamped: the i-th delivered frame came from the input frame whose pts the engine kept
    #    on its OutputFrame (pts travels as metadata, the id as pixels): the ids agree.
    for out, pixels in zip(pulled["stamped"], delivered["stamped"]):
        assert isinstance(out.pts, Stamped)
        index = out.pts.pts
        assert out.pts.stamp_id == ids[index]  # read from the input pixels
        assert decode_id(pixels) == ids[index]  # drawn into the output pixels
        # the rest of the picture is the model's output, untouched
        assert np.array_equal(pixels[strip:], out.frame[strip:])
        # the model changed the picture: its output is not the input frame
        assert np.abs(out.frame[strip:].astype(int) - clip[index][strip:]).mean() > 10
        # and does not carry the input's code through: the server must draw it
        assert decode_id(out.frame) is None
    indices = [out.pts.pts for out in pulled["stamped"]]
    assert indices == sorted(indices) and len(set(indices)) > 4
    # 2. Unstamped: frames are delivered as the engine made them, pts is the plain pts.
    for out, pixels in zip(pulled["plain"], delivered["plain"]):
        assert isinstance(out.pts, int) and not isinstance(out.pts, Stamped)
        assert pixels is out.frame and decode_id(pixels) is None


async def _bench_against_test_server():
    async with running_server() as (url, app):
        engine, sessions = app[ENGINE_KEY], sessions_of(app)
        async with aiohttp.ClientSession() as http:
            # 1. The option: a bad value is refused; `?stamp=1` on WHIP marks the session.
            async with http.post(f"{url}/offer", json={"sdp": "v=0", "type": "offer", "stamp": "maybe"},
                                 headers=auth()) as resp:
                assert resp.status == 400 and "stamp" in (await resp.json())["error"]
            pc, sdp = await obs_like_offer()
            async with http.post(f"{url}/whip/cam?stamp=1", data=sdp,
                                 headers={**auth(), "Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201, await resp.text()
                whip_id = resp.headers["X-Session-Id"]
            assert sessions.get(whip_id).stamp and sessions.get(whip_id).fanout.stamp
            async with http.delete(f"{url}/whip/cam/{whip_id}", headers=auth()) as resp:
                assert resp.status == 200
            await pc.close()
            await wait_closed(sessions, whip_id)
        # 2. The benchmark refuses to run without the token, with the server's reason.
        with pytest.raises(BenchError, match="HTTP 401.*--token"):
            await run_e2e(url, sessions=1, duration_s=1.0, token="wrong", progress=False, bitrate_bps=None)
        assert sessions.sessions == {}
        # 3. The benchmark, with every output frame the server delivered logged by stamp id.
        served: dict[str, dict[int, float]] = {}  # session -> stamp id -> server latency (ms)
        original = engine.next_frame

        async def spy(stream_id, timeout=None):
            out = await original(stream_id, timeout)
            if isinstance(out.pts, Stamped) and out.pts.stamp_id is not None:
                served.setdefault(stream_id, {})[out.pts.stamp_id] = out.latency_ms
            return out

        engine.next_frame = spy
        report = await run_e2e(url, sessions=2, duration_s=4.0, fps=15.0, token=TOKEN, prompt="a cat",
                               progress=False, bitrate_bps=None)  # (after the default warm-up of 2 s)
    return report, served


def test_bench_latencies_match_the_server_metrics():
    report, served = asyncio.run(_bench_against_test_server())
    assert (report["width"], report["height"]) == (WIDTH, HEIGHT)  # the size came from /healthz
    assert report["server"]["model"]["config"] == "tiny"  # a probe: the report did not say what was measured
    # the default warm-up was left out, and the deadline is the server's own (gateway_helpers' loose SLO)
    assert report["warmup_s"] == 2.0 and report["deadline_ms"] == 600_000.0
    assert len(report["sessions"]) == 2
    for s in report["sessions"]:
        ids, client_ms = s["samples"]["ids"], s["samples"]["latency_ms"]
        assert s["frames_read"] >= 12 and s["unreadable"] == 0, s
        # 1. Per frame: every id read back is one the server drew for this session, and the
        #    client's latency contains the server's (same clock) plus a bounded gateway share.
        server_ms = served[s["session_id"]]
        assert set(ids) <= set(server_ms)
        overhead = [c - server_ms[i] for i, c in zip(ids, client_ms)]
        assert min(overhead) > 0
        assert statistics.median(overhead) < MARGIN_MS
        # 2. The report against the server's own metrics (GET /metrics, scraped by the bench
        #    before the sessions closed): the same frames counted, the same inequality.
        server = s["server"]
        assert server["frames_out"] >= s["frames_read"]
        gateway = server["gateway"]  # where frames went at the gateway, from GET /sessions
        assert gateway["frames_received"] >= gateway["frames_pushed"] + gateway["frames_superseded"] > 0
        assert gateway["frames_sent"] >= s["frames_received"] > 0
        assert 0 < s["latency_ms"]["mean"] - server["latency_mean_ms"] < MARGIN_MS
        assert s["latency_ms"]["p50"] > 0 and s["latency_ms"]["max"] >= s["latency_ms"]["p99"]
    agg = report["aggregate"]
    assert agg["latency_ms"]["count"] == sum(s["frames_read"] for s in report["sessions"])
    assert all(s["stopped_after_s"] is None for s in report["sessions"])  # served to the end


async def _bench_whose_session_the_server_ends():
    async with running_server() as (url, app):
        sessions = sessions_of(app)

        async def end_it_once_frames_flow() -> None:
            while app[ENGINE_KEY].metrics()["totals"]["frames_out"] < 8:
                await asyncio.sleep(0.05)
            (session_id,) = list(sessions.sessions)
            await sessions.close(session_id, "the test ended it (a server that went away)")

        ender = asyncio.create_task(end_it_once_frames_flow())
        report = await run_e2e(url, sessions=1, duration_s=7.0, fps=15.0, token=TOKEN, progress=False,
                               bitrate_bps=None, warmup_s=0.0)
        await ender
    return report


def test_a_session_the_server_ends_midway_is_said_and_the_run_fails(monkeypatch, capsys):
    """A probe: the server stopped 8 s into a 15 s bench; the report said 15 s, 10 fps, 0 freezes,
    and the bench exited 0. The quiet end counts as a freeze, the session says when its last frame
    came, and the CLI says so and exits 1."""
    import argparse

    from streamdiff.client import bench

    report = asyncio.run(_bench_whose_session_the_server_ends())
    (s,) = report["sessions"]
    assert s["frames_read"] > 0 and s["freezes"] >= 1, s
    assert s["stopped_after_s"] is not None and 0 < s["stopped_after_s"] < 7.0 - bench.STOPPED_MIN_S, s

    async def measured(*args, **kwargs):
        return report

    monkeypatch.setattr(bench, "run_e2e", measured)
    code = bench.run_from_args(argparse.Namespace(url="http://127.0.0.1:8000", quiet=True))
    err = capsys.readouterr().err
    assert code == 1 and f"session 1 received no frame after {s['stopped_after_s']:.1f} s of the 7 s run" in err, err


def test_bench_says_when_the_server_is_unreachable():
    with pytest.raises(BenchError, match="cannot reach a StreamDiff server at http://127.0.0.1:9"):
        asyncio.run(run_e2e("http://127.0.0.1:9", sessions=1, duration_s=1.0, progress=False, bitrate_bps=None))


async def _bench_against(routes) -> str:
    from aiohttp import web

    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        await run_e2e(f"http://127.0.0.1:{port}", sessions=1, duration_s=1.0, progress=False, bitrate_bps=None)
    except BenchError as exc:
        return str(exc)
    finally:
        await runner.cleanup()
    raise AssertionError("the bench ran against a server that is not StreamDiff")


def test_bench_says_when_something_else_answers(capsys):
    """A probe: a service that is not StreamDiff was "cannot reach ... Expecting value: line 1
    column 1", and one answering /healthz with {"ok": true} ended in a KeyError traceback."""
    from aiohttp import web

    async def text(request):
        return web.Response(text="<html>hello</html>", status=404)

    async def ok(request):
        return web.json_response({"ok": True})

    async def no_sdp(request):
        return web.json_response({"hello": "world"})

    async def full(request):
        return web.json_response({"error": "busy: 4 streams already running"}, status=503,
                                 headers={"Retry-After": "10"})

    said = asyncio.run(_bench_against([web.get("/healthz", text)]))
    assert "answers, but not as a StreamDiff server: /healthz gave HTTP 404 '<html>hello</html>'" in said, said
    said = asyncio.run(_bench_against([web.get("/healthz", ok), web.post("/offer", no_sdp)]))
    assert "/offer answered session 1's offer without an SDP answer" in said and "StreamDiff server?" in said, said
    # A probe: `--sessions 1` refused by a full server said so twice, first "...; measuring the others"
    said = asyncio.run(_bench_against([web.get("/healthz", ok), web.post("/offer", full)]))
    assert said == "the server refused session 1: HTTP 503: busy: 4 streams already running (retry after 10 s)", said
    assert "measuring the others" not in capsys.readouterr().err


async def _bench_one_refused(tmp_path):
    async with running_server(max_sessions=1) as (url, app):
        report = await run_e2e(url, sessions=2, duration_s=2.0, fps=15.0, token=TOKEN, progress=False,
                               bitrate_bps=None, json_path=str(tmp_path / "r.json"), warmup_s=0.0)
    return report


def test_a_refused_session_is_reported_and_the_others_measured(tmp_path, capsys):
    """A probe: with --max-sessions 1, `bench --sessions 2` ended with "the server refused session
    2" and no report: session 1's measurement and the JSON were thrown away."""
    import json

    report = asyncio.run(_bench_one_refused(tmp_path))
    assert len(report["sessions"]) == 1 and report["sessions"][0]["frames_read"] > 0
    assert [r["session"] for r in report["refused"]] == [2]
    assert "HTTP 503" in report["refused"][0]["reason"]
    assert json.loads((tmp_path / "r.json").read_text())["refused"] == report["refused"]
    assert "1 more refused" in format_report(report)
    assert "refused session 2" in capsys.readouterr().err


async def _bench_mistakes():
    async with running_server() as (url, app):
        errors = []
        try:  # a frame too small for the id stamp: refused before any session opens
            await run_e2e(url, sessions=1, duration_s=1.0, size=(16, 16), token=TOKEN, progress=False, bitrate_bps=None)
        except BenchError as exc:
            errors.append((str(exc), sessions_of(app).stream_count))
        try:  # a frame too large to make a clip of in memory (100000x100000 asked for 1.6 TiB)
            await run_e2e(url, sessions=1, duration_s=1.0, size=(100_000, 100_000), token=TOKEN, progress=False,
                          bitrate_bps=None)
        except BenchError as exc:
            errors.append((str(exc), sessions_of(app).stream_count))

        async def never(stream_id, timeout=None):  # an engine that outputs nothing
            await asyncio.sleep(3600)

        app[ENGINE_KEY].next_frame = never
        try:
            await run_e2e(url, sessions=1, duration_s=2.0, fps=15.0, token=TOKEN, progress=False, bitrate_bps=None,
                          warmup_s=0.0)
        except BenchError as exc:
            errors.append((str(exc), None))
    return errors


def test_bench_fails_in_words_instead_of_reporting_nothing():
    """A probe: `bench --size 8x8` ran its whole duration with every frame failing in the sender,
    printed a table of zeros and exited 0."""
    (small, streams), (large, large_streams), (nothing, _) = asyncio.run(_bench_mistakes())
    assert small.startswith("--size 16x16: bench stamps a frame id") and streams == 0, small
    assert large.startswith("--size 100000x100000: bench sends frames of at most 3840x2160") and not large_streams
    assert nothing.startswith("no output frame came back in 2 s (") and "frames sent over 1 session)" in nothing, nothing


async def _bench_terminated_midway(tmp_path):
    """`streamdiff bench --url` in a child, sent SIGTERM (`timeout`, a service manager) once frames
    flow; Ctrl-C takes the same way (asyncio cancels the main task on SIGINT)."""
    import os
    import signal
    import sys

    async with running_server() as (url, app):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamdiff.cli", "bench", "--url", url, "--token", TOKEN, "--duration", "60",
            "--fps", "15", "-q", "--json", str(tmp_path / "r.json"), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        for _ in range(1200):  # until frames come back (the limit only turns a hang into a failure)
            await asyncio.sleep(0.1)
            if app[ENGINE_KEY].metrics()["totals"]["frames_out"] >= 12:
                break
        await asyncio.sleep(1.0)
        child.send_signal(signal.SIGTERM)
        try:  # it hung for minutes: the CLI's SIGTERM handler raised inside aiortc's tasks
            out, err = await asyncio.wait_for(child.communicate(), 60)
        except TimeoutError:
            child.kill()
            await child.wait()
            raise
        for _ in range(100):
            if not sessions_of(app).stream_count:
                break
            await asyncio.sleep(0.1)
        streams = sessions_of(app).stream_count
    return child.returncode, out.decode(), err.decode(), streams


def test_a_terminated_bench_reports_what_it_measured(tmp_path):
    """A probe: Ctrl-C in a 30 s bench printed only "interrupted" and wrote nothing; SIGTERM left
    the bench waiting for ever (no table, no report)."""
    import json

    code, out, err, streams = asyncio.run(_bench_terminated_midway(tmp_path))
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 143, (code, err)
    assert report["interrupted"] and 0 < report["duration_s"] < 60 and report["sessions"][0]["frames_read"] > 0
    assert f"{report['duration_s']:g} s" in out and "interrupted after" in err, (out, err)
    assert streams == 0  # its session was closed on the server
