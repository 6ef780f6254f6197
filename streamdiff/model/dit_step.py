"""DiTStep: how one full-model DiT forward runs — eager, compiled, or as replayed CUDA graphs —
and what torch._dynamo reports about it.

Owns: the row-count buckets (a forward's rows are padded up to the next bucket so that a
compiled graph or a captured CUDA graph serves every count up to it), the compiled block
(`torch.compile(fullgraph=True, dynamic=False)` of `CausalWanModel.run_block`: one graph per
bucket, chunk size and cache-policy flags, no graph breaks), and, for `cuda_graphs`, one
`torch.cuda.CUDAGraph` per input signature captured over static input buffers and replayed after
copying the step's inputs into them.

Regional compilation: the blocks are compiled, not the whole forward. Every block has the same
code and shapes and gets its layer's weights, pool views and prompt K/V as arguments, so Dynamo
traces and inductor compiles one block once and every layer runs that graph: the compile time
does not grow with the depth (the whole 30-block forward of the 1.3B compiled for minutes, once per
bucket). The embeddings and the head (a few small ops) run eagerly around them.
Does not own: padding the rows' slot plans (pipeline/stream_state.py pads with the pool's
scratch lane, which no stream ever holds), the model, or the pool.

Why the pool needs no static copy: its tensors are allocated once and updated in place, so a
captured graph reads and writes the same memory on every replay. Anything that reallocates
them (a pipeline stage moving layers) must call `reset()`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from streamdiff.cache.kv_cache import AttnBatch, KVPool
from streamdiff.config import padded_rows

STEP_MODES = ("eager", "compiled", "graphs")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class DiTStep:
    def __init__(self, model: torch.nn.Module, mode: str = "eager", buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        if mode not in STEP_MODES:
            raise ValueError(f"unknown DiT step mode {mode!r} (known: {', '.join(STEP_MODES)})")
        if mode == "graphs" and next(model.parameters()).device.type != "cuda":
            raise ValueError("step mode 'graphs' (runtime.cuda_graphs) needs the model on a CUDA device")
        self.model = model
        self.mode = mode
        self.buckets = tuple(sorted(buckets))
        self._compiled = None
        if mode == "compiled":
            raise_recompile_limit(DIT_RECOMPILE_LIMIT)
            self._compiled = torch.compile(model.run_block, fullgraph=True, dynamic=False)
        self._graphs: dict[tuple, _Captured] = {}
        # One memory pool for every captured graph (as vLLM's per-batch-size graphs): each graph's
        # inputs and output stay its own (held tensors), its intermediates are free for the next
        # capture, and replays run one after another on one stream, each output cloned at once.
        # A pool per graph kept every graph's intermediates: 6.7 GiB for one 1.3B stream's graphs
        # at 512x512 on the H200, and the warm-up captures every bucket (engine/core.py).
        self._graph_pool = None

    @property
    def pads(self) -> bool:
        """Rows are padded to buckets (and the attention metadata kept at fixed widths)."""
        return self.mode != "eager"

    def bucket(self, rows: int) -> int:
        return padded_rows(rows, self.buckets)

    def reset(self) -> None:
        """Forget captured graphs (after the pool's tensors were reallocated)."""
        self._graphs.clear()
        self._graph_pool = None

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, cross: dict, batch: AttnBatch,
                 pool: KVPool) -> torch.Tensor:
        if self.mode == "eager":
            return self.model(x, timestep, cross, batch, pool)
        if self.mode == "compiled":
            return self.model(x, timestep, cross, batch, pool, self._compiled)
        key = _signature(x, timestep, cross, batch)
        captured = self._graphs.get(key)
        if captured is None:  # this call runs for real while the graph is made (see _Captured)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            captured = self._graphs[key] = _Captured(self.model, x, timestep, cross, batch, pool, self._graph_pool)
            return captured.first_out
        return captured.replay(x, timestep, cross, batch)


