"""`streamdiff control`: change a running stream's parameters over the control WebSocket.

Owns: one WebSocket round trip (`send_params`) with the `websockets` package, and printing
the reply. Does not own: the protocol's meaning (server.app / server.sessions).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode, urlsplit, urlunsplit


class ControlError(Exception):
    """The change could not be made: a bad URL, no such session, a refused token or value.
    One line, in the user's terms."""


WS_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def server_address(url: str, schemes=WS_SCHEMES):
    """`url` split (urlsplit) if it names a server: one of `schemes`, a host, a port in range;
    ControlError otherwise (`streamdiff control` and `streamdiff bench --url` both check it)."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or 1 <= parts.port <= 65535
    except ValueError:  # not a number, or out of range
        port_ok = False
    if parts.scheme not in schemes or not parts.hostname or not port_ok:
        raise ControlError(f"--url {url!r} is not a server address: use http://HOST:PORT, "
                           f"e.g. http://127.0.0.1:8000")
    return parts


def ws_url(base_url: str, session: str, token: str | None = None) -> str:
    """http(s)://host:port[/...] or ws(s)://... -> ws(s)://host:port/ws?session=...&token=...
    ControlError for anything else (a missing scheme or host, a port out of range)."""
    parts = server_address(base_url)
    query = {"session": session, **({"token": token} if token else {})}
    return urlunsplit((WS_SCHEMES[parts.scheme], parts.netloc, "/ws", urlencode(query), ""))


# WebSocket close codes a server may send without a reason
CLOSE_CODES = {1001: "going away", 1009: "message too big", 1011: "server error"}


async def send_params(base_url: str, session: str, params: dict, token: str | None = None,
                      timeout_s: float = 10.0) -> dict:
    """Send one `params` message and return the server's reply (skipping stats pushes and changes
    other controllers made meanwhile, `elsewhere`)."""
    import websockets
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    url = ws_url(base_url, session, token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=timeout_s) as ws:
            await ws.send(json.dumps({"type": "params", **params}))
            while True:
                reply = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
                if reply.get("type") != "stats" and not reply.get("elsewhere"):
                    return reply
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 404:
            raise ControlError(f"no session {session!r} on {base_url} (a session id, or the stream key of "
                               f"an OBS stream; the server's console lists them)") from None
        if status == 401:
            raise ControlError(f"{base_url} wants a token: give --token" if not token
                               else f"{base_url} refused the token") from None
        raise ControlError(f"{base_url} answered HTTP {status} instead of a control socket") from None
    except InvalidHandshake as exc:  # not HTTP/1.1, or nothing (a probe: `python -m http.server` gave a traceback)
        raise ControlError(f"{base_url} answers, but not as a StreamDiff server: {exc}") from None
    except TimeoutError:
        raise ControlError(f"{base_url} did not answer within {timeout_s:g} s") from None
    except ConnectionClosed as exc:  # e.g. 1009: the message is over the server's size limit
        said = exc.rcvd or exc.sent
        why = f" ({said.code} {said.reason or CLOSE_CODES.get(said.code, '')})".replace(" )", ")") if said else ""
        raise ControlError(f"{base_url} closed the control connection{why}") from None


def run(base_url: str, session: str, params: dict, token: str | None = None) -> int:
    reply = asyncio.run(send_params(base_url, session, params, token))
    if reply.get("type") == "error":
        raise ControlError(f"the server refused the change: {reply.get('error')}")
    if reply.get("type") == "closed":
        raise ControlError(f"session {session!r} has ended")
    try:  # the prompt as the user wrote it (a probe: 水彩画 came back as \u6c34\u5f69\u753b)
        print(json.dumps(reply, ensure_ascii=False))
    except UnicodeEncodeError:  # a terminal or file that cannot show it: escaped
        print(json.dumps(reply))
    return 0
