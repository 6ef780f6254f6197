"""Live control of a stream: `PATCH /sessions/{id}/params`, `DELETE /sessions/{id}` and the `/ws`
WebSocket (params in, stats out each second), and freeing a browser page's session when its control
socket drops.

Owns: those two handlers and the control message format ({"type": "params" | "ping", ...}; a
params reply carries `means` where the model knows only a few prompts; a change another
controller made is pushed to every other control socket of the stream as a params message with
`elsewhere: true`).
Does not own: what the fields mean (server.sessions maps them to engine parameters) or routing
(server.app).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSMsgType, web

from streamdiff.server.http import (
    SESSIONS_KEY,
    SETTINGS_KEY,
    authorized,
    parse_json,
    read_json_object,
    unauthorized,
)
from streamdiff.engine.types import StreamClosedError, short_repr
from streamdiff.server.sessions import ServerFull, SessionManager

log = logging.getLogger(__name__)
CHANGE_FAILED = "the change could not be applied (the server log has the details)"

MAX_WAITING_PARAMS = 8  # params messages of one control socket waiting for the engine
# Control sockets of one session (the page's own, a `streamdiff control`, a dashboard or two):
# each holds a descriptor and two tasks, and a WHIP session's key is in every viewer's URL.
MAX_SOCKETS_PER_SESSION = 8
# A control message's size limit: far above any valid one (a prompt is at most 1000 characters),
# so that a long prompt is answered with what is wrong; a larger message closes the socket (1009).
MAX_MESSAGE_BYTES = 1 << 20


def _authorized(request: web.Request) -> bool:
    return authorized(request, request.app[SETTINGS_KEY].token)


_unauthorized = unauthorized


async def params_patch(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS_KEY]
    if not _authorized(request):
        return _unauthorized(json_body=True)
    body = await read_json_object(request, request.app[SETTINGS_KEY].body_timeout_s)
    if body.get("type", "params") != "params":  # the socket's message shape is welcome, another type is not
        return web.json_response({"error": f"a params change has no type or type \"params\", got "
                                           f"{short_repr(body['type'])}"}, status=400)
    try:
        reply = await sessions.update_params(request.match_info["id"], body)
    except KeyError:
        return web.json_response({"error": "no such session"}, status=404)
    except ServerFull as exc:  # more steps than the other streams leave room for now
        return web.json_response({"error": str(exc)}, status=503,
                                 headers={"Retry-After": str(request.app[SETTINGS_KEY].retry_after_s)})
    except (ValueError, TypeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except StreamClosedError as exc:  # the pipeline failed under the change: the session ends with the reason
        return web.json_response({"error": f"the change was not applied: {exc}"}, status=410)
    except Exception:  # noqa: BLE001 - one line to the client, the traceback to the log
        log.exception("applying %s to session %s failed", body, request.match_info["id"])
        return web.json_response({"error": CHANGE_FAILED}, status=500)
    return web.json_response({"ok": True, **reply})


async def session_delete(request: web.Request) -> web.Response:
    """`DELETE /sessions/{id}`: ends the session now. The page sends it on Stop: a peer that never
    connected (Stop pressed while its offer was answered) tells the server nothing, and its session
    held the tab's stream key and a place for 30 s (a page probe)."""
    sessions = request.app[SESSIONS_KEY]
    if not _authorized(request):
        return _unauthorized(json_body=True)
    session_id = request.match_info["id"]
    if session_id not in sessions.sessions:
        if (reason := sessions.why_ended(session_id)) is not None:  # (the peer's close may have come first)
            return web.json_response({"ok": True, "ended_already": reason})
        return web.json_response({"error": f"no such session {short_repr(session_id)}"}, status=404)
    await sessions.close(session_id, "its client ended it (DELETE /sessions)")
    return web.json_response({"ok": True})


async def websocket(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS_KEY]
    if not _authorized(request):
        return _unauthorized(json_body=True)  # (as its 404 and 503: JSON, a probe)
    key = request.query.get("session", "")
    owner = sessions.get(key)
    if owner is None:
        return web.json_response({"error": f"no such session {short_repr(key)}"}, status=404)
    if owner.sockets >= MAX_SOCKETS_PER_SESSION:  # counted from before the handshake: no burst gets past
        log.info("refused a control socket for session %s: %d open already", owner.id, owner.sockets)
        return web.json_response({"error": f"{MAX_SOCKETS_PER_SESSION} control connections to this session are "
                                           f"open already"}, status=503)
    owner.sockets += 1
    try:
        return await _control(request, sessions, key, owner)
    finally:
        owner.sockets -= 1


