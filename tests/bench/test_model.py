"""`streamdiff bench` model mode on the tiny preset, through the CLI entry point in-process.

One short run (steps 1,2 x streams 1,2 at 64x48, 1 s each) writes the JSON and the plot that
most tests read; a second, shorter one checks the deadline and the MFU arithmetic. Values are
checked for consistency with each other and with the FLOP count, never against timings.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from streamdiff.cli import main
from streamdiff.config import load_config
from streamdiff.bench.device import peak_tflops_for
from streamdiff.bench.model import ModelBenchSettings, bench_config
from streamdiff.model.flops import dit_flops_per_step

DURATION_S = 1.0
BASE = ["bench", "--config", "tiny", "--resolution", "64x48", "--set", "runtime.device=cpu", "-q"]


def strict_json(path):
    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-CPU machine two OpenMP threads stall each other for
    seconds, which only makes the test slow (nothing here depends on speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench")
    argv = [*BASE, "--steps", "1,2", "--streams", "1,2", "--duration", str(DURATION_S), "--deadline-ms", "1e9",
            "--json", str(out / "r.json"), "--plot", str(out / "r.png")]
    assert main(argv) == 0
    return strict_json(out / "r.json"), out


def test_every_combination_is_reported(run):
    report, _ = run
    assert sorted((r["steps"], r["streams"]) for r in report["results"]) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert {r["resolution"] for r in report["results"]} == {"64x48"}


def test_run_facts(run):
    report, _ = run
    assert report["mode"] == "model" and report["config"] == "tiny" and report["weights"] == "random"
    assert report["command"].startswith("streamdiff bench --config tiny --resolution 64x48")
    assert "--steps 1,2" in report["command"]
    assert report["torch_version"] == torch.__version__
    assert report["device_type"] == "cpu" and report["device"].startswith("CPU")
    assert report["peak_tflops"] is None and report["duration_s"] == DURATION_S


def test_throughput_is_consistent_with_frames_and_window(run):
    for r in run[0]["results"]:
        assert r["fps"] > 0
        assert r["window_s"] >= DURATION_S
        assert r["fps"] == pytest.approx(r["output_frames"] / r["window_s"])
        # every measured step outputs one 4-frame chunk per stream (throughput feeding)
        assert r["output_frames"] == 4 * r["streams"] * r["measured_steps"]
        assert r["fps_per_stream"] * r["streams"] == pytest.approx(r["fps"])
        assert sum(r["fps_streams"]) == pytest.approx(r["fps"])
        assert len(r["series"]["times_s"]) == r["output_frames"]


def test_latency_quantiles_and_counts(run):
    for r in run[0]["results"]:
        chunk, frame = r["chunk_latency_ms"], r["frame_latency_ms"]
        assert chunk["count"] == r["streams"] * r["measured_steps"]
        assert frame["count"] == r["output_frames"]
        for s in (chunk, frame):
            assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        # a chunk's frames are pushed together: the frame latencies sit on the chunk latencies
        assert frame["p50"] == pytest.approx(chunk["p50"], rel=0.05)
        # the chunk passes `steps` engine steps before it leaves
        assert chunk["p50"] > (r["steps"] - 1) * min(r["step_ms"]["dit"], r["step_ms"]["total"])


def test_ttff_jitter_memory_and_deadline(run):
    for r in run[0]["results"]:
        assert r["ttff_s"] > 0 and len(r["ttff_streams_s"]) == r["streams"]
        assert r["ttff_max_s"] == max(r["ttff_streams_s"])
        assert r["ttff_s"] == pytest.approx(statistics.mean(r["ttff_streams_s"]))  # streams averaged
        assert r["jitter_ms"] >= 0 and math.isfinite(r["jitter_ms"])
        assert r["peak_memory_mb"] > 0
        assert r["peak_memory_kind"] in ("cpu_peak_rss_since_reset", "cpu_process_lifetime_peak_rss")
        assert r["deadline_ms"] == 1e9 and r["deadline_miss_rate"] == 0.0 and r["deadline_misses"] == 0


def test_flops_and_step_split(run):
    cfg = load_config("tiny")
    for r in run[0]["results"]:
        rows = r["streams"] * r["steps"]
        assert r["rows_per_forward"] == rows
        assert r["dit_flops_per_step"] == dit_flops_per_step(cfg, rows, 1, 64, 48, cfg.cache.window)
        assert r["dit_tflops_per_s"] > 0
        assert r["mfu"] is None and r["mfu_wall"] is None  # CPU, no --peak-tflops
        split = r["step_ms"]
        assert set(split) == {"total", "encode", "dit", "decode"}
        assert all(v > 0 for v in split.values())


def test_plot_is_a_png(run):
    png = (run[1] / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_tiny_deadline_misses_everything_and_peak_gives_mfu(tmp_path, capsys):
    out = tmp_path / "d.json"
    argv = [*BASE, "--steps", "1", "--duration", "0.5", "--deadline-ms", "0.001", "--peak-tflops", "0.5",
            "--json", str(out)]
    assert main(argv) == 0
    (r,) = strict_json(out)["results"]
    assert r["deadline_miss_rate"] == 1.0 and r["deadline_misses"] == r["output_frames"] > 0
    assert r["chunk_latency_ms"]["deadline_miss_rate"] == 1.0
    assert r["mfu"] == pytest.approx(r["dit_tflops_per_s"] / 0.5)
    assert 0 < r["mfu_wall"] < r["mfu"]  # the window also holds the VAE
    assert r["mfu_wall"] == pytest.approx(r["dit_flops_per_step"] * r["measured_steps"] / r["window_s"] / 1e12 / 0.5)
    table = capsys.readouterr().out
    assert "64x48" in table and "MFU %" in table


def test_the_measured_steps_attend_to_full_kv_windows(tmp_path, monkeypatch):
    """The steady warm-up waits for every lane of every stream (at 2 steps the second lane fills a
    chunk after the first): from the first measured step on, every row attends to a whole window."""
    import streamdiff.engine.core as engine_core
    import streamdiff.model.flops as flops

    measuring, filled = [], []
    tokens_per_frame = flops.tokens_per_frame

    class Core(engine_core.EngineCore):
        def step(self, *args, **kwargs):
            if measuring:
                filled.append({lane.filled for s in self.executor.runner.slots.streams.values() for lane in s.lanes})
            return super().step(*args, **kwargs)

    def measure(*args):  # the bench reads it just before its measurement starts
        measuring.append(True)
        return tokens_per_frame(*args)

    monkeypatch.setattr(engine_core, "EngineCore", Core)
    monkeypatch.setattr(flops, "tokens_per_frame", measure)
    assert main([*BASE, "--steps", "2", "--duration", "0.2", "--json", str(tmp_path / "r.json")]) == 0
    assert measuring == [True] and filled and filled[0] == {load_config("tiny").cache.window}, filled


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resolution", "500x500"], "multiples of 16"),
        (["--steps", "5"], "out of range [1, 4]"),
        (["--steps", "one"], "comma-separated list of integers"),
        (["--streams", "0"], "out of range"),
        (["--config", "wan-1.3b"], "--random-weights"),
        (["--size", "64x64"], "end-to-end mode only"),
        (["--url", "http://127.0.0.1:9", "--steps", "1"], "model-mode flag"),
    ],
)
def test_bad_flags_fail_with_one_line(argv, message, capsys):
    assert main(["bench", *argv, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamdiff: error:") and message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["--duration", "0"], ["--duration", "nan"], ["--duration", "inf"],
                                  ["--deadline-ms", "nan"], ["--peak-tflops", "-1"], ["--simulate", "--hop-ms", "-50"]])
def test_numbers_out_of_range_are_refused_by_the_parser(argv, capsys):
    """nan passed every `<= 0` check (a nan --duration failed after the warm-up, inf never ended)."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv, "-q"])
    assert exit_.value.code == 2 and f"argument {argv[-2]}: {argv[-1]!r} is not a number" in capsys.readouterr().err


