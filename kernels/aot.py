"""Compile the kernels for NVIDIA GPUs without one, and read facts off the machine code.

`python -m streamdiff.kernels.aot [--capability 90 80] [--json OUT]`

Owns: ahead-of-time compiles of the launchers' own calls at model shapes, and a report of
what the compiler made of each. The arguments come from each op's `kernel_args` on meta
tensors (shapes and strides, no memory) and are specialised as Triton's launcher specialises
them on a GPU (pointers and integers divisible by 16 marked so, integers equal to 1 made
constant). That matters: without the alignment marks the compiler cannot vectorise the loads
or pipeline the K/V loop, and reports a different kernel from the one that runs.

The report, per kernel, case and tile: shared memory, registers, local memory (spills), and
counts of the SASS instructions that decide speed:
  HGMMA   Hopper's warpgroup tensor-core MMA (wgmma); HMMA is the older per-warp MMA
  LDGSTS  asynchronous global->shared copies: the K/V loop is software-pipelined
  LDL/STL local-memory loads / stores: registers spilled
  LDG.128 / STG.128 / LDG / STG  16-byte global accesses, and all global accesses
Uses the ptxas and cuobjdump that ship inside Triton's NVIDIA backend; needs no GPU and no
CUDA driver. Does not own: timings (`streamdiff.bench.kernels`, GPU only) or correctness
(tests/kernels). Run it where TRITON_INTERPRET is unset: the interpreter replaces
triton.language in its process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

# Largest shared memory one block may take, by compute capability (CUDA programming guide).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
HEADS, HEAD_DIM, SLOTS = 12, 128, 6  # Wan 1.3B attention; a window of 3 sinks, 2 ring, the chunk
GRIDS = {1024: (32, 32), 1560: (30, 52)}  # latent-frame token grids at 512x512 and 832x480
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Report:
    kernel: str
    case: str
    capability: int
    config: dict
    shared: int = 0  # bytes of shared memory per block
    registers: int = 0  # per thread
    local: int = 0  # bytes of local memory per thread: the stack frame (spills) and local arrays
    sass: dict = field(default_factory=dict)  # instruction counts, see the module docstring
    error: str | None = None


# ---------------------------------------------------------------------------------- compiling


def _tools_dir() -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec("triton.backends.nvidia").origin), "bin")


def available() -> bool:
    """Triton's NVIDIA backend and its bundled ptxas / cuobjdump are here."""
    if importlib.util.find_spec("triton") is None:
        return False
    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return False
    return all(os.path.exists(os.path.join(_tools_dir(), tool)) for tool in ("ptxas", "cuobjdump"))


