"""End-to-end mode of `streamdiff bench` (`--url`): N WebRTC clients against a running server.

Owns: the load generator. Each session is an aiortc peer that POSTs /offer (the browser
client's JSON, with `"stamp": true`), sends a synthetic clip at a fixed rate with each frame's
id drawn into its pixels (streamdiff.stamp), reads the frames that come back and the ids the
server drew into them, and so measures glass-to-glass latency per frame through any model:
from the moment a frame is handed to the sender's encoder to the moment its output frame
leaves the receiver's decoder (one clock: both ends are this process). At the end it reads the
server's own per-stream numbers from GET /metrics (before closing the sessions, which drops
them) and reports both. `run_e2e` (async) returns the report; `run_from_args` is what the CLI
calls. Does not own: the definitions of the reported numbers, the table, JSON and plot
(streamdiff.bench.report), the stamp code (streamdiff.stamp), argument parsing (streamdiff.cli).

Definitions specific to this mode:
- ids are 0, 1, 2, ... per session; the stamp carries them modulo 2**20 and the reader unwraps
  a read id to the newest id sent with those low bits (a frame is never 2**20 frames late).
  Output comes back in input order, so an id not above the last one read is refused (counted
  as unreadable, like frames without a readable code).
- dropped: ids sent but never returned, counting only ids up to the newest id returned (ids
  after it may still be in flight: the tail is left out).
- warm-up: the first `warmup_s` seconds of the run (default 2) are sent and received but not
  measured: the first chunk comes back late and the frames queued meanwhile drain faster than
  the camera sends (a review: a clean run said 9.46 fps at 10 in, one freeze, 67 ms of jitter,
  all of it the start). Latency counts the frames whose input was sent after it; fps, jitter and
  freezes the frames that arrived after it; dropped the ids sent after it. Time to first frame
  is its own number.
- fps: frames that arrived in the measured window over its length (the same window for every
  session, so the sessions' fps add up to the run's). Without a window (a run interrupted in its
  warm-up) frames after the first over the longer of two spans, the arrival one and the one their
  inputs were sent over, so a draining start-up queue is not throughput.
- unreadable: frames that came back without a readable id; counted apart (said on the console),
  neither as dropped nor in latency.
- freezes: gaps between received frames over 3 periods of the input frame rate, the quiet time
  from the last frame received to the end of the run included (a server that went away).
- stopped: a session that received nothing for the end of the run, longer than 3 s and than 3
  of its own longest gaps before (the server ended it or went away): said, and exit code 1.
- time to first frame: from POST /offer to the first frame received.
- The sender paces like a camera: frame n leaves at start + n / fps; when the sender falls more
  than a period behind, the schedule restarts from now (frames are skipped, never bursted).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fractions
import ipaddress
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from streamdiff.bench import report as benchreport
from streamdiff.config import parse_size
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.server.webrtc import configure_bitrates, enable_loopback_candidates
from streamdiff.stamp import ID_MODULO, MIN_HEIGHT as STAMP_MIN_HEIGHT, MIN_WIDTH as STAMP_MIN_WIDTH, decode_id, encode_id

DEFAULT_SIZE = (256, 256)  # when the server does not say its frame size
DEFAULT_FPS = 15.0
CLIENT_BITRATE_BPS = 2_000_000  # the clients' encoder bitrate, pinned (see server.webrtc)
CLIP_FRAMES = 60
# The largest frame bench sends (4K UHD): its clip of CLIP_FRAMES frames is made in memory first
# (1.5 GB here; a probe's 8192x8192 asked for 12 GiB and 100000x100000 for 1.6 TiB, a traceback)
MAX_SEND_PIXELS = 3840 * 2160
CONNECT_TIMEOUT_S = 20.0
DEFAULT_WARMUP_S = 2.0  # unmeasured seconds at the start (the module docstring)
VIDEO_CLOCK_HZ = 90_000

TABLE_COLUMNS = [
    ("name", "session"), ("frames", "frames"), ("fps", "fps"), ("p50", "p50 ms"), ("p90", "p90 ms"),
    ("p99", "p99 ms"), ("max", "max ms"), ("freezes", "freezes"), ("misses", "misses"),
    ("dropped_pct", "dropped %"), ("ttff_ms", "first frame ms"), ("server_ms", "server mean ms"),
]


class BenchError(Exception):
    """A user-facing failure (server unreachable, session refused): one line, no traceback."""


@dataclass
class SessionRecord:
    """What one session measured. Times are `time.monotonic()` seconds."""

    index: int
    session_id: str | None = None
    offer_s: float = math.nan
    sent_s: list[float] = field(default_factory=list)  # [id] -> when it went to the encoder
    received: list[tuple[float, int]] = field(default_factory=list)  # (arrival, id) read back
    arrivals_s: list[float] = field(default_factory=list)  # every received frame
    unreadable_s: list[float] = field(default_factory=list)  # arrivals without a readable id
    tasks: list = field(default_factory=list)
    connection: str = "new"  # the peer connection's state when the measuring ended

    def unwrap(self, low: int) -> int | None:
        """The newest id sent whose low 20 bits are `low`; None if it is not a plausible
        next output (not sent, or not after the last id read)."""
        last = len(self.sent_s) - 1
        full = last - ((last - low) % ID_MODULO)
        newest_read = self.received[-1][1] if self.received else -1
        return full if newest_read < full <= last else None


class StampedClip(MediaStreamTrack):
    """The synthetic clip at `fps`, every frame stamped with its id (0, 1, 2, ...)."""

    kind = "video"

    def __init__(self, clip: np.ndarray, fps: float, record: SessionRecord):
        super().__init__()
        self.clip, self.period_s, self.record = clip, 1.0 / fps, record
        self._start_s: float | None = None
        self._n = 0  # frames since the schedule (re)started

    async def recv(self) -> VideoFrame:
        # 1. Pace like a camera; when more than a period late, restart the schedule from now.
        now = time.monotonic()
        if self._start_s is None or now - (self._start_s + self._n * self.period_s) > self.period_s:
            self._start_s, self._n = now, 0
        wait_s = self._start_s + self._n * self.period_s - now
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        self._n += 1
        # 2. Stamp the next id into a copy of the clip frame; note when it leaves.
        frame_id = len(self.record.sent_s)
        pixels = encode_id(self.clip[frame_id % len(self.clip)], frame_id)  # [H, W, 3]
        frame = VideoFrame.from_ndarray(pixels, format="rgb24")
        sent_s = time.monotonic()
        frame.pts = int(round(sent_s * VIDEO_CLOCK_HZ))
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
        self.record.sent_s.append(sent_s)
        return frame


async def _receive(track: MediaStreamTrack, record: SessionRecord) -> None:
    """Read the returned frames: arrival time, then the id drawn into them."""
    with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
        while True:
            frame = await track.recv()
            arrival_s = time.monotonic()
            record.arrivals_s.append(arrival_s)
            low = decode_id(frame.to_ndarray(format="rgb24"))
            full = None if low is None else record.unwrap(low)
            if full is None:
                record.unreadable_s.append(arrival_s)
            else:
                record.received.append((arrival_s, full))


# ---------------------------------------------------------------------- talking to the server


def _headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _probe(http: aiohttp.ClientSession, url: str, warmup_wait_s: float = 600.0) -> dict:
    """GET /healthz: reachable and running; returns its body (it names the frame size). A server
    still warming up its model (it listens meanwhile) is waited for, up to `warmup_wait_s`."""
    deadline = time.monotonic() + warmup_wait_s
    said = False
    while True:
        try:
            async with http.get(f"{url}/healthz") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise BenchError(f"cannot reach a StreamDiff server at {url}: {exc or type(exc).__name__}") from None
        try:
            body = json.loads(text)
        except ValueError:  # something else answers there (it said "Expecting value: line 1 column 1")
            raise BenchError(f"{url} answers, but not as a StreamDiff server: /healthz gave HTTP {resp.status} "
                             f"{short(text)}") from None
        if not (resp.status == 503 and isinstance(body, dict) and body.get("state") == "warming"):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the server at {url} was still warming up its model after {warmup_wait_s:.0f} s")
        if not said:
            print(f"the server at {url} is warming up its model; waiting for it", file=sys.stderr, flush=True)
            said = True
        await asyncio.sleep(0.5)
    if resp.status != 200 or not isinstance(body, dict) or not body.get("ok"):
        raise BenchError(f"the server at {url} is not ready (/healthz answered {resp.status}: {body})")
    return body


def short(text: str, limit: int = 80) -> str:
    """A reply's text for a one-line message: first line, cut, quoted."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return repr(line[:limit] + ("..." if len(line) > limit else "")) if line else "an empty body"


