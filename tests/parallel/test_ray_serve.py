"""`streamdiff serve --stages 2` as a user runs it (issue 16, item 9): Ray's start-up notices
are not shown, and SIGTERM stops it cleanly: no native stack dump, no Ray process left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(path: str) -> list[str]:
    """Command lines of live processes that mention `path` (Ray's session folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


def test_serve_with_stages_starts_quietly_and_sigterm_leaves_nothing_behind():
    ray_tmp = tempfile.mkdtemp(prefix="sdr", dir="/tmp")  # short: Ray's socket paths must fit
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONWARNINGS="ignore")
    port = _free_port()
    cmd = [sys.executable, "-m", "streamdiff.cli", "serve", "--config", "tiny", "--stages", "2", "--port", str(port),
           "--set", "video.width=64", "--set", "video.height=48", "--set", "runtime.device=cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        started = False
        deadline = time.monotonic() + 280
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if "StreamDiff serving" in line:
                started = True
                break
        assert started, proc.stderr.read() if proc.poll() is not None else "not serving within 280 s"
        assert _processes_under(ray_tmp), "the test cannot see Ray's processes"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), (proc.returncode, err)
    assert "SIGTERM received" not in err and "logging.cc" not in err, err  # no native stack dump
    # Ray's start-up notices are not the user's business; ours about tiny's random weights is
    warned = [line for line in err.splitlines() if "WARNING" in line and "random weights" not in line]
    assert not warned, err
    for _ in range(40):  # Ray's helpers exit within moments of the driver
        left = _processes_under(ray_tmp)
        if not left:
            break
        time.sleep(0.5)
    assert not left, left
