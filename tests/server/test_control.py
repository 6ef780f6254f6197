"""`streamdiff control` and client.control against a live server (websockets package)."""

import asyncio
import logging
import socket
import threading

import aiohttp
import pytest

from gateway_helpers import TOKEN, auth, obs_like_offer, running_server, sessions_of, until
from streamdiff import cli
from streamdiff.client.control import ControlError, send_params, ws_url
from streamdiff.server.app import ENGINE_KEY


def test_ws_url():
    assert ws_url("http://h:8000", "abc") == "ws://h:8000/ws?session=abc"
    assert ws_url("https://h/x", "abc", "t") == "wss://h/ws?session=abc&token=t"
    for bad in ("127.0.0.1:8000", "http://", "http://h:99999", "http://h:0", "ftp://h", "not a url"):
        with pytest.raises(ControlError, match="is not a server address"):
            ws_url(bad, "abc")


async def publish(url: str, key: str):
    """An OBS-like WHIP publisher on `key`; returns its peer (close it when done)."""
    pub, offer = await obs_like_offer()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/whip/{key}", data=offer, headers={**auth(), "Content-Type": "application/sdp"}) as r:
            assert r.status == 201, await r.text()
    return pub


async def _stats_expect(url: str, key: str, streams: int) -> dict:
    """The `expect` of the first stats message on `key`'s control socket that says `streams`."""
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws?session={key}", headers=auth()) as ws:
        async with asyncio.timeout(60):  # a hang's bound, not a timing assertion
            async for msg in ws:
                got = msg.json()
                if got["type"] == "stats" and got.get("expect", {}).get("streams") == streams:
                    return got["expect"]
    raise AssertionError(f"the control socket closed before its stats said {streams} streams")


async def _messages(ws, seconds: float) -> list[dict]:
    """What a control socket is sent within `seconds`, stats left out."""
    got = []
    try:
        async with asyncio.timeout(seconds):
            async for msg in ws:
                got.append(msg.json())
    except TimeoutError:
        pass
    return [m for m in got if m["type"] != "stats"]


def test_control_cli_mistakes_are_one_line(capsys):
    """Found by trying: an unknown session, a missing token and a refused value ended in a
    websockets traceback or a raw JSON reply; `--motion maybe` was taken as off."""
    async def run():
        async with running_server() as (url, app):
            pub = await publish(url, "cam")
            said = {}
            for name, args in (("unknown", ["--session", "nosuch", "--token", TOKEN, "--seed", "1"]),
                               ("no token", ["--session", "cam", "--seed", "1"]),
                               ("refused", ["--session", "cam", "--token", TOKEN, "--prompt", "x" * 5000]),
                               # a probe's 100 kB prompt closed the socket (1009) and the CLI printed a
                               # traceback; past the server's message limit it is still one line
                               ("long", ["--session", "cam", "--token", TOKEN, "--prompt", "x" * 100_000]),
                               ("too big", ["--session", "cam", "--token", TOKEN, "--prompt", "x" * 2_000_000])):
                code = await asyncio.to_thread(cli.main, ["control", "--url", url, *args])
                said[name] = (code, capsys.readouterr().err.strip())
            await pub.close()
            return said

    said = asyncio.run(run())
    for name, words in (("unknown", "no session 'nosuch' on"), ("no token", "wants a token: give --token"),
                        ("refused", "the server refused the change: prompt is 5000 characters long"),
                        ("long", "the server refused the change: prompt is 100000 characters long"),
                        ("too big", "closed the control connection (1009 message too big)")):
        code, err = said[name]
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("streamdiff: error:"), (name, err)
        assert words in err, (name, err)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["control", "--session", "s", "--motion", "maybe"])
    assert "'maybe' is not on or off" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["control", "--session", "s", "--motion", "Off"]).motion is False


