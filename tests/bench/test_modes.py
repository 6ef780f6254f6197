"""Step modes of `streamdiff bench` (--compile, --cuda-graphs) and host_ms_per_step."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from streamdiff.bench.modes import check_modes, device_busy_ms, host_ms_per_step, modes_from_flags
from streamdiff.cli import main
from streamdiff.model.dit_step import CompileStats, DiTStep

ONE_LAYER = ["--config", "tiny", "--resolution", "64x48", "--set", "runtime.device=cpu", "--set", "model.num_layers=1", "--steps", "1",
             "--streams", "1", "-q"]


def _event(name, start, end, parent=None, device_type=torch.autograd.DeviceType.CPU):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), cpu_parent=parent,
                           device_type=device_type)


def test_device_busy_is_the_union_of_outermost_work():
    region = _event("Torch-Compiled Region: 0/0", 0, 1000)  # not work itself: Python runs inside
    mm = _event("aten::mm", 100, 400, region)
    inner = _event("aten::copy_", 150, 300, mm)  # inside mm: not counted twice
    graph = _event("## Call CompiledFxGraph abc ##", 350, 600, region)  # overlaps mm by 50
    kernel_in_graph = _event("aten::addmm", 400, 500, graph)
    later = _event("aten::add", 800, 900)
    events = [region, mm, inner, graph, kernel_in_graph, later]
    assert device_busy_ms(events, "cpu") == pytest.approx((600 - 100 + 100) / 1000.0)


def test_device_busy_on_cuda_counts_device_events_only():
    cuda = torch.autograd.DeviceType.CUDA
    events = [_event("aten::mm", 0, 1000), _event("gemm_kernel", 100, 300, device_type=cuda),
              _event("elementwise", 250, 400, device_type=cuda), _event("memcpy", 900, 950, device_type=cuda)]
    assert device_busy_ms(events, "cuda") == pytest.approx(0.35)


def test_host_ms_counts_python_time_not_op_time():
    a = torch.randn(256, 256)

    def step():
        time.sleep(0.05)  # host: no op runs
        for _ in range(20):
            a @ a  # device work (the CPU "device")

    host = host_ms_per_step(step, torch.device("cpu"), steps=1)
    assert host >= 45.0  # the sleep is never counted as device work

    def busy_only():
        for _ in range(50):
            a @ a

    t0 = time.perf_counter()
    busy_only()
    assert host_ms_per_step(busy_only, torch.device("cpu"), steps=1) < (time.perf_counter() - t0) * 1000.0 + 45.0


def test_modes_from_flags_and_checks():
    assert modes_from_flags(False, False) == ("eager",)
    assert modes_from_flags(True, True) == ("eager", "compiled", "graphs")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_modes(("eager", "graphs"), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown step mode"):
        check_modes(("fast",), torch.device("cpu"))


class _OneBlock(torch.nn.Linear):
    """What DiTStep needs of a model: parameters and a `run_block` to compile."""

    def run_block(self, block, pool, x, *rest):
        return block(x)


def test_step_modes_and_stats_arithmetic():
    model = _OneBlock(4, 4)
    assert DiTStep(model, "compiled").pads and not DiTStep(model, "eager").pads
    assert DiTStep(model, "compiled", (1, 4, 16)).bucket(5) == 16 and DiTStep(model, "eager", (2,)).bucket(3) == 3
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        DiTStep(model, "graphs")
    with pytest.raises(ValueError, match="unknown DiT step mode"):
        DiTStep(model, "fast")
    assert CompileStats(3, 5, 2.0) - CompileStats(1, 2, 0.5) == CompileStats(2, 3, 1.5)


def test_cuda_graphs_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", *ONE_LAYER, "--duration", "0.1", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamdiff: error:") and "CUDA" in err and "\n" not in err


def test_compile_with_simulate_is_refused(capsys):
    assert main(["bench", "--simulate", "--compile"]) == 2
    assert "--compile" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_compile_reports_both_modes_side_by_side(tmp_path):
    """The compiled DiT runs through the engine on CPU; the JSON holds both modes' numbers."""
    out = tmp_path / "r.json"
    # (0.2 s: a few steady steps a mode)
    assert main(["bench", *ONE_LAYER, "--duration", "0.2", "--compile", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["modes"] == ["eager", "compiled"]
    eager, compiled = report["results"]
    assert (eager["mode"], compiled["mode"]) == ("eager", "compiled")
    assert eager["compile"] is None and eager["host_ms_per_step"] >= 0.0
    c = compiled["compile"]
    assert c["graphs"] >= 1 and c["compile_s"] > 0.0
    assert c["recompiles"] == 0  # nothing compiles once the lanes are full
    assert (c["graph_breaks"] > 0) == bool(c["break_reasons"])  # a reason for every run with breaks
    assert compiled["output_frames"] > 0 and compiled["host_ms_per_step"] >= 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bench_all_modes(tmp_path):
    out = tmp_path / "r.json"
    argv = ["bench", "--config", "tiny", "--resolution", "256x256", "--steps", "1", "--streams", "1", "-q",
            "--duration", "1", "--compile", "--cuda-graphs", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["eager", "compiled", "graphs"]
    assert all(r["output_frames"] > 0 and r["host_ms_per_step"] >= 0.0 for r in report["results"])
    assert report["results"][2]["compile"]["recompiles"] == 0
