"""Hostile and sloppy clients (issue 16, item 8): every bad input gets a 4xx or a clean
WebSocket error, error bodies carry no Python exception text, nothing is logged as a crash."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from gateway_helpers import TOKEN, answer, auth, obs_like_offer, running_server, sessions_of
from streamdiff.server.http import MAX_BODY_BYTES, MAX_JSON_DEPTH, foreign_origin, parse_json
from streamdiff.server.sessions import MAX_PROMPT_CHARS, check_prompt, parse_flag

SDP = {"Content-Type": "application/sdp"}
JSON = {"Content-Type": "application/json"}


async def _raw(port: int, data: bytes, wait_s: float = 6.0) -> bytes:
    """Send `data` on a raw connection and read until the server closes it (or `wait_s`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    got = b""
    try:
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(4096):
                got += chunk
    except TimeoutError:
        got += b"<still open>"
    writer.close()
    return got


async def _hostile(caplog):
    async with running_server(header_timeout_s=1.0, body_timeout_s=1.0) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        sessions = sessions_of(app)
        async with aiohttp.ClientSession() as http:
            # 1. Bodies that are not UTF-8, unknown charsets, deep and huge JSON, on every body route.
            for path, ctype in (("/offer", "application/json"), ("/whip/k", "application/sdp"),
                                ("/whep/k", "application/sdp"), ("/sessions/k/params", "application/json")):
                method = http.patch if path.startswith("/sessions") else http.post
                async with method(f"{url}{path}", data=b"\xff\xfe{\x80", headers={**auth(), "Content-Type": ctype}) as r:
                    assert r.status == 400 and "UTF-8" in await r.text(), path
                async with method(f"{url}{path}", data=b"{}", headers={**auth(), "Content-Type": f"{ctype}; charset=klingon"}) as r:
                    assert r.status == 415 and "charset" in await r.text(), path
                async with method(f"{url}{path}", data=b"[" * 300_000, headers={**auth(), "Content-Type": ctype}) as r:
                    assert r.status in (400, 413), path

            async def two_bytes_over_the_limit():  # a chunked body (no Content-Length): the limit holds too
                yield b'{"seed": 1, "pad": "' + b"x" * (MAX_BODY_BYTES - 20)
                yield b'"}'

            async with http.patch(f"{url}/sessions/k/params", data=two_bytes_over_the_limit(),
                                  headers={**auth(), **JSON}) as r:
                assert r.status == 413
            # an ASCII charset is UTF-8: the body is read and parsed (k is no session)
            async with http.patch(f"{url}/sessions/k/params", data=b'{"seed": 1}',
                                  headers={**auth(), "Content-Type": "application/json; charset=us-ascii"}) as r:
                assert r.status == 404, await r.text()
            # so is one saved with a UTF-8 byte-order mark (curl -d @params.json from a Windows
            # editor's file; a probe: 400 "not valid JSON")
            async with http.patch(f"{url}/sessions/k/params", data=b'\xef\xbb\xbf{"seed": 1}',
                                  headers={**auth(), **JSON}) as r:
                assert r.status == 404, await r.text()
            for depth in (50, 5000):
                async with http.post(f"{url}/offer", data="[" * depth + "]" * depth, headers={**auth(), **JSON}) as r:
                    assert r.status == 400 and "nested" in await r.text()
            async with http.post(f"{url}/offer", data=b"not json", headers={**auth(), **JSON}) as r:
                text = await r.text()
                assert r.status == 400 and "not valid JSON" in text and "Expecting value" not in text
            # valid JSON with a 5000-digit number (past Python's int limit) was called invalid JSON
            async with http.patch(f"{url}/sessions/k/params", data='{"seed": %s}' % ("9" * 5000),
                                  headers={**auth(), **JSON}) as r:
                text = await r.text()
                assert r.status == 400 and "more digits than any value takes" in text, text
            # 2. Stream keys: letters, digits, - and _, 1-64 characters, checked before anything is made.
            pub, offer = await obs_like_offer()
            for key in ("bad%20key", "a" * 65, "%C3%A9t%C3%A9", "x.y"):
                async with http.post(f"{url}/whip/{key}", data=offer, headers={**auth(), **SDP}) as r:
                    assert r.status == 400 and "stream key" in await r.text(), key
            assert sessions.sessions == {}
            # 3. Prompt length is capped; a lone surrogate (valid JSON, not encodable text) and a
            #    prompt that is not a string are refused in our words, not Python's.
            async with http.post(f"{url}/offer", json={"sdp": offer, "type": "offer", "prompt": "x" * 5000},
                                 headers=auth()) as r:
                assert r.status == 400 and "at most 1000" in await r.text()
            for prompt, words in (('"\\udc80 fox"', "a lone surrogate"), ("0", "prompt must be a string, got int"),
                                  ("false", "prompt must be a string, got bool")):
                body = '{"sdp": %s, "type": "offer", "prompt": %s}' % (json.dumps(offer), prompt)
                async with http.post(f"{url}/offer", data=body, headers={**auth(), **JSON}) as r:
                    text = await r.text()
                    assert r.status == 400 and words in text and "codec" not in text, (prompt, text)
            # 3b. Every reply carries CORS (a controller on another origin reads errors too), and
            #     /offer answers the preflight.
            async with http.options(f"{url}/offer") as r:
                assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
                assert r.headers["Accept-Post"] == "application/json"
            async with http.patch(f"{url}/sessions/nobody/params", json={"seed": 1}, headers=auth()) as r:
                assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == "*"
            async with http.head(f"{url}/whep/bad%20key") as r:
                assert r.status == 400
            # 4. Negotiation failures do not leak exception text to the client; the console's
            #    line (no -v needed) says why.
            broken = ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 H264/90000\r\n"
                      "a=fmtp:96 packetization-mode=1;profile-level-id=42e01f\r\n")
            async with http.post(f"{url}/whip/k", data=broken, headers={**auth(), **SDP}) as r:
                text = await r.text()
                assert r.status == 400 and text.strip() == "could not negotiate the offer (the server's console says why)"
            lines = [r.getMessage() for r in caplog.records if r.name == "streamdiff.events"]
            assert any("could not negotiate the offer: " in line and "Error" in line for line in lines), lines
            assert sessions.sessions == {}
            # 5. Bearer in any case; the comparison is constant-time.
            calls = []
            real = hmac.compare_digest

            def spy(a, b):
                calls.append(1)
                return real(a, b)

            hmac.compare_digest = spy
            try:
                async with http.post(f"{url}/whip/k", data=offer,
                                     headers={"Authorization": f"bearer {TOKEN}", **SDP}) as r:
                    assert r.status == 201, await r.text()
                    location, session_id = r.headers["Location"], r.headers["X-Session-Id"]
                    await answer(pub, await r.text())
            finally:
                hmac.compare_digest = real
            assert calls
            # 6. A WHIP session URL under /whep (and the other way round) is 404, and stays alive.
            async with http.delete(f"{url}/whep/k/{session_id}", headers=auth()) as r:
                assert r.status == 404
            async with http.patch(f"{url}/whep/k/{session_id}", headers=auth()) as r:
                assert r.status == 404
            assert session_id in sessions.sessions
            # 7. PATCH takes the same prompt checks as /offer and /ws.
            for prompt in ("z" * 5000, "\udc80"):
                body = json.dumps({"prompt": prompt})  # ensure_ascii: the surrogate as an escape
                async with http.patch(f"{url}/sessions/{session_id}/params", data=body,
                                      headers={**auth(), **JSON}) as r:
                    text = await r.text()
                    assert r.status == 400 and ("at most 1000" in text or "lone surrogate" in text), text
                    assert r.headers["Access-Control-Allow-Origin"] == "*"
            # 7b. WebSocket: binary frames and long prompts get error messages; the socket stays up.
            async with http.ws_connect(f"{url}/ws?session={session_id}", headers=auth()) as ws:
                async def reply():
                    while (msg := await ws.receive_json(timeout=30))["type"] == "stats":
                        pass
                    return msg

                await ws.send_bytes(b"\x00\x01binary")
                assert "binary" in (await reply())["error"]
                await ws.send_json({"type": "params", "prompt": "y" * 5000})
                assert "at most 1000" in (await reply())["error"]
                await ws.send_str('{"type": "params", "prompt": "\\udc80"}')
                assert "a lone surrogate" in (await reply())["error"]
                await ws.send_str("[" * 5000 + "]" * 5000)
                assert "nested" in (await reply())["error"]
                assert not ws.closed
                # a fuzzer's 100 kB value comes back cut short, on the socket and over PATCH
                await ws.send_json({"type": "params", "seed": "y" * 100_000})
                error = (await reply())["error"]
                assert error.startswith("seed must be a whole number") and len(error) < 300, len(error)
            params_url = f"{url}/sessions/{session_id}/params"
            for body, words in (({"y" * 100_000: 1}, "unknown parameter"), ({"type": "y" * 100_000}, "no type"),
                                ({"type": "ping", "seed": 1}, "no type")):
                async with http.patch(params_url, json=body, headers=auth()) as r:
                    text = await r.text()
                    assert r.status == 400 and words in text and len(text) < 400, (r.status, text[:300])
            # 8. /metrics names sessions only to an authorised scrape.
            async with http.get(f"{url}/metrics") as r:
                assert r.status == 200 and session_id not in await r.text()
            async with http.get(f"{url}/metrics", headers=auth()) as r:
                text = await r.text()  # labelled with the session and its WHIP key
                assert f'streamdiff_stream_frames_in{{key="k",stream="{session_id}"}}' in text, text
                assert f'streamdiff_stream_dropped_frames_by_cause{{cause="input",key="k",stream="{session_id}"}}' \
                    in text, text
            async with http.delete(f"{url}{location}", headers=auth()) as r:
                assert r.status == 200
        await pub.close()
        # 9. Slow clients: headers not complete in time -> closed; a body not in time -> 408.
        got = await _raw(port, b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        assert b"<still open>" not in got
        got = await _raw(port, b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                               b"Content-Length: 1000\r\n\r\n{\"sdp\":")
        assert got.startswith(b"HTTP/1.1 408"), got[:80]
        # 10. Requests aiohttp cannot parse are answered 400 and logged as one INFO line, not as
        #     an ERROR with a traceback (any client could fill the log with them).
        for raw in (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"):
            got = await _raw(port, raw)
            assert got.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), (raw[:40], got[:80])


def test_hostile_inputs_get_4xx_and_nothing_crashes(caplog):
    caplog.set_level(logging.INFO)
    asyncio.run(_hostile(caplog))
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]
    refused = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert len(refused) >= 4 and all(m.startswith("refused a malformed HTTP request from ") for m in refused), refused