def test_control_cli_changes_params(capsys, caplog):
    async def run():
        async with running_server() as (url, app):
            pub = await publish(url, "cam")
            before = sessions_of(app).publisher("cam").expect
            reply = await send_params(url, "cam", {"prompt": "ink sketch", "steps": 3}, token=TOKEN)
            assert reply["type"] == "params" and reply["params"]["steps"] == 3
            # a probe: steps 3-4 stalled a stream with the reply still quoting the old expectation
            assert before["latency_ms"] < reply["expect"]["latency_ms"], (before, reply["expect"])
            assert sessions_of(app).publisher("cam").expect == reply["expect"]
            assert "means" not in reply  # tiny's prompt encoder reads free text
            # A probe: a stream told 30 fps alone got 10 beside newcomers and was never told. Its
            # stats (each second, to every control socket) carry what it can expect now.
            alone = reply["expect"]
            assert alone["streams"] == 1, alone
            other = await publish(url, "cam2")
            beside = await _stats_expect(url, "cam", streams=2)
            # (not strictly more: the tiny preset's rows cost next to nothing, and a warm-up on a
            # quiet machine may measure a second row at no cost at all)
            assert beside["latency_ms"] >= alone["latency_ms"], (alone, beside)
            assert beside["fps"] <= alone["fps"] and beside["service"] == alone["service"], (alone, beside)
            await sessions_of(app).close(sessions_of(app).publisher("cam2").id)
            await other.close()
            assert await _stats_expect(url, "cam", streams=1) == alone
            # and every few seconds while streams run (input rates are measured as frames arrive)
            sessions, asked = sessions_of(app), []
            outlooks = sessions.engine.outlooks
            sessions.engine.outlooks = lambda: asked.append(1) or outlooks()
            sessions.RENEW_EVERY_S = 0.1
            sessions._renew_expectations()
            await until(lambda: len(asked) >= 3, "renewed every RENEW_EVERY_S")
            # the steps it runs sent again (a page sends its steps field with every Apply once its user set it)
            code = await asyncio.to_thread(cli.main, ["control", "--url", url, "--session", "cam", "--token", TOKEN,
                                                      "--prompt", "watercolor 水彩画", "--seed", "5",
                                                      "--steps", "3"])
            assert code == 0
            publisher = sessions_of(app).publisher("cam")
            params = await app[ENGINE_KEY].params(publisher.id)
            assert (params.prompt, params.seed, params.steps) == ("watercolor 水彩画", 5, 3)
            # the reply shows the prompt as typed (a probe: \u6c34\u5f69\u753b)
            assert '"prompt": "watercolor 水彩画"' in capsys.readouterr().out
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/sessions", headers=auth()) as resp:
                    assert [s["stream_key"] for s in await resp.json()] == ["cam"]
            await pub.close()

    with caplog.at_level(logging.INFO, logger="streamdiff.events"):
        asyncio.run(run())
    # a page probe: each prompt change from a page whose steps field was set said "now runs 3 steps" again
    assert sum("now runs 3 steps" in r.getMessage() for r in caplog.records) == 1, \
        [r.getMessage() for r in caplog.records]


