"""Behind a reverse proxy, as operators deploy it (a proxy probe): under a path of the proxy's own
(`location /streamdiff/`), with the page's host passed on, with a proxy that drops or refuses
WebSockets. The proxy is a small aiohttp one written here (nginx is not installed in CI): it
strips its prefix, says so in X-Forwarded-Prefix, adds X-Forwarded-For and passes Host on as
the browser sent it (nginx's `proxy_set_header Host $http_host`)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web
from gateway_helpers import auth, obs_like_offer, running_server, sessions_of, viewer_offer
from test_browser import CHROMIUM, _async, _browser, _message_with, _playing, _until

SDP = {"Content-Type": "application/sdp"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "host"}
WS_HANDSHAKE = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"}
GRACE_S = 1.0  # the server's grace for a page's control socket (control_grace_s; 3 s by default)


class Proxy:
    """Serves `upstream` under `prefix`; `websockets=False` is a proxy configured without the
    Upgrade lines (it answers a WebSocket handshake 400, as nginx then does)."""

    def __init__(self, upstream: str, prefix: str = "/streamdiff", websockets: bool = True):
        self.upstream, self.prefix, self.websockets = upstream, prefix, websockets
        self.offers = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.frozen: set[web.WebSocketResponse] = set()  # held open, passing nothing on
        self.http: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if not path.startswith(self.prefix + "/"):
            return web.Response(status=404, text=f"proxy: not under {self.prefix}")
        target = self.upstream + path[len(self.prefix):] + (f"?{request.rel_url.raw_query_string}"
                                                             if request.rel_url.raw_query_string else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | WS_HANDSHAKE}
        headers.update({"Host": request.host, "X-Forwarded-Prefix": self.prefix,
                        "X-Forwarded-For": request.remote or "", "X-Forwarded-Proto": "http"})
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if not self.websockets:
                return web.Response(status=400, text="proxy: no WebSocket upgrade configured")
            return await self._bridge(request, target, headers)
        if request.method == "POST" and path.endswith("/offer"):
            self.offers += 1
        async with self.http.request(request.method, target, headers=headers, data=await request.read(),
                                     allow_redirects=False) as resp:
            body = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
            return web.Response(status=resp.status, body=body, headers=out)

    async def _bridge(self, request: web.Request, target: str, headers: dict) -> web.StreamResponse:
        try:
            upstream = await self.http.ws_connect(target.replace("http", "ws", 1), headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            return web.Response(status=exc.status, text=f"proxy: upstream said {exc.status}")
        client = web.WebSocketResponse()
        await client.prepare(request)
        self.sockets.add(client)

        async def pump(source, sink) -> None:
            async for msg in source:
                if client in self.frozen:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)

        tasks = [asyncio.ensure_future(pump(client, upstream)), asyncio.ensure_future(pump(upstream, client))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self.sockets.discard(client)
            self.frozen.discard(client)
            await upstream.close()
            await client.close()
        return client

    async def drop_sockets(self) -> int:
        """What a proxy's timeout or reload does: every WebSocket it carries is closed."""
        dropped = list(self.sockets)
        for socket in dropped:
            await socket.close()
        return len(dropped)

    def freeze_sockets(self) -> set:
        """A proxy that holds the sockets open and passes nothing on (a stalled upstream)."""
        self.frozen = set(self.sockets)
        return set(self.frozen)

    @contextlib.asynccontextmanager
    async def serving(self):
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        async with aiohttp.ClientSession(auto_decompress=False) as self.http:
            try:
                yield f"http://127.0.0.1:{port}{self.prefix}"
            finally:
                await runner.cleanup()