class SessionRefused(BenchError):
    """The server is full or its admission refused this session (503): the others still run."""


async def _open_session(http: aiohttp.ClientSession, url: str, record: SessionRecord, clip: np.ndarray,
                        fps: float, prompt: str, token: str | None) -> RTCPeerConnection:
    """One peer: offer with `stamp`, answer, wait until connected."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: host candidates only
    pc.addTrack(StampedClip(clip, fps, record))

    @pc.on("track")
    def _on_track(track) -> None:
        if track.kind == "video":
            record.tasks.append(asyncio.create_task(_receive(track, record)))

    name = f"session {record.index + 1}"
    try:
        await pc.setLocalDescription(await pc.createOffer())
        record.offer_s = time.monotonic()
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "prompt": prompt, "stamp": True}
        async with http.post(f"{url}/offer", json=offer, headers=_headers(token)) as resp:
            text = await resp.text()
            status, retry = resp.status, resp.headers.get("Retry-After")
        if status != 200:
            try:
                reason = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                reason = text.strip()
            hint = f" (retry after {retry} s)" if retry else ""
            if status == 401:
                hint = " (pass the server's token with --token)"
            raise (SessionRefused if status == 503 else BenchError)(
                f"the server refused {name}: HTTP {status}: {reason}{hint}")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str):  # a probe: KeyError traceback
            raise BenchError(f"{url}/offer answered {name}'s offer without an SDP answer "
                             f"({short(text)}): is {url} a StreamDiff server?")
        record.session_id = body.get("session")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
        # Wait for ICE + DTLS.
        deadline_s = time.monotonic() + CONNECT_TIMEOUT_S
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline_s:
                raise BenchError(f"{name}: the WebRTC connection did not come up ({pc.connectionState}); "
                                 "for a server on this machine start it with --ice-loopback")
            await asyncio.sleep(0.02)
    except BaseException:
        await pc.close()
        raise
    return pc


async def _server_metrics(http: aiohttp.ClientSession, url: str, token: str | None) -> dict[str, dict]:
    """Per stream (session id) from GET /metrics: the engine's own latency mean (arrival at the
    engine to the end of the step), frames out, fps, drops. {} if unavailable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with http.get(f"{url}/metrics", headers=_headers(token)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return {}
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sid = sample.labels.get("stream")
            if sid is not None and sample.name.startswith("streamdiff_stream_"):
                out.setdefault(sid, {})[sample.name[len("streamdiff_stream_"):]] = sample.value
    return {
        sid: {"latency_mean_ms": v["latency_ms_sum"] / v["latency_ms_count"] if v.get("latency_ms_count") else None,
              "frames_out": v.get("frames_out"), "fps": v.get("fps"), "dropped_frames": v.get("dropped_frames"),
              "deadline_misses": v.get("deadline_misses")}
        for sid, v in out.items()
    }


async def _gateway_counts(http: aiohttp.ClientSession, url: str, token: str | None) -> dict[str, dict]:
    """Per session id from GET /sessions: where the gateway lost frames (received from the peer,
    superseded by a newer one before the engine, pushed; sent by the output track, skipped).
    {} if unavailable (no token, an older server)."""
    keys = ("frames_received", "frames_superseded", "frames_pushed", "frames_sent", "frames_skipped")
    try:
        async with http.get(f"{url}/sessions", headers=_headers(token)) as resp:
            listed = await resp.json() if resp.status == 200 else []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return {}
    return {s["session"]: {k: s[k] for k in keys if k in s} for s in listed if isinstance(s, dict) and "session" in s}


# ---------------------------------------------------------------------- measuring


async def _measure(records: list[SessionRecord], duration_s: float, progress: bool) -> None:
    """Wait `duration_s`, showing frames, fps and median latency so far."""
    from tqdm import tqdm

    start_s = time.monotonic()
    with tqdm(total=round(duration_s, 1), unit="s", desc="bench", disable=not progress,
              bar_format="{desc}: {n:.0f}/{total:.0f} s |{bar}| {postfix}") as bar:
        while (elapsed_s := time.monotonic() - start_s) < duration_s:
            await asyncio.sleep(min(0.5, duration_s - elapsed_s))
            bar.n = min(time.monotonic() - start_s, duration_s)
            lat = [1000 * (t - r.sent_s[i]) for r in records for t, i in r.received[-50:]]
            fps = sum(benchreport.fps(r.arrivals_s[-30:]) for r in records)
            p50 = benchreport.quantile(lat, 0.5)
            bar.set_postfix_str(f"frames {sum(len(r.arrivals_s) for r in records)}, {fps:.1f} fps, "
                                f"latency p50 {'-' if math.isnan(p50) else f'{p50:.0f} ms'}")


def delivered_fps(record: SessionRecord) -> float:
    """Output frames per second (the module docstring's definition)."""
    n, arrived = len(record.arrivals_s), max(record.arrivals_s, default=0.0) - min(record.arrivals_s, default=0.0)
    ids = [i for _, i in record.received]
    sent = record.sent_s[max(ids)] - record.sent_s[min(ids)] if ids else 0.0
    span = max(arrived, sent)
    return (n - 1) / span if n > 1 and span > 0 else 0.0


STOPPED_MIN_S = 3.0  # quiet at the end for longer than this (and 3 of the session's longest gaps): stopped


def stopped_after_s(record: SessionRecord, t0_s: float, end_s: float) -> float | None:
    """When the session's last frame came (seconds into the run), if it received nothing after
    it for the rest of the run by the module docstring's rule; else None."""
    if not record.arrivals_s:
        return None
    quiet_s = end_s - record.arrivals_s[-1]
    longest = max(benchreport.arrival_gaps_s(record.arrivals_s), default=0.0)
    return record.arrivals_s[-1] - t0_s if quiet_s > max(STOPPED_MIN_S, 3 * longest) else None


def session_report(record: SessionRecord, fps_in: float, deadline_ms: float, t0_s: float, server: dict | None,
                   end_s: float | None = None, from_s: float | None = None) -> dict:
    """One session's numbers (see the module docstring and streamdiff.bench.report). `end_s`:
    when the measuring ended (the quiet time after the last frame counts as a gap); `from_s`:
    when the warm-up ended (None: every frame is measured; given, `end_s` is too)."""
    start = -math.inf if from_s is None else from_s
    first_id = bisect.bisect_left(record.sent_s, start)  # the first id sent in the window
    received = [(t, i) for t, i in record.received if i >= first_id]
    arrivals = [t for t in record.arrivals_s if t >= start]
    latency_ms = [1000.0 * (t - record.sent_s[i]) for t, i in received]
    newest = received[-1][1] if received else first_id - 1
    considered = newest + 1 - first_id
    unreadable = sum(t >= start for t in record.unreadable_s)
    dropped = max(0, considered - len({i for _, i in received}) - unreadable)
    first = record.arrivals_s[0] if record.arrivals_s else None
    # in a window: arrivals over its length (run_e2e sets one only with room after the warm-up)
    fps = delivered_fps(record) if from_s is None else len(arrivals) / (end_s - from_s)
    return {
        "session": record.index + 1,
        "session_id": record.session_id,
        "frames_sent": len(record.sent_s),
        "frames_received": len(record.arrivals_s),
        "frames_read": len(received),
        "unreadable": unreadable,
        "in_flight": len(record.sent_s) - (newest + 1),
        "fps": fps,
        "jitter_ms": benchreport.jitter_ms(arrivals),
        "freezes": benchreport.freezes(arrivals + ([end_s] if end_s is not None and arrivals else []), 1.0 / fps_in),
        "stopped_after_s": None if end_s is None else stopped_after_s(record, t0_s, end_s),
        "connection": record.connection,
        "latency_ms": benchreport.latency_summary(latency_ms, deadline_ms),
        "ids_considered": considered,
        "dropped": dropped,
        "dropped_share": dropped / considered if considered > 0 else math.nan,
        "time_to_first_frame_ms": None if first is None else 1000.0 * (first - record.offer_s),
        "server": server,
        "samples": {"ids": [i for _, i in received], "latency_ms": latency_ms,
                    "times_s": [t - t0_s for t, _ in received]},
    }


def aggregate_report(sessions: list[dict], fps_in: float, deadline_ms: float) -> dict:
    """All sessions together: latencies pooled, fps summed (one window for all), drops and freezes
    summed, the first frame the slowest session's."""
    latency_ms = [v for s in sessions for v in s["samples"]["latency_ms"]]
    considered = sum(s["ids_considered"] for s in sessions)
    dropped = sum(s["dropped"] for s in sessions)
    ttff = [s["time_to_first_frame_ms"] for s in sessions if s["time_to_first_frame_ms"] is not None]
    servers = [s["server"] for s in sessions if s["server"] and s["server"].get("latency_mean_ms") is not None]
    server_n = sum(sv["frames_out"] or 0 for sv in servers)
    return {
        "frames_received": sum(s["frames_received"] for s in sessions),
        "fps": sum(s["fps"] for s in sessions),
        "freezes": sum(s["freezes"] for s in sessions),
        "latency_ms": benchreport.latency_summary(latency_ms, deadline_ms),
        "dropped": dropped,
        "dropped_share": dropped / considered if considered else math.nan,
        "time_to_first_frame_ms": max(ttff) if ttff else None,
        "server_latency_mean_ms": (sum(sv["latency_mean_ms"] * (sv["frames_out"] or 0) for sv in servers) / server_n
                                   if server_n else None),
    }


def _row(name: str, s: dict, server_ms: float | None) -> dict:
    lat = s["latency_ms"]
    return {"name": name, "frames": s.get("frames_read", lat["count"]), "fps": s["fps"], "p50": lat["p50"],
            "p90": lat["p90"], "p99": lat["p99"], "max": lat["max"], "freezes": s["freezes"],
            "misses": lat["deadline_misses"], "dropped_pct": 100.0 * s["dropped_share"],
            "ttff_ms": s["time_to_first_frame_ms"], "server_ms": server_ms}


def format_report(report: dict) -> str:
    """The table printed at the end: one row per session and an aggregate row."""
    rows = [_row(str(s["session"]), s, (s["server"] or {}).get("latency_mean_ms")) for s in report["sessions"]]
    rows.append(_row("all", report["aggregate"], report["aggregate"]["server_latency_mean_ms"]))
    refused = report.get("refused") or []
    said = f" ({len(refused)} more refused: {refused[0]['reason']})" if refused else ""
    head = (f"{report['url']}: {len(report['sessions'])} session(s){said}, {report['width']}x{report['height']} "
            f"at {report['fps_in']:g} fps in, {report['duration_s']:g} s, deadline {report['deadline_ms']:g} ms\n"
            "latency: glass to glass (sender's encoder in -> receiver's decoder out); "
            "server mean: the engine's own (arrival -> end of step)\n"
            + (f"measured after a warm-up of {report['warmup_s']:g} s (first frame: from the offer; "
               "'all': the slowest session's)\n" if report.get("warmup_s") else ""))
    return head + benchreport.format_table(rows, TABLE_COLUMNS)


async def run_e2e(url: str, sessions: int = 1, duration_s: float = 30.0, *, fps: float = DEFAULT_FPS,
                  size: tuple[int, int] | None = None, prompt: str = "", token: str | None = None,
                  deadline_ms: float | None = None, json_path: str | None = None, plot_path: str | None = None,
                  progress: bool = True, bitrate_bps: int | None = CLIENT_BITRATE_BPS,
                  command: str | None = None, warmup_s: float = DEFAULT_WARMUP_S) -> dict:
    """Run `sessions` stamped sessions against the server at `url` for `duration_s` and return
    the report (also written to `json_path`, plotted to `plot_path`). `size` (width, height):
    default the server's frame size from /healthz, else 256x256. `deadline_ms`: default the
    server's service level (/healthz `slo`), else 1000 ms. `bitrate_bps` pins this
    process's encoders (None: leave aiortc's settings alone). `warmup_s`: run this long first,
    unmeasured (the module docstring). Raises BenchError."""
    if sessions < 1 or duration_s <= 0 or fps <= 0 or warmup_s < 0:
        raise BenchError(f"need sessions >= 1, duration > 0, fps > 0 and warm-up >= 0 (got {sessions}, {duration_s}, "
                         f"{fps}, {warmup_s})")
    url = url.rstrip("/")
    if _is_loopback(url):
        enable_loopback_candidates(True)  # aioice leaves 127.0.0.1 out; the server side needs --ice-loopback
    if bitrate_bps:
        configure_bitrates(bitrate_bps)
    records = [SessionRecord(i) for i in range(sessions)]
    interrupted_after_s: float | None = None
    pcs: list[RTCPeerConnection] = []
    admitted: list[SessionRecord] = []
    refused: list[dict] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        # 1. Ask the server: running? which frame size?
        health = await _probe(http, url)
        video = health.get("video") or {}
        width, height = size or (video.get("width"), video.get("height"))
        if deadline_ms is None:
            deadline_ms = float((health.get("slo") or {}).get("deadline_ms") or 1000.0)
        if not width or not height:
            width, height = DEFAULT_SIZE
        said = "--size" if size else "the server's frame size"
        if width < STAMP_MIN_WIDTH or height < STAMP_MIN_HEIGHT:  # else every frame fails in the sender
            raise BenchError(f"{said} {width}x{height}: bench stamps a frame id into every frame, which needs "
                             f"at least {STAMP_MIN_WIDTH}x{STAMP_MIN_HEIGHT}")
        if width * height > MAX_SEND_PIXELS:  # the server scales every frame to its model's size anyway
            raise BenchError(f"{said} {width}x{height}: bench sends frames of at most 3840x2160 pixels "
                             f"({MAX_SEND_PIXELS:,} in all; its clip is made in memory first)")
        clip = synthetic_clip(CLIP_FRAMES, width, height)  # [n, H, W, 3]
        try:
            # 2. Open the sessions one by one (the server admits each on its own). A refused one
            #    is reported as such; the admitted ones are measured (none admitted: an error).
            for record in records:
                try:
                    pcs.append(await _open_session(http, url, record, clip, fps, prompt, token))
                    admitted.append(record)
                except SessionRefused as exc:
                    refused.append({"session": record.index + 1, "reason": str(exc)})
                    if len(records) > 1:  # (one session refused is the error itself: said once, below)
                        print(f"{exc}; measuring the others", file=sys.stderr, flush=True)
            if not admitted:
                raise BenchError(refused[0]["reason"])
            # 3. Measure, then read the server's own numbers while the streams still exist.
            t0_s = time.monotonic()
            try:
                await _measure(admitted, warmup_s + duration_s, progress)
            except asyncio.CancelledError:  # Ctrl-C: report what was measured (a second one stops at once)
                task = asyncio.current_task()
                if task is None or task.uncancel() > 0:
                    raise
                interrupted_after_s = time.monotonic() - t0_s
                if not any(r.arrivals_s for r in admitted):
                    raise
            end_s = time.monotonic()
            for record, pc in zip(admitted, pcs):
                record.connection = pc.connectionState
            server = await _server_metrics(http, url, token)
            for sid, counts in (await _gateway_counts(http, url, token)).items():
                server.setdefault(sid, {})["gateway"] = counts
        finally:
            # 4. Close every peer (the server frees a session when its peer closes).
            for pc in pcs:
                await pc.close()
            for record in records:
                for task in record.tasks:
                    task.cancel()
                await asyncio.gather(*record.tasks, return_exceptions=True)
    if not any(r.arrivals_s for r in admitted):  # nothing to report: not a table of zeros and exit 0
        sent = sum(len(r.sent_s) for r in admitted)
        raise BenchError(f"no output frame came back in {warmup_s + duration_s:g} s ({sent} frames sent over "
                         f"{len(admitted)} session{'s' if len(admitted) > 1 else ''}); the server's console says why")
    # the measured window starts after the warm-up (a run interrupted in its warm-up, or less than
    # a second after it, measures it all)
    from_s = t0_s + warmup_s if warmup_s and end_s - t0_s - warmup_s >= min(1.0, duration_s) else None
    per_session = [session_report(r, fps, deadline_ms, t0_s, server.get(r.session_id), end_s, from_s)
                   for r in admitted]
    for s in per_session:
        if s["unreadable"]:
            print(f"session {s['session']}: {s['unreadable']} frame(s) came back without a readable id (counted "
                  "neither as dropped nor in latency)", file=sys.stderr, flush=True)
    if interrupted_after_s is not None:
        duration_s = round(interrupted_after_s - (warmup_s if from_s is not None else 0.0), 1)
    report = {
        "mode": "end-to-end", "command": command, "url": url,
        # what was measured: the server's model and service level as it says them (/healthz)
        "server": {key: health.get(key) for key in ("model", "video", "slo", "defaults") if key in health},
        "width": width, "height": height, "fps_in": fps, "duration_s": duration_s,
        "warmup_s": warmup_s if from_s is not None else 0.0,
        "interrupted": interrupted_after_s is not None,
        "deadline_ms": deadline_ms, "prompt": prompt, "sessions": per_session, "refused": refused,
        "aggregate": aggregate_report(per_session, fps, deadline_ms),
    }
    if json_path:
        benchreport.write_json(report, json_path)
    if plot_path:
        series = {f"session {s['session']}": s["samples"] for s in per_session}
        benchreport.plot(series, plot_path, title=f"streamdiff bench {url}: {sessions} session(s)",
                         deadline_ms=deadline_ms)
    return report


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise BenchError(f"--size {exc}") from None


async def _sigterm_as_ctrl_c(coro, terminated: list[bool]):
    """Await `coro` with SIGTERM handled as asyncio handles Ctrl-C: the main task is cancelled,
    so the measurement reports what it has and every peer is closed. (The CLI's SIGTERM handler
    raises wherever the loop is; inside aiortc's tasks that left asyncio.run waiting for ever.)"""
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def cancel() -> None:
        terminated.append(True)
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, cancel)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (Windows, another thread)
        return await coro
    try:
        return await coro
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)