def _source(fn, args: tuple, constexprs: dict):
    """An ASTSource for `fn` called with runtime `args` (in order) and `constexprs`, specialised
    as the launcher would specialise those values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend  # the NVIDIA backend inherits these rules
    from triton.compiler import ASTSource

    runtime = [name for name in fn.arg_names if name not in constexprs]
    if len(runtime) != len(args):
        raise ValueError(f"{fn.__name__} takes {len(runtime)} runtime arguments, got {len(args)}")
    consts, signature, attrs = dict(constexprs), {}, {}
    for name, value in zip(runtime, args):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":  # an integer equal to 1
            consts[name] = spec
            continue
        signature[name] = kind
        if spec == "D":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in consts})
    return ASTSource(fn, {name: signature[name] for name in fn.arg_names}, consts, attrs)


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)


def sass_counts(sass: str) -> dict:
    """Counts of the instructions the report names, from `cuobjdump -sass` text."""
    ops = _OPCODE.findall(sass)

    def count(pred) -> int:
        return sum(1 for op in ops if pred(op))

    return {
        "HGMMA": count(lambda op: op.startswith("HGMMA")),
        "HMMA": count(lambda op: op.startswith("HMMA")),
        "LDGSTS": count(lambda op: op.startswith("LDGSTS")),
        "LDL": count(lambda op: op.startswith("LDL")),
        "STL": count(lambda op: op.startswith("STL")),
        "LDG.128": count(lambda op: op.startswith("LDG.") and op.endswith(".128")),
        "STG.128": count(lambda op: op.startswith("STG.") and op.endswith(".128")),
        "LDG": count(lambda op: op.split(".")[0] == "LDG"),
        "STG": count(lambda op: op.split(".")[0] == "STG"),
    }


def compile_report(kernel: str, case: str, fn, args: tuple, constexprs: dict, capability: int,
                   num_warps: int, num_stages: int) -> Report:
    """Compile one launch for `capability` and read its resources and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget

    config = dict(constexprs=_tile(constexprs), num_warps=num_warps, num_stages=num_stages)
    report = Report(kernel, case, capability, config)
    try:
        compiled = triton.compile(_source(fn, args, constexprs), target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as exc:  # reported per case: one tile that does not compile is a finding
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return report
    report.shared = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(_tools_dir(), "cuobjdump")
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    found = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    report.registers = found.get("REG", 0)
    report.local = found.get("STACK", 0) + found.get("LOCAL", 0)
    report.sass = sass_counts(sass)
    return report


def _tile(constexprs: dict) -> dict:
    return {k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T") if k in constexprs}


# ---------------------------------------------------------------------------------- the cases


def _meta(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def attention_reports(capability: int) -> list[Report]:
    """sink_window_attention at Wan 1.3B shapes, every GPU tile candidate, one row of 6 slots."""
    from streamdiff.kernels import sink_window_attention as op

    fn = op._kernel()
    reports = []
    cases = [(tokens, torch.bfloat16, HEAD_DIM) for tokens in GRIDS] + [
        (1560, torch.float16, HEAD_DIM), (1560, torch.bfloat16, 64),
        (20, torch.float32, 32),  # what the fp32 kernel tests compile on a GPU
    ]
    for tokens, dtype, head_dim in cases:
        q = _meta(1, tokens, HEADS, head_dim, dtype=dtype)  # [B, N, H, D]
        pool = _meta(SLOTS, tokens, HEADS, head_dim, dtype=dtype)  # [S, T, H, D]
        table = _meta(1, SLOTS, dtype=torch.int32)
        count = _meta(1, dtype=torch.int32)
        args, constexprs = op.kernel_args(q, pool, pool, table, count, torch.empty_like(q))
        for block_m, block_n, num_warps, num_stages in op.gpu_configs(head_dim, 10**9, 1):
            case = f"T={tokens} {DTYPE_NAMES[dtype]} D={head_dim}"
            tile = dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
            reports.append(compile_report("sink_window_attention", case, fn, args, tile, capability,
                                          num_warps, num_stages))
    return reports


def cache_write_reports(capability: int) -> list[Report]:
    """cache_write at Wan 1.3B shapes: one latent frame per row into a bf16 / fp16 pool."""
    from streamdiff.kernels import cache_write as op

    fn = op._kernel()
    reports = []
    split = (44, 42, 42)  # diffusers WanRotaryPosEmbed at head dim 128
    for tokens, grid in GRIDS.items():
        for dtype in (torch.bfloat16, torch.float16):
            k = _meta(2, tokens, HEADS, HEAD_DIM, dtype=dtype)  # [B, F*T, H, D]
            pool = _meta(2 * SLOTS, tokens, HEADS, HEAD_DIM, dtype=dtype)  # [S, T, H, D]
            slots = _meta(2, 1, dtype=torch.int32)
            pos = _meta(2, 1, dtype=torch.int64)
            freqs = _meta(1024, HEAD_DIM, dtype=torch.float32)  # [P, D]
            args, constexprs = op.kernel_args(k, k, pool, pool, slots, pos, freqs, freqs, split, grid)
            case = f"T={tokens} {DTYPE_NAMES[dtype]} D={HEAD_DIM}"
            reports.append(compile_report("cache_write", case, fn, args, dict(constexprs, BLOCK_T=64), capability,
                                          num_warps=4, num_stages=1))
    # an fp32 chunk into a bf16 pool at head dim 32 (the kernel tests' mixed-precision case)
    k = _meta(1, 20, 2, 32, dtype=torch.float32)
    pool = _meta(4, 20, 2, 32)
    freqs = _meta(64, 32, dtype=torch.float32)
    args, constexprs = op.kernel_args(k, k, pool, pool, _meta(1, 1, dtype=torch.int32), _meta(1, 1, dtype=torch.int64),
                                      freqs, freqs, (12, 10, 10), (4, 5))
    reports.append(compile_report("cache_write", "T=20 fp32->bf16 D=32", fn, args, dict(constexprs, BLOCK_T=16),
                                  capability, num_warps=4, num_stages=1))
    return reports


def all_reports(capabilities: list[int]) -> list[Report]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("streamdiff.kernels.aot compiles for the GPU: unset TRITON_INTERPRET")
    if not available():
        raise RuntimeError("Triton's NVIDIA backend with its bundled ptxas and cuobjdump is not installed here")
    reports = []
    for capability in capabilities:
        reports += attention_reports(capability) + cache_write_reports(capability)
    return reports


def format_table(reports: list[Report]) -> str:
    keys = ("HGMMA", "HMMA", "LDGSTS", "LDL", "STL", "LDG.128", "LDG", "STG.128", "STG")
    lines = [f"{'kernel':<22}{'sm':>3}  {'case':<23}{'tile':<22}{'smem KiB':>9}{'regs':>5}{'local':>6}  "
             + " ".join(f"{k:>7}" for k in keys)]
    for r in reports:
        tile = "x".join(str(v) for v in r.config["constexprs"].values())
        tile += f" w{r.config['num_warps']} s{r.config['num_stages']}"
        head = f"{r.kernel:<22}{r.capability:>3}  {r.case:<23}{tile:<22}"
        if r.error:
            lines.append(head + f"ERROR {r.error}")
            continue
        lines.append(head + f"{r.shared / 1024:>9.1f}{r.registers:>5}{r.local:>6}  "
                     + " ".join(f"{r.sass[k]:>7}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capability", type=int, nargs="+", default=[90, 80],
                        help="compute capabilities to compile for (90: H100 / H200, 80: A100)")
    parser.add_argument("--json", metavar="OUT", help="also write the reports as JSON ('-' for stdout only)")
    args = parser.parse_args(argv)
    try:
        reports = all_reports(args.capability)
    except RuntimeError as exc:
        print(f"streamdiff.kernels.aot: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps([asdict(r) for r in reports]))
        return 0
    print(format_table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
