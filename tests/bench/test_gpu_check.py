"""`streamdiff gpu-check` on CPU: the dry-run plan, the refusal without CUDA, and the budgeted
runner and its report driven by a fake executor and a fake clock."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from streamdiff.bench import gpu_check
from streamdiff.bench.gpu_check import (EST_BUILD_S, CudaParts, Part, gpu_test_files, markdown, plan_parts, run_check,
                                        schedule)
from streamdiff.cli import main


def test_parts_cover_the_matrix_headline_first():
    parts = plan_parts(5.0)
    bench = [(p.width, p.height, p.steps, p.streams, p.mode) for p in parts if p.kind == "bench" and not p.vae]
    assert len(bench) == len(set(bench)) == 2 * 4 * 2 * 3  # sizes x steps x streams x modes, each once
    assert bench[0] == (512, 512, 1, 1, "eager")
    assert [p.kind for p in parts].count("tests") == 1 and [p.kind for p in parts].count("kernels") == 1
    assert parts[1].kind == "tests"  # correctness right after the headline number
    firsts = {m: next(i for i, b in enumerate(bench) if b[4] == m) for m in ("eager", "compiled", "graphs")}
    assert firsts["eager"] < firsts["graphs"] < firsts["compiled"]  # capture costs seconds, compiling minutes


def test_the_vae_levers_run_on_the_captured_headline_before_the_compiled_dit():
    """The VAE is half the eager step (H200: encode 43 + decode 63 of 210 ms) and graphs capture
    only the DiT: TAEHV decoding and the compiled VAE are each measured once, on the headline
    (512x512, 1 step, 1 stream, graphs), before the minutes-long compiled DiT parts."""
    parts = plan_parts(5.0)
    names = [p.name for p in parts]
    variants = [p for p in parts if p.vae]
    assert sorted(p.vae for p in variants) == sorted(gpu_check.VAE_VARIANTS)
    assert all((p.width, p.height, p.steps, p.streams, p.mode) == (512, 512, 1, 1, "graphs") for p in variants)
    first_compiled = names.index("bench 512x512 steps 1 streams 1 compiled")
    assert all(names.index(p.name) < first_compiled for p in variants)
    assert names.index("bench 512x512 steps 1 streams 1 graphs") < names.index(variants[0].name)
    compiled = next(p for p in variants if p.vae == "compiled")
    assert compiled.est_s > next(p for p in variants if p.vae == "taehv").est_s  # the compile is paid


def test_dry_run_prints_estimates_within_the_budget(capsys):
    assert main(["gpu-check", "--dry-run", "--budget-s", "600"]) == 0
    out = capsys.readouterr().out
    assert "bench 512x512 steps 1 streams 1 eager" in out.splitlines()[1]
    times = [float(t) for t in re.findall(r"done by\s+(\d+) s", out)]
    assert times == sorted(times) and 0 < times[-1] <= 600
    assert "skipped (budget)" in out
    scheduled = schedule(plan_parts(5.0), 600)
    assert len(times) == sum(fits for _, fits in scheduled)


def test_only_keeps_the_parts_named(capsys):
    assert main(["gpu-check", "--dry-run", "--only", "vae", "--only", "KERNEL"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 3 and "kernel bench" in lines[0] + lines[1] + lines[2]
    assert all("VAE" in line or "kernel" in line for line in lines)
    assert main(["gpu-check", "--dry-run", "--only", "nothing like it"]) == 2
    err = capsys.readouterr().err.strip()
    assert "matches no part" in err and "\n" not in err


def test_a_wrong_preset_or_setting_is_refused_before_the_gpu(capsys):
    """A CLI probe: `--config nope` and `--set foo=1` passed --dry-run and would have failed inside
    every part on the lent GPU."""
    assert main(["gpu-check", "--dry-run", "--set", "foo=1"]) == 2
    assert "foo" in capsys.readouterr().err
    assert main(["gpu-check", "--dry-run", "--config", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_exit_status_says_whether_every_part_ran(tmp_path, monkeypatch, capsys):
    """Exit 1 when a part failed or timed out (it was always 0); parts the budget skipped are not failures."""
    import streamdiff.bench.gpu_check as gpu_check

    class NoGpu:
        def __init__(self, *args):
            pass

        def header(self):
            return {}

    statuses = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "CudaParts", NoGpu)
    monkeypatch.setattr(gpu_check, "run_check", lambda parts, budget, out, execute, header: {
        "elapsed_s": 1.0, "parts": [{"part": p.name, "status": s} for p, s in zip(parts, statuses)]})
    for said, rc in ((["ok", "skipped"], 0), (["ok", "failed"], 1), (["timed out", "ok"], 1)):
        statuses[:] = said
        assert main(["gpu-check", "--out", str(tmp_path), "--only", "kernel", "--only", "VAE"]) == rc
        out = capsys.readouterr().out
        assert ("not ok:" in out) == (rc == 1), out


def test_without_cuda_it_refuses_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["gpu-check", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamdiff: error:") and "CUDA" in err and "\n" not in err


def test_the_gpu_tests_are_collected_from_their_own_files_alone(tmp_path):
    """A GPU image without aiortc / av must still run the gpu tests: pytest gets only the files
    that hold them, so the server's tests are never imported."""
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "test_offer.py").write_text("import aiortc_missing\n\ndef test_offer():\n    pass\n")
    (tmp_path / "kernels").mkdir()
    marked = tmp_path / "kernels" / "test_attention.py"
    marked.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_bf16():\n    pass\n")
    (tmp_path / "test_whole_module.py").write_text("import pytest\n\npytestmark = pytest.mark.gpu\n")
    assert gpu_test_files(tmp_path) == sorted([marked, tmp_path / "test_whole_module.py"])
    real = {f.as_posix() for f in gpu_test_files(Path(__file__).parents[1])}
    assert any(f.endswith("tests/kernels/test_sink_window_attention.py") for f in real)
    assert not any("/server/" in f for f in real)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _result(fps):
    return {"fps": fps, "fps_per_stream": fps, "ttff_s": 0.4, "chunk_latency_ms": {"p50": 150.0}, "mfu": 0.3,
            "host_ms_per_step": 1.5, "peak_memory_mb": 10240.0, "planned_peak_mb": 9216.0,
            "compile": {"graph_breaks": 0, "recompiles": 0, "compile_s": 42.0}}


