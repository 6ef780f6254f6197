"""Device facts for `streamdiff bench`: the device's name, its peak FLOP/s for MFU, and peak
memory around a measurement.

Owns: the table of dense bf16 peaks and how peak memory is measured on CUDA and on CPU.
Does not own: any measurement loop (model.py).

Peak memory: on CUDA, torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats
(tensors only: weights, KV pool, activations; not the allocator's cached blocks). On CPU, the
peak resident set size (VmHWM) after a reset through /proc/self/clear_refs (Linux), or, where
the reset is refused, the process's lifetime peak from resource.getrusage (ru_maxrss).
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets; the first
# name contained in torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (get_device_name: "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"


def peak_tflops_for(name: str, device_type: str, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from); (None, reason) when unknown."""
    if override is not None:
        return override, "--peak-tflops"
    if device_type != "cuda":
        return None, "no peak for CPU (give --peak-tflops)"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"dense bf16 datasheet peak of {key}"
    return None, f"unknown GPU {name!r} (give --peak-tflops)"


def reset_peak_memory(device) -> str:
    """Start a peak-memory measurement; returns its kind (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM)
        return "cpu_peak_rss_since_reset"
    except OSError:
        return "cpu_process_lifetime_peak_rss"


def read_peak_memory_mb(device, kind: str) -> float:
    if kind == "cuda_max_memory_allocated":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if kind == "cpu_peak_rss_since_reset":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


__all__ = ["PEAK_BF16_TFLOPS", "device_name", "peak_tflops_for", "read_peak_memory_mb", "reset_peak_memory"]