async def _resources_under_a_prefix() -> dict:
    out: dict = {}
    async with running_server(token=None, max_streams=6, allowed_hosts=("video.example",)) as (url, app), \
            aiohttp.ClientSession() as http:
        for name, prefix in (("proxied", "/streamdiff"), ("nested", "/apps/video/"), ("bad", "/a b"),
                             ("scheme", "https://evil.example"), ("none", None)):
            headers = {**SDP, **({"X-Forwarded-Prefix": prefix} if prefix is not None else {})}
            pub, offer = await obs_like_offer()
            async with http.post(f"{url}/whip/cam-{len(out)}", data=offer, headers=headers) as r:
                out[f"whip {name}"] = (r.status, r.headers.get("Location"))
            viewer, view_offer, _ = await viewer_offer()
            async with http.post(f"{url}/whep/cam-{len(out) - 1}", data=view_offer, headers=headers) as r:
                out[f"whep {name}"] = (r.status, r.headers.get("Location"))
            await viewer.close()
            await pub.close()
        async with http.get(f"{url}/sessions", headers={"X-Forwarded-Prefix": "/streamdiff"}) as r:
            out["watch"] = [s.get("watch") for s in await r.json() if s["kind"] == "whip"]  # (players have none)
        # /metrics names the streams (keys, session ids) to a scrape, not to a page elsewhere
        for name, headers in (("scrape", {}), ("foreign page", {"Origin": "https://evil.example"})):
            async with http.get(f"{url}/metrics", headers=headers) as r:
                out[f"metrics {name}"] = (r.status, await r.text())
        # a proxy at :8443 that passes the host without its port (nginx's $host) is told what to pass
        page = {"Origin": "https://video.example:8443", "X-Forwarded-For": "10.0.0.7"}
        for name, headers in (("port dropped", {**page, "X-Forwarded-Host": "video.example"}),
                              ("host and port", {**page, "X-Forwarded-Host": "video.example:8443"}),
                              ("rfc 7239", {"Origin": "https://video.example:8443",
                                            "Forwarded": 'for=10.0.0.7;host="video.example:8443";proto=https'}),
                              ("foreign", {"Origin": "https://evil.example"}),
                              ("foreign via the proxy", {"Origin": "https://evil.example",
                                                         "X-Forwarded-Host": "video.example:8443"})):
            async with http.get(f"{url}/sessions", headers=headers) as r:
                out[f"origin {name}"] = (r.status, await r.text())
        # DNS rebinding through a proxy block that answers any name: the Host is the upstream's, the
        # page's own name comes in X-Forwarded-Host or Forwarded (a probe: it reached every control route)
        rebound = {"Origin": "http://rebind.evil.example:8080"}
        for name, headers in (("x-forwarded-host", {"X-Forwarded-Host": "rebind.evil.example:8080"}),
                              ("forwarded", {"Forwarded": 'for=10.0.0.7;host="rebind.evil.example:8080"'}),
                              ("forwarded twice", {"Forwarded": 'host="video.example:8443";host=rebind.evil.example'})):
            async with http.get(f"{url}/sessions", headers={**rebound, **headers}) as r:
                out[f"rebound {name}"] = (r.status, await r.text())
        # the Origin rule goes by the route, not the decoded path: /sessions/a%2Fb is the session route
        async with http.delete(f"{url}/sessions/a%2Fb", headers={"Origin": "https://evil.example"}) as r:
            out["encoded slash"] = (r.status, await r.text())
        async with http.post(f"{url}/offer", json={}, headers={"Origin": "https://evil.example"}) as r:
            out["offer foreign"] = (r.status, r.content_type, await r.text())
    return out


def test_the_addresses_the_server_hands_out_go_through_the_proxys_prefix(caplog):
    """A proxy probe: under `location /streamdiff/` WHIP/WHEP answered `Location: /whip/KEY/ID`,
    outside the proxy's path, so OBS's DELETE at the end and a player's went nowhere; the viewer
    links of /sessions too. The prefix is taken only as a plain path; one that is not is said once.
    And what a proxy passes on widens nothing (a probe of the headers): its forwarded host meets the
    Host rule, /metrics keeps stream keys from pages elsewhere."""
    caplog.set_level("WARNING", logger="streamdiff.server.http")
    out = asyncio.run(_resources_under_a_prefix())
    refused = [r.getMessage() for r in caplog.records if "X-Forwarded-Prefix" in r.getMessage()]
    assert sum("'/a b'" in m for m in refused) == 1 and sum("evil.example" in m for m in refused) == 1, refused
    for kind in ("whip", "whep"):
        status, location = out[f"{kind} proxied"]
        assert status == 201 and location.startswith(f"/streamdiff/{kind}/cam-"), out[f"{kind} proxied"]
        assert out[f"{kind} nested"][1].startswith(f"/apps/video/{kind}/cam-"), out[f"{kind} nested"]
        for name in ("bad", "scheme", "none"):
            assert out[f"{kind} {name}"][1].startswith(f"/{kind}/cam-"), (name, out[f"{kind} {name}"])
    assert out["watch"] and all(w.startswith("/streamdiff/viewer.html?key=cam-") for w in out["watch"]), out["watch"]
    status, text = out["origin port dropped"]
    assert status == 403 and "proxy_set_header X-Forwarded-Host $http_host" in text, text
    assert out["origin host and port"][0] == 200 and out["origin rfc 7239"][0] == 200, out
    status, text = out["origin foreign"]
    assert status == 403 and "behind a proxy" not in text, text  # a page elsewhere, no proxy involved
    status, text = out["origin foreign via the proxy"]  # a page elsewhere, through a well set up proxy
    assert status == 403 and "behind a proxy" not in text, text
    for name in ("x-forwarded-host", "forwarded"):
        status, text = out[f"rebound {name}"]
        assert status == 403 and "--allow-host rebind.evil.example" in text and "proxy" in text, (name, status, text)
    status, text = out["rebound forwarded twice"]  # a malformed Forwarded (host twice) names no host at all
    assert status == 403 and "another origin" in text, text
    status, text = out["encoded slash"]
    assert status == 403 and "another origin" in text, text
    status, kind, text = out["offer foreign"]
    assert status == 403 and kind == "application/json" and "another origin" in text, (status, kind, text)
    status, scrape = out["metrics scrape"]
    assert status == 200 and 'key="cam-' in scrape, scrape[-400:]
    status, foreign = out["metrics foreign page"]
    assert status == 200 and "key=" not in foreign and "stream=" not in foreign, foreign[-400:]
    assert "streamdiff_" in foreign  # the totals stay readable


