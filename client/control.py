"""`streamdiff control`: change a running stream's parameters over the control WebSocket.

Owns: one WebSocket round trip (`send_params`) with the `websockets` package, and printing
the reply. Does not own: the protocol's meaning (server.app / server.sessions).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode, urlsplit, urlunsplit


def ws_url(base_url: str, session: str, token: str | None = None) -> str:
    """http(s)://host:port[/...] or ws(s)://... -> ws(s)://host:port/ws?session=...&token=..."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme or "ws")
    query = {"session": session, **({"token": token} if token else {})}
    return urlunsplit((scheme, parts.netloc, "/ws", urlencode(query), ""))


async def send_params(base_url: str, session: str, params: dict, token: str | None = None,
                      timeout_s: float = 10.0) -> dict:
    """Send one `params` message and return the server's reply (skipping stats pushes)."""
    import websockets

    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with websockets.connect(ws_url(base_url, session, token), additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "params", **params}))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
            if reply.get("type") != "stats":
                return reply


def run(base_url: str, session: str, params: dict, token: str | None = None) -> int:
    reply = asyncio.run(send_params(base_url, session, params, token))
    print(json.dumps(reply))
    return 0 if reply.get("type") == "params" else 1
