"""How the DiT forward runs: eager, compiled with torch.compile, or compiled with CUDA graphs.

Owns: `set_step_mode(model, mode)` (the one call that switches a built CausalWanModel between
modes) and `compile_stats()` (what torch._dynamo reports: graph breaks, graphs compiled,
seconds spent compiling), read before and after a measurement to tell steady-state
recompilation from warm-up compilation.
Does not own: which mode a server runs (the runtime config, read by whoever builds the
model), bucketing rows to a fixed count, or static buffers for a hand-captured CUDA graph.

Modes:
- `eager`: plain PyTorch (the reference every other mode is compared with).
- `compiled`: `nn.Module.compile` of the whole forward (inductor, static shapes). Graph breaks
  are allowed (`fullgraph=False`) so that a forward with host reads still runs; the count of
  breaks is reported instead, and 0 is the target.
- `graphs`: the same with inductor's CUDA graphs (`mode="reduce-overhead"`); CUDA only. Each
  forward marks a new graph-tree step and copies its output out of the graph's memory.
  Inductor declines to capture a graph that mutates its inputs in place (the KV pool); it says
  so in `cudagraph_skips`, which `compile_stats` reports. (Untested here: no GPU yet; the
  `gpu`-marked bench test runs it.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STEP_MODES = ("eager", "compiled", "graphs")


def set_step_mode(model: torch.nn.Module, mode: str, fullgraph: bool = False) -> torch.nn.Module:
    """Switch `model`'s forward to `mode` in place (and return it). `eager` undoes a compile."""
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r} (known: {', '.join(STEP_MODES)})")
    model._compiled_call_impl = None  # nn.Module.compile's slot; None = eager
    if mode == "graphs":
        if next(model.parameters()).device.type != "cuda":
            raise ValueError("step mode 'graphs' (CUDA graphs) needs the model on a CUDA device")
        captured = torch.compile(model._call_impl, fullgraph=fullgraph, dynamic=False, mode="reduce-overhead")

        def replay(*args, **kwargs):
            # Each forward is a new step of inductor's graph trees; the output is copied out of
            # the graph's static memory, which the next replay overwrites (lanes keep flows).
            torch.compiler.cudagraph_mark_step_begin()
            return captured(*args, **kwargs).clone()

        model._compiled_call_impl = replay
    elif mode == "compiled":
        model.compile(fullgraph=fullgraph, dynamic=False)
    return model


@dataclass(frozen=True)
class CompileStats:
    """Cumulative torch._dynamo / inductor counts of this process (subtract two snapshots)."""

    graph_breaks: int  # graph-break events while tracing (each one splits a graph)
    graphs: int  # graphs compiled (a recompilation adds one)
    compile_s: float  # seconds dynamo spent compiling frames (tracing + inductor)
    cudagraph_skips: int  # graphs inductor ran without CUDA graphs

    def __sub__(self, other: CompileStats) -> CompileStats:
        return CompileStats(self.graph_breaks - other.graph_breaks, self.graphs - other.graphs,
                            self.compile_s - other.compile_s, self.cudagraph_skips - other.cudagraph_skips)


def compile_stats() -> CompileStats:
    from torch._dynamo.utils import compilation_time_metrics, counters

    return CompileStats(
        graph_breaks=sum(counters["graph_break"].values()),
        graphs=counters["stats"]["unique_graphs"],
        compile_s=sum(compilation_time_metrics.get("_compile.compile_inner", [])),
        cudagraph_skips=sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)),
    )


def graph_break_reasons(limit: int = 5) -> list[str]:
    """The most frequent graph-break reasons so far (for a report; empty when none)."""
    from torch._dynamo.utils import counters

    return [f"{n}x {reason.splitlines()[0][:200]}" for reason, n in counters["graph_break"].most_common(limit)]


__all__ = ["STEP_MODES", "CompileStats", "compile_stats", "graph_break_reasons", "set_step_mode"]
