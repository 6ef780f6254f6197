"""What `streamdiff serve` prints at start-up (issue 16, items 2 and 4): the measured step time
and the fps one stream can expect, the preset's service level, and a viewer URL that carries
the token when one is set."""

from __future__ import annotations

from streamdiff.config import load_config
from streamdiff.server.app import ServerSettings, startup_lines


def test_startup_lines_show_the_measured_step_the_expectation_and_a_working_viewer_url():
    cfg = load_config("tiny")
    lines = startup_lines(cfg, ServerSettings(token="s3cret"), "127.0.0.1", 8011, (412.0, 9.7, 1650.0))
    text = "\n".join(lines)
    assert "measured step 412 ms" in text and "about 9.7 fps" in text and "1650 ms latency" in text
    assert "service level 2 fps, 8000 ms" in text  # the preset's own, no flags given
    assert "viewer http://127.0.0.1:8011/viewer.html?key=<key>&token=s3cret" in text
    # that link controls every stream; the console says which link plays one stream and nothing else
    assert "to share one stream, use its play-only link" in text and "`watch` in /sessions" in text
    assert "http://127.0.0.1:8011/?token=s3cret" in text
    plain = "\n".join(startup_lines(cfg, ServerSettings(target_fps=5.0), "127.0.0.1", 8000, (100.0, 30.0, 300.0)))
    assert "token" not in plain and "service level 5 fps" in plain
    # a probe: on the network without a token any Host is answered; the console says what that opens
    lan = "\n".join(startup_lines(cfg, ServerSettings(), "0.0.0.0", 8000, (100.0, 30.0, 300.0)))
    assert "no --token: anyone who can reach port 8000" in lan and "DNS rebinding" in lan, lan
    assert "no --token" not in "\n".join(startup_lines(cfg, ServerSettings(token="t"), "0.0.0.0", 8000,
                                                         (100.0, 30.0, 300.0)))
    # a probe: `--host ::1` printed http://::1:8000/, which no browser opens
    v6 = "\n".join(startup_lines(cfg, ServerSettings(), "::1", 8000, (100.0, 30.0, 300.0)))
    assert "on http://[::1]:8000/" in v6 and "viewer http://[::1]:8000/viewer.html" in v6


SIGNALS_PROBE = """
import asyncio, os, signal, sys
from aiohttp import web
from streamdiff.server.app import _stop_on_signals

async def serving():
    await _stop_on_signals(None)
    os.kill(os.getpid(), signal.SIGTERM if sys.argv[1] in ("echo", "late") else signal.SIGINT)
    await asyncio.sleep(5)
    print("not stopped", flush=True)

async def cleanup():  # as aiohttp's run_app runs its cleanup after the first signal
    if sys.argv[1] in ("twice", "echo"):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while the stop is under way
    if sys.argv[1] == "late":
        await asyncio.sleep(1.2)
        os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(1)
    print("finished", flush=True)

loop = asyncio.new_event_loop()
try:
    loop.run_until_complete(serving())
except web.GracefulExit:
    print("graceful", flush=True)
loop.run_until_complete(cleanup())
"""


def test_a_second_signal_during_the_graceful_stop_ends_the_server_at_once():
    """Found by pressing Ctrl-C twice: aiohttp's handlers stayed installed through its cleanup, so
    the second one raised wherever the server was (exit 1 or -2 and nothing said; once a C++ abort
    from a codec thread). Now the first starts a graceful stop and says so, a second exits 130."""
    import subprocess
    import sys

    # (side by side: each child spends most of its time importing the server)
    cases = ("once", "twice", "echo", "late")
    children = {case: subprocess.Popen([sys.executable, "-c", SIGNALS_PROBE, case], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for case in cases}
    done = {case: child.communicate(timeout=60) for case, child in children.items()}
    once, twice, echo, late = (subprocess.CompletedProcess(children[case].args, children[case].returncode,
                                                           *done[case]) for case in cases)
    assert once.returncode == 0 and once.stdout.split() == ["graceful", "finished"], (once.stdout, once.stderr)
    assert "SIGINT: stopping" in once.stderr and "Ctrl-C again" in once.stderr, once.stderr
    assert twice.returncode == 130 and twice.stdout.split() == ["graceful"], (twice.returncode, twice.stdout)
    assert twice.stderr.strip().endswith("streamdiff: interrupted"), twice.stderr
    # An install probe: `timeout 12 make run` sometimes skipped the graceful stop. One SIGTERM came
    # twice (timeout signals its process group, and make passes SIGTERM on to its child): a second
    # SIGTERM within a second of the first is the same request; a later one still ends at once.
    assert echo.returncode == 0 and echo.stdout.split() == ["graceful", "finished"], (echo.stdout, echo.stderr)
    assert echo.stderr.count("SIGTERM: stopping") == 1, echo.stderr
    assert late.returncode == 130 and late.stdout.split() == ["graceful"], (late.returncode, late.stdout)