def test_runner_keeps_to_the_budget_and_reports(tmp_path):
    clock = FakeClock()
    parts = [Part("bench", 20, 512, 512, 1, 1, "eager"), Part("tests", 100), Part("bench", 140, 512, 512, 1, 1, "compiled"),
             Part("bench", 20, 832, 480, 1, 1, "eager"), Part("bench", 20, 832, 480, 2, 1, "eager"),
             Part("bench", 140, 832, 480, 1, 1, "compiled")]
    ran = []

    allowed = {}

    def execute(part, left_s):
        ran.append(part.name)
        allowed[part.kind] = left_s
        clock.now += {"tests": 130, "bench": 30 if part.mode == "eager" else 150}[part.kind] + (
            EST_BUILD_S if len(ran) == 1 else 0)
        if part.kind == "tests":
            raise RuntimeError("pytest crashed")
        return {"status": "ok", "result": _result(30.0 if part.width == 512 else 20.0)}

    budget = EST_BUILD_S + 20 + 100 + 140 + 20  # by the estimates, the first compiled part would fit
    report = run_check(parts, budget, tmp_path, execute, {"config": "wan-1.3b", "device": "NVIDIA H100"}, clock,
                       progress=lambda _: None)
    status = [e["status"] for e in report["parts"]]
    assert status[:2] == ["ok", "failed"] and "pytest crashed" in report["parts"][1]["error"]
    # The tests ran 30 s over their estimate: the compiled part no longer fits, the shorter
    # eager parts after it still do, the last compiled part does not.
    assert status[2:] == ["skipped", "ok", "ok", "skipped"]
    assert len(ran) == 4 and report["parts"][2]["reason"].startswith("budget")
    assert allowed["tests"] == 1.5 * 100  # killed at 1.5 times its estimate, though more budget was left
    on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
    assert on_disk["parts"] == json.loads(json.dumps(report["parts"]))
    md = (tmp_path / "gpu-check.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 512x512 | 1 | 1 | eager |"))
    assert "| 30.00 |" in row and "| 26.21 |" in row  # ours beside StreamDiffusionV2's
    assert "| 10.0 (9.0) |" in row  # measured peak beside the memory plan
    assert "| 832x480 | 1 | 1 | eager | 20.00 | 20.00 | 20.47 |" in md
    assert "pytest crashed" in md and "Not run (budget)" in md
    assert "| 512x512 | 1 | 1 | compiled |" not in md and "skipped" not in md  # skipped parts are no table rows


def test_markdown_names_failures_and_leaves_sdv2_out_for_several_streams():
    report = {"budget_s": 600, "parts": [
        {"part": "x", "kind": "bench", "width": 512, "height": 512, "steps": 1, "streams": 4, "mode": "graphs",
         "status": "failed", "error": "RuntimeError: capture failed"},
        {"part": "y", "kind": "bench", "width": 512, "height": 512, "steps": 1, "streams": 4, "mode": "eager",
         "status": "ok", "result": dict(_result(60.0), compile=None, mfu=None)}]}
    md = markdown(report)
    assert "| 512x512 | 1 | 4 | graphs | failed: RuntimeError: capture failed" in md
    assert "| 512x512 | 1 | 4 | eager | 60.00 | 60.00 | - |" in md


