"""WebRTC plumbing for the gateway: tracks, input readers, SDP checks, aiortc/aioice settings.

Owns: `OutputTrack` (an aiortc video track that plays a stream's output with pts from a
monotonic 90 kHz clock, paced evenly), `FanOut` (one task per stream pulling the engine's
output and handing the newest frame to every subscribed track), `InputReader` (drains a
remote video track, keeps only the newest frame, pushes it to the engine), `SilenceTrack`
(Opus silence for WHEP players), `drain_track` (discards audio), and the two process-wide
aiortc settings: encoder bitrates and loopback ICE candidates. SDP checks: server.sdp.
Stamped sessions (the benchmark's frame ids, streamdiff.stamp): the InputReader reads the id
drawn into each input frame and pushes `Stamped(pts, stamp_id)` as the frame's pts, which the
engine hands back on the OutputFrame made from it; the FanOut draws that id into the output
frame. The model never sees the id as data, so any model works; unstamped sessions are untouched.
Does not own: HTTP, sessions or auth (server.app, server.sessions), any engine logic.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import threading
import time
from typing import Callable, NamedTuple

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame

from streamdiff.client.video_io import same_aspect, to_model_frame
from streamdiff.stamp import decode_id, encode_id

log = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)


# ---------------------------------------------------------------------- process-wide settings


def default_bitrate_bps(width: int, height: int, fps: float) -> int:
    """The video bitrate a stream gets unless told: 1 bit a pixel a frame, between 1 and 4 Mbit/s
    (256x256 at 30 fps: 2 Mbit/s; 512x512 and up: 4). A probe found the demo's 256x256 sent at
    4 Mbit/s as H.264 twice VP8's packets: aiortc's sender keeps 128 packets to resend, 0.5 s of
    it, so a 1 s loss burst froze WHEP players 1.5 s where VP8 recovered at once; 2 Mbit/s costs
    0.7 dB there (36.2 against 36.9 dB on a panning photograph)."""
    return int(min(4_000_000, max(1_000_000, width * height * fps)))


def configure_bitrates(bitrate_bps: int) -> None:
    """Pin aiortc's H.264 and VP8 encoder bitrates (default, min and max) to `bitrate_bps`.

    aiortc starts at 1 Mbps (H.264) / 0.5 Mbps (VP8), re-creates the encoder whenever the
    congestion controller moves the target by more than 10%, and caps at 3 / 1.5 Mbps; noisy
    diffusion output needs more and must not stall on encoder restarts, so the target is fixed.
    """
    from aiortc.codecs import h264, vpx

    for mod in (h264, vpx):
        mod.DEFAULT_BITRATE = mod.MIN_BITRATE = mod.MAX_BITRATE = int(bitrate_bps)


_original_host_addresses = None


def enable_loopback_candidates(enabled: bool = True) -> None:
    """Make aioice offer 127.0.0.1 as a host candidate (it leaves loopback out by default).

    Needed on a host whose only usable interface is loopback (tests, sandboxes) and for a
    browser on the same machine when other interfaces are firewalled. Process-wide.
    """
    global _original_host_addresses
    import aioice.ice

    if _original_host_addresses is None:
        _original_host_addresses = aioice.ice.get_host_addresses
    if not enabled:
        aioice.ice.get_host_addresses = _original_host_addresses
        return
    original = _original_host_addresses

    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = original(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
        if use_ipv4 and "127.0.0.1" not in addresses:
            addresses.insert(0, "127.0.0.1")
        return addresses

    aioice.ice.get_host_addresses = with_loopback


def stop_consent_checks(pc) -> None:
    """End aioice's consent-freshness checks (RFC 7675) on `pc`'s connected ICE transports, so
    that a peer which stops answering them is not cut off.

    For WHIP publishers: FFmpeg's WHIP muxer (8.0) answers STUN only during its handshake,
    so aioice, which closes a connection after 6 unanswered checks, ended every FFmpeg publish
    about 30 s in. Consent guards against sending media to a peer that no longer wants it; to a
    publisher we send only RTCP, and a publisher that stops sending video is freed by the
    session's own input timeout. aioice has no option for this: the check runs as the task
    `Connection._query_consent_task`, started on connect, which is cancelled here."""
    for transceiver in pc.getTransceivers():  # bundled: one ICE transport for all (cancelling twice is harmless)
        ice = transceiver.receiver.transport.transport  # RTCDtlsTransport -> RTCIceTransport
        task = getattr(getattr(ice, "_connection", None), "_query_consent_task", None)
        if task is not None:
            task.cancel()


# ---------------------------------------------------------------------- output


class Stamped(NamedTuple):
    """The pts a stamped session pushes: the input frame's own pts and the id read from its
    pixels (None when the frame carried no readable code)."""

    pts: object
    stamp_id: int | None


class FrameQueue:
    """A viewer's output mailbox: a short FIFO, so the frames of a chunk burst are all shown;
    when full, the oldest frame is dropped (latency stays bounded). Remembers when frames came,
    so the output track can pace at the rate they are produced."""

    def __init__(self, maxlen: int = 8, clock=time.monotonic) -> None:
        self.clock = clock  # tests pass a simulated one
        self.frames: collections.deque[np.ndarray] = collections.deque(maxlen=maxlen)
        self.arrivals_s: collections.deque[float] = collections.deque(maxlen=33)
        self.dropped = 0  # frames pushed out unsent by newer ones (the viewer fell behind)
        self.sent = 0  # frames the output track took
        self.closed = False
        self._event = asyncio.Event()

    def put(self, frame: np.ndarray) -> None:
        if len(self.frames) == self.frames.maxlen:
            self.dropped += 1
        self.frames.append(frame)
        self.arrivals_s.append(self.clock())
        self._event.set()

    def close(self) -> None:
        self.closed = True
        self._event.set()

    def production_fps(self) -> float | None:
        """Frames per second over the recent arrivals (None until there are two bursts)."""
        if len(self.arrivals_s) < 2 or self.arrivals_s[-1] - self.arrivals_s[0] <= 0:
            return None
        return (len(self.arrivals_s) - 1) / (self.arrivals_s[-1] - self.arrivals_s[0])

    async def get(self) -> np.ndarray:
        while True:
            if self.closed:
                raise MediaStreamError("stream ended")
            if self.frames:
                self.sent += 1
                return self.frames.popleft()
            self._event.clear()
            await self._event.wait()


class FanOut:
    """Pulls one engine stream's output frames and hands each to every subscriber slot.
    With `stamp`, each output frame gets the id of the input frame it was made from drawn in
    (a copy; frames whose input had no readable id go out as they are). `on_end(reason)` is
    called when the engine ends the stream itself (it could not be restarted, the engine loop
    failed), not when `close()` stops the fan-out."""

    LATENCY_FRAMES = 16  # output frames the stats' mean latency is taken over

    def __init__(self, engine, stream_id: str, *, stamp: bool = False, on_end=None):
        self.engine = engine
        self.stream_id = stream_id
        self.stamp = stamp
        self.on_end = on_end
        self.slots: set[FrameQueue] = set()
        self.encoders: dict[str, SharedEncoder] = {}  # codec -> the encoder its WHEP players share
        self.frames_out = 0
        # the latest output frames' latencies: a chunk's first frame waited for the rest of the
        # chunk to arrive, its last did not, so one frame alone says little
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=self.LATENCY_FRAMES)
        self.task = asyncio.create_task(self._run(), name=f"fanout-{stream_id}")

    @property
    def latency_ms(self) -> float | None:
        """Mean latency (input arrival to output) of the latest LATENCY_FRAMES output frames."""
        return sum(self._latencies_ms) / len(self._latencies_ms) if self._latencies_ms else None

    def _check_live(self) -> None:
        """A subscriber or player of a fan-out that ended (`close()`, or the engine ended the
        stream) would wait for ever, and a player's encoder task with it (a review: a source that
        ended while a player's offer was answered left an encoder running on it)."""
        if self.task.done():
            raise RuntimeError(f"stream {self.stream_id} ended")

    def subscribe(self) -> FrameQueue:
        self._check_live()
        slot = FrameQueue()
        self.slots.add(slot)
        return slot

    def unsubscribe(self, slot: FrameQueue) -> None:
        self.slots.discard(slot)
        slot.close()

    def player(self, mime: str, max_fps: float, bitrate_bps: int, track: PlayerTrack | None = None) -> PlayerTrack:
        """A WHEP player's track, fed by the stream's encoder for `mime` (lower case; made on
        first use, closed when its last player leaves). `track`: a player released by another
        stream's fan-out (`release`), which plays this stream from its next keyframe on."""
        self._check_live()
        encoder = self.encoders.get(mime)
        if encoder is None:
            encoder = self.encoders[mime] = SharedEncoder(self, mime, max_fps, bitrate_bps, on_empty=self._encoder_idle)
        player = PlayerTrack() if track is None else track
        player.wants = (mime, max_fps, bitrate_bps)
        encoder.join(player)
        return player

    @staticmethod
    def release(player: PlayerTrack) -> None:
        """Take `player` off its encoder without ending its track: its peer's sender waits for
        packets, which another stream's encoder may give it (`player(..., track=player)`)."""
        if player.encoder is not None:
            player.encoder.leave(player, end=False)
        player.detach()

    def _encoder_idle(self, encoder: "SharedEncoder") -> None:
        if self.encoders.get(encoder.mime) is encoder:
            del self.encoders[encoder.mime]
        asyncio.ensure_future(encoder.close())

    async def _run(self) -> None:
        try:
            while True:
                out = await self.engine.next_frame(self.stream_id)
                self.frames_out += 1
                self._latencies_ms.append(out.latency_ms)
                frame = out.frame
                if self.stamp and isinstance(out.pts, Stamped) and out.pts.stamp_id is not None:
                    frame = encode_id(frame, out.pts.stamp_id)
                for slot in list(self.slots):
                    slot.put(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # StreamClosedError / KeyError: the stream is gone
            log.debug("fan-out %s ended: %s", self.stream_id, exc)
            if self.on_end is not None:
                cause = exc.__cause__
                self.on_end(f"the engine failed: {cause}" if cause is not None else str(exc))
        finally:
            for slot in list(self.slots):
                slot.close()

    async def close(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        for slot in list(self.slots):
            slot.close()
        for encoder in list(self.encoders.values()):
            await encoder.close()
        self.encoders.clear()


class OutputTrack(MediaStreamTrack):
    """Plays a FrameQueue as a video track. The engine delivers a chunk's frames in a burst;
    the track spreads them evenly at the rate frames are produced (never above `max_fps`), and
    catches up when frames pile up. pts = 90 kHz ticks of `time.monotonic()` since the first."""

    kind = "video"

    def __init__(self, slot: FrameQueue, max_fps: float, *, sleep=asyncio.sleep,
                 on_fail: Callable[[str], None] | None = None):
        super().__init__()
        self.slot = slot
        self.on_fail = on_fail  # called with the reason when a frame cannot be made (the track ends)
        self.clock, self.sleep = slot.clock, sleep  # the queue's clock; tests pass simulated ones
        self.min_period_s = 1.0 / max(max_fps, 1e-3)
        self._start_s: float | None = None
        self._next_s = 0.0

    def _period_s(self) -> float:
        fps = self.slot.production_fps()
        period = self.min_period_s if fps is None else max(self.min_period_s, 1.0 / fps)
        if len(self.slot.frames) > self.slot.frames.maxlen // 2:  # behind: catch up
            period = self.min_period_s
        return period

    async def recv(self) -> VideoFrame:
        try:
            return await self._next()
        except (MediaStreamError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a fault probe: aiortc's sender logged it and stopped, the picture froze
            why = f"an output frame could not be made ({type(exc).__name__}: {exc})"
            log.error("%s; the track ends", why)
            self.stop()
            if self.on_fail is not None:
                self.on_fail(why)
            raise MediaStreamError(why) from exc

    async def _next(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError("track ended")
        # 1. Pace: the next frame leaves one period after the last one.
        now = self.clock()
        if now < self._next_s:
            await self.sleep(self._next_s - now)
        # 2. The next output frame, oldest first.
        waited = not self.slot.frames
        try:
            pixels = await self.slot.get()
        except MediaStreamError:
            self.stop()
            raise
        now = self.clock()
        if self._start_s is None:
            self._start_s = now
        # 3. The next frame's time, on the grid of the last ones: scheduling from `now` made every
        # late wake-up (the event loop, the encoder between two recv calls) a lasting delay, which
        # grew by ~4 ms a second at 5 fps. The grid restarts when the frame had to be waited for
        # (the queue ran dry: the output is in step with production) and never lags `now` by
        # more than a period (after a stall, frames catch up one period early at most).
        period = self._period_s()
        base = now if waited else max(self._next_s, now - period)
        self._next_s = base + period
        # 4. Wrap with a monotonic-clock pts.
        frame = VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = int(round((now - self._start_s) * VIDEO_CLOCK_HZ))
        frame.time_base = VIDEO_TIME_BASE
        return frame


# ---------------------------------------------------------------------- input


class InputReader:
    """Drains a remote video track; the pusher side hands only the newest frame, centre-cropped
    and scaled to the engine's size (`to_model_frame`), to `engine.push_frame`. Two tasks so a
    slow push never backs up recv. With `stamp`, the pts pushed is `Stamped(frame.pts, id read
    from the pixels)`; the id strip spans the sender's whole width, so it is read from the whole
    frame scaled to the engine's size when a crop would cut it."""

    BAD_FRAMES_S = 2.0  # frames that cannot be read for this long end the session

    def __init__(self, track: MediaStreamTrack, engine, stream_id: str, width: int, height: int,
                 *, stamp: bool = False, on_fail: Callable[[str], None] | None = None):
        self.track, self.engine, self.stream_id = track, engine, stream_id
        self.on_fail = on_fail  # called with the reason when the input cannot go on (the session ends)
        self.frames_unreadable = 0
        self._bad_since: float | None = None
        self.width, self.height = width, height
        self.stamp = stamp
        self.latest: VideoFrame | None = None
        self.frames_received = 0  # decoded from the peer
        self.frames_superseded = 0  # received, then replaced by a newer one before it was pushed
        self.last_frame_s: float | None = None  # time.monotonic() of the latest frame received
        self.frames_pushed = 0
        self.stamps_unread = 0  # stamped session: pushed frames without a readable id
        self._ready = asyncio.Event()
        self.tasks = [
            asyncio.create_task(self._read(), name=f"read-{stream_id}"),
            asyncio.create_task(self._push(), name=f"push-{stream_id}"),
        ]

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                self.frames_superseded += self.latest is not None
                self.latest = frame
                self.frames_received += 1
                self.last_frame_s = time.monotonic()
                self._ready.set()
        except MediaStreamError:
            pass
        finally:
            self._ready.set()

    async def _push(self) -> None:
        try:
            await self._push_frames()
        except Exception as exc:  # noqa: BLE001 - a fault probe: the task ended without a word, the
            # session stayed "connected" (its frames still arrived, so no input timeout) on a frozen picture
            why = f"its input stopped ({type(exc).__name__}: {exc})"
            log.error("stream %s: %s", self.stream_id, why)
            log.debug("stream %s: its input stopped", self.stream_id, exc_info=True)
            if self.on_fail is not None:
                self.on_fail(why)

    def _readable(self, frame: VideoFrame):
        """(pixels, pts) of a frame, or None when it cannot be read: skipped with a line on the
        console the first time; unreadable frames for `BAD_FRAMES_S` end the session."""
        try:
            pixels = to_model_frame(frame, self.width, self.height)  # [H, W, 3]
            pts = frame.pts
            if self.stamp:
                whole = pixels if same_aspect(frame, self.width, self.height) else \
                    frame.to_ndarray(format="rgb24", width=self.width, height=self.height)
                pts = Stamped(frame.pts, decode_id(whole))
                self.stamps_unread += pts.stamp_id is None
        except Exception as exc:  # noqa: BLE001 - one frame the model cannot take
            now = time.monotonic()
            if self.frames_unreadable == 0:
                log.warning("stream %s: a video frame could not be read (%s: %s); skipped", self.stream_id,
                            type(exc).__name__, exc)
            self.frames_unreadable += 1
            self._bad_since = now if self._bad_since is None else self._bad_since
            if now - self._bad_since >= self.BAD_FRAMES_S:
                raise RuntimeError(f"no video frame could be read for {now - self._bad_since:.0f} s: "
                                   f"{type(exc).__name__}: {exc}") from exc
            return None
        self._bad_since = None
        return pixels, pts

    async def _push_frames(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            frame, self.latest = self.latest, None
            if frame is None:
                if self.tasks[0].done():
                    return
                continue
            if (read := self._readable(frame)) is None:
                continue
            pixels, pts = read
            try:
                self.engine.push_frame(self.stream_id, pixels, pts)
            except (KeyError, RuntimeError):
                return  # the stream was removed or the engine stopped
            self.frames_pushed += 1
            await asyncio.sleep(0)
            if self.tasks[0].done() and self.latest is None:
                return  # the track ended and its last frame is in

    async def close(self) -> None:
        await cancel_tasks(self.tasks)


class PlayerTrack(MediaStreamTrack):
    """A WHEP player's video track: the packets of its stream's `SharedEncoder`, from a
    keyframe on (aiortc's sender packs an `av.Packet` as it is, with no encoder of its own). A
    player that falls behind skips to the next keyframe (it asks for one); a player's own
    keyframe request (RTCP PLI or FIR, after lost packets) is passed on to the encoder
    (`answer_keyframe_requests`). Released from its stream's encoder (`FanOut.release`: the
    stream ended, its session waits for the key's next publisher) the track stays live and sends
    nothing; joined to another stream's encoder of its codec, it plays on from that one's next
    keyframe, its pts after those it sent (`put`), the sender's RTP stream the same one."""

    kind = "video"
    QUEUE_PACKETS = 8

    def __init__(self) -> None:
        super().__init__()
        self.encoder: SharedEncoder | None = None  # bound once the negotiated codec is known
        self.on_failed = None  # called when its encoder fails (its session should end: a player waits on)
        self.sent = 0  # packets (frames) the sender took
        self.skipped = 0  # frames dropped while the player was behind, or before its first keyframe
        self.keyframe_requests = 0  # PLI / FIR from the player (it lost packets it cannot do without)
        self._queue: collections.deque = collections.deque()
        self._event = asyncio.Event()
        self._keyed = False  # a keyframe went out since the (re)start: the decoder can follow
        self._closed = False
        self.wants: tuple | None = None  # (mime, max_fps, bitrate_bps): the encoder it negotiated
        # Its RTP timestamps must not jump back when it moves to another stream's encoder (whose pts
        # begin at 0): the first packet from there is put after the last one it got, as far after as
        # the time between them, and its pts shifted by as much from then on.
        self._last_pts: int | None = None
        self._last_s = 0.0
        self._offset = 0
        self._moved = False  # released: the next encoder's first packet sets `_offset`

    def put(self, packet, keyframe: bool) -> None:
        if len(self._queue) >= self.QUEUE_PACKETS:  # behind: what is queued cannot be decoded alone
            self.skipped += len(self._queue)
            self._queue.clear()
            self._keyed = False
            if self.encoder is not None:
                self.encoder.want_keyframe = True
        if not self._keyed and not keyframe:
            self.skipped += 1
            return
        self._keyed = True
        now = time.monotonic()
        if self._moved:
            self._moved = False
            if self._last_pts is not None:
                self._offset = self._last_pts + max(1, int((now - self._last_s) / packet.time_base)) - packet.pts
        if self._offset:  # (the packet is shared with the encoder's other players: a copy)
            shifted = av.Packet(bytes(packet))
            shifted.pts, shifted.time_base = packet.pts + self._offset, packet.time_base
            packet = shifted
        self._last_pts, self._last_s = packet.pts, now
        self._queue.append(packet)
        self._event.set()

    def detach(self) -> None:
        """Off its encoder (`FanOut.release`), its track still live: from the next encoder's first
        keyframe on, with its pts after the last ones sent."""
        self.encoder = None
        self._keyed = False
        self._moved = True

    def request_keyframe(self) -> None:
        """The player's decoder needs a keyframe (it asked with a PLI or FIR)."""
        self.keyframe_requests += 1
        if self.encoder is not None:
            self.encoder.request_keyframe()

    def end(self) -> None:
        self._closed = True
        self._event.set()

    async def recv(self):
        while not self._queue:
            if self._closed or self.readyState != "live":
                raise MediaStreamError("stream ended")
            self._event.clear()
            await self._event.wait()
        self.sent += 1
        return self._queue.popleft()

    def stop(self) -> None:
        if self.encoder is not None:
            self.encoder.leave(self)
        self.end()  # (released, it has no encoder to end it: its sender would wait on)
        super().stop()


class SharedEncoder:
    """One encoder for every WHEP player of a stream that negotiated the same codec: each frame
    is encoded once and its packet goes to every `PlayerTrack` (a probe measured a player's own
    encoder at about 6 % of a 2-CPU machine's core, the stream losing 1.2 fps a player). Paced
    like a session's own output (`OutputTrack`); a keyframe when a player joins or falls behind,
    when a player asks for one (at most one such every KEYFRAME_ASKED_GAP_S: sixteen lossy
    players must not make every frame a keyframe), and every KEYFRAME_EVERY_S for players that
    never ask."""

    KEYFRAME_EVERY_S = 2.0
    KEYFRAME_ASKED_GAP_S = 0.5

    def __init__(self, fanout: "FanOut", mime: str, max_fps: float, bitrate_bps: int, on_empty=None):
        self.fanout, self.mime, self.bitrate_bps = fanout, mime, bitrate_bps
        self.on_empty = on_empty
        self.slot = fanout.subscribe()
        self.track = OutputTrack(self.slot, max_fps)
        self.players: set[PlayerTrack] = set()
        self.encoded = 0  # frames encoded: one per frame, whatever the number of players
        self.want_keyframe = True
        self._asked = False  # a player asked for a keyframe (granted once KEYFRAME_ASKED_GAP_S has passed)
        self._last_key_s = -float("inf")
        self._codec = None
        self._closed = False
        self._codec_lock = threading.Lock()  # `_encode`'s thread makes the codec while `_run` may end
        self.task = asyncio.create_task(self._run(), name=f"encode-{fanout.stream_id}")

    def join(self, player: PlayerTrack) -> None:
        player.encoder = self
        self.players.add(player)
        self.want_keyframe = True

    def request_keyframe(self) -> None:
        self._asked = True

    def leave(self, player: PlayerTrack, end: bool = True) -> None:
        self.players.discard(player)
        if end:
            player.end()
        if not self.players and self.on_empty is not None:
            self.on_empty(self)

    async def close(self) -> None:
        self.fanout.unsubscribe(self.slot)
        await cancel_tasks([self.task])  # its `finally` ends the players

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self.track.recv()
                now = time.monotonic()
                since = now - self._last_key_s
                key = (self.want_keyframe or since >= self.KEYFRAME_EVERY_S
                       or (self._asked and since >= self.KEYFRAME_ASKED_GAP_S))
                if key:
                    self.want_keyframe, self._asked, self._last_key_s = False, False, now
                packet = await loop.run_in_executor(None, self._encode, frame, key)
                if packet is None:
                    continue
                self.encoded += 1
                for player in list(self.players):
                    player.put(packet, key)
        except MediaStreamError:  # the stream ended
            pass
        except Exception:  # noqa: BLE001 - its players' sessions end (viewer.html asks again); the log says why
            log.exception("encoding %s for the WHEP players of %s failed", self.mime, self.fanout.stream_id)
            for player in list(self.players):
                if player.on_failed is not None:
                    player.on_failed()
        finally:
            for player in list(self.players):
                player.end()
            # Free the codec now: it is reachable only through this encoder, whose references run in
            # cycles (on_empty -> FanOut, players -> encoder), so it waited for the cycle collector,
            # each libx264 context keeping its 4 threads (a soak: 10 players gone, 20 threads left).
            with self._codec_lock:
                self._closed = True
                self._codec, self.on_empty = None, None
            self.players.clear()

    def _encode(self, frame: VideoFrame, keyframe: bool):
        """One frame -> one packet (pts and time base the frame's), in an executor thread."""
        import av

        frame = frame.reformat(format="yuv420p")
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        codec = self._codec  # held here: `_run` may drop the encoder's reference while this thread encodes
        if self._closed:
            return None
        if codec is None:  # made outside the lock (it takes a moment), kept only if still open: an
            # encoder closed meanwhile kept the new codec and its libx264 threads (a review)
            made = _codec_context(self.mime, frame.width, frame.height, self.bitrate_bps)
            with self._codec_lock:
                if self._closed:
                    return None
                codec = self._codec = made
        data = b"".join(bytes(p) for p in codec.encode(frame))
        if not data:
            return None
        packet = av.Packet(data)
        packet.pts, packet.time_base = frame.pts, frame.time_base
        return packet


def on_rtcp(sender, callback) -> None:
    """Call `callback()` whenever `sender` receives an RTCP packet from its peer (receiver reports,
    NACKs, keyframe requests): the sign a player is still there. aiortc's DTLS transport hands
    each packet to its recipient's `_handle_rtcp_packet`, which is wrapped here."""
    handle = sender._handle_rtcp_packet

    async def heard(packet) -> None:
        callback()
        await handle(packet)

    sender._handle_rtcp_packet = heard


def answer_keyframe_requests(sender, player: PlayerTrack) -> None:
    """Route the RTCP keyframe requests (PLI, FIR) that `sender` receives to `player`'s shared
    encoder. aiortc's sender answers them by encoding its next frame as a keyframe, which a
    sender of packets cannot do; its `_send_keyframe` is the one place it handles them."""
    sender._send_keyframe = player.request_keyframe


def _codec_context(mime: str, width: int, height: int, bitrate_bps: int):
    """An encoder as aiortc configures its own for WebRTC (H.264 baseline, zero latency; VP8
    real-time CBR), keyframes only when asked for."""
    import av

    if mime == "video/h264":
        codec = av.CodecContext.create("libx264", "w")
        codec.options = {"level": "31", "tune": "zerolatency"}
        codec.profile = "Baseline"
    elif mime == "video/vp8":
        codec = av.CodecContext.create("libvpx", "w")
        codec.qmin, codec.qmax = 2, 56
        codec.options = {"bufsize": str(bitrate_bps), "cpu-used": "-6", "deadline": "realtime",
                         "lag-in-frames": "0", "minrate": str(bitrate_bps), "maxrate": str(bitrate_bps),
                         "undershoot-pct": "100", "overshoot-pct": "15", "static-thresh": "1"}
    else:
        raise ValueError(f"no shared encoder for {mime}")
    codec.width, codec.height, codec.bit_rate, codec.pix_fmt = width, height, bitrate_bps, "yuv420p"
    codec.framerate, codec.time_base = fractions.Fraction(30, 1), fractions.Fraction(1, 30)
    codec.gop_size = 100_000  # keyframes when SharedEncoder asks
    return codec


class SilenceTrack(MediaStreamTrack):
    """Opus-ready silence (48 kHz mono, 20 ms frames) for WHEP answers: players expect audio."""

    kind = "audio"
    SAMPLES = 960

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._start_s: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError("track ended")
        if self._start_s is None:
            self._start_s = time.monotonic()
        wait_s = self._start_s + self._n * self.SAMPLES / 48_000 - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        frame = AudioFrame.from_ndarray(np.zeros((1, self.SAMPLES), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 48_000
        frame.pts, frame.time_base = self._n * self.SAMPLES, fractions.Fraction(1, 48_000)
        self._n += 1
        return frame


async def drain_track(track: MediaStreamTrack) -> None:
    """Receive and discard (OBS's Opus audio): an unread remote track queues without bound."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass


def retrieve_connect_errors(pc) -> None:
    """aiortc sets a peer up in a task nobody awaits (`RTCPeerConnection.__connect`, started by
    setLocalDescription and setRemoteDescription). A peer closed while it runs (a client that
    leaves or is freed during the DTLS handshake) makes it raise InvalidStateError("RTCIceTransport
    is closed") at its next transport, and asyncio logs the unretrieved exception as an error
    with a traceback, for what is a normal end. Every such task of `pc` still running gets a
    callback that takes its exception: debug level once the peer is closed (the session's own
    line says why it ended), a warning if it is not."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)  # None once finished
        if getattr(coro, "__qualname__", "") == "RTCPeerConnection.__connect" and frame is not None \
                and frame.f_locals.get("self") is pc:
            task.add_done_callback(lambda t: _connect_ended(pc, t))


def _connect_ended(pc, task: asyncio.Task) -> None:
    exc = None if task.cancelled() else task.exception()
    if exc is None:
        return
    if pc.connectionState == "closed":
        log.debug("a peer closed while connecting: %r", exc)
    else:
        log.warning("setting up a peer failed: %r", exc)


async def cancel_tasks(tasks) -> None:
    """Cancel and await `tasks` (the calling task, if among them, is left to finish)."""
    tasks = [task for task in tasks if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
