"""Gateway sessions: one aiortc peer per session, its engine stream and its tasks.

Owns: the `Session` record (id, kind, stream key, peer, input reader, output fan-out, tasks),
`SessionManager` (session limit, admission through the engine, lookup by id or stream key,
closing a session when its peer fails or vanishes, closing everything at shutdown) and the
mapping from control messages (`prompt`, `steps`, `noise`, `seed`, `motion`) to engine
parameters. Does not own: HTTP (server.app) or media details (server.webrtc).

Kinds: "browser" (POST /offer: input and output on one peer), "whip" (publish only: input),
"whep" (play only: subscribes to another session's output; holds no engine stream; when that
session ends, it waits `player_grace_s` for the next publisher of its stream key).
Option `stamp` (browser and whip): the frame-id stamp of the end-to-end benchmark is read from
each input frame and drawn into the output frame made from it (server.webrtc, streamdiff.stamp).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from aiortc import RTCConfiguration, RTCPeerConnection

from streamdiff.engine import AdmissionRefused
from streamdiff.engine.types import StreamParams, StreamsLost, short_repr
from streamdiff.model.style_prompts import prompt_style
from streamdiff.server.webrtc import FanOut, InputReader, FrameQueue, PlayerTrack, cancel_tasks, stop_consent_checks

log = logging.getLogger(__name__)
# One line per session start, end and refusal. `enable_event_log` (called by `serve`) shows them
# on the console without -v.
events = logging.getLogger("streamdiff.events")


class RefusalBursts(logging.Filter):
    """The console shows at most `burst` refusal lines ("refused ...") per `window_s`; the next
    one shown says how many it left out. A probe's flood of offers printed 482 lines; a user's
    refusal is still seen at once, every session start and end too."""

    def __init__(self, burst: int = 5, window_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._shown: collections.deque[float] = collections.deque()
        self._hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("refused "):
            return True
        now = self.clock()
        while self._shown and self._shown[0] <= now - self.window_s:
            self._shown.popleft()
        if len(self._shown) >= self.burst:
            self._hidden += 1
            return False
        self._shown.append(now)
        if self._hidden:
            n, self._hidden = self._hidden, 0
            record.msg, record.args = f"{record.getMessage()} (and {n} more refusal{'s' if n > 1 else ''} " \
                                      f"not shown since the line before)", ()
        return True


def enable_event_log(stream=None) -> logging.Handler:
    """Print session events to `stream` (default stderr) at INFO, whatever the root level;
    bursts of refusals are thinned (`RefusalBursts`)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(RefusalBursts())
    events.addHandler(handler)
    events.setLevel(logging.INFO)
    events.propagate = False
    return handler


def release_freed_memory() -> bool:
    """Hand memory that is free inside glibc's heaps back to the system (malloc_trim). A session
    frees hundreds of small buffers (codec frames, numpy arrays, aiortc packets) that glibc keeps
    for reuse: 300 sessions left a tiny-preset server at 1.3 GB RSS of which 650 MB was free in its
    arenas, and trimming took it to 700 MB (docs/benchmarks.md). False where libc has no
    malloc_trim (not glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


# control message field -> engine parameter
PARAM_ALIASES = {
    "prompt": "prompt",
    "steps": "steps",
    "noise": "noise_strength",
    "noise_strength": "noise_strength",
    "seed": "seed",
    "motion": "motion_aware",
    "motion_aware": "motion_aware",
    "blend": "prompt_blend_chunks",
}


def to_control_words(params: StreamParams) -> dict:
    """A stream's parameters in the words a control message uses (the inverse of
    `to_engine_params` for the fields the page shows)."""
    return {"prompt": params.prompt, "steps": params.steps, "noise": params.noise_strength,
            "seed": params.seed, "motion": params.motion_aware, "blend": params.prompt_blend_chunks}


MAX_PROMPT_CHARS = 1000


def check_prompt(prompt: object) -> str:
    """A prompt as every route takes it: text of at most MAX_PROMPT_CHARS that UTF-8 can carry
    (JSON can spell a lone surrogate, "\\udc80", which no tokenizer can encode); ValueError else."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"prompt has a character UTF-8 cannot carry at position {exc.start} "
                         f"(a lone surrogate: {prompt[exc.start]!r})") from None
    return prompt


def to_engine_params(message: dict) -> dict:
    """Control fields -> engine parameter names; ValueError on an unknown field or a bad prompt
    (the engine checks the other values' ranges)."""
    out = {}
    for key, value in message.items():
        if key == "type":
            continue
        if key not in PARAM_ALIASES:
            raise ValueError(f"unknown parameter {short_repr(key)} (known: {', '.join(sorted(PARAM_ALIASES))})")
        if PARAM_ALIASES[key] in out:  # (a probe: noise and noise_strength together, the later won silently)
            both = [k for k in message if PARAM_ALIASES.get(k) == PARAM_ALIASES[key]]
            raise ValueError(f"{' and '.join(both)} name the same parameter: give one")
        out[PARAM_ALIASES[key]] = check_prompt(value) if key == "prompt" else value
    return out