def test_control_cli_sends_zero_and_off_and_says_what_it_could_not_reach(capsys, monkeypatch):
    """`--seed 0`, `--blend 0` and `--motion off` are changes like any other (not "nothing to
    change"); a server that is not there, or a session that ended, is one line."""
    from streamdiff.client import control

    sent = []
    monkeypatch.setattr(control, "run", lambda url, session, params, token: sent.append(params) or 0)
    assert cli.main(["control", "--session", "s", "--seed", "0", "--blend", "0", "--motion", "off"]) == 0
    assert sent == [{"seed": 0, "motion": False, "blend": 0}]
    monkeypatch.undo()
    assert cli.main(["control", "--url", "http://127.0.0.1:9", "--session", "s", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamdiff: error: cannot reach http://127.0.0.1:9") and len(err.splitlines()) == 1, err
    # a probe: a server that is not ours (`python -m http.server` answers in HTTP/1.0) gave a websockets traceback
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        threading.Thread(target=lambda: other.accept()[0].sendall(b"HTTP/1.0 404 File not found\r\n\r\n"),
                         daemon=True).start()
        assert cli.main(["control", "--url", f"http://127.0.0.1:{other.getsockname()[1]}", "--session", "s",
                         "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "answers, but not as a StreamDiff server" in err and len(err.splitlines()) == 1, err

    async def ended(*args):
        return {"type": "closed", "reason": "the publisher left"}

    monkeypatch.setattr(control, "send_params", ended)
    assert cli.main(["control", "--session", "cam", "--seed", "1"]) == 2
    assert "session 'cam' has ended" in capsys.readouterr().err


def test_control_waits_for_its_own_reply_past_stats_and_changes_made_elsewhere():
    """A control socket is also sent stats and other controllers' changes (`elsewhere`): the reply
    to this change is the first message that is neither."""
    from aiohttp import web

    async def socket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        change = await ws.receive_json()
        await ws.send_json({"type": "stats", "fps": 1.0})
        await ws.send_json({"type": "params", "elsewhere": True, "params": {"seed": 9}})
        await ws.send_json({"type": "params", "params": {"seed": change["seed"]}})
        await ws.close()
        return ws

    async def run():
        app = web.Application()
        app.router.add_get("/ws", socket)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            return await send_params(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", "s", {"seed": 3})
        finally:
            await runner.cleanup()

    assert asyncio.run(run()) == {"type": "params", "params": {"seed": 3}}


def test_the_demo_says_what_it_makes_of_a_prompt():
    """The demo knows nine prompts: the replies say which one a prompt means, so a user who types
    free text learns why the picture did not change ("a photo")."""
    from streamdiff.config import load_config

    async def run():
        async with running_server(config=load_config("demo")) as (url, app):
            pub = await publish(url, "cam")
            async with aiohttp.ClientSession() as http:
                async with http.patch(f"{url}/sessions/cam/params", json={"prompt": "A claymation world"},
                                      headers=auth()) as resp:
                    patched = await resp.json()
            by_ws = await send_params(url, "cam", {"prompt": "Starry  Night over my desk"}, token=TOKEN)
            await pub.close()
            return patched, by_ws

    patched, by_ws = asyncio.run(run())
    assert patched["ok"] and patched["params"]["prompt"] == "A claymation world", patched
    assert patched["means"] == "a photo", patched
    assert by_ws["type"] == "params" and by_ws["means"] == "starry night", by_ws


def test_a_change_that_fails_unexpectedly_is_one_line_and_the_socket_goes_on():
    """Found by a probe: an unexpected error while applying a change answered PATCH with aiohttp's
    bare 500 page and killed the control socket's params task (no reply ever again)."""

    async def run():
        async with running_server() as (url, app):
            pub = await publish(url, "cam")
            sessions = sessions_of(app)
            real = sessions.apply_change  # update_params (PATCH) goes through it too
            calls = []

            async def flaky(key, message):
                calls.append(message)
                if len(calls) <= 2:
                    raise RuntimeError("something broke inside")
                return await real(key, message)

            sessions.apply_change = flaky
            async with aiohttp.ClientSession() as http:
                async with http.patch(f"{url}/sessions/cam/params", json={"seed": 5}, headers=auth()) as resp:
                    patched = (resp.status, await resp.json())
                async with http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as ws:
                    replies = []
                    for seed in (6, 7):
                        await ws.send_json({"type": "params", "seed": seed})
                        while True:
                            reply = await ws.receive_json(timeout=30)
                            if reply["type"] != "stats":
                                replies.append(reply)
                                break
            await pub.close()
            return patched, replies

    patched, replies = asyncio.run(run())
    assert patched == (500, {"error": "the change could not be applied (the server log has the details)"})
    assert {k: v for k, v in replies[0].items() if k != "params"} == \
        {"type": "error", "error": "the change could not be applied (the server log has the details)"}
    assert replies[0]["params"]["seed"] not in (5, 6)  # what the stream still uses
    assert replies[1]["type"] == "params" and replies[1]["params"]["seed"] == 7, replies


def test_a_refused_change_says_what_the_stream_uses():
    """A page probe: a burst's refused changes left the page showing values its stream did not
    use. A refusal's reply carries the params in use, so a page can put its fields back."""
    async def run():
        async with running_server() as (url, app):
            pub = await publish(url, "cam")
            refused = await send_params(url, "cam", {"steps": 9, "seed": 5}, token=TOKEN)
            await pub.close()
            return refused

    refused = asyncio.run(run())
    assert refused["type"] == "error" and "steps" in refused["error"], refused
    assert refused["params"]["steps"] in (1, 2, 3, 4) and refused["params"]["seed"] != 5, refused


def test_control_sockets_keep_or_end_their_streams_as_they_should_and_are_told_the_server_stops():
    """What a stream's control sockets do to it (a review): a page's own socket may say owner=true
    as well as owner=1; when it drops and comes back within the grace (a network blip) the stream
    stays; a controller saying owner=1 on a WHIP key does not end OBS's stream when it leaves; a
    refusal in a burst of changes carries the params the stream runs (the page puts its fields
    back); and when the server stops, the socket is told so (the page waits for it to come back
    instead of reading the end as its stream's)."""

    async def run():
        async with running_server(control_grace_s=0.5) as (url, app), aiohttp.ClientSession() as http:
            sessions = sessions_of(app)
            engine = app[ENGINE_KEY]
            obs = await sessions.open("whip", "obs")
            page = await sessions.open("browser", None, "a fox")
            async with http.ws_connect(f"{url}/ws?session=obs&owner=1", headers=auth()):
                await until(lambda: obs.sockets == 1, "the controller's socket is counted", 10)
            own = f"{url}/ws?session={page.id}&owner=true"
            async with http.ws_connect(own, headers=auth()):
                await until(lambda: page.control_sockets == 1, "the page's socket is counted", 10)
            await until(lambda: obs.sockets == 0 and page.control_sockets == 0, "both ends are seen", 10)
            async with http.ws_connect(own, headers=auth()) as ws:
                await until(lambda: page.control_sockets == 1, "the page's socket comes back", 10)
                await asyncio.sleep(0.7)  # past the grace
                alive = {"whip stream": obs.id in sessions.sessions, "page's stream": page.id in sessions.sessions}
                assert alive == {"whip stream": True, "page's stream": True}, alive

                async def reply():
                    while (msg := await ws.receive_json(timeout=30))["type"] == "stats":
                        pass
                    return msg

                await ws.send_json({"type": "params", "seed": 123})
                assert (await reply())["type"] == "params"  # a first change: the stream runs seed 123
                real = engine.update_params

                async def slow_update(stream_id, **changes):
                    await asyncio.sleep(0.3)
                    return await real(stream_id, **changes)

                engine.update_params = slow_update
                for seed in range(12):
                    await ws.send_json({"type": "params", "seed": seed})
                while not ((refused := await reply())["type"] == "error" and "already waiting" in refused["error"]):
                    pass
                engine.update_params = real
                await sessions.close_all()
                while (closed := await reply())["type"] != "closed":
                    pass
        return refused, closed

    refused, closed = asyncio.run(run())
    assert refused["params"]["seed"] == 123, refused
    assert closed.get("server_stopping") is True and closed["reason"] == "server shutting down", closed


def test_a_change_made_elsewhere_is_pushed_to_the_other_controllers():
    """Found by a probe: a change made by `streamdiff control` (or a second tab) never reached the
    page, which went on showing its own last values while its stream ran others. Every other
    control socket of the stream now gets it, marked `elsewhere`; the one that made it only its
    reply."""

    async def run():
        async with running_server() as (url, app), aiohttp.ClientSession() as http:
            pub = await publish(url, "cam")
            async with http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as page, \
                    http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as other:

                # a stream's first change that changes nothing (an empty PATCH): nothing pushed
                await send_params(url, "cam", {}, token=TOKEN)
                first_no_op = await _messages(other, 2.0)
                await page.send_json({"type": "params", "prompt": "ink sketch", "seed": 11})
                on_page, on_other = await asyncio.gather(_messages(page, 3.0), _messages(other, 3.0))
                code = await asyncio.to_thread(cli.main, ["control", "--url", url, "--session", "cam", "--token", TOKEN,
                                                          "--steps", "3"])  # the preset runs 2
                later_page, later_other = await asyncio.gather(_messages(page, 3.0), _messages(other, 3.0))
                # changes that change nothing (an empty PATCH, an Apply of what runs): nothing pushed
                await send_params(url, "cam", {}, token=TOKEN)
                await send_params(url, "cam", {"prompt": "ink sketch", "steps": 3}, token=TOKEN)
                no_ops = await _messages(other, 3.0)
            await pub.close()
            return on_page, on_other, code, later_page, later_other, first_no_op + no_ops

    on_page, on_other, code, later_page, later_other, no_ops = asyncio.run(run())
    assert no_ops == [], no_ops
    assert [m.get("elsewhere") for m in on_page] == [None], on_page  # its own reply, nothing pushed back
    assert on_page[0]["params"]["prompt"] == "ink sketch"
    assert len(on_other) == 1 and on_other[0]["elsewhere"] is True, on_other
    assert (on_other[0]["params"]["prompt"], on_other[0]["params"]["seed"]) == ("ink sketch", 11)
    assert code == 0
    for pushed in (later_page, later_other):
        assert len(pushed) == 1 and pushed[0]["elsewhere"] and pushed[0]["params"]["steps"] == 3, pushed
        assert pushed[0]["params"]["prompt"] == "ink sketch" and "expect" in pushed[0]  # steps renew it


def test_a_change_landing_while_a_steps_change_is_readmitted_is_still_pushed():
    """A steps change awaits the engine's admission after the engine applied it: a change another
    controller made meanwhile was counted before it, so the steps change's socket took it as told
    (its reply's params predate it) and never got it pushed: its page showed the old prompt."""

    async def run():
        async with running_server() as (url, app), aiohttp.ClientSession() as http:
            engine = app[ENGINE_KEY]
            pub = await publish(url, "cam")
            real = engine.admission
            other_sent, slowed = asyncio.Event(), []

            async def slow_admission(stream_id):  # (a plain assignment: a renamed method is not patched)
                slowed.append(stream_id)
                await other_sent.wait()
                await asyncio.sleep(0.5)  # the other change lands meanwhile
                return await real(stream_id)

            engine.admission = slow_admission
            async with http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as page, \
                    http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as other:
                await page.send_json({"type": "params", "steps": 3})  # the preset runs 2
                await asyncio.sleep(0.3)
                await other.send_json({"type": "params", "prompt": "changed meanwhile"})
                other_sent.set()
                got = []
                try:
                    async with asyncio.timeout(4.0):
                        async for msg in page:
                            got.append(msg.json())
                except TimeoutError:
                    pass
            await pub.close()
            return [m for m in got if m["type"] == "params"], slowed

    on_page, slowed = asyncio.run(run())
    assert slowed, "the steps change's re-admission was not slowed: the test made no overlap"
    assert on_page and on_page[-1]["params"]["prompt"] == "changed meanwhile", on_page


async def _sockets_of_a_stream_that_ends():
    async with running_server() as (url, app):
        sessions = sessions_of(app)
        session = await sessions.open("browser", "studio", "a fox")
        got = {}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/ws?session=studio") as r:  # no token: JSON as its 404 (a probe)
                got["401"] = (r.status, r.content_type, "error" in await r.json())
            async with http.ws_connect(f"{url}/ws?session={session.id}", headers=auth()) as by_id, \
                    http.ws_connect(f"{url}/ws?session=studio", headers=auth()) as by_key:
                await by_key.send_str("{")  # (a probe: "the body is not valid JSON" on a socket)
                while (msg := await by_key.receive_json(timeout=30))["type"] == "stats":
                    pass
                got["bad"] = msg
                # DELETE /sessions/{id} ends it (the page sends it on Stop), with the token only
                async with http.delete(f"{url}/sessions/{session.id}") as r:
                    got["delete 401"] = r.status
                async with http.delete(f"{url}/sessions/nosuch", headers=auth()) as r:
                    got["delete 404"] = (r.status, await r.json())
                async with http.delete(f"{url}/sessions/{session.id}", headers=auth()) as r:
                    got["delete"] = (r.status, await r.json(), session.id in sessions.sessions)
                for name, ws in (("id", by_id), ("key", by_key)):
                    while (msg := await ws.receive_json(timeout=30))["type"] != "closed":
                        pass
                    got[name] = msg
                # (once more: as when its peer's close came first)
                async with http.delete(f"{url}/sessions/{session.id}", headers=auth()) as r:
                    got["delete again"] = (r.status, await r.json())
        return got


def test_a_socket_opened_by_stream_key_is_told_why_its_stream_ended():
    """A control probe: by key the closing message had no reason (looked up by key, kept by id)."""
    got = asyncio.run(_sockets_of_a_stream_that_ends())
    ended = "its client ended it (DELETE /sessions)"
    assert got["id"].get("reason") == got["key"].get("reason") == ended, got
    assert got["delete 401"] == 401 and got["delete 404"] == (404, {"error": "no such session 'nosuch'"}), got
    assert got["delete"] == (200, {"ok": True}, False), got["delete"]
    assert got["delete again"] == (200, {"ok": True, "ended_already": ended}), got["delete again"]
    assert got["bad"] == {"type": "error", "error": "the message is not valid JSON"}, got["bad"]
    assert got["401"] == (401, "application/json", True), got["401"]


def test_two_names_of_one_parameter_in_one_message_are_refused():
    """A control probe: {"noise": 0.3, "noise_strength": 0.9} ran 0.9 without a word."""
    from streamdiff.server.sessions import to_engine_params

    assert to_engine_params({"type": "params", "noise": 0.3, "motion": True}) == {"noise_strength": 0.3,
                                                                                  "motion_aware": True}
    for message, said in (({"noise": 0.3, "noise_strength": 0.9}, "noise and noise_strength"),
                          ({"motion_aware": False, "motion": True}, "motion_aware and motion")):
        with pytest.raises(ValueError, match=f"{said} name the same parameter: give one"):
            to_engine_params(message)


def test_a_steps_change_is_not_pushed_back_to_the_socket_that_made_it(caplog):
    """A page probe: every steps change from the page said "changed by another controller": the
    change is counted when the engine applies it, and while its reply waited for the stream's
    re-admission the socket's stats tick pushed the count back to it as another's (and the page
    then forgot which fields its user had set). Another controller still gets it pushed."""
    async def run():
        async with running_server() as (url, app):
            engine = app[ENGINE_KEY]
            admission, slowed = engine.admission, []

            async def slow_admission(stream_id):  # the re-admission spans a stats tick
                slowed.append(stream_id)  # (a plain assignment: a renamed method is not patched)
                await asyncio.sleep(1.5)
                return await admission(stream_id)

            engine.admission = slow_admission
            pub = await publish(url, "cam")
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as page, \
                        http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as other:

                    await page.send_json({"type": "params", "steps": 3})  # the preset runs 2
                    on_page, on_other = await asyncio.gather(_messages(page, 4.0), _messages(other, 4.0))
            await pub.close()
            return on_page, on_other, slowed

    with caplog.at_level(logging.INFO, logger="streamdiff.events"):
        on_page, on_other, slowed = asyncio.run(run())
    assert slowed, "the re-admission was not slowed: no stats tick fell within the change"
    assert [(m["type"], m.get("elsewhere"), m["params"]["steps"]) for m in on_page] == [("params", None, 3)], on_page
    # the console says what the stream now expects, as for a start (a probe: only the reply did)
    assert any("now runs 3 steps; expect about " in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert [(m.get("elsewhere"), m["params"]["steps"]) for m in on_other] == [(True, 3)], on_other


def test_a_change_the_failed_pipeline_took_down_says_so_without_a_traceback(caplog):
    """A fault probe: a prompt change whose plan failed answered PATCH with the generic 500 and a
    traceback in the log, the stream frozen behind it. The stream is closed now (its session ends
    with the reason); the PATCH says 410 and why, the control socket an error with the same."""
    import logging

    from streamdiff.engine.types import StreamClosedError

    async def run():
        async with running_server() as (url, app):
            pub = await publish(url, "cam")
            sessions = sessions_of(app)

            async def closed_under_it(key, message):
                raise StreamClosedError("stream 'cam' was closed: pipeline stage failed (boom); start the stream again")

            sessions.apply_change = closed_under_it
            async with aiohttp.ClientSession() as http:
                async with http.patch(f"{url}/sessions/cam/params", json={"prompt": "x"}, headers=auth()) as resp:
                    patched = (resp.status, await resp.json())
                async with http.ws_connect(f"{url}/ws?session=cam", headers=auth()) as ws:
                    await ws.send_json({"type": "params", "prompt": "y"})
                    while (reply := await ws.receive_json(timeout=30))["type"] == "stats":
                        pass
            await pub.close()
            return patched, reply

    with caplog.at_level(logging.ERROR, logger="streamdiff.server.control"):
        patched, reply = asyncio.run(run())
    assert patched[0] == 410 and patched[1]["error"].startswith("the change was not applied: stream 'cam' was closed")
    assert reply["type"] == "error" and "start the stream again" in reply["error"], reply
    assert not [r for r in caplog.records if r.name == "streamdiff.server.control"]  # no traceback