async def _control(request: web.Request, sessions: SessionManager, key: str, owner) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=10, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    # `owner=1`: the page that made the session holds this socket for its lifetime (other
    # controllers, e.g. `streamdiff control`, come and go without it).
    owns = request.query.get("owner") in ("1", "true")
    owner.control_sockets += owns
    if owns:
        owner.page_left_s = None

    # Changes this socket's client has been told of (its own replies, or pushed): a change another
    # controller makes (`streamdiff control`, a second tab, a dashboard) is pushed with the next
    # stats, so that the page shows what its stream runs (it kept showing its own last values).
    told = sessions.params_changes(key) or 0
    # This socket's own change is counted when the engine applied it, before its reply is made
    # (a steps change then waits for the re-admission): meanwhile the count is not pushed back to
    # it as another controller's (a page probe: every steps change said "changed by another
    # controller" and the page forgot which fields its user had set).
    applying = False

    async def push_stats() -> None:
        nonlocal told
        last_id = owner.id  # the session the key named last (a socket opened by stream key follows it)
        while not ws.closed:
            session = sessions.get(key)
            if session is None:  # says why (no video for 10 s, the server shutting down, ...)
                reason = sessions.why_ended(last_id)  # (by key it never matched: a bare "closed", a probe)
                # `server_stopping`: the page waits for the server to come back and starts again
                await ws.send_json({"type": "closed", **({"reason": reason} if reason else {}),
                                    **({"server_stopping": True} if sessions.stopping else {})})
                await ws.close()
                return
            if not applying and (changes := sessions.params_changes(key) or 0) > told \
                    and (now := await sessions.params_now(key)):
                told = max(told, changes)  # this socket's own change may have landed meanwhile
                await ws.send_json({"type": "params", "elsewhere": True, **now})
            await ws.send_json({"type": "stats", **session.stats()})
            last_id = session.id
            await asyncio.sleep(1.0)

    # Params messages wait on the engine (a change lands between two steps), so they are applied
    # in order from a bounded inbox by their own task: a ping or a bad message is answered at
    # once, a client that sends faster than the engine steps is told so instead of queueing
    # without end, and what is still waiting when the socket closes is dropped.
    inbox: asyncio.Queue[dict] = asyncio.Queue(MAX_WAITING_PARAMS)

    async def with_params_in_use(reply: dict) -> dict:
        """A refused params message's reply also says what runs (a probe: a burst's refusals left
        the page showing values its stream did not use)."""
        if reply.get("type") == "error" and (now := await sessions.current_params(key)) is not None:
            reply["params"] = now
        return reply

    async def apply_params() -> None:
        nonlocal told, applying
        while True:
            message = await inbox.get()
            applying = True
            try:
                reply, count = await _apply_params(sessions, key, message, request.app[SETTINGS_KEY].retry_after_s)
            finally:
                applying = False
            if count is not None:  # the count as of this change (later ones are pushed)
                told = max(told, count)
            reply = await with_params_in_use(reply)
            if ws.closed:
                return
            try:
                await ws.send_json(reply)
            except ConnectionError:  # the socket went while the engine applied it
                return

    stats_task = asyncio.create_task(push_stats())
    params_task = asyncio.create_task(apply_params())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_json({"type": "error", "error": "binary messages are not accepted: send JSON text"})
            elif msg.type == WSMsgType.TEXT:
                message, reply = _read_control_message(msg.data)
                if message is not None:
                    try:
                        inbox.put_nowait(message)
                        continue
                    except asyncio.QueueFull:  # answered at once: what runs as of the last change
                        # (asking the engine here held the read loop a step a refusal: a probe's
                        # burst of 40 had its ping answered 26 s late)
                        reply = {"type": "error", "error": f"{MAX_WAITING_PARAMS} params messages are already "
                                                           "waiting to be applied: wait for their replies"}
                        if (known := sessions.params_known(key)) is not None:
                            reply["params"] = known
                await ws.send_json(reply)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        stats_task.cancel()
        params_task.cancel()
        owner.control_sockets -= owns
        if owns and owner.kind == "browser" and owner.control_sockets == 0 and not owner.closed:
            owner.page_left_s = time.monotonic()  # the tab, should it come back with its key, takes it at once
            grace_s = request.app[SETTINGS_KEY].control_grace_s
            owner.tasks[:] = [t for t in owner.tasks if not t.done()]  # a page that reconnects often
            owner.tasks.append(asyncio.create_task(_free_orphan(sessions, owner, grace_s)))
    return ws


async def _free_orphan(sessions: SessionManager, session, grace_s: float) -> None:
    """A browser page keeps its control socket open while it lives; a tab that crashed or was
    killed drops it, and its stream is freed after `grace_s` unless a socket came back."""
    await asyncio.sleep(grace_s)
    if session.control_sockets == 0 and not session.closed:
        await sessions.close(session.id, "the page's control socket closed (tab closed or crashed)")


def _read_control_message(text: str) -> tuple[dict | None, dict | None]:
    """(a params message to apply, None) or (None, the reply: pong or an error)."""
    try:
        message = parse_json(text)
    except ValueError as exc:  # (a socket has messages, not bodies)
        return None, {"type": "error", "error": str(exc).replace("the body", "the message")}
    if not isinstance(message, dict):
        return None, {"type": "error", "error": "a message must be a JSON object with a 'type'"}
    if message.get("type") == "ping":
        return None, {"type": "pong"}
    if message.get("type") != "params":
        return None, {"type": "error", "error": f"unknown message type {short_repr(message.get('type'))} (known: params, ping)"}
    return message, None


async def _apply_params(sessions: SessionManager, key: str, message: dict,
                        retry_after_s: int) -> tuple[dict, int | None]:
    """The reply, and the stream's change count as of this change (None: refused)."""
    try:
        reply, count = await sessions.apply_change(key, message)
        return {"type": "params", **reply}, count
    except KeyError:
        return {"type": "error", "error": "the session has ended"}, None
    except ServerFull as exc:  # no room for now: the same change may pass later
        return {"type": "error", "error": str(exc), "retry_after_s": retry_after_s}, None
    except (ValueError, TypeError) as exc:
        return {"type": "error", "error": str(exc)}, None
    except StreamClosedError as exc:  # the session's end (with this reason) follows on the socket
        return {"type": "error", "error": f"the change was not applied: {exc}"}, None
    except Exception:  # noqa: BLE001 - the socket's params task must outlive it
        log.exception("applying %s to session %s failed", message, key)
        return {"type": "error", "error": CHANGE_FAILED}, None