async def _one_format_and_honest_logs(caplog) -> dict:
    out: dict = {}
    async with running_server() as (url, app):
        port = int(url.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as http:
            # a stream key with a newline cannot start a line of its own in the log
            async with http.post(f"{url}/whip/a%0A07:21:00%20session%20x%20started", data="x", headers=SDP) as r:
                out["forged"] = r.status
            # no such route: not logged as a refused session
            async with http.post(f"{url}/whip/k/abc", data="x", headers=SDP) as r:
                out["no_route"] = r.status
            # the JSON endpoints answer every refusal in JSON, and want JSON
            answers = {}
            for name, method, path, data, headers in (
                    ("not json", "POST", "/offer", b"not json", JSON),
                    ("text/plain", "POST", "/offer", b'{"sdp": "v=0", "type": "offer"}', {"Content-Type": "text/plain"}),
                    ("no type", "POST", "/offer", b'{"sdp": "v=0", "type": "offer"}', {}),
                    ("array", "PATCH", "/sessions/k/params", b"[1]", JSON),
                    ("huge", "POST", "/offer", b"x" * 200_000, JSON)):
                async with http.request(method, f"{url}{path}", data=data, headers={**auth(), **headers}) as r:
                    answers[name] = (r.status, r.content_type, await r.json(content_type=None))
            out["answers"] = answers
            # a controller on another origin preflights a GET that carries the token
            out["preflight"] = {}
            for path in ("/sessions", "/metrics", "/healthz"):
                async with http.options(f"{url}{path}", headers={"Origin": "http://elsewhere",
                                                                 "Access-Control-Request-Method": "GET",
                                                                 "Access-Control-Request-Headers": "authorization"}) as r:
                    out["preflight"][path] = (r.status, r.headers.get("Access-Control-Allow-Methods", ""))
            # a WHIP offer with audio only: a bad offer (400), not a codec it lacks (406)
            audio_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
            async with http.post(f"{url}/whip/k", data=audio_only, headers={**auth(), **SDP}) as r:
                out["audio_only"] = (r.status, await r.text())
        # a body declared too large is refused before "100 Continue" invites it
        out["expect"] = await _raw(port, b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                         b"Expect: 100-continue\r\nContent-Length: 999999999\r\n\r\n", wait_s=3.0)
    return out


def test_json_endpoints_answer_in_json_and_the_log_shows_what_clients_sent_escaped(caplog):
    """Found by a probe of the HTTP surface: a stream key with %0A wrote a forged line into the
    console (no token needed: the key is checked first); /offer and PATCH answered body errors in
    plain text and took any Content-Type; OPTIONS on /sessions, /metrics and /healthz was 405, so
    a page on another origin could not send its token; an audio-only WHIP offer got 406; a huge
    body with Expect: 100-continue was invited before it was refused; a POST to no route was
    logged as a refused session."""
    caplog.set_level(logging.INFO)
    out = asyncio.run(_one_format_and_honest_logs(caplog))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("streamdiff")]
    refused = [line for line in lines if line.startswith("refused whip session")]
    assert out["forged"] == 400 and out["no_route"] == 405
    assert len(refused) == 2 and not any("\n" in line for line in lines), refused  # forged key, audio only
    assert "(stream key 'a\\n07:21:00 session x started')" in refused[0], refused  # escaped
    for name, (status, ctype, body) in out["answers"].items():
        assert ctype == "application/json" and set(body) == {"error"}, (name, ctype, body)
    assert out["answers"]["not json"][0] == 400 and out["answers"]["array"][0] == 400
    assert out["answers"]["text/plain"][0] == 415 and "application/json" in out["answers"]["text/plain"][2]["error"]
    assert out["answers"]["no type"][0] == 415 and out["answers"]["huge"][0] == 413
    for path, (status, methods) in out["preflight"].items():
        assert status == 204 and "GET" in methods, (path, status, methods)
    assert out["audio_only"][0] == 400 and "no video" in out["audio_only"][1], out["audio_only"]
    assert out["expect"].startswith(b"HTTP/1.1 413") and b"100 Continue" not in out["expect"], out["expect"][:80]


