"""The aiohttp gateway: browser offers, WHIP ingest, WHEP playback, control, health, metrics.

Owns: routes and their HTTP semantics (status codes, CORS, Bearer auth, content types),
`ServerSettings`, building the app around an AsyncEngine (`build_app`) and running it
(`serve`). Does not own: session bookkeeping (server.sessions) or media (server.webrtc).

Routes:
  GET  /, /viewer.html, /app.js          static client (client/web)
  POST /offer                            JSON {sdp, type, prompt?, stamp?, key?, input_fps?, params...}
                                         -> {sdp, type, session, expect, means?}
                                         (OPTIONS /offer: the CORS preflight; every reply carries CORS)
  POST /whip/{key}                       application/sdp -> 201 + Location /whip/{key}/{session}
                                         (/whip/{key}/ the same; /whip, /whip/: 404 saying the key is missing)
                                         (`?stamp=1` on /offer and /whip: frame-id stamps, see sessions)
  DELETE|PATCH|OPTIONS /whip/{key}/{id}  end (200) | trickle (405) | CORS
  POST /whep/{key}, DELETE|PATCH /whep/{key}/{id}   the same for playback of stream `key`
  GET  /ws?session=ID                    control WebSocket (params in, stats out each second)
  PATCH /sessions/{id}/params            JSON params (id: session id or stream key)
  DELETE /sessions/{id}                  end the session now (the page's Stop)
  GET  /sessions, /healthz, /metrics
  HEAD /whep/{key}                       200, Content-Type application/sdp (WHEP draft 04)
Auth: with a token set, every session and control route needs `Authorization: Bearer T`
(`?token=T` is accepted too: browsers cannot set headers on WebSockets); /metrics names
sessions only to an authorised scrape (without a token: not to a page on another origin).
Bodies, keys and timeouts: server.http.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import urlencode

from aiohttp import web
from aiortc import RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from streamdiff.server.control import params_patch, session_delete, websocket
from streamdiff.server.http import (
    CORS,
    AccessLog,
    ENGINE_KEY,
    SESSIONS_KEY,
    SETTINGS_KEY,
    STREAM_KEY,
    add_cors,
    authorized,
    authorized_to_watch,
    check_stream_key,
    error,
    expect_small_body,
    foreign_origin,
    forwarded_prefix,
    known_host_only,
    quiet_malformed_requests,
    read_json_object,
    printable,
    read_text,
    same_origin_control,
    shown_key,
    unauthorized,
    watch_token,
)
from streamdiff.engine.types import short_repr
from streamdiff.config import ConfigError
from streamdiff.preflight import LISTEN_ERRNOS, cannot_listen, loopback_only
from streamdiff.server.prom import exposition
from streamdiff.server.startup import START_KEY, EngineStart
from streamdiff.server.sessions import (
    ServerFull,
    SessionManager,
    StreamKeyTaken,
    check_prompt,
    enable_event_log,
    events,
    in_client_words,
    parse_flag,
    to_engine_params,
)
from streamdiff.server.sdp import (
    CodecError,
    SdpError,
    accept_simulcast,
    answer_simulcast,
    check_offer_sdp,
    directions_per_section,
    prefer_h264,
    reject_sections,
    require_directions,
    require_video_codec,
    stand_in_for_unknown_audio,
    wait_ice_gathering,
)
from streamdiff.server.webrtc import (
    InputReader,
    OutputTrack,
    PlayerTrack,
    SilenceTrack,
    answer_keyframe_requests,
    configure_bitrates,
    default_bitrate_bps,
    drain_track,
    enable_loopback_candidates,
    on_rtcp,
    retrieve_connect_errors,
)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "client" / "web"
if not WEB_DIR.is_dir():  # installed layout: streamdiff/server next to streamdiff/client
    import streamdiff.client

    WEB_DIR = Path(streamdiff.client.__file__).resolve().parent / "web"


@dataclass
class ServerSettings:
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names besides IP addresses and localhost (no token: DNS rebinding)
    max_sessions: int | None = None  # default: the engine's cache.max_streams
    max_viewers: int = 16  # WHEP players at once, all streams together (connected or connecting)
    target_fps: float | None = None  # stream SLO; default the config's slo (else video.fps)
    deadline_ms: float | None = None  # default the config's slo.deadline_ms
    output_fps: float | None = None  # cap on output pacing; default video.fps (never the admission floor)
    bitrate_bps: int | None = None  # None: default_bitrate_bps of the config's frame size and fps
    ice_loopback: bool = False
    retry_after_s: int = 10
    warmup_wait_s: float = 20.0  # an offer that comes during warm-up waits this long for the engine, then 503
    whip_warmup_wait_s: float = 5.0  # a WHIP POST waits at most this: OBS abandons one after 8 s
    warmup_retry_after_s: int = 5
    connect_timeout_s: float = 30.0  # a peer that has not connected by then is freed
    replace_pending_after_s: float = 10.0  # ...or, when a newcomer would be refused, by then
    input_timeout_s: float = 10.0  # a connected stream session that sent no video for this long is freed
    player_timeout_s: float = 10.0  # a WHEP player whose RTCP reports stop for this long is freed
    player_grace_s: float = 15.0  # a WHEP player whose source ended waits this long for the key's next publisher
    takeover_after_s: float = 5.0  # a publisher silent this long gives its key to a new one
    header_timeout_s: float = 10.0  # a connection whose request headers are not in by then is closed
    body_timeout_s: float = 10.0  # a request body not in by then gets 408
    control_grace_s: float = 3.0  # a page whose control socket closed (crashed tab) is freed after this


_error = error
_unauthorized = unauthorized


def _authorized(request: web.Request) -> bool:
    return authorized(request, request.app[SETTINGS_KEY].token)


def _may_watch(request: web.Request) -> bool:
    """A WHEP route: the server's token or the watch token of the URL's stream key."""
    return authorized_to_watch(request, request.app[SETTINGS_KEY].token, request.match_info["key"])


def watch_path(settings: ServerSettings, key: str) -> str:
    """The viewer page of stream `key`, with its watch token when the server has a token."""
    query = {"key": key, **({"token": watch_token(settings.token, key)} if settings.token else {})}
    return "/viewer.html?" + urlencode(query)


def _full(exc: ServerFull, settings: ServerSettings) -> web.Response:
    return _error(503, str(exc), **{"Retry-After": str(settings.retry_after_s)})


async def _not_ready(request: web.Request, wait_s: float | None = None) -> str | None:
    """None once the engine runs (waiting for a warm-up in progress, at most `wait_s`, default
    `warmup_wait_s`); else why not, for a 503 with `_retry_warm_up` headers."""
    settings = request.app[SETTINGS_KEY]
    return await request.app[START_KEY].ready(settings.warmup_wait_s if wait_s is None else wait_s)


def _client_gone(request: web.Request) -> bool:
    """The client closed its connection (gave up waiting): an answer would reach nobody."""
    return request.transport is None or request.transport.is_closing()


def _left_during_warm_up(request: web.Request, kind: str) -> web.Response:
    """The client gave up while its offer waited for the engine: no session is opened (one would
    hold its place, and a publisher's key, until it timed out). The response reaches nobody."""
    request[LOGGED] = True
    log.info("a %s offer's client left while the model warmed up; no session opened", kind)
    return _error(408, "the client left while the model warmed up")


async def _close_if_client_gone(request: web.Request, sessions: SessionManager, session) -> None:
    """After negotiating: a client that left meanwhile never gets its answer; free its session now."""
    if _client_gone(request):
        await sessions.close(session.id, "the client left before its answer was sent")


async def _refused_by_aiortc(request: web.Request, kind: str, sdp: str) -> str | None:
    """Why aiortc cannot take the offer (its exception, in one line for the console), tried on a
    peer of its own before the offer gets a place; None: it takes it. An offer that can never work
    was admitted first, then failed: on a busy server it got 503 and Retry-After (a client that
    obeys retried for ever), and it could evict a connecting session before it failed (a probe:
    no ICE credentials, `a=setup:bogus`). The client gets a fixed sentence, the console the why."""
    pc = request.app[SESSIONS_KEY].new_peer()
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        answer = await pc.createAnswer()  # (its own checks: a probe's offers failed only here)
        if (got := _sections(answer.sdp)) != (offered := _sections(sdp)):  # as setLocalDescription checks
            raise ValueError(f"the answer's media sections {got} do not match the offer's {offered}")
    except Exception as exc:
        log.info("a %s offer aiortc cannot take", kind, exc_info=True)
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        request[LOGGED] = True
        events.info("refused %s session (stream key %s): 400 could not negotiate the offer: %s", kind,
                    shown_key(request.match_info.get("key", "-")), printable(why))
        return why
    finally:
        await pc.close()
    return None


def _sections(sdp: str) -> list[tuple[str, str]]:
    """(kind, mid) of each media section, as aiortc pairs an answer with its offer."""
    parsed = aiortc_sdp.SessionDescription.parse(sdp)
    return [(media.kind, media.rtp.muxId) for media in parsed.media]


NOT_NEGOTIABLE = "could not negotiate the offer (the server's console says why)"


def _retry_warm_up(request: web.Request) -> dict:
    return {"Retry-After": str(request.app[SETTINGS_KEY].warmup_retry_after_s)}


LOGGED = web.RequestKey("refusal_logged", bool)  # SessionManager.open has logged this refusal


async def log_refusal(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: one console line for every refused session offer, with the reason
    the client was sent (OBS shows only "Failed to connect" and drops the body, docs/obs.md). The
    session manager's own refusals (a key taken, the server full) say more and are logged there
    (`request[LOGGED]`); a WHEP player's 404 while it waits for a publisher is not a refusal
    (viewer.html retries on it), nor is an answer to a client that has left."""
    if request.method != "POST" or response.status < 400 or request.get(LOGGED) or not isinstance(response, web.Response):
        return
    if _client_gone(request):  # an answer that reaches nobody (the client left half way through its body)
        return
    if request.match_info.http_exception is not None:  # no such route (POST /whip/, /whip/k/x): not an offer
        return
    kind = "browser" if request.path == "/offer" else request.path.split("/")[1]
    if kind not in ("browser", "whip", "whep") or (kind == "whep" and response.status == 404):
        return
    text = (response.text or "").strip()
    if response.content_type == "application/json":
        try:
            text = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            pass
    events.info("refused %s session (stream key %s): %d %s", kind, shown_key(request.match_info.get("key", "-")),
                response.status, printable(text.splitlines()[0]) if text else response.reason)


def _expect_header(session) -> dict:
    e = session.expect
    return {"X-StreamDiff-Expect": f"fps={e['fps']}; latency_ms={e['latency_ms']}; best_effort={str(e['best_effort']).lower()}"} if e else {}


async def _answer(session) -> str:
    answer = await session.pc.createAnswer()
    await session.pc.setLocalDescription(answer)
    retrieve_connect_errors(session.pc)  # a peer that leaves mid-handshake is a normal end
    await wait_ice_gathering(session.pc)
    return session.pc.localDescription.sdp


def _wire_input(session, sessions: SessionManager, settings: ServerSettings) -> None:
    cfg = sessions.engine.cfg

    @session.pc.on("track")
    def _on_track(track) -> None:
        if track.kind == "video" and session.reader is None:
            session.reader = InputReader(track, sessions.engine, session.id, cfg.video.width, cfg.video.height,
                                         stamp=session.stamp, on_fail=functools.partial(sessions.end_soon, session))
        else:
            session.tasks.append(asyncio.create_task(drain_track(track), name=f"drain-{session.id}"))


def _output_track(session, source, settings: ServerSettings, cfg, sessions: SessionManager) -> OutputTrack:
    session.slot = source.fanout.subscribe()
    # (a fault probe: errors of a track or reader froze the picture and held the place)
    return OutputTrack(session.slot, settings.output_fps or cfg.video.fps,
                       on_fail=functools.partial(sessions.end_soon, session))


def _player_track(session, source, settings: ServerSettings, sessions: SessionManager):
    """A WHEP player's video: packets of the stream's encoder shared by every player that
    negotiated the same codec (the first codec of the answer, H.264 when offered); a codec we
    do not encode ourselves gets an encoder of its own, as a browser's output does."""
    # the codec of the section the stream goes out on (`_send_on`), not of the first video section:
    # a player offering [sendonly VP8, recvonly H.264] was sent VP8 on its H.264 section (a review)
    section = _send_section(session.pc, "video")
    mime = section._codecs[0].mimeType.lower() if section is not None and getattr(section, "_codecs", None) else ""
    cfg = sessions.engine.cfg
    if mime not in ("video/h264", "video/vp8"):
        return _output_track(session, source, settings, cfg, sessions)
    session.player = source.fanout.player(mime, settings.output_fps or cfg.video.fps, settings.bitrate_bps)
    # a generic WHEP player would wait on a frozen picture: end its session (its peer closes)
    session.player.on_failed = functools.partial(
        sessions.end_soon, session, "the stream's encoder failed (the server's console says why)")
    return session.player


# ---------------------------------------------------------------------- browser


async def offer(request: web.Request) -> web.Response:
    sessions, settings = request.app[SESSIONS_KEY], request.app[SETTINGS_KEY]
    if not _authorized(request):
        return _unauthorized(json_body=True)
    body = await read_json_object(request, settings.body_timeout_s)
    try:
        sdp, kind = body.get("sdp"), body.get("type", "offer")
        if kind != "offer" or not isinstance(sdp, str):
            raise SdpError("type must be 'offer' and sdp a string")
        prompt = "" if body.get("prompt") is None else check_prompt(body["prompt"])
        stamp = parse_flag(body.get("stamp", request.query.get("stamp")))
        # `key`: the page's own stream key, the same across its reconnects and Stops, so that a
        # viewer of its output keeps playing (a probe: each reconnect made a new id, and an open
        # viewer waited for the old one for ever); without one the session's id is its key
        key = body.get("key")
        if key is not None and not (isinstance(key, str) and STREAM_KEY.fullmatch(key)):
            raise SdpError("key must be 1-64 characters: letters, digits, '-' and '_'")
        # `input_fps`: the rate the page's camera sends at, so that what the stream is told assumes
        # it until its frames' rate is measured (a probe: a 15 fps camera was told 30 fps, video.fps)
        input_fps = body.get("input_fps")
        if input_fps is not None and not (isinstance(input_fps, (int, float)) and not isinstance(input_fps, bool)
                                          and 1 <= input_fps <= 240):
            raise SdpError(f"input_fps must be a number from 1 to 240 (the camera's frame rate), got "
                           f"{short_repr(input_fps)}")
        params = to_engine_params({k: v for k, v in body.items()
                                   if k not in ("sdp", "type", "prompt", "stamp", "key", "input_fps")})
        if input_fps is not None:
            params["input_fps"] = float(input_fps)
        check_offer_sdp(sdp)
        require_directions(sdp, sends=True, receives=True, what="the page sends its camera and "
                           "receives the restyled video (sendrecv); to publish only, use /whip/KEY, to watch, /whep/KEY")
        sdp, _ = accept_simulcast(directions_per_section(sdp))
    except (ValueError, TypeError) as exc:  # our own checks: plain messages
        return web.json_response({"error": f"bad offer: {exc}"}, status=400)
    if await _refused_by_aiortc(request, "browser", sdp) is not None:
        return web.json_response({"error": NOT_NEGOTIABLE}, status=400)
    if (why := await _not_ready(request)) is not None:
        return web.json_response({"error": why}, status=503, headers=_retry_warm_up(request))
    if _client_gone(request):
        return _left_during_warm_up(request, "page")
    try:
        session = await sessions.open("browser", key, prompt, stamp=stamp, **params)
    except StreamKeyTaken as exc:  # the page's own previous session, not yet freed: it retries
        request[LOGGED] = True
        return web.json_response({"error": str(exc)}, status=409, headers={"Retry-After": "3"})
    except ServerFull as exc:
        request[LOGGED] = True
        return web.json_response({"error": str(exc)}, status=503, headers={"Retry-After": str(settings.retry_after_s)})
    except ValueError as exc:  # a parameter out of range (the engine names it; we say it in the client's word)
        return web.json_response({"error": str(in_client_words(exc, body))}, status=400)
    try:
        _wire_input(session, sessions, settings)
        await session.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        session.pc.addTrack(_output_track(session, session, settings, sessions.engine.cfg, sessions))
        answer_sdp = await _answer(session)
    except Exception as exc:
        if (ended := _ended_meanwhile(sessions, session, settings.retry_after_s, json_body=True)) is not None:
            return ended  # (its peer closed under it)
        await _negotiation_failed(sessions, session, exc)
        return web.json_response({"error": NOT_NEGOTIABLE}, status=400)
    await _close_if_client_gone(request, sessions, session)
    reply = {"sdp": answer_sdp, "type": "answer", "session": session.id, "expect": session.expect,
             "watch": watch_path(settings, session.stream_key)}  # the page's "watch it elsewhere" link
    if (means := sessions.prompt_means(prompt)) is not None:
        reply["means"] = means
    # what the stream runs (control words): the page shows it in the fields the offer left out,
    # which could hold a value from before (a refused change, another controller's, then Stop and Start)
    if (now := await sessions.current_params(session.id)) is not None:
        reply["params"] = now
    return _ended_meanwhile(sessions, session, settings.retry_after_s, json_body=True) or web.json_response(reply)


# ---------------------------------------------------------------------- WHIP / WHEP


async def _read_sdp_offer(request: web.Request) -> str:
    if request.content_type != "application/sdp":
        raise web.HTTPUnsupportedMediaType(text="Content-Type must be application/sdp\n", headers=CORS)
    # a byte-order mark before "v=0" (an offer a Windows editor saved, sent with curl --data-binary @file)
    return (await read_text(request, request.app[SETTINGS_KEY].body_timeout_s)).removeprefix("\ufeff")


async def whip_post(request: web.Request) -> web.Response:
    sessions, settings = request.app[SESSIONS_KEY], request.app[SETTINGS_KEY]
    key = check_stream_key(request.match_info["key"])
    if not _authorized(request):
        return _unauthorized()
    sdp = await _read_sdp_offer(request)
    try:
        stamp = parse_flag(request.query.get("stamp"))
        # the stream's first prompt, in the WHIP URL (OBS has no other field for it): ?prompt=...
        prompt = check_prompt(request.query.get("prompt", ""))
        check_offer_sdp(sdp)
        require_directions(sdp, sends=True, receives=False, what="a WHIP publisher offers sendonly video "
                           f"(to watch stream {key!r}, use /whep/{key})")
        require_video_codec(sdp)
        sdp, rids = accept_simulcast(directions_per_section(sdp))
        sdp, rejected = stand_in_for_unknown_audio(sdp)
    except CodecError as exc:
        return _error(406, str(exc))
    except ValueError as exc:  # SdpError or a bad ?stamp=
        return _error(400, str(exc))
    if await _refused_by_aiortc(request, "whip", sdp) is not None:
        return _error(400, NOT_NEGOTIABLE)
    if (why := await _not_ready(request, min(settings.warmup_wait_s, settings.whip_warmup_wait_s))) is not None:
        return _error(503, why, **_retry_warm_up(request))
    if _client_gone(request):
        return _left_during_warm_up(request, "WHIP")
    try:
        session = await sessions.open("whip", key, prompt, stamp=stamp)
    except StreamKeyTaken as exc:
        request[LOGGED] = True
        return _error(409, str(exc))
    except ServerFull as exc:
        request[LOGGED] = True
        return _full(exc, settings)
    try:
        _wire_input(session, sessions, settings)
        await session.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        answer_sdp = reject_sections(answer_simulcast(await _answer(session), rids), rejected)
    except Exception as exc:
        if (ended := _ended_meanwhile(sessions, session, settings.retry_after_s)) is not None:
            return ended  # (its peer closed under it)
        await _negotiation_failed(sessions, session, exc)
        return _error(400, NOT_NEGOTIABLE)
    await _close_if_client_gone(request, sessions, session)
    if (ended := _ended_meanwhile(sessions, session, settings.retry_after_s)) is not None:
        return ended
    if settings.token:  # where to watch it: the link carries a token that plays this stream and nothing else
        events.info("stream key %s: watch it at %s", key, watch_path(settings, key))
    return _sdp_created(f"{forwarded_prefix(request)}/whip/{key}/{session.id}", answer_sdp, session.id,
                        _expect_header(session))


async def no_stream_key(request: web.Request) -> web.Response:
    """POST /whip or /whep with no key: a URL without its stream key (OBS drops the body and
    says "Failed to connect"; `log_refusal` prints this line on the console)."""
    kind = request.path.strip("/")
    what = "your stream key, any name you choose" if kind == "whip" else "the key of the stream to play"
    return _error(404, f"no stream key in the URL: {kind.upper()} URLs are /{kind}/KEY, KEY {what} "
                       "(letters, digits, '-' and '_')")


async def whep_post(request: web.Request) -> web.Response:
    sessions, settings = request.app[SESSIONS_KEY], request.app[SETTINGS_KEY]
    key = check_stream_key(request.match_info["key"])
    if not _may_watch(request):
        return _unauthorized()
    sdp = await _read_sdp_offer(request)
    try:
        kinds = check_offer_sdp(sdp)
        require_directions(sdp, sends=False, receives=True, what=f"/whep/{key} plays a stream (a WHEP "
                           f"player offers recvonly video); to publish, POST to /whip/{key}")
        require_video_codec(sdp, player=True)
        sdp, rejected = stand_in_for_unknown_audio(directions_per_section(sdp))
    except CodecError as exc:
        return _error(406, str(exc))
    except SdpError as exc:
        return _error(400, str(exc))
    if _live(sessions, key) is None:  # (before the trial peer: viewer.html asks every 2 s)
        return _not_live(key)
    if await _refused_by_aiortc(request, "whep", sdp) is not None:
        return _error(400, NOT_NEGOTIABLE)
    try:
        session = await sessions.open("whep", key)
    except ServerFull as exc:
        request[LOGGED] = True
        return _full(exc, settings)
    # The source as it is now: the one found before those awaits may have ended, or been replaced
    # by a new publisher of the key (a probe: a viewer attached to an ended source got 201 and held
    # its --max-viewers place, its player's reports keeping it alive, with no frame to show).
    source = _live(sessions, key)
    if source is None:
        await sessions.close(session.id, f"stream {key} ended before the viewer was answered")
        return _not_live(key)
    try:
        session.source = source
        _wire_input(session, sessions, settings)  # a viewer's own tracks (if any) are drained
        await session.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        prefer_h264(session.pc)
        track = _player_track(session, source, settings, sessions)
        sender = _send_on(session.pc, track)
        on_rtcp(sender, lambda: setattr(session, "rtcp_s", time.monotonic()))
        if isinstance(track, PlayerTrack):
            answer_keyframe_requests(sender, track)
        if kinds.count("audio") > len(rejected):  # WHEP players expect audio too: silence
            _send_on(session.pc, SilenceTrack())
        for transceiver in session.pc.getTransceivers():  # WHEP answers sendonly, even to a sendrecv offer
            transceiver.direction = "sendonly" if transceiver.sender.track is not None else "inactive"
        answer_sdp = reject_sections(await _answer(session), rejected)
    except Exception as exc:
        if (ended := _ended_meanwhile(sessions, session, 2)) is not None:
            return ended  # (its source ended, its peer closed under it)
        await _negotiation_failed(sessions, session, exc)
        return _error(400, NOT_NEGOTIABLE)
    await _close_if_client_gone(request, sessions, session)
    location = f"{forwarded_prefix(request)}/whep/{key}/{session.id}"
    return _ended_meanwhile(sessions, session, 2) or _sdp_created(location, answer_sdp, session.id)


def _live(sessions: SessionManager, key: str):
    """The stream a viewer of `key` plays (a WHIP key's publisher, or a session by id); None if none is live."""
    source = sessions.publisher(key) or sessions.get(key)
    return source if source is not None and source.fanout is not None and not source.closed else None


def _not_live(key: str) -> web.Response:
    return _error(404, f"no stream {key!r} is live (start publishing first; viewers retry by themselves)",
                  **{"Retry-After": "2"})  # players that honour it come back in 2 s (viewer.html does)


def _send_on(pc, track):
    """Send `track` on the first transceiver of its kind that the player receives on (its offer
    says recvonly or sendrecv), else on the first of its kind (aiortc's addTrack: a player
    offering [sendonly, recvonly] video got its stream on the section it does not receive, and
    no picture). Returns the sender."""
    section = _send_section(pc, track.kind)
    if section is None or not _receives(section):
        return pc.addTrack(track)
    section.sender.replaceTrack(track)
    return section.sender


def _receives(transceiver) -> bool:
    # aiortc keeps the offer's direction as seen from our side: the player's recvonly is our sendonly
    return getattr(transceiver, "_offerDirection", None) in ("sendonly", "sendrecv")


def _send_section(pc, kind: str):
    """The transceiver a track of `kind` goes out on: the first one the player receives on, else
    the first of its kind with no track (where aiortc's addTrack puts it); None: a new one."""
    ours = [t for t in pc.getTransceivers() if t.kind == kind and t.sender.track is None]
    return next((t for t in ours if _receives(t)), ours[0] if ours else None)


async def whep_head(request: web.Request) -> web.Response:
    """WHEP draft 04: HEAD on the endpoint answers 200 with the offer's content type."""
    check_stream_key(request.match_info["key"])
    return web.Response(status=200, headers={**CORS, "Content-Type": "application/sdp"})


def _ended_meanwhile(sessions: SessionManager, session, retry_after_s: int, *,
                     json_body: bool = False) -> web.Response | None:
    """A 503 with Retry-After saying why, if the session ended while its offer was answered (a
    Stop's DELETE, a takeover of its key, its source ending, the server stopping); None while it
    lives. A probe: such a session got 400 "could not negotiate" (a page does not retry that; a
    viewer waited 30 s), or 200 with an answer for a session that was gone."""
    if not session.closed:
        return None
    why = f"the session ended while its offer was answered ({sessions.why_ended(session.id) or 'closed'}); try again"
    headers = {"Retry-After": str(retry_after_s)}
    return web.json_response({"error": why}, status=503, headers=headers) if json_body else _error(503, why, **headers)


async def _negotiation_failed(sessions: SessionManager, session, exc: Exception) -> None:
    """End a session whose offer aiortc could not answer; the console line says why in one line
    (the client gets a fixed sentence: no exception text in error bodies), -v adds the traceback."""
    log.info("negotiating %s session %s failed", session.kind, session.id, exc_info=True)
    why = " ".join(f"{type(exc).__name__}: {exc}".split())
    await sessions.close(session.id, f"could not negotiate the offer: {why[:200]}")


def _sdp_created(location: str, sdp: str, session_id: str, extra: dict | None = None) -> web.Response:
    # body, not text=: aiohttp would add "; charset=utf-8", a parameter application/sdp does not define
    return web.Response(status=201, body=sdp.encode(), content_type="application/sdp",
                        headers={**CORS, "Location": location, "X-Session-Id": session_id, **(extra or {})})


def _resource_kind(request: web.Request) -> str:
    """"whip" or "whep": the first part of a /whip|whep/{key}/{id} URL."""
    return request.path.split("/", 2)[1]


def _may_use_resource(request: web.Request) -> bool:
    """A /whip|whep/{key}/{id} URL: the server's token, or for a player's resource its stream's
    watch token."""
    return _may_watch(request) if _resource_kind(request) == "whep" else _authorized(request)


def _resource(request: web.Request):
    """The session a /whip|whep/{key}/{id} URL names, of that kind and key; None otherwise."""
    session = request.app[SESSIONS_KEY].sessions.get(request.match_info["id"])
    if session is None or session.kind != _resource_kind(request) or session.stream_key != request.match_info["key"]:
        return None
    return session


async def resource_delete(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS_KEY]
    if not _may_use_resource(request):
        return _unauthorized()
    session = _resource(request)
    if session is None:
        # OBS closes its peer before it sends DELETE: the close may have ended the session first
        reason = sessions.why_ended(request.match_info["id"], _resource_kind(request), request.match_info["key"])
        return _error(200, f"session ended already: {reason}") if reason else _error(404, "no such session")
    await sessions.close(session.id, f"{session.kind.upper()} DELETE")
    return _error(200, "session ended")


async def resource_other(request: web.Request) -> web.Response:
    """Every method on a session's resource URL but DELETE and OPTIONS: 405, whose Allow says
    the same as PATCH's (aiohttp's own 405 listed PATCH, which is always refused)."""
    if request.method == "PATCH":
        return await resource_patch(request)
    request[LOGGED] = True  # a POST here is no offer: not a refused session
    return _error(405, "a session's URL takes DELETE (ends the session) and OPTIONS only", Allow="DELETE, OPTIONS")


async def resource_patch(request: web.Request) -> web.Response:
    if not _may_use_resource(request):
        return _unauthorized()
    if _resource(request) is None:
        return _error(404, "no such session")
    return _error(405, "trickle ICE and ICE restarts are not supported: the answer holds all of the server's "
                  "candidates and yours are learnt from your connectivity checks, so none need sending "
                  "(OBS 30.2+ sends none and connects)", Allow="DELETE, OPTIONS")


async def options(request: web.Request) -> web.Response:
    """CORS preflight; endpoints that take a POST say what they accept (a session's resource
    URL takes DELETE only)."""
    if request.path == "/offer":
        return web.Response(status=204, headers={**CORS, "Accept-Post": "application/json"})
    if "key" in request.match_info and "id" not in request.match_info:  # /whip/KEY, /whep/KEY
        return web.Response(status=204, headers={**CORS, "Accept-Post": "application/sdp"})
    return web.Response(status=204, headers=CORS)


# ---------------------------------------------------------------------- ops


async def healthz(request: web.Request) -> web.Response:
    """200 once the engine runs; 503 while it warms up ("state": "warming") or after a failed
    start. The body is the same either way (the page reads its defaults from it). A stopping
    server has closed its listener already: a check is refused, not answered."""
    state = request.app[START_KEY].state
    ok = state == "ready"
    # `token_required`: the page says at once how to open it, not after asking for the camera
    return web.json_response({"ok": ok, "state": state, "token_required": bool(request.app[SETTINGS_KEY].token),
                              **request.app[SESSIONS_KEY].snapshot()}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    # Per-stream series name stream keys and session ids: not to a page on another origin of a
    # server without a token (any site the operator visited read them, then ended OBS's stream with
    # a WHIP DELETE: a probe); the totals stay readable to a dashboard anywhere.
    token = request.app[SETTINGS_KEY].token
    per_stream = _authorized(request) and (bool(token) or foreign_origin(request) is None)
    body = exposition(request.app[ENGINE_KEY], request.app[SESSIONS_KEY], per_stream=per_stream)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def list_sessions(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    settings = request.app[SETTINGS_KEY]
    prefix = forwarded_prefix(request)  # (behind a proxy's sub-path the link goes through it)
    return web.json_response([{**s.stats(), **({"watch": prefix + watch_path(settings, s.stream_key)}
                                                if s.has_stream else {})}
                              for s in request.app[SESSIONS_KEY].sessions.values()])


def _static(name: str):
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / name)

    return handler


# ---------------------------------------------------------------------- app


def build_app(engine, settings: ServerSettings | None = None, *, own_engine: bool = True,
              then: Callable[[], Awaitable[None]] | None = None) -> web.Application:
    """The gateway around `engine` (an AsyncEngine). With `own_engine`, the app starts the
    engine in the background from its startup (the port listens during warm-up; routes that need
    the engine wait for it: server.startup), runs `then` once it is warm, and stops it on
    cleanup; every peer is closed on shutdown either way."""
    settings = settings or ServerSettings()
    cfg = engine.cfg
    if settings.bitrate_bps is None:
        settings = replace(settings, bitrate_bps=default_bitrate_bps(cfg.video.width, cfg.video.height, cfg.video.fps))
    configure_bitrates(settings.bitrate_bps)
    if settings.ice_loopback:
        enable_loopback_candidates(True)
    quiet_malformed_requests()
    app = web.Application(client_max_size=256 * 1024, middlewares=[known_host_only, same_origin_control])
    app.on_response_prepare.append(add_cors)
    app.on_response_prepare.append(log_refusal)
    app[ENGINE_KEY] = engine
    app[SETTINGS_KEY] = settings
    app[START_KEY] = start = EngineStart(engine, own=own_engine)
    app[SESSIONS_KEY] = SessionManager(
        engine,
        max_sessions=settings.max_sessions or cfg.cache.max_streams,
        target_fps=settings.target_fps or cfg.slo.target_fps or cfg.video.fps,
        deadline_ms=settings.deadline_ms or cfg.slo.deadline_ms,
        connect_timeout_s=settings.connect_timeout_s,
        replace_pending_after_s=settings.replace_pending_after_s,
        input_timeout_s=settings.input_timeout_s,
        takeover_after_s=settings.takeover_after_s,
        max_viewers=settings.max_viewers,
        player_timeout_s=settings.player_timeout_s,
        player_grace_s=settings.player_grace_s,
    )

    async def on_startup(app: web.Application) -> None:
        start.begin(then)

    async def on_shutdown(app: web.Application) -> None:
        await app[SESSIONS_KEY].close_all()

    async def on_cleanup(app: web.Application) -> None:
        if start.state == "warming":  # stopped during warm-up: the start ends at its next step
            start.task.cancel()
            await asyncio.wait([start.task])
        if own_engine:
            await engine.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    r = app.router
    r.add_get("/", _static("index.html"))
    r.add_get("/index.html", _static("index.html"))
    r.add_get("/viewer.html", _static("viewer.html"))
    r.add_get("/app.js", _static("app.js"))
    r.add_post("/offer", offer, expect_handler=expect_small_body)
    r.add_route("OPTIONS", "/offer", options)
    for kind, post in (("whip", whip_post), ("whep", whep_post)):
        for endpoint in (f"/{kind}/{{key}}", f"/{kind}/{{key}}/"):  # a URL pasted with its slash works too
            r.add_post(endpoint, post, expect_handler=expect_small_body)
            if kind == "whep":
                r.add_route("HEAD", endpoint, whep_head)
            r.add_route("OPTIONS", endpoint, options)
        for keyless in (f"/{kind}", f"/{kind}/"):
            r.add_post(keyless, no_stream_key)
        r.add_delete(f"/{kind}/{{key}}/{{id}}", resource_delete)
        r.add_route("OPTIONS", f"/{kind}/{{key}}/{{id}}", options)
        r.add_route("*", f"/{kind}/{{key}}/{{id}}", resource_other)  # PATCH (trickle ICE): 405 too
    r.add_get("/ws", websocket)
    r.add_patch("/sessions/{id}/params", params_patch, expect_handler=expect_small_body)
    r.add_route("OPTIONS", "/sessions/{id}/params", options)
    r.add_delete("/sessions/{id}", session_delete)
    r.add_route("OPTIONS", "/sessions/{id}", options)
    for path, get in (("/sessions", list_sessions), ("/healthz", healthz), ("/metrics", metrics)):
        r.add_get(path, get)
        r.add_route("OPTIONS", path, options)  # a controller on another origin sends a token: preflighted
    return app


def app_runner(app: web.Application) -> web.AppRunner:
    """An AppRunner with the settings' header timeout (aiohttp closes a connection whose request
    headers are not complete within its keep-alive timeout)."""
    return web.AppRunner(app, keepalive_timeout=app[SETTINGS_KEY].header_timeout_s, access_log_class=AccessLog)


def page_url(host: str, port: int) -> str:
    """The address to open: an IPv6 host in brackets (http://[::1]:8000/). A server on every
    interface (0.0.0.0, ::) is opened on this machine as localhost: a browser gives the camera
    to a page on localhost or https only, and 0.0.0.0 is no address to open."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _say(text: str) -> None:
    """print() that survives a closed stdout (`serve | head -1`: a BrokenPipeError traceback,
    after which the server ignored SIGINT and SIGTERM): later lines go nowhere."""
    try:
        print(text, flush=True)
    except (BrokenPipeError, OSError):
        sys.stdout = open(os.devnull, "w")


def startup_lines(cfg, settings: ServerSettings, host: str, port: int, expect: tuple[float, float, float]) -> list[str]:
    """What `serve` prints once the engine is warm: where to go, the service level, and what one
    stream can expect from the measured step."""
    step_ms, fps, latency_ms = expect
    shown = page_url(host, port)
    token = f"token={settings.token}" if settings.token else ""
    target = settings.target_fps or cfg.slo.target_fps or cfg.video.fps
    deadline = settings.deadline_ms or cfg.slo.deadline_ms
    return [
        f"StreamDiff serving {cfg.name} on {shown}{'?' + token if token else ''}",
        f"  measured step {step_ms:.0f} ms: one stream can expect about {fps:.1f} fps and {latency_ms:.0f} ms latency "
        f"(service level {target:g} fps, {deadline:g} ms; a first stream is always admitted)",
        f"  OBS: WHIP {shown}whip/<key>{'  (Bearer token ' + settings.token + ')' if settings.token else ''}; "
        f"viewer {shown}viewer.html?key=<key>{'&' + token if token else ''}"
        # a docs probe: this link holds the server's token; the one to share plays one stream only
        + (" (holds the server's token; to share one stream, use its play-only link: on the console or the "
           "page when it starts, or `watch` in /sessions)"
           if token else ""),
        # a probe: served on the network with no token, any Host is answered (the names other
        # machines use are not known here), so nothing but this line stands between its streams
        # and anyone on the network, or a web page its users visit (DNS rebinding)
        *([f"  no --token: anyone who can reach port {port} (or a web page its users open, through DNS "
           f"rebinding) may open, change and end streams; give --token TOKEN (or STREAMDIFF_TOKEN)"]
          if not settings.token and not loopback_only(host) else []),
    ]


def serve(cfg, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None) -> int:
    """Build the engine from `cfg` and run the gateway until interrupted (0) or until the engine
    fails (1)."""
    from streamdiff.engine import AsyncEngine
    from streamdiff.parallel import build_executor

    settings = settings or ServerSettings()
    enable_event_log(sys.stderr)
    engine = AsyncEngine(cfg, executor_factory=build_executor)

    async def report() -> None:  # once the engine is warm
        expect = await engine.expect()
        _say("\n".join(startup_lines(cfg, settings, host, port, expect)))

    app = build_app(engine, settings, then=report)
    start = app[START_KEY]

    async def announce(_app: web.Application) -> None:  # the port listens right after the start-up hooks
        _say(f"StreamDiff: warming up {cfg.name} on {page_url(host, port)} (the page opens now; a stream "
             f"starts once the model is warm)")
        start.task.add_done_callback(_stop_if_failed)

    failed: list[BaseException] = []

    def engine_failed(exc: BaseException) -> None:  # every session has been told; nothing left to serve
        failed.append(exc)
        raise web.GracefulExit()

    engine.add_failure_callback(engine_failed)
    app.on_startup.insert(0, _stop_on_signals)  # before the engine warms up
    app.on_startup.append(announce)
    try:
        web.run_app(app, host=host, port=port, print=None, keepalive_timeout=settings.header_timeout_s,
                    handle_signals=False, access_log_class=AccessLog)
    except OSError as exc:  # `check_listen` passed, then another server bound the port first
        if exc.errno not in LISTEN_ERRNOS:
            raise
        raise ConfigError(cannot_listen(host, port, exc)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):  # the loop is gone; threads still wind down
        signal.signal(sig, _out_at_once)
    if start.error is not None:  # the warm-up failed: the command fails with its error, as before
        raise start.error
    if failed:  # its traceback is in the log above; exit 1 so that a supervisor restarts the server
        print(f"streamdiff: error: the engine failed, so the server stopped: {failed[0]!r}", file=sys.stderr, flush=True)
        return 1
    print("streamdiff: stopped", file=sys.stderr, flush=True)
    return 0


def _stop_if_failed(task: asyncio.Task) -> None:
    """The engine's start failed (weights, device memory, a Ray cluster...): stop serving; `serve`
    raises the error once aiohttp has cleaned up."""
    if not task.cancelled() and task.exception() is not None:
        raise web.GracefulExit()  # a SystemExit: it leaves the event loop like a signal's


def _out_at_once(*_) -> None:
    os.write(2, b"streamdiff: interrupted\n")  # not print: it may hold stderr's lock (a signal mid-print)
    os._exit(130)


SAME_SIGTERM_S = 1.0


async def _stop_on_signals(_app: web.Application) -> None:
    """SIGINT (Ctrl-C) or SIGTERM: a graceful stop (every session told, the engine stopped); a
    second one while that runs: out at once, exit 130. aiohttp's own handlers stayed installed
    during its cleanup, so a second Ctrl-C raised wherever the process was (exit 1 or -2, once a
    C++ abort from a codec thread) and printed nothing. A SIGTERM within `SAME_SIGTERM_S` of a
    first SIGTERM is that one again, not a second request: `timeout` signals its process group and
    make passes SIGTERM on to its child, so `timeout 12 make run` delivered one stop twice."""
    loop = asyncio.get_running_loop()
    received: list[tuple[str, float]] = []

    def on_signal(name: str) -> None:
        now = time.monotonic()
        if received and name == received[0][0] == "SIGTERM" and now - received[0][1] < SAME_SIGTERM_S:
            return
        received.append((name, now))
        if len(received) == 1:
            print(f"streamdiff: {name}: stopping (every session is told; press Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
            raise web.GracefulExit()
        _out_at_once()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