def test_cuda_parts_run_a_bench_part_and_a_subprocess_part(tmp_path):
    """The executor behind a real check, on the CPU with the tiny preset (no CUDA needed by it)."""
    from streamdiff.bench.gpu_check import CudaParts

    execute = CudaParts("tiny", 0.3, tmp_path, ("runtime.device=cpu",))
    header = execute.header()
    assert header["sdv2_one_h100_fps"]["512x512"][1] == 26.21
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = execute(Part("bench", 1, 64, 48, 1, 1, "eager"), 100.0)
    finally:
        torch.set_num_threads(threads)
    assert out["status"] == "ok" and out["result"]["output_frames"] > 0 and "series" not in out["result"]
    own = execute.comps.vae
    torch.set_num_threads(1)
    try:  # a VAE variant: swapped in for its part only (TAEHV decoding; random weights like the rest)
        taehv = execute(Part("bench", 1, 64, 48, 1, 1, "eager", "taehv"), 100.0)
    finally:
        torch.set_num_threads(threads)
    assert taehv["status"] == "ok" and taehv["result"]["output_frames"] > 0
    assert execute.comps.vae is own and type(execute._vaes["taehv"][1]).__name__ == "HybridVAE"
    assert execute._vaes["taehv"][0].vae.decoder == "taehv"  # the part ran on its own config as well
    assert "| eager + VAE taehv |" in markdown({"budget_s": 1, "parts": [{**vars(Part("bench", 1, 64, 48, 1, 1, "eager",
                                                                                    "taehv")), "status": "ok",
                                                                         "result": _result(9.0)}]})
    if torch.cuda.is_available():
        return  # the kernel bench would run for real
    kernels = execute(Part("kernels", 1), 100.0)  # no CUDA here: the kernel bench says so and exits 0
    assert (tmp_path / "kernels.log").exists() and kernels["returncode"] == 0


def test_a_bench_part_that_overruns_the_budget_is_stopped_and_the_rest_go_on(tmp_path, monkeypatch):
    """A bench part runs in-process (an inductor compile of the 1.3B took over 105 s on an
    H200): at the end of what the budget has left it is stopped, recorded, and the check goes on."""
    import time

    parts = CudaParts("tiny", 1.0, tmp_path)
    calls = []

    def slow_bench(part):  # never returns by itself
        calls.append(part.mode)
        while part.mode == "compiled":
            time.sleep(0.01)
        return {"status": "ok", "result": _result(30.0)}

    monkeypatch.setattr(parts, "_bench", slow_bench)
    monkeypatch.setattr(gpu_check, "EST_BUILD_S", 0.0)
    plan = [Part("bench", 0.1, 512, 512, 1, 1, "compiled"), Part("bench", 0.1, 512, 512, 1, 1, "eager")]
    start = time.monotonic()
    report = run_check(plan, 0.5, tmp_path, parts, {"config": "tiny"}, progress=lambda _: None)
    assert time.monotonic() - start < 20  # not stuck in the first part
    first, second = report["parts"]
    assert first["status"] == "timed out" and "budget" in first["summary"]
    assert calls == ["compiled"] and second["status"] == "skipped"  # the check went on to its end
    assert "timed out: stopped at the budget" in (tmp_path / "gpu-check.md").read_text()


def test_a_part_that_ends_in_time_leaves_no_alarm_behind():
    """The budget's alarm is cancelled when a part ends before it: it must not stop a later part."""
    import signal
    import time

    before = signal.getsignal(signal.SIGALRM)
    with gpu_check.deadline(0.2):
        pass
    time.sleep(0.4)  # a PartTimeout here would stop whatever runs next
    assert signal.getsignal(signal.SIGALRM) is before


def test_subprocess_parts_run_compiled_and_report_their_exit_status(tmp_path, monkeypatch):
    """The gpu tests and the kernel bench run without TRITON_INTERPRET (inherited, it would run
    the interpreter and skip every compiled test), only the files with gpu tests, killed at the
    time given; a non-zero exit is a failed part, its last line the summary, stderr in the log."""
    import subprocess

    calls = []

    def fake_run(argv, **kwargs):
        calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, 1, "...F\n\n1 failed, 3 passed\n", "Traceback ...\n")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    out = CudaParts("tiny", 1.0, tmp_path)(Part("tests", 100), 150.0)
    (argv, kwargs), = calls
    assert "TRITON_INTERPRET" not in kwargs["env"] and kwargs["timeout"] == 150.0
    files = [str(f) for f in gpu_test_files(Path("tests"))]
    assert argv[1:] == ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    assert out["status"] == "failed" and out["returncode"] == 1 and out["summary"] == "1 failed, 3 passed"
    assert "Traceback" in (tmp_path / "gpu-tests.log").read_text()


def test_the_plan_pays_the_model_build_once_and_fills_the_budget_exactly():
    """--dry-run's plan is what run_check does: the model build before the first bench part only."""
    parts = [Part("bench", 20, 512, 512, 1, 1, "eager"), Part("tests", 100), Part("bench", 20, 832, 480, 1, 1, "eager")]
    assert [fits for _, fits in schedule(parts, EST_BUILD_S + 140)] == [True, True, True]
    assert [fits for _, fits in schedule(parts, EST_BUILD_S + 139)] == [True, True, False]