def test_the_prompt_and_json_nesting_limits_take_exactly_the_limit():
    """A prompt of exactly 1000 characters and JSON nested exactly 16 levels are taken, one more is
    refused: a client that sizes its input to the documented limit must not be refused (a review)."""
    assert check_prompt("x" * MAX_PROMPT_CHARS) == "x" * MAX_PROMPT_CHARS
    with pytest.raises(ValueError, match="at most 1000"):
        check_prompt("x" * (MAX_PROMPT_CHARS + 1))
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    with pytest.raises(ValueError, match="nested more than 16 levels"):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))


def test_a_flag_is_true_or_false_and_other_numbers_are_refused():
    """`stamp` takes true/false, 1/0 and their words; 2, -1 or 0.5 are refused rather than read as
    true, so a client's mistake is told, not silently turned on (a review)."""
    assert parse_flag(1) is True and parse_flag(0) is False
    assert parse_flag("yes") is True and parse_flag(None) is False
    for bad in (2, -1, "maybe", 0.5):
        with pytest.raises(ValueError, match="stamp must be true or false"):
            parse_flag(bad)


def test_a_flood_of_refusals_is_thinned_on_the_console_and_counted():
    from streamdiff.server.sessions import RefusalBursts

    t = [0.0]
    thin = RefusalBursts(burst=5, window_s=10.0, clock=lambda: t[0])

    def shown(msg: str) -> str | None:
        record = logging.LogRecord("streamdiff.events", logging.INFO, __file__, 1, msg, (), None)
        return record.getMessage() if thin.filter(record) else None

    lines = [shown(f"refused whep session (stream key k): {i}") for i in range(8)]
    assert sum(line is not None for line in lines) == 5  # a burst of 8: the first 5 shown
    assert shown("session abc (browser) started") is not None  # other events always pass
    t[0] = 10.5
    assert shown("refused whep session (stream key k): 8").endswith("(and 3 more refusals not shown since the line before)")
    assert shown("refused whep session (stream key k): 9").endswith(": 9")