def in_client_words(exc: ValueError, message: dict) -> ValueError:
    """The engine names a bad value by its own parameter name (`motion_aware must be ...`); say
    it in the word the client sent (`motion must be ...`)."""
    text = str(exc)
    for word in message:
        name = PARAM_ALIASES.get(word)
        if name is not None and name != word and text.startswith(name):
            return ValueError(word + text[len(name):])
    return exc


_STREAM_ID = re.compile(r"stream '([0-9a-f]{16})'")


def without_other_ids(text: str, own: str) -> str:
    """A refusal as its client reads it: the scheduler names the stream a change would slow down
    by its session id, which the console line keeps but another client must not be told (those
    ids open the session's routes); that stream is "another stream", the client's own "this
    stream"."""
    return _STREAM_ID.sub(lambda m: "this stream" if m.group(1) == own else "another stream", text)


def parse_flag(value: object, name: str = "stamp") -> bool:
    """A boolean session option from JSON (true/false) or a query string (1/0, true/false,
    on/off, yes/no); None is False. ValueError names the option otherwise."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "on", "yes", "0", "false", "off", "no", ""):
        return value.strip().lower() in ("1", "true", "on", "yes")
    raise ValueError(f"{name} must be true or false (or 1/0), got {short_repr(value)}")


class StreamKeyTaken(Exception):
    """Another session publishes (or is being admitted to publish) this stream key; HTTP 409."""


class ServerFull(Exception):
    """No room for another stream (session limit or engine admission), or for a running stream's
    bigger step count; HTTP 503 with the server's Retry-After (`ServerSettings.retry_after_s`, its
    one owner), `retry_after_s` in a control socket's error."""


def expectation(admission, target_fps: float, deadline_ms: float) -> dict:
    """What an admitted stream can expect, for the answer to the client; `service` is the level
    it was admitted for (the page names it when the stream is best effort: a probe's user read
    "5.1 fps, best effort" as meeting a level the page never showed)."""
    return {"fps": round(admission.expected_fps, 2), "latency_ms": round(admission.expected_latency_ms),
            "best_effort": admission.best_effort, "service": f"{target_fps:g} fps within {deadline_ms / 1000:g} s",
            "streams": admission.streams}


@dataclass
class Session:
    id: str
    kind: str  # "browser" | "whip" | "whep"
    stream_key: str
    pc: RTCPeerConnection
    prompt: str = ""
    has_stream: bool = False  # owns an engine stream (browser, whip)
    stamp: bool = False  # read input frame ids and draw them into the output (benchmark)
    reader: InputReader | None = None
    fanout: FanOut | None = None
    slot: FrameQueue | None = None  # the subscription a browser's output track (or a whep player's own) reads
    player: PlayerTrack | None = None  # whep: its track, fed by the stream's shared encoder
    source: "Session | None" = None  # whep: the session it plays (None while it waits for a publisher)
    waiting_s: float | None = None  # whep: when its source ended; it waits `player_grace_s` for the key's next
    tasks: list = field(default_factory=list)
    created_s: float = field(default_factory=time.monotonic)
    connected_s: float | None = None  # when its peer first reached "connected"
    rtcp_s: float | None = None  # whep: when its player's latest RTCP packet came (None: none yet)
    closed: bool = False
    expect: dict | None = None  # stream kinds: the fps and latency it can expect (renewed as streams come and go)
    control_sockets: int = 0  # open /ws connections of the page that owns it (`?owner=1`)
    page_left_s: float | None = None  # browser: when its page's last owner socket closed (None: open, or never)
    sockets: int = 0  # open /ws connections to it, any client's, handshakes included
    params_changes: int = 0  # stream kinds: changes applied so far (control sockets push others' to their client)
    params_applied: dict | None = None  # the params (control words) as of its last change (before its first)

    def input_idle_s(self, now: float | None = None) -> float:
        """Seconds since the latest input frame (since the peer connected, or the session
        began, if none came yet)."""
        now = time.monotonic() if now is None else now
        last = self.reader.last_frame_s if self.reader is not None else None
        return now - max(self.created_s, self.connected_s or 0.0, last or 0.0)

    def stats(self) -> dict:
        out = {"session": self.id, "kind": self.kind, "stream_key": self.stream_key,
               "state": self.pc.connectionState, "uptime_s": round(time.monotonic() - self.created_s, 1)}
        if self.stamp:
            out["stamp"] = True
        if self.reader is not None:  # received = pushed + superseded (+ the one about to be pushed)
            out.update(frames_received=self.reader.frames_received, frames_superseded=self.reader.frames_superseded,
                       frames_pushed=self.reader.frames_pushed)
        if self.fanout is not None:
            out.update(frames_out=self.fanout.frames_out, latency_ms=self.fanout.latency_ms)
        if self.slot is not None:  # what this session's output track sent, and skipped falling behind
            out.update(frames_sent=self.slot.sent, frames_skipped=self.slot.dropped)
        if self.player is not None:
            out.update(frames_sent=self.player.sent, frames_skipped=self.player.skipped,
                       keyframe_requests=self.player.keyframe_requests)
        if self.expect is not None:
            out["expect"] = self.expect
        if self.waiting_s is not None:
            out["waiting_for_publisher_s"] = round(time.monotonic() - self.waiting_s, 1)
        return out