def test_random_weights_forces_random_init_of_the_configured_architecture():
    cfg = bench_config(ModelBenchSettings(config="wan-1.3b", random_weights=True, dtype="float32"))
    assert cfg.weights.format == "random" and cfg.text.kind == "tiny"
    assert (cfg.model.num_layers, cfg.model.dim, cfg.model.text_dim, cfg.text.max_length) == (30, 1536, 4096, 512)
    assert cfg.model.dtype == "float32"
    with pytest.raises(FileNotFoundError, match="weights.transformer"):
        bench_config(ModelBenchSettings(config="wan-1.3b"))


def test_peak_table_lookup():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "cuda", None)[0] == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe", "cuda", None)[0] == 756.0
    assert peak_tflops_for("NVIDIA H200", "cuda", None)[0] == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", "cuda", None)[0] == 312.0
    assert peak_tflops_for("NVIDIA GeForce RTX 4090", "cuda", None)[0] is None
    assert peak_tflops_for("anything", "cpu", 2.5) == (2.5, "--peak-tflops")


def test_bench_from_a_shell_prints_its_table_and_no_profiler_lines():
    """The host time comes from torch's profiler, whose Kineto logs "USDT: profiler_start /
    profiler_stop" on stderr for every profiled call unless quietened before torch loads."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "streamdiff.cli", *BASE, "--steps", "1", "--streams", "1",
                             "--duration", "0.5"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "profiler_st" not in result.stderr and "USDT" not in result.stderr, result.stderr
    assert "64x48" in result.stdout


def _ctrl_c_on_call(n: int, real):
    """`real`, except that its n-th call raises KeyboardInterrupt (Ctrl-C at that moment)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper


def _interrupted_bench(argv: list[str], tmp_path, capsys):
    """Run the model bench (a Ctrl-C set up by the caller): it must exit 130; (its JSON report,
    what it printed)."""
    assert main([*BASE, *argv, "--deadline-ms", "1e9", "--json", str(tmp_path / "r.json")]) == 130
    return strict_json(tmp_path / "r.json"), capsys.readouterr()


def test_ctrl_c_reports_the_combinations_already_measured(tmp_path, capsys, monkeypatch):
    """A probe: Ctrl-C in a long model bench printed only "interrupted", after minutes of runs."""
    import streamdiff.bench.model as bench_model

    monkeypatch.setattr(bench_model, "run_combination", _ctrl_c_on_call(2, bench_model.run_combination))
    report, captured = _interrupted_bench(["--steps", "1,2", "--duration", "0.5"], tmp_path, capsys)
    assert report["interrupted"] and len(report["results"]) == 1 and report["combinations"] == 2
    assert "1 of 2 combinations measured" in captured.err and "steps" in captured.out


def test_ctrl_c_during_the_only_combination_reports_what_it_measured(tmp_path, capsys, monkeypatch):
    """A probe: Ctrl-C in a one-combination bench (`--duration 60`) printed only "interrupted"."""
    import streamdiff.model.flops as flops

    # called once per measured step, after the step: Ctrl-C during the third
    monkeypatch.setattr(flops, "dit_forward_flops", _ctrl_c_on_call(3, flops.dit_forward_flops))
    report, captured = _interrupted_bench(["--steps", "1", "--duration", "60"], tmp_path, capsys)
    (result,) = report["results"]
    assert report["interrupted"] and result["cut_short"] and result["measured_steps"] == 2
    assert 0 < result["window_s"] < 60 and result["output_frames"] > 0 and result["host_ms_per_step"] is None
    assert "1 of 1 combinations measured (above, the last for" in captured.err and "64x48" in captured.out


def test_ctrl_c_during_the_as_served_run_still_writes_what_was_measured(tmp_path, capsys, monkeypatch):
    """A CLI probe: Ctrl-C during the demo's as-served pass printed a bare "interrupted" and wrote
    no --json, though the one-process table was complete."""
    import streamdiff.bench.stages as stages

    monkeypatch.setattr(stages, "run_stages_bench", _ctrl_c_on_call(1, stages.run_stages_bench))
    argv = ["bench", "--config", "demo", "--resolution", "64x64", "--duration", "0.3", "-q", "--deadline-ms", "1e9",
            "--json", str(tmp_path / "r.json")]
    assert main(argv) == 130
    report = strict_json(tmp_path / "r.json")
    assert report["interrupted"] and len(report["results"]) == report["combinations"] == 1 and "served" not in report
    assert "interrupted during the as-served run: all 1 one-process combinations measured" in capsys.readouterr().err


def test_ctrl_c_just_after_a_measurement_keeps_it(tmp_path, capsys, monkeypatch):
    """A CLI probe: Ctrl-C while the finished combination's host time was profiled (after its bar
    reached the end, before its row) lost the measurement: the whole run when it was the only one."""
    from streamdiff.bench import modes

    monkeypatch.setattr(modes, "host_ms_per_step", _ctrl_c_on_call(1, modes.host_ms_per_step))
    report, captured = _interrupted_bench(["--steps", "1,2", "--duration", "0.5"], tmp_path, capsys)
    (result,) = report["results"]
    assert report["interrupted"] and not result["cut_short"] and result["host_ms_per_step"] is None
    assert 0.5 <= result["window_s"] and result["output_frames"] > 0
    assert "1 of 2 combinations measured" in captured.err and "64x48" in captured.out
