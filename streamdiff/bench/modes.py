"""Step modes of `streamdiff bench` (eager / compiled / CUDA graphs) and the host time of a step.

Owns: which modes the flags ask for, switching the shared model between them for one
combination, the `compile` numbers of a combination,
and `host_ms_per_step`. Does not own: the measurement loop (model.py) or how a mode compiles
(streamdiff.model.dit_step.DiTStep: the same step object `runtime.compile` /
`runtime.cuda_graphs` give a server, rows padded to buckets).

compile (per combination, modes other than eager): `graph_breaks`, graph breaks traced while
this combination ran (warm-up included; 0 is the target); `recompiles`, graphs compiled during
the measured window (after warm-up: 0 in a steady state); `compile_s`, seconds dynamo spent
compiling for this combination; `graphs`, graphs compiled in all (mode graphs compiles
nothing: it captures the eager forward, `DiTStep`); `break_reasons`, the most frequent reasons.
Each combination starts from `torch._dynamo.reset()`, so the compile cost of every shape is
counted and dynamo's recompile limit is never reached across combinations.

host_ms_per_step (definition): a few extra steady steps after the measured window, each under
torch.profiler; per step, wall ms minus the ms the device is busy, median over the steps.
Device busy = the union of the intervals of CUDA kernels and copies (CUDA), or of the outermost
ATen ops and compiled-graph calls (CPU: the same thread, so "host" is the Python, scheduler and
bookkeeping between ops). The profiler adds its own overhead to the host part, so the figure
errs high.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from streamdiff.model.dit_step import STEP_MODES, CompileStats, DiTStep, compile_stats, graph_break_reasons

HOST_PROFILED_STEPS = 3


def modes_from_flags(compile: bool, cuda_graphs: bool) -> tuple[str, ...]:
    """eager always (the reference), then compiled and graphs when asked."""
    return ("eager",) + (("compiled",) if compile else ()) + (("graphs",) if cuda_graphs else ())


def check_modes(modes: tuple[str, ...], device: torch.device) -> None:
    for mode in modes:
        if mode not in STEP_MODES:
            raise ValueError(f"unknown step mode {mode!r} (known: {', '.join(STEP_MODES)})")
    if "graphs" in modes and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device (this run is on {device.type})")


def enter_mode(comps, mode: str) -> CompileStats:
    """Give the components the DiT step of `mode` for one combination (runners built after this
    pad rows into the scratch lane it needs); returns the stats snapshot to diff against."""
    if mode != "eager":
        torch._dynamo.reset()
    comps.step = DiTStep(comps.model, mode, comps.cfg.runtime.row_buckets)
    return compile_stats()


def compile_report(mode: str, start: CompileStats, before_measure: CompileStats, end: CompileStats) -> dict | None:
    if mode == "eager":
        return None
    total = end - start
    return {"graph_breaks": total.graph_breaks, "recompiles": (end - before_measure).graphs,
            "compile_s": round(total.compile_s, 3), "graphs": total.graphs,
            "break_reasons": graph_break_reasons() if total.graph_breaks else []}


def host_ms_per_step(step: Callable[[], None], device: torch.device, steps: int = HOST_PROFILED_STEPS) -> float:
    """Median over `steps` profiled calls of step(): wall ms - device-busy ms (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    host_ms = []
    for _ in range(steps):
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall_ms = (time.perf_counter() - t0) * 1000.0
        host_ms.append(max(wall_ms - device_busy_ms(prof.events(), device.type), 0.0))
    return statistics.median(host_ms)


def device_busy_ms(events, device_type: str) -> float:
    """Union of the busy intervals in a profiler event list (see the module docstring)."""
    spans = []
    for e in events:
        if device_type == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA:
                spans.append((e.time_range.start, e.time_range.end))
        elif _is_work(e.name) and not _has_work_ancestor(e):
            spans.append((e.time_range.start, e.time_range.end))
    busy_us, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy_us += end - max(start, reach)
            reach = end
    return busy_us / 1000.0


def _is_work(name: str) -> bool:
    return name.startswith("aten::") or name.startswith("## Call CompiledFxGraph")


def _has_work_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_work(parent.name):
            return True
        parent = parent.cpu_parent
    return False


__all__ = ["check_modes", "compile_report", "device_busy_ms", "enter_mode", "host_ms_per_step", "modes_from_flags"]