async def _page_behind_a_proxy() -> dict:
    from playwright.async_api import async_playwright

    out: dict = {}
    async with running_server(token=None, control_grace_s=GRACE_S) as (url, app), async_playwright() as pw:
        sessions = sessions_of(app)
        browser = await _browser(pw)
        try:
            proxy = Proxy(url)
            async with proxy.serving() as front:
                page = await browser.new_page()
                await page.goto(front + "/")
                await page.click("#start")
                out["playing"] = await _until(lambda: _playing(page, "output"), 180)
                out["sessions"] = list(sessions.sessions)
                # the proxy drops the control socket (its timeout, its reload): the same stream
                # plays on, the page opening its socket again
                out["dropped"] = await proxy.drop_sockets()
                await asyncio.sleep(GRACE_S + 0.5)  # past the server's grace for a page's socket
                out["after_drops"] = (list(sessions.sessions), proxy.offers, len(proxy.sockets),
                                      await page.inner_text("#message"))
                # the proxy holds the socket open and passes nothing: the page replaces it, and a
                # change applied then is answered
                held = proxy.freeze_sockets()
                out["replaced"] = await _until(
                    lambda: _async(lambda: bool(proxy.sockets) and not proxy.sockets & held), 30)
                await page.fill("#prompt", "through the proxy")
                await page.click("#apply")
                out["applied"] = await _until(lambda: _message_with(page, "applied"), 30)
                played = (await _playing(page, "output") or {}).get("time", 0)
                out["still_playing"] = await _until(lambda: _played_past(page, played + 1.0), 30)
                # the viewer link, under the proxy's path, plays the stream through WHEP
                href = await page.get_attribute("#watch", "href")
                viewer = await browser.new_page()
                await viewer.goto(f"{front}/{href}")
                out["viewer"] = await _until(lambda: _playing(viewer, "v"), 90)
                await page.click("#stop")
                out["freed"] = await _until(lambda: _async(lambda: not sessions.sessions), 15)
            # a proxy without the WebSocket lines: the page says what it lacks, after one offer
            blocked = Proxy(url, websockets=False)
            async with blocked.serving() as front:
                page = await browser.new_page()
                await page.goto(front + "/")
                await page.click("#start")
                out["blocked"] = await _until(lambda: _message_with(page, "WebSocket"), 60)
                await asyncio.sleep(2.0)  # the page that retried made an offer a second
                out["blocked_offers"] = blocked.offers
                out["blocked_freed"] = await _until(lambda: _async(lambda: not sessions.sessions), 15)
        finally:
            await browser.close()
    return out


async def _played_past(page, time_s: float):
    stats = await _playing(page, "output")
    return stats if stats and stats["time"] > time_s else None


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_and_viewer_work_under_a_proxys_path_and_outlive_its_socket_drops():
    """A proxy probe: under a proxy's path the page sent /offer, /healthz and /ws to the root (404)
    and the viewer waited for ever; each time the proxy dropped the control socket the page ended
    its stream and started another; a proxy without WebSocket upgrades made a new stream every
    second for 5 minutes with "Lost the connection" as the only word."""
    out = asyncio.run(_page_behind_a_proxy())
    assert out["playing"] and len(out["sessions"]) == 1, out
    assert out["dropped"] == 1, out  # the proxy carried the page's socket
    ids, offers, sockets, message = out["after_drops"]
    assert ids == out["sessions"] and offers == 1 and sockets == 1, out["after_drops"]
    assert "Lost the connection" not in message, message
    assert out["replaced"] and out["applied"] and "through the proxy" in out["applied"], out
    assert out["still_playing"] and out["viewer"], out
    assert out["freed"], "Stop did not end the stream through the proxy"
    assert out["blocked"] and "proxy_set_header Upgrade" in out["blocked"], out["blocked"]
    assert out["blocked_offers"] == 1 and out["blocked_freed"], out
