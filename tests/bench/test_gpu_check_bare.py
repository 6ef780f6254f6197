"""scripts/gpu-check-bare.sh's control flow on the CPU (DEVICE=cpu, no preflight): what a lease
would lose to a setup mistake shows here first. A `python3` on PATH is this interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check-bare.sh"


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "python3"  # a wrapper, not a link: a link to a venv's python leaves the venv
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k not in ("WHEELS", "PYTHONSAFEPATH")}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", DEVICE="cpu", PREFLIGHT="0", STREAMDIFF_COMMIT="test", **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=240, env=full)


def test_named_wheels_that_did_not_travel_stop_it_at_once(tmp_path):
    empty = tmp_path / "whl"
    empty.mkdir()
    done = _run(tmp_path, "560", str(tmp_path / "out"), WHEELS=str(empty))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "holds no .whl" in done.stdout
    assert "holds no .whl" in (tmp_path / "out" / "console.log").read_text()


def test_setup_and_startup_are_paid_out_of_the_budget(tmp_path):
    out = tmp_path / "out"
    done = _run(tmp_path, "560", str(out), "--only", "steps 1 streams 1 graphs", "--only", "kernel",
                "--only", "512x512 steps 1 streams 1 compiled")
    assert done.returncode == 0, done.stdout + done.stderr
    left, spent = map(int, re.search(r"gpu-check, budget (\d+) s of 560 \((\d+) s\)", done.stdout).groups())
    assert left <= 560 - 15  # the exit margin at least
    assert left + spent + 15 in (560, 561), done.stdout  # the setup's seconds (a clock tick apart) are paid too
    plan = re.search(rf"plan \(budget {left} s;", done.stdout)
    assert plan, done.stdout  # --dry-run on the CPU: the plan for what is left
    assert (out / "console.log").read_text().count("== done, rc 0") == 1


def test_a_missing_torch_is_said_in_the_console_log_after_earlier_runs(tmp_path):
    """stderr lands in OUT_DIR/console.log too (the record a lease leaves), appended to what an
    earlier run into the same folder wrote."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")  # an image whose python has no torch
    (bin_dir / "python3").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "console.log").write_text("== an earlier run\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(SCRIPT), "560", str(out)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    log = (out / "console.log").read_text()
    assert log.startswith("== an earlier run\n") and "cannot import torch and triton" in log, log