class SessionManager:
    """Every live session; the only place that creates or frees engine streams.

    Timeouts: a peer not connected `connect_timeout_s` after its answer is freed; a stream
    session that received no video for `input_timeout_s` (a WHIP offer that sends nothing, a
    publisher gone silent) is freed; a publisher silent for `takeover_after_s` gives its stream
    key to a new publisher (OBS restarted after a crash: the old peer has not timed out yet); a
    WHEP player whose RTCP reports stop for `player_timeout_s` is freed (a killed player was sent
    video and held its place until ICE consent expired, 30 s). A stream session whose peer has
    not connected `replace_pending_after_s` after its offer gives its place to a newcomer that
    would otherwise be refused (`_replace_pending`). A WHEP player whose source ends waits
    `player_grace_s` for a new publisher of its stream key (OBS reconnecting, or stopped and
    started again), its peer kept, and plays that one once its peer connects; else it is freed
    (`_wait_for_publisher`, `_resume_players`)."""

    ENDED_KEPT = 256  # recently ended sessions remembered, so that a late DELETE gets 200

    def __init__(self, engine, *, max_sessions: int, target_fps: float, deadline_ms: float,
                 ice_servers: list | None = None, connect_timeout_s: float = 30.0,
                 input_timeout_s: float = 10.0, takeover_after_s: float = 5.0, max_viewers: int = 16,
                 player_timeout_s: float = 10.0, replace_pending_after_s: float = 10.0,
                 player_grace_s: float = 15.0):
        self.engine = engine
        self.max_sessions = max_sessions
        # WHEP players, connected or not: each one's own encoder takes CPU from the model, and
        # each peer holds sockets, so a flood of offers must not reach the process's fd limit
        self.max_viewers = max_viewers
        self.target_fps = target_fps
        self.deadline_ms = deadline_ms
        self.ice_servers = list(ice_servers or [])
        self.connect_timeout_s = connect_timeout_s
        self.input_timeout_s = input_timeout_s
        self.player_timeout_s = player_timeout_s
        self.player_grace_s = player_grace_s
        self.takeover_after_s = takeover_after_s
        self.replace_pending_after_s = replace_pending_after_s
        self.sessions: dict[str, Session] = {}
        self._trim: asyncio.Task | None = None  # release_freed_memory, a little after a session ends
        # session id -> (kind, stream key, why it ended), oldest first, at most ENDED_KEPT
        self.ended: collections.OrderedDict[str, tuple[str, str, str]] = collections.OrderedDict()
        # stream sessions between their admission check and their entry in `sessions` (the
        # engine's admission is awaited): session id -> stream key. Counted by the limit and
        # the key check (and shown by /metrics) while `_opening` holds the next request back.
        self._admitting: dict[str, str] = {}
        # One open at a time, from its key and limit checks to its entry in `sessions`: a check
        # passed, then an await (a pending session's close, the engine's admission) let another
        # request pass the same check (a probe: two publishers on one key, streams over
        # --max-sessions, viewers over --max-viewers, all with offers arriving together).
        self._opening = asyncio.Lock()
        self.stopping = False  # close_all ran: the server is going away (pages wait for it to return)
        self._renewing: asyncio.Task | None = None  # `_renew`, while stream sessions exist
        self._renew_now = asyncio.Event()  # a stream came, went or changed steps

    # ------------------------------------------------------------------ lookup

    @property
    def stream_count(self) -> int:
        """Streams running or being admitted."""
        return sum(1 for s in self.sessions.values() if s.has_stream) + len(self._admitting)

    @property
    def viewer_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.kind == "whep")

    def get(self, key: str) -> Session | None:
        """By session id, else the stream-owning session with that stream key."""
        session = self.sessions.get(key)
        if session is not None:
            return session
        for session in self.sessions.values():
            if session.has_stream and session.stream_key == key:
                return session
        return None

    def admitting_key(self, session_id: str) -> str | None:
        """The stream key a stream session being admitted (not in `sessions` yet) holds."""
        return self._admitting.get(session_id)

    def why_ended(self, session_id: str, kind: str | None = None, stream_key: str | None = None) -> str | None:
        """Why a recently ended session ended (the console line's reason); None if it is not
        among the last ENDED_KEPT, or not of that kind and key when they are given."""
        ended = self.ended.get(session_id)
        if ended is None or (kind is not None and ended[0] != kind) or \
                (stream_key is not None and ended[1] != stream_key):
            return None
        return ended[2]

    def publisher(self, stream_key: str) -> Session | None:
        for session in self.sessions.values():
            if session.has_stream and session.stream_key == stream_key and not session.closed:
                return session
        return None

    # ------------------------------------------------------------------ lifecycle

    def new_peer(self) -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))

    async def open(self, kind: str, stream_key: str | None, prompt: str = "", *, stamp: bool = False,
                   **params) -> Session:
        """Create a session and its peer; stream kinds ask the engine for admission first.
        `stamp`: the session carries frame-id stamps through (stream kinds only).
        Raises StreamKeyTaken (409) when a stream kind's key is published already, ServerFull
        (503) when the limit is reached or the engine refuses. Opens run one at a time."""
        async with self._opening:
            return await self._open(kind, stream_key, prompt, stamp=stamp, **params)

    async def _open(self, kind: str, stream_key: str | None, prompt: str, *, stamp: bool, **params) -> Session:
        session_id = uuid.uuid4().hex[:16]
        owns_stream = kind in ("browser", "whip")
        admission = None
        if owns_stream and stream_key is not None:
            await self._take_over_silent(stream_key)
            if self.publisher(stream_key) is not None or stream_key in self._admitting.values():
                events.info("refused %s session (stream key %s): the key is being published already", kind, stream_key)
                raise StreamKeyTaken(
                    f"stream key {stream_key!r} is already being published; a publisher that stopped sending "
                    f"video gives it up after {self.takeover_after_s:g} s")
        # Full: a place held by a peer that never connected goes to the newcomer (`_replace_pending`)
        if (kind == "whep" and self.viewer_count >= self.max_viewers
                and not await self._replace_pending(kind, stream_key, viewers=True)):
            n = self.max_viewers
            connecting = sum(1 for s in self.sessions.values() if s.kind == "whep" and s.connected_s is None)
            still = f", {connecting} of them still connecting ({self._pending_rule})" if connecting else ""
            raise self._full(kind, stream_key,
                             f"{n} viewer{'s' if n != 1 else ''} already watching (--max-viewers){still}")
        if (owns_stream and self.stream_count >= self.max_sessions
                and not await self._replace_pending(kind, stream_key)):
            n = self.max_sessions
            connecting = len(self._admitting) + sum(1 for s in self.sessions.values()
                                                    if s.has_stream and s.connected_s is None)
            if not connecting:
                raise self._full(kind, stream_key, f"{n} stream{'s' if n != 1 else ''} already running (--max-sessions)")
            if n == 1:
                taken = "the one stream is taken (--max-sessions) by a peer"
            else:
                taken = (f"the {n} streams are taken (--max-sessions), {connecting} of them by "
                         f"{'a peer' if connecting == 1 else 'peers'}")
            raise self._full(kind, stream_key, f"{taken} still connecting ({self._pending_rule})")
        if owns_stream:
            admission = await self._admit(session_id, stream_key or session_id, prompt, params)
            while not admission and await self._replace_pending(kind, stream_key):
                admission = await self._admit(session_id, stream_key or session_id, prompt, params)
            if not admission:
                if admission.lasting:  # never takeable here: 400 (the gateway's console line), no retry
                    raise ValueError(without_other_ids(admission.reason, session_id))
                events.info("refused %s session (stream key %s): %s", kind, stream_key or "-", admission.reason)
                raise ServerFull(f"busy: {without_other_ids(admission.reason, session_id)}")
        if self.stopping:  # close_all ran while this offer waited (for its turn, its admission)
            if admission is not None:
                await self._give_back(session_id)
            events.info("refused %s session (stream key %s): the server is stopping", kind, stream_key or "-")
            raise ServerFull("the server is stopping")
        pc = self.new_peer()
        session = Session(session_id, kind, stream_key or session_id, pc, prompt=prompt, has_stream=owns_stream,
                          stamp=stamp and owns_stream)
        if admission is not None:
            session.expect = expectation(admission, self.target_fps, self.deadline_ms)
            # best effort: the scheduler's reason says why ("admitted best effort: it ... would miss ...")
            how = admission.reason if admission.best_effort else \
                f"admitted at {self.target_fps:g} fps / {self.deadline_ms:g} ms"
            events.info("session %s (%s%s) started, %s; expect about %.1f fps and %.0f ms latency",
                        session_id, kind, f", key {stream_key}" if stream_key else "", how,
                        admission.expected_fps, admission.expected_latency_ms)
        else:
            events.info("session %s (%s, key %s) started", session_id, kind, stream_key)
        self.sessions[session_id] = session
        if owns_stream:
            self._renew_expectations()
            session.fanout = FanOut(self.engine, session_id, stamp=session.stamp,
                                    on_end=functools.partial(self.end_soon, session))

        @pc.on("connectionstatechange")
        async def _state() -> None:
            log.info("session %s (%s): %s", session_id, kind, pc.connectionState)
            if pc.connectionState == "connected" and session.connected_s is None:
                session.connected_s = time.monotonic()
                if kind == "whip":  # FFmpeg's publisher stops answering consent checks once connected
                    stop_consent_checks(pc)
                if owns_stream:
                    self._resume_players(session)
            if pc.connectionState in ("failed", "closed"):
                await self.close(session_id, f"peer connection {pc.connectionState}")

        session.tasks.append(asyncio.create_task(self._watchdog(session), name=f"watchdog-{session_id}"))
        return session

    @staticmethod
    def _full(kind: str, stream_key: str | None, why: str) -> ServerFull:
        """A place refused: the console says what the client is told (a probe: the console said
        "4 of 4 streams already running" while the client heard that 3 were still connecting)."""
        events.info("refused %s session (stream key %s): %s", kind, stream_key or "-", why)
        return ServerFull(f"busy: {why}")

    @property
    def _pending_rule(self) -> str:
        return f"one that has not connected {self.replace_pending_after_s:g} s after its offer gives its place to a new one"

    async def _replace_pending(self, kind: str, stream_key: str | None, viewers: bool = False) -> bool:
        """A newcomer would be refused (the session limit, or the engine's admission; `viewers`:
        the viewer limit): end the oldest stream session (WHEP session) whose peer has not
        connected `replace_pending_after_s` after its offer, and say whether one was ended. Such
        a peer has sent no frame and may never send one (a tab closed while connecting, blocked
        UDP, a client that posts offers and leaves): held for `connect_timeout_s`, one such offer
        at 4 denoise steps kept every other user out for 30 s, and `max_sessions` of them the
        whole server. A peer still connecting within the time an ICE handshake takes keeps its
        place."""
        now = time.monotonic()
        pending = [s for s in self.sessions.values() if (s.kind == "whep" if viewers else s.has_stream)
                   and not s.closed and s.connected_s is None and now - s.created_s >= self.replace_pending_after_s]
        if not pending:
            return False
        oldest = min(pending, key=lambda s: s.created_s)
        await self.close(oldest.id, f"a new {kind} session (stream key {stream_key or '-'}) took its place: "
                                    f"not connected {now - oldest.created_s:.0f} s after its offer")
        return True

    async def _take_over_silent(self, stream_key: str) -> None:
        """End the key's publisher if no video came from it for `takeover_after_s`: its peer
        is gone (a crashed OBS) or sends nothing, and a new publisher wants the key now. A
        browser session whose page's control socket has closed is ended at once: the page's
        key is its tab's, so this is that tab come back (a reload, a reconnect), which waited
        out 409s before (a probe: three of them, and the page then took a new key, breaking its
        viewer link)."""
        held = self.publisher(stream_key)
        if held is None:
            return
        if held.kind == "browser" and held.page_left_s is not None and held.control_sockets == 0:
            await self.close(held.id, f"its page came back (stream key {stream_key}; its control socket had "
                                      f"closed {time.monotonic() - held.page_left_s:.0f} s before)")
            return
        idle = held.input_idle_s()
        if idle >= self.takeover_after_s:
            await self.close(held.id, f"a new publisher took stream key {stream_key} (no video from this one "
                                      f"for {idle:.0f} s)")

    async def _admit(self, session_id: str, stream_key: str, prompt: str, params: dict):
        """The engine's admission of a new stream, with the stream counted (and its key held)
        while it is awaited. A request cancelled meanwhile gives back what the engine admitted."""
        self._admitting[session_id] = stream_key
        try:
            return await self.engine.add_stream(
                session_id, prompt, target_fps=self.target_fps, deadline_ms=self.deadline_ms, **params
            )
        except asyncio.CancelledError:
            asyncio.ensure_future(self._give_back(session_id))
            raise
        except StreamsLost as lost:  # the pipeline failed twice while admitting it: say so, not 500
            events.info("refused a session (stream key %s): %s", stream_key, lost.reason)
            raise ServerFull(f"busy: the model pipeline failed while admitting this stream ({lost.reason})") from None
        finally:
            del self._admitting[session_id]

    async def _give_back(self, session_id: str) -> None:
        try:
            await self.engine.remove_stream(session_id)
        except Exception:  # never admitted, or the engine stopped
            log.debug("remove_stream %s after a cancelled admission failed", session_id, exc_info=True)

    async def _watchdog(self, session: Session) -> None:
        """A peer that answers but never connects (closed tab, blocked UDP) is freed after
        `connect_timeout_s`; one that connected is freed by its state change, or, for a stream
        session, when no video came from it for `input_timeout_s` (it holds an engine stream)."""
        deadline = session.created_s + self.connect_timeout_s
        while session.connected_s is None and time.monotonic() < deadline:
            await asyncio.sleep(min(0.25, deadline - time.monotonic()))
        if session.connected_s is None:
            await self.close(session.id, f"never connected within {self.connect_timeout_s:g} s")
            return
        while session.has_stream and not session.closed:
            idle = session.input_idle_s()
            if idle >= self.input_timeout_s:
                await self.close(session.id, f"no video arrived for {idle:.0f} s")
                return
            await asyncio.sleep(self.input_timeout_s - idle)
        while session.kind == "whep" and not session.closed:  # judged only once its player has reported
            if session.waiting_s is not None:  # its source ended: sent nothing, it need not report
                left = session.waiting_s + self.player_grace_s - time.monotonic()
                if left <= 0:
                    await self.close(session.id, f"its source {session.stream_key} ended and no publisher took "
                                                 f"the key within {self.player_grace_s:g} s")
                    return
                await asyncio.sleep(min(1.0, left))
                continue
            silent = 0.0 if session.rtcp_s is None else time.monotonic() - session.rtcp_s
            if silent >= self.player_timeout_s:
                await self.close(session.id, f"its player sent no RTCP report for {silent:.0f} s (gone)")
                return
            await asyncio.sleep(min(1.0, self.player_timeout_s - silent))

    def end_soon(self, session: Session, why: str) -> None:
        """End `session` with `why` from a callback that cannot await (its output's end, a track
        or reader that cannot go on, a player's failed encoder); nothing once it is closed."""
        if not session.closed:
            session.tasks.append(asyncio.ensure_future(self.close(session.id, why)))

    async def close(self, session_id: str, reason: str = "closed") -> bool:
        """Free everything a session holds: tasks, input reader, subscribers, engine stream,
        peer. Idempotent; False if unknown. `reason` goes to the console line."""
        session = self.sessions.pop(session_id, None)
        if session is None or session.closed:
            return False
        session.closed = True
        self.ended[session_id] = (session.kind, session.stream_key, reason)
        while len(self.ended) > self.ENDED_KEPT:
            self.ended.popitem(last=False)
        frames = f", {session.fanout.frames_out} frames out" if session.fanout is not None else ""
        key = f", key {session.stream_key}" if session.kind in ("whip", "whep") else ""
        events.info("session %s (%s%s) ended after %.0f s%s: %s", session_id, session.kind, key,
                    time.monotonic() - session.created_s, frames, reason)
        # 0. The engine stream goes first (its removal queued now, awaited below): the session has
        #    left the list, so a new offer arriving meanwhile must not be refused on its account.
        removal = asyncio.ensure_future(self.engine.remove_stream(session_id)) if session.has_stream else None
        # 1. Stop reading input and any helper tasks.
        if session.reader is not None:
            await session.reader.close()
        await cancel_tasks(session.tasks)
        # 2. Leave the source's fan-out (whep) / stop our own fan-out and its viewers.
        if session.source is not None and session.source.fanout is not None and session.slot is not None:
            session.source.fanout.unsubscribe(session.slot)
        if session.player is not None:
            session.player.stop()  # leaves the shared encoder (the last player closes it)
        if session.fanout is not None:
            viewers = [v for v in self.sessions.values() if v.source is session]
            waiting = [v for v in viewers if self._wait_for_publisher(v, session)]  # (before the await below)
            await session.fanout.close()
            for viewer in viewers:
                if viewer not in waiting:
                    await self.close(viewer.id, f"its source {session.stream_key} ended")
        # 3. The engine stream's removal, queued at step 0.
        if removal is not None:
            try:
                await removal
            except Exception:  # engine stopped meanwhile
                log.debug("remove_stream %s failed", session_id, exc_info=True)
        if removal is not None:
            self._renew_expectations()
        # 4. The peer (its connectionstatechange re-enters close(), which returns False).
        await session.pc.close()
        # 5. What it freed goes back to the system once its last buffers are gone (one trim for a
        #    burst of ends; in a thread: it holds the allocator's lock for some milliseconds).
        if self._trim is None or self._trim.done():
            self._trim = asyncio.ensure_future(self._release_memory_later())
        return True

    def _wait_for_publisher(self, viewer: Session, source: Session) -> bool:
        """`source` ends: its WHEP player `viewer` waits `player_grace_s` for the next publisher of
        its stream key (OBS reconnecting after a network drop takes the key over, or its Stop and
        Start), keeping its peer and its RTP stream, off the source's encoder (`FanOut.release`);
        the watchdog frees it when none comes. A generic WHEP player lost the stream at each
        reconnect and had to be restarted by hand. False (the viewer ends with the source): no
        grace, the server stopping, a player with its own output track or not answered yet, or a
        source played by its session id (no publisher takes that again)."""
        if (self.player_grace_s <= 0 or self.stopping or viewer.closed or viewer.player is None
                or source.stream_key == source.id):
            return False
        viewer.source, viewer.waiting_s = None, time.monotonic()
        source.fanout.release(viewer.player)
        events.info("session %s (whep, key %s) waits up to %g s for a new publisher: its source %s ended",
                    viewer.id, viewer.stream_key, self.player_grace_s, source.id)
        return True

    def _resume_players(self, source: Session) -> None:
        """`source`, a new publisher of a key whose players wait (`_wait_for_publisher`), has
        connected: each plays it from its next keyframe, with the codec it negotiated."""
        if source.closed or self.publisher(source.stream_key) is not source:
            return
        for viewer in [v for v in self.sessions.values() if v.waiting_s is not None
                       and v.stream_key == source.stream_key and not v.closed]:
            try:
                source.fanout.player(*viewer.player.wants, track=viewer.player)
            except RuntimeError:  # its fan-out ended (the engine ended the stream): its close follows
                return
            # its reports are judged from now on (a player may send none while it gets no video)
            viewer.source, viewer.waiting_s = source, None
            viewer.rtcp_s = None if viewer.rtcp_s is None else time.monotonic()
            events.info("session %s (whep, key %s) plays again: the key's new publisher is session %s",
                        viewer.id, viewer.stream_key, source.id)

    TRIM_AFTER_S = 2.0

    async def _release_memory_later(self) -> None:
        await asyncio.sleep(self.TRIM_AFTER_S)
        await asyncio.to_thread(release_freed_memory)

    async def close_all(self, reason: str = "server shutting down") -> None:
        self.stopping = True
        for session_id in list(self.sessions):
            await self.close(session_id, reason)
        await cancel_tasks([t for t in (self._trim, self._renewing) if t is not None])

    RENEW_EVERY_S = 5.0

    def _renew_expectations(self) -> None:
        """A stream came, went or changed its steps: what every stream can expect is asked of the
        engine now, and every RENEW_EVERY_S while streams run (their input rates are measured as
        their frames arrive, the cost model learns), and kept in its `expect`, which each stats
        message carries (a probe: a stream told 30 fps alone got 10 beside two newcomers and still
        read 30)."""
        self._renew_now.set()
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while not self.stopping and any(s.has_stream for s in self.sessions.values()):
            self._renew_now.clear()
            try:
                outlooks = await self.engine.outlooks()
            except Exception:  # the engine stopped (the server is going away)
                log.debug("renewing the streams' expectations failed", exc_info=True)
                return
            for session_id, (fps, latency_ms) in outlooks.items():
                session = self.sessions.get(session_id)
                if session is not None and session.expect is not None:
                    session.expect = {**session.expect, "fps": round(fps, 2), "latency_ms": round(latency_ms),
                                      "streams": len(outlooks)}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), self.RENEW_EVERY_S)

    async def update_params(self, key: str, message: dict) -> dict:
        return (await self.apply_change(key, message))[0]

    async def apply_change(self, key: str, message: dict) -> tuple[dict, int]:
        """Apply control fields to the session's stream (or, for whep, its source's). The reply:
        `params`, every field as now applied; `expect`, what the stream can expect (renewed when
        steps change: more steps cost fps and add latency); `means`, what the model makes of the
        prompt where it knows only a few (the demo's nine names: a free prompt changes nothing)."""
        if (target := self._stream_session(key)) is None:
            raise KeyError(key)
        if message and target.params_applied is None:  # its first change: what it ran until now
            target.params_applied = to_control_words(await self.engine.params(target.id))
        steps_before = (target.params_applied or {}).get("steps")
        try:
            params = await self.engine.update_params(target.id, **to_engine_params(message))
        except AdmissionRefused as exc:  # the console says so, as it does for a refused offer
            key = f", key {target.stream_key}" if target.kind == "whip" or target.stream_key != target.id else ""
            events.info("refused a change of session %s (%s%s): %s", target.id, target.kind, key, exc)
            why = without_other_ids(str(in_client_words(exc, message)), target.id)
            # room that other streams hold is a 503 with Retry-After, as for a new stream (a probe:
            # a 400 told a client it sent a bad value); more steps than the pool has lanes, a 400
            raise (ValueError if exc.lasting else ServerFull)(why) from None
        except ValueError as exc:
            raise ValueError(without_other_ids(str(in_client_words(exc, message)), target.id)) from None
        # Counted as the engine applied it, before the await below: a change another controller
        # makes during that await counts after this one, so this caller's control socket (told
        # `count`, the reply's params predating that change) still gets that one pushed.
        # A change that changed nothing (an empty PATCH, an Apply of what runs) is not pushed to
        # the other controllers as "changed by another controller" (a page probe)
        words = to_control_words(params)
        if message and words != target.params_applied:
            target.params_changes += 1
        target.params_applied = words
        count = target.params_changes
        # re-admitted with the new lane count; a page sends its steps field with every Apply once
        # its user set it, and each prompt change logged "now runs N steps" again (a probe)
        if "steps" in message and params.steps != steps_before:
            admission = await self.engine.admission(target.id)
            target.expect = expectation(admission, self.target_fps, self.deadline_ms)
            # the console says it as for a start (a probe: only the control reply said it)
            events.info("session %s (%s) now runs %d steps; expect about %.1f fps and %.0f ms latency%s", target.id,
                        target.kind, params.steps, admission.expected_fps, admission.expected_latency_ms,
                        " (best effort)" if admission.best_effort else "")
            self._renew_expectations()  # the others' share changed too
        return self._params_reply(target, params), count

    def _params_reply(self, target: Session, params) -> dict:
        reply = {"params": to_control_words(params)}
        if target.expect is not None:
            reply["expect"] = target.expect
        if (means := self.prompt_means(params.prompt)) is not None:
            reply["means"] = means
        return reply

    def params_changes(self, key: str) -> int | None:
        """How many changes the session's stream (a whep session's source's) has taken; None when
        it has none. A control socket compares it with the count it last told its client of."""
        target = self._stream_session(key)
        return None if target is None else target.params_changes

    def _stream_session(self, key: str) -> Session | None:
        """The live session whose engine stream `key` controls: itself, or a whep session's source."""
        session = self.get(key)
        target = session.source if session is not None and session.kind == "whep" else session
        return None if target is None or not target.has_stream or target.closed else target

    async def params_now(self, key: str) -> dict | None:
        """What a change's reply says (params, expect, means), for a change another controller
        made; None when the session's stream has gone."""
        if (target := self._stream_session(key)) is None:
            return None
        try:
            return self._params_reply(target, await self.engine.params(target.id))
        except (KeyError, ValueError):  # the stream left the engine meanwhile
            return None

    async def current_params(self, key: str) -> dict | None:
        """The params the session's stream (a whep session's source's) runs now, in control
        words; None when it has none. A refused change's reply carries them, so that a page
        shows what is in use, not what it failed to apply."""
        now = await self.params_now(key)
        return None if now is None else now["params"]

    def params_known(self, key: str) -> dict | None:
        """The params as of the stream's last change, without asking the engine (None before its
        first change, or when it has no stream): for replies that must not wait on a step."""
        target = self._stream_session(key)
        return None if target is None or target.params_applied is None else dict(target.params_applied)

    def prompt_means(self, prompt: str) -> str | None:
        """What the served model makes of `prompt` when it knows a few prompts only (the demo's
        nine names, `text.kind: styles`: "a claymation world" is `a photo`); None for free text."""
        return prompt_style(prompt) if self.engine.cfg.text.kind == "styles" else None

    def snapshot(self) -> dict:
        """Counts for /healthz and /metrics, the engine's frame size and rate (clients such as
        the benchmark send frames at that size), the preset's stream parameters in the
        control words (the page shows them and sends only what its user changed), and which
        preset runs (the page says so when its weights are random: the picture is noise)."""
        cfg = self.engine.cfg
        video = cfg.video
        defaults = to_control_words(StreamParams.defaults(cfg))
        del defaults["prompt"]  # the page's own field
        return {
            "sessions": len(self.sessions),
            "streams": self.stream_count,
            "max_sessions": self.max_sessions,
            "viewers": self.viewer_count,
            "max_viewers": self.max_viewers,
            "tasks": sum(sum(not t.done() for t in s.tasks) for s in self.sessions.values()),
            "video": {"width": video.width, "height": video.height, "fps": video.fps},
            "slo": {"target_fps": self.target_fps, "deadline_ms": self.deadline_ms},
            "defaults": defaults,
            "model": {"config": cfg.name, "random_weights": cfg.weights.format == "random"},
        }


async def wait_closed(manager: SessionManager, session_id: str, timeout_s: float = 10.0) -> None:
    """Test/ops helper: wait until a session is gone."""
    deadline = time.monotonic() + timeout_s
    while session_id in manager.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