def run_from_args(args) -> int:
    """`streamdiff bench --url ...`: run, print the table (and where files went); 0 or BenchError.
    Interrupted (Ctrl-C, SIGTERM): the table of what was measured, exit 130 / 143."""
    quiet = bool(getattr(args, "quiet", False))
    terminated: list[bool] = []
    try:
        report = asyncio.run(_sigterm_as_ctrl_c(run_e2e(
            args.url, int(getattr(args, "sessions", 1) or 1), float(getattr(args, "duration", 30.0) or 30.0),
            fps=float(getattr(args, "fps", None) or DEFAULT_FPS), size=_parse_size(getattr(args, "size", None)),
            prompt=getattr(args, "prompt", None) or "", token=getattr(args, "token", None),
            deadline_ms=getattr(args, "deadline_ms", None), json_path=getattr(args, "json", None),
            plot_path=getattr(args, "plot", None), progress=not quiet, command=getattr(args, "command_line", None),
            warmup_s=float(DEFAULT_WARMUP_S if getattr(args, "warmup", None) is None else args.warmup),
        ), terminated))
    except asyncio.CancelledError:  # SIGTERM before anything was measured (or a second one)
        print("streamdiff: terminated (SIGTERM)", file=sys.stderr)
        return 143
    print(format_report(report))
    for what, path in (("report", getattr(args, "json", None)), ("plot", getattr(args, "plot", None))):
        if path and not quiet:
            print(f"{what} written to {path}")
    if report.get("interrupted"):
        print(f"streamdiff: interrupted after {report['duration_s']:g} s: the numbers above cover that time",
              file=sys.stderr)
        return 143 if terminated else 130
    stopped = [s for s in report["sessions"] if s.get("stopped_after_s") is not None]
    for s in stopped:  # a server that went away mid-run is no clean run (a probe: exit 0, "0 freezes")
        state = "" if s["connection"] == "connected" else f"; its connection is {s['connection']}"
        run_s = report["duration_s"] + report.get("warmup_s", 0.0)  # (stopped_after_s counts from the start)
        print(f"streamdiff: session {s['session']} received no frame after {s['stopped_after_s']:.1f} s of the "
              f"{run_s:g} s run (the server ended it or went away{state}): its numbers cover that time",
              file=sys.stderr)
    return 1 if stopped else 0


__all__ = ["BenchError", "format_report", "run_e2e", "run_from_args"]