# One compiled block serves every bucket x chunk size x cache-policy flags (sdv2's choose and
# refresh test, rolling's swap) that a server meets, each a graph: more than Dynamo's default of 8
# for one function (steps 1-4 and 4 buckets already make 8), past which it would raise (fullgraph).
DIT_RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int) -> None:
    """Raise Dynamo's per-function recompile limit to `limit` (process-wide; only ever grows it)."""
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), limit))


def _signature(x, timestep, cross, batch: AttnBatch) -> tuple:
    flags = tuple(getattr(batch, f.name) for f in fields(batch) if not isinstance(getattr(batch, f.name), torch.Tensor))
    tensors = tuple(tuple(getattr(batch, f.name).shape) for f in fields(batch)
                    if isinstance(getattr(batch, f.name), torch.Tensor))
    first = next(iter(cross.values()))[0]
    return (tuple(x.shape), x.dtype, tuple(timestep.shape), tuple(first.shape), flags, tensors)


class _Captured:
    """One CUDA graph of the forward over static inputs (same shapes, flags, pool).

    The first call of a signature runs for real, eagerly, on the static buffers (on a side
    stream: allocator and kernel warm-up) and its output is that call's result; the graph is
    captured after it. Capturing records kernels without running them, so the pool is left
    exactly as the real step left it and needs no copy."""

    def __init__(self, model, x, timestep, cross, batch: AttnBatch, pool: KVPool, memory_pool=None):
        self.x, self.timestep = x.clone(), timestep.clone()
        self.cross = {layer: (k.contiguous().clone(), v.contiguous().clone()) for layer, (k, v) in cross.items()}
        self.batch = AttnBatch(**{f.name: (v.clone() if isinstance(v := getattr(batch, f.name), torch.Tensor) else v)
                                  for f in fields(batch)})
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.first_out = model(self.x, self.timestep, self.cross, self.batch, pool)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=memory_pool):
            self.out = model(self.x, self.timestep, self.cross, self.batch, pool)

    def replay(self, x, timestep, cross, batch: AttnBatch) -> torch.Tensor:
        self.x.copy_(x)
        self.timestep.copy_(timestep)
        for layer, (k, v) in cross.items():
            self.cross[layer][0].copy_(k)
            self.cross[layer][1].copy_(v)
        for f in fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, torch.Tensor):
                getattr(self.batch, f.name).copy_(value)
        self.graph.replay()
        return self.out.clone()


@dataclass(frozen=True)
class CompileStats:
    """Cumulative torch._dynamo / inductor counts of this process (subtract two snapshots)."""

    graph_breaks: int  # graph-break events while tracing (each one splits a graph)
    graphs: int  # graphs compiled (a recompilation adds one)
    compile_s: float  # seconds dynamo spent compiling frames (tracing + inductor)

    def __sub__(self, other: CompileStats) -> CompileStats:
        return CompileStats(self.graph_breaks - other.graph_breaks, self.graphs - other.graphs,
                            self.compile_s - other.compile_s)


def compile_stats() -> CompileStats:
    from torch._dynamo.utils import compilation_time_metrics, counters

    return CompileStats(
        graph_breaks=sum(counters["graph_break"].values()),
        graphs=counters["stats"]["unique_graphs"],
        compile_s=sum(compilation_time_metrics.get("_compile.compile_inner", [])),
    )


def graph_break_reasons(limit: int = 5) -> list[str]:
    """The most frequent graph-break reasons so far (for a report; empty when none)."""
    from torch._dynamo.utils import counters

    return [f"{n}x {reason.splitlines()[0][:200]}" for reason, n in counters["graph_break"].most_common(limit)]


__all__ = ["DEFAULT_BUCKETS", "DIT_RECOMPILE_LIMIT", "STEP_MODES", "CompileStats", "DiTStep", "compile_stats",
           "graph_break_reasons", "raise_recompile_limit"]