async def _sockets_per_session():
    async with running_server() as (url, app):
        session = await sessions_of(app).open("browser", None, "a fox")
        async with aiohttp.ClientSession() as http:
            sockets = [await http.ws_connect(f"{url}/ws?session={session.id}", headers=auth()) for _ in range(8)]
            async with http.get(f"{url}/ws?session={session.id}", headers={**auth(), "Connection": "Upgrade",
                                "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
                ninth = (r.status, await r.text())
            await sockets[0].close()
            for _ in range(100):  # the server sees the close a moment later
                if session.sockets < 8:
                    break
                await asyncio.sleep(0.05)
            again = await http.ws_connect(f"{url}/ws?session={session.id}", headers=auth())
            replaced = not again.closed
            for ws in [*sockets[1:], again]:
                await ws.close()
    return ninth, replaced


def test_control_sockets_of_one_session_are_bounded():
    """A probe opened 3000 sockets to one WHIP key (it is in every viewer's URL): each held a
    descriptor, two tasks and a stats message a second."""
    (status, text), replaced = asyncio.run(_sockets_per_session())
    assert status == 503 and "8 control connections to this session are open already" in text
    assert replaced


async def _what_a_security_probe_tried(caplog) -> dict:
    out: dict = {}
    async with running_server() as (url, app):  # a token is set (gateway_helpers.TOKEN)
        port = int(url.rsplit(":", 1)[1])
        # one byte that is not UTF-8 in the Authorization header: 401, not a 500 with a traceback
        out["bad_byte"] = await _raw(port, b"GET /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n"
                                           b"Connection: close\r\n\r\n", wait_s=3.0)
        async with aiohttp.ClientSession() as http:
            # terminal escapes in an offer's H.264 profile: not echoed to the client or the console
            pub, offer = await obs_like_offer()
            hostile = re.sub(r"profile-level-id=42[0-9a-f]{4}", "profile-level-id=64\x1b]0;owned\x07\x1b[31m", offer)
            assert hostile != offer
            async with http.post(f"{url}/whip/k", data=hostile, headers={**auth(), **SDP}) as r:
                out["escape"] = (r.status, await r.text())
            await pub.close()
            # the page's, viewer.html's and /ws's ?token= stays out of the access log (-v)
            async with http.get(f"{url}/?token={TOKEN}") as r:
                out["page"] = r.status
            # the same spelt with a percent-encoded letter (aiohttp reads it as the token)
            async with http.get(f"{url}/sessions?%74oken={TOKEN}") as r:
                out["encoded"] = r.status
        # a Bearer header aiohttp cannot parse: its refusal line (-v) quoted the credential
        out["bad bearer"] = await _raw(port, b"GET /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                                       TOKEN.encode() + b"\x01\r\nConnection: close\r\n\r\n", wait_s=3.0)
    return out


def test_what_a_security_probe_tried_is_refused_without_leaks(caplog):
    """A security probe: a non-UTF-8 byte in Authorization gave a 500 and a 20-line traceback (no
    token needed); an H.264 profile-level-id was copied raw into the 406 and the console line, ESC
    sequences included (recolouring or retitling the operator's terminal); with -v the access log
    printed every page load's ?token=."""
    caplog.set_level(logging.INFO)
    out = asyncio.run(_what_a_security_probe_tried(caplog))
    assert out["bad_byte"].startswith(b"HTTP/1.1 401"), out["bad_byte"][:60]
    status, text = out["escape"]
    assert status == 406 and "\x1b" not in text and "unreadable profile-level-id" in text, text
    assert out["page"] == 200 and out["encoded"] == 200 and out["bad bearer"].startswith((b"HTTP/1.1 400", b"HTTP/1.0 400"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in logged and "Traceback" not in caplog.text
    assert TOKEN not in logged and "token=…" in logged  # the access log line, redacted


async def _other_origins() -> dict:
    out: dict = {}
    evil = {"Origin": "https://evil.example"}
    for token in (None, TOKEN):
        async with running_server(token=token, allowed_hosts=("streams.example",)) as (url, app), \
                aiohttp.ClientSession() as http:
            here = {"Origin": url}
            got = out[token] = {}
            proxied = {"Origin": "https://streams.example", "X-Forwarded-Host": "streams.example"}
            for name, headers in (("foreign", evil), ("same", here), ("none", {}), ("proxied", proxied)):
                async with http.get(f"{url}/sessions", headers={**auth(token), **headers}) as r:
                    got[f"sessions {name}"] = r.status
            async with http.patch(f"{url}/sessions/k/params", json={"prompt": "x"}, headers={**auth(token), **evil}) as r:
                got["params foreign"] = r.status
            async with http.delete(f"{url}/sessions/k", headers={**auth(token), **evil}) as r:
                got["delete foreign"] = r.status
            try:
                async with http.ws_connect(f"{url}/ws?session=k", headers={**auth(token), **evil}):
                    got["ws foreign"] = 101
            except aiohttp.WSServerHandshakeError as exc:
                got["ws foreign"] = exc.status
            pub, offer = await obs_like_offer()  # WHIP stays open to other origins (web publishers)
            async with http.post(f"{url}/whip/web", data=offer, headers={**auth(token), **SDP, **evil}) as r:
                got["whip foreign"] = r.status
            await pub.close()
    return out


def test_a_page_on_another_origin_cannot_control_a_server_without_a_token():
    """A security probe: with no token (make run's default) every reply allowed any origin and
    /ws took any Origin, so any web page the user visited could list the streams, change their
    prompts or end them on 127.0.0.1:8000."""
    out = asyncio.run(_other_origins())
    open_server, with_token = out[None], out[TOKEN]
    assert open_server["sessions foreign"] == 403 and open_server["params foreign"] == 403
    assert open_server["delete foreign"] == 403 and with_token["delete foreign"] == 404  # (k is no session)
    assert open_server["ws foreign"] == 403
    assert open_server["sessions same"] == 200 and open_server["sessions none"] == 200  # the page, curl
    assert open_server["sessions proxied"] == 200  # the page behind an https proxy that says its host
    assert open_server["whip foreign"] == 201
    assert with_token["sessions foreign"] == 200 and with_token["ws foreign"] in (101, 404)  # the token decides


async def _rebound_names() -> dict:
    out: dict = {}
    for token, allowed in ((None, ()), (None, ("video.example.org",)), (TOKEN, ())):
        async with running_server(token=token, allowed_hosts=allowed) as (url, app), aiohttp.ClientSession() as http:
            port = url.rsplit(":", 1)[1]
            got = out[(token, allowed)] = {}
            for name in ("evil.example", "video.example.org", "localhost", "app.localhost", "[::1]", "127.0.0.1"):
                host = f"{name}:{port}"  # what a browser sends once the page's name points at 127.0.0.1
                same = {"Host": host, "Origin": f"http://{host}"}
                async with http.get(f"{url}/sessions", headers={**auth(token), **same}) as r:
                    got[f"sessions {name}"] = (r.status, await r.text())
                async with http.get(f"{url}/", headers=same) as r:
                    got[f"page {name}"] = r.status
            # bytes that are not UTF-8 in Host or Origin: a probe got a 500 and a traceback per request
            for name, header in (("host", b"Host: \xff\xfe"), ("origin", b"Host: localhost\r\nOrigin: http://\xff")):
                got[f"bad byte {name}"] = await _raw(int(port), b"GET /sessions HTTP/1.1\r\n" + header +
                                                     b"\r\nConnection: close\r\n\r\n", wait_s=3.0)
    return out


def test_a_page_that_rebinds_its_name_to_the_server_is_refused():
    """DNS rebinding: a web page the user visits points its own name at 127.0.0.1, and its requests
    to http://its-name:8000 are same-origin (the Origin rule lets them through): with no token it
    could open, change and end streams and read /sessions. Without a token the server answers only
    to an IP address, localhost, or a name the operator allowed."""
    out = asyncio.run(_rebound_names())
    plain, allowed, with_token = out[(None, ())], out[(None, ("video.example.org",))], out[(TOKEN, ())]
    status, text = plain["sessions evil.example"]
    assert status == 403 and "--allow-host evil.example" in text, text
    assert plain["page evil.example"] == 403 and plain["sessions video.example.org"][0] == 403
    for name in ("localhost", "app.localhost", "[::1]", "127.0.0.1"):
        assert plain[f"sessions {name}"][0] == 200 and plain[f"page {name}"] == 200, name
    assert allowed["sessions video.example.org"][0] == 200 and allowed["page video.example.org"] == 200
    assert allowed["sessions evil.example"][0] == 403
    assert with_token["sessions evil.example"][0] == 200  # the token decides
    for name in ("host", "origin"):
        got = plain[f"bad byte {name}"]
        assert got.startswith(b"HTTP/1.1 403") and b"\\udcff" in got, got[:300]


def test_host_names_the_rule_knows():
    from streamdiff.preflight import allowed_hosts
    from streamdiff.server.http import host_name, known_host

    # `serve` on loopback answers to IP addresses and localhost only; on the network to any name
    assert allowed_hosts("127.0.0.1", None) == () and allowed_hosts("localhost", None) == ()
    assert allowed_hosts("0.0.0.0", None) == ("*",) and allowed_hosts("0.0.0.0", ["a.example"]) == ("a.example",)

    assert host_name("[::1]:8000") == "::1" and host_name("Example.ORG:80") == "example.org"
    assert host_name("example.org") == "example.org" and host_name("::1") == "::1"
    assert known_host("10.0.0.7:8000", ()) and known_host("localhost", ()) and known_host(None, ())
    assert not known_host("localhost.evil.example:8000", ()) and not known_host("10.0.0.7.evil.example", ())
    assert known_host("Video.Example.org.:8000", ("video.example.org",)) and known_host("anything", ("*",))
    assert known_host("localhost.:8000", ()) and known_host("App.Localhost.", ())  # the trailing dot, as for allowed names
    assert not known_host("evil.example.:8000", ()) and not known_host("", ())


def test_a_name_that_binds_loopback_and_the_network_answers_to_any_name(monkeypatch):
    """`--host NAME` resolving to 127.0.0.1 and a LAN address binds the network too: other machines
    reach it by names not known here, so it is not held to the loopback rule."""
    import socket

    from streamdiff.preflight import allowed_hosts

    both = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in ("127.0.0.1", "192.168.1.5")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both)
    assert allowed_hosts("studio", None) == ("*",)


def test_an_origin_of_another_scheme_is_foreign_even_with_the_servers_host():
    """Only an http or https page on the server's own host and port is same-origin: an origin of
    another scheme naming that host (an extension's, an app shell's) is held to the foreign-origin
    rule, not let by as the server's own (a review)."""

    def origin(value):
        headers = {"Host": "127.0.0.1:8000", "Origin": value}
        return foreign_origin(make_mocked_request("GET", "/sessions", headers=headers))

    assert origin("http://127.0.0.1:8000") is None and origin("https://127.0.0.1:8000/") is None
    assert origin("ftp://127.0.0.1:8000") == "ftp://127.0.0.1:8000"
    assert origin("chrome-extension://127.0.0.1:8000") == "chrome-extension://127.0.0.1:8000"


async def _a_watch_token(caplog) -> dict:
    from gateway_helpers import viewer_offer

    from streamdiff.server.http import watch_token

    out: dict = {}
    async with running_server() as (url, app), aiohttp.ClientSession() as http:  # token: TOKEN
        pub, offer = await obs_like_offer()
        async with http.post(f"{url}/whip/studio", data=offer, headers={**auth(), **SDP}) as r:
            assert r.status == 201, await r.text()
            publisher_url = r.headers["Location"]
            await answer(pub, await r.text())
        watch = watch_token(TOKEN, "studio")
        async with http.get(f"{url}/sessions", headers=auth()) as r:
            out["listed"] = [s.get("watch") for s in await r.json()]
        view, voffer, _ = await viewer_offer()
        async with http.post(f"{url}/whep/studio", data=voffer, headers={**auth(watch), **SDP}) as r:
            out["plays"] = r.status
            viewer_url = r.headers.get("Location")
            if r.status == 201:
                await answer(view, await r.text())
        other, ooffer, _ = await viewer_offer()
        async with http.post(f"{url}/whep/other", data=ooffer, headers={**auth(watch), **SDP}) as r:
            out["other key"] = r.status
        await other.close()
        # what the viewer URL's token must not do
        async with http.get(f"{url}/sessions", headers=auth(watch)) as r:
            out["list"] = r.status
        async with http.patch(f"{url}/sessions/studio/params", json={"prompt": "x"}, headers=auth(watch)) as r:
            out["params"] = r.status
        async with http.delete(f"{url}{publisher_url}", headers=auth(watch)) as r:
            out["end publisher"] = r.status
        try:
            async with http.ws_connect(f"{url}/ws?session=studio&token={watch}"):
                out["ws"] = 101
        except aiohttp.WSServerHandshakeError as exc:
            out["ws"] = exc.status
        async with http.delete(f"{url}{viewer_url}", headers=auth(watch)) as r:  # its own player: yes
            out["end own player"] = r.status
        await view.close()
        await pub.close()
    return out


def test_a_viewer_link_carries_a_token_that_only_watches(caplog):
    """A security probe: the viewer URL (the page's "watch it elsewhere" link, OBS's Browser
    Source) carried the server's token, which let anyone holding it change, end or replace every
    stream. It now carries a watch token: WHEP for its own stream key, nothing else."""
    caplog.set_level(logging.INFO)
    out = asyncio.run(_a_watch_token(caplog))
    from streamdiff.server.http import watch_token

    link = f"/viewer.html?key=studio&token={watch_token(TOKEN, 'studio')}"
    assert link in out["listed"] and f"stream key studio: watch it at {link}" in caplog.text
    assert TOKEN not in caplog.text
    assert out["plays"] == 201 and out["end own player"] == 200
    assert out["other key"] == 401
    assert (out["list"], out["params"], out["end publisher"], out["ws"]) == (401, 401, 401, 401), out


async def _bodies_cut_short(caplog) -> dict:
    async with running_server(token=None) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        for path, kind in (("/whip/halfbody", "application/sdp"), ("/whep/halfbody", "application/sdp"),
                           ("/offer", "application/json")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: 2000\r\n\r\n".encode() + b"v=0\r\n" * 40)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()  # gone half way through its body
        await asyncio.sleep(0.5)
        health = sessions_of(app).snapshot()
    lines = [(r.levelno, r.name, r.getMessage()) for r in caplog.records]
    return {"errors": [line for line in lines if line[0] >= logging.ERROR],
            "refused": [line for line in lines if line[2].startswith("refused")], "sessions": health["sessions"]}


def test_a_client_that_leaves_half_way_through_its_body_is_no_error(caplog):
    """A churn probe: each one logged an ERROR with a traceback ("Connection lost") and a console
    refusal line "500 500 Internal Server Error"."""
    caplog.set_level(logging.INFO)
    out = asyncio.run(_bodies_cut_short(caplog))
    assert out == {"errors": [], "refused": [], "sessions": 0}, out
